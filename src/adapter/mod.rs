//! LoRA adapters: the per-layer plan, attaching adapters to a model, PEFT directories, merging
//! and llama.cpp LoRA files. (The adapter weights themselves, [`Lora`], are part of the model.)

pub mod llama_lora;
pub mod merge;
pub mod peft;
pub mod plan;

pub use plan::{LoraPlan, PlanRule};
