//! Evaluation: perplexity and next-token accuracy on packed text.

pub mod perplexity;

pub use perplexity::{eval_sequences, TextMetrics};
