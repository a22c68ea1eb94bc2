//! A Hugging Face model directory: config.json, tokenizer.json, model.safetensors (or a shard
//! index and its shard); for directories that open, every tensor loaded.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| strata::testing::fuzz::hf_dir(data));
