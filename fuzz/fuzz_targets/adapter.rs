//! A PEFT adapter directory (adapter_config.json, adapter_model.safetensors) loaded onto the
//! tiny two-layer model, then merged.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| strata::testing::fuzz::adapter(data));
