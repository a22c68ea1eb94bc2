//! Where a model comes from: a GGUF file or a Hugging Face directory, behind one interface.

use anyhow::{bail, Result};
use candle_core::Tensor;
use std::path::{Path, PathBuf};

use super::config::ModelConfig;
use super::names::{BaseTensor, Proj, LAYERS};
use super::tokenizer::Tok;

/// Named tensors in Hugging Face naming (`model.layers.0.self_attn.q_proj.weight` ...).
pub trait WeightSource {
    /// The tensor `name` in its stored precision, dequantized if quantized, on the CPU.
    fn get(&self, name: &str) -> Result<Tensor>;
    /// Names of every tensor available.
    fn names(&self) -> Vec<String>;
    /// The logical shape of `name` as the file declares it, without reading it (`None` when
    /// absent, or when only decoding tells, as for packed 4-bit weights).
    fn shape(&self, _name: &str) -> Option<Vec<usize>> {
        None
    }
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
    /// Whether norm weights are stored with the family's offset already added (llama.cpp's
    /// Gemma files hold `1 + w` where Hugging Face's hold `w`; see [`crate::model::config::Arch::norm_offset`]).
    fn norms_shifted(&self) -> bool {
        false
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

/// Opens a `.gguf` file or a Hugging Face model directory, its configuration checked against
/// the tensors the file declares (see [`check_inventory`]).
pub fn open(path: &Path) -> Result<ModelSource> {
    let src = open_unchecked(path)?;
    check_inventory(&src.config, src.weights.as_ref())?;
    Ok(src)
}

/// Every tensor the decoder reads for `cfg`, with its shape.
pub fn expected_tensors(cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let h = cfg.hidden_size;
    let mut out = vec![
        (BaseTensor::Embed.hf(0), vec![cfg.vocab_size, h]),
        (BaseTensor::Norm.hf(0), vec![h]),
    ];
    if !cfg.tie_word_embeddings {
        out.push((BaseTensor::Head.hf(0), vec![cfg.vocab_size, h]));
    }
    for i in 0..cfg.num_layers {
        for (kind, width) in cfg.arch.layer_norms(cfg.head_dim, h) {
            out.push((kind.hf(i), vec![width]));
        }
        for p in Proj::ALL {
            let (o, inp) = cfg.linear_shape(p);
            out.push((format!("{}.weight", p.path(i)), vec![o, inp]));
            if cfg.arch.qkv_bias() && p.has_qkv_bias() {
                out.push((format!("{}.bias", p.path(i)), vec![o]));
            }
        }
    }
    out
}

/// Checks a configuration against the tensors a file declares before anything is allocated:
/// the layer count against the `model.layers.N` tensors present (a crafted count of 2^31 would
/// otherwise reserve memory for layers that are not there), then every tensor the decoder
/// reads for presence and, where the file states it, shape.
pub fn check_inventory(cfg: &ModelConfig, w: &dyn WeightSource) -> Result<()> {
    let names = w.names();
    let layers: std::collections::BTreeSet<usize> = names
        .iter()
        .filter_map(|n| {
            n.strip_prefix(LAYERS)?
                .strip_prefix('.')?
                .split('.')
                .next()?
                .parse()
                .ok()
        })
        .collect();
    let contiguous = layers.iter().enumerate().all(|(i, &l)| i == l);
    if layers.len() != cfg.num_layers || !contiguous {
        bail!(
            "{}: the configuration declares {} layers but the file holds tensors for {} ({}); \
             the layer count must match the layers stored",
            w.describe(),
            cfg.num_layers,
            layers.len(),
            match (layers.first(), layers.last()) {
                (Some(a), Some(b)) if contiguous => format!("layers {a} to {b}"),
                (Some(_), Some(_)) => "with gaps in their numbering".to_string(),
                _ => "none".to_string(),
            }
        );
    }
    let have: std::collections::HashSet<&str> = names.iter().map(String::as_str).collect();
    for (name, shape) in expected_tensors(cfg) {
        if !have.contains(name.as_str()) {
            bail!(
                "{}: missing tensor `{name}` (shape {shape:?} for this configuration)",
                w.describe()
            );
        }
        if let Some(got) = w.shape(&name).filter(|got| *got != shape) {
            bail!(
                "{}: tensor `{name}` has shape {got:?} but the configuration implies {shape:?}",
                w.describe()
            );
        }
    }
    Ok(())
}

fn open_unchecked(path: &Path) -> Result<ModelSource> {
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
