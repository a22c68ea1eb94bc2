//! Where a model comes from: a GGUF file or a Hugging Face directory, behind one interface.

use anyhow::{bail, Result};
use candle_core::Tensor;
use std::path::{Path, PathBuf};

use super::config::ModelConfig;
use super::tokenizer::Tok;

/// Named tensors in Hugging Face naming (`model.layers.0.self_attn.q_proj.weight` ...).
pub trait WeightSource {
    /// The tensor `name` in its stored precision, dequantized if quantized, on the CPU.
    fn get(&self, name: &str) -> Result<Tensor>;
    /// Names of every tensor available.
    fn names(&self) -> Vec<String>;
    /// Storage type of `name` as stored in the file (for `inspect`).
    fn stored_type(&self, name: &str) -> Option<String>;
    /// A short description of the file for error messages.
    fn describe(&self) -> String;
    /// The tensor `name` in its stored quantization, when the file holds it quantized (GGUF
    /// Q4_0/Q4_1/Q8_0/K-quants); `None` for float tensors and for sources without quantization.
    fn get_quant(&self, _name: &str) -> Result<Option<candle_core::quantized::QTensor>> {
        Ok(None)
    }
    /// Bytes of the file that stay resident once every tensor has been read (a memory-mapped
    /// checkpoint's pages count in the process's resident set); 0 for sources that read into
    /// buffers they free.
    fn mapped_bytes(&self) -> u64 {
        0
    }
    /// Bytes `name` occupies as stored (for memory planning of `as-stored` bases).
    fn stored_bytes(&self, _name: &str) -> Option<u64> {
        None
    }
    /// The tensor `name` in NF4 when the file holds it so (a bitsandbytes 4-bit checkpoint);
    /// `None` otherwise. [`WeightSource::get`] returns the same tensor dequantized.
    fn get_nf4(&self, _name: &str) -> Result<Option<crate::quant::nf4::Nf4Tensor>> {
        Ok(None)
    }
}

/// An opened model: its configuration, its weights, its tokenizer.
pub struct ModelSource {
    /// The path the user gave.
    pub path: PathBuf,
    /// Model shape.
    pub config: ModelConfig,
    /// Tensors.
    pub weights: Box<dyn WeightSource>,
    /// Tokenizer (from `tokenizer.json` or GGUF metadata).
    pub tokenizer: Tok,
}

/// Opens a `.gguf` file or a Hugging Face model directory.
pub fn open(path: &Path) -> Result<ModelSource> {
    if !path.exists() {
        bail!("model path {} does not exist (run `strata fetch` for the default model, or pass a .gguf file or a Hugging Face directory)", path.display());
    }
    if path.is_dir() {
        super::hf::open_dir(path)
    } else if path.extension().and_then(|e| e.to_str()) == Some("gguf") {
        super::gguf::open_gguf(path)
    } else {
        bail!(
            "{}: expected a .gguf file or a Hugging Face model directory (config.json + safetensors)",
            path.display()
        )
    }
}
