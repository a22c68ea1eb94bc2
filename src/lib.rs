//! strata: layered LoRA / QLoRA fine-tuning and continual pretraining of decoder-only LLMs on
//! candle, built so that a model learns a new domain without forgetting what it knew.
//!
//! The crate is laid out as DESIGN.md describes: `model` (config, decoder, loaders, tokenizer),
//! `ops` (differentiable kernels), `adapter` (LoRA, plans, PEFT files, merging), `train` (the
//! loop and its parts), `data` (corpora and packing), `eval` (metrics), `cli` (subcommands).

pub mod adapter;
pub mod cli;
pub mod data;
pub mod engine;
pub mod eval;
pub mod model;
pub mod ops;
pub mod quant;
pub mod retain;
pub mod rng;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod train;
pub mod util;
