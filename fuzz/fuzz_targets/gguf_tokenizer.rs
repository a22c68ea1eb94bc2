//! The tokenizer strata rebuilds from GGUF metadata: tokens, merges, token types and the
//! pre-tokenizer name as a GGUF could hold them, then a text encoded and decoded.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| strata::testing::fuzz::gguf_tokenizer(data));
