//! A checkpoint (state.json, trainable.safetensors, optimizer.safetensors) read and checked
//! against a run of 5 steps of 4 rows over 10 domain and 4 general rows, as a resume does.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| strata::testing::fuzz::checkpoint(data));
