//! Training data: chat JSONL rendered through a chat template (the input's first part) with
//! loss on assistant turns, and text JSONL tokenized and packed.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| strata::testing::fuzz::data(data));
