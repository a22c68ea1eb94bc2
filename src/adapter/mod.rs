//! LoRA adapters: the layer, the per-layer plan, PEFT directories and merging.

pub mod llama_lora;
pub mod lora;
pub mod merge;
pub mod peft;
pub mod plan;

pub use lora::Lora;
pub use plan::{LoraPlan, PlanRule};
