//! Evaluation: perplexity and next-token accuracy on text, multiple-choice accuracy, and
//! before/after comparisons (forgetting rate, domain gain) with bootstrap intervals.

pub mod compare;
pub mod mc;
pub mod perplexity;
pub mod report;

pub use perplexity::{eval_sequences, eval_sequences_on, TextMetrics};
