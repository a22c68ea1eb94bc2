//! Models: configuration, the decoder, weight loading (GGUF, Hugging Face) and tokenizers.

pub mod config;
pub mod decoder;
pub mod generate;
pub mod gguf;
pub mod gguf_read;
pub mod hf;
pub mod lora;
pub mod names;
pub mod precision;
pub mod source;
pub mod tokenizer;

pub use config::{Arch, ModelConfig};
pub use decoder::{Block, BlockState, Fwd, KvCache, Linear, LinearWeight, LoadSpec, Model, Param};
pub use lora::{Lora, ModuleLora};
pub use names::{BaseTensor, PerProj, Proj, MODULES, SAVABLE};
pub use precision::BaseDtype;
pub use source::{open, ModelSource, WeightSource};
