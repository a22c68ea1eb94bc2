//! A GGUF file: header, metadata, configuration, vocabulary and tensor table checked as
//! `strata::model::open` checks them; then, for files that pass, every tensor loaded
//! (dequantized, and as stored), as a training run would. The tokenizer built from the
//! vocabulary has a target of its own (`gguf_tokenizer`), which keeps this one fast.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| strata::testing::fuzz::gguf(data));
