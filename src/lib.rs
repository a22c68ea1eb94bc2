//! strata: layered LoRA / QLoRA fine-tuning and continual pretraining of decoder-only LLMs on
//! candle, built so that a model learns a new domain without forgetting what it knew.
//!
//! # Layers
//!
//! Modules import only downward (`tests/layers.rs` holds the code to it):
//!
//! | layer | modules | what they are |
//! |---|---|---|
//! | 7 | [`cli`] | one file per subcommand; the benchmarks' synthetic models and policies |
//! | 6 | [`train`] | recipes and their typed plan, the run in phases, schedules, callbacks, checkpoints, the memory plan |
//! | 5 | [`retain`] | Fisher information, EWC, the contrastive loss |
//! | 4 | [`engine`], [`eval`] | one step's forward, backward and AdamW; perplexity, multiple choice, comparisons, reports |
//! | 3 | [`adapter`], [`data`] | LoRA plans, PEFT files, merging; corpora, packing, chat templates, the mixer |
//! | 2 | [`model`] | config, the tensor-name table, the decoder, GGUF and Hugging Face loaders, tokenizers |
//! | 1 | [`ops`] | differentiable kernels with hand-written backwards |
//! | 0 | [`quant`], [`rng`], [`util`], [`fsio`], [`progress`], [`dist`] | NF4, the seeded RNG, atomic writes and memory readings, capped reads of untrusted files, progress bars, data parallelism's collectives |
//!
//! Where to look first: a training step is [`engine::step`]; the base precisions are
//! [`model::precision`]; every Hugging Face and GGUF tensor name is in [`model::names`]; a whole
//! run, phase by phase, is [`train::trainer`].

pub mod adapter;
pub mod cli;
pub mod data;
pub mod dist;
pub mod engine;
pub mod eval;
pub mod fsio;
pub mod model;
pub mod ops;
pub mod progress;
pub mod quant;
pub mod retain;
pub mod rng;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod train;
pub mod util;
