//! A recipe: TOML parsed and checked, then planned for a four-layer model (adapter plan, base
//! precisions, schedules evaluated over the run).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| strata::testing::fuzz::recipe(data));
