//! The adapter alone in llama.cpp's LoRA GGUF format, for `llama-cli --lora` and Ollama's
//! `ADAPTER`: `general.type = "adapter"`, `adapter.type = "lora"`, and per adapted projection
//! `<base tensor>.lora_a` (`[r, in]`) and `.lora_b` (`[out, r]`), what llama.cpp's
//! `convert_lora_to_gguf.py` writes from a PEFT directory.
//!
//! llama.cpp scales each pair by `alpha / r` from one file-wide alpha, which cannot say a layer
//! plan's per-layer ranks and alphas; so strata folds each module's own scale into `B` and
//! writes alpha 0, which llama.cpp reads as "no further scale" (its `--lora-scaled` factor still
//! applies). Llama-family `B` rows take llama.cpp's Q/K permutation, as the base weights do.

use anyhow::{Context, Result};
use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use std::path::Path;

use crate::model::gguf::{permute_rows, permuted_heads};
use crate::model::names::hf_to_gguf;
use crate::model::Model;

/// Storage types of the adapter's tensors (its ranks are rarely whole blocks of a quantized
/// type, so float only).
pub const LORA_TYPES: [(&str, GgmlDType); 3] = [
    ("f32", GgmlDType::F32),
    ("f16", GgmlDType::F16),
    ("bf16", GgmlDType::BF16),
];

/// The storage type `dtype` names, or an error saying which there are.
pub fn lora_type(dtype: &str) -> Result<GgmlDType> {
    match LORA_TYPES.iter().find(|t| t.0 == dtype) {
        Some(&(_, ty)) => Ok(ty),
        None => anyhow::bail!("a llama.cpp LoRA is stored as f32, f16 or bf16, not `{dtype}`"),
    }
}

/// Writes the model's adapters to `out` as a llama.cpp LoRA GGUF whose tensors are `dtype`.
pub fn write(model: &Model, out: &Path, dtype: &str) -> Result<()> {
    let ty = lora_type(dtype)?;
    let cfg = &model.cfg;
    let mut tensors = Vec::new();
    for (module, l) in model.loras() {
        let base =
            hf_to_gguf(&format!("{module}.weight"), &[]).with_context(|| format!("no GGUF name for `{module}`"))?;
        let mut b = (l.b.as_tensor() * l.scale)?;
        if let Some(n) = permuted_heads(cfg.arch, cfg.num_heads, cfg.num_kv_heads, &base) {
            b = permute_rows(&b, n, true)?;
        }
        tensors.push((format!("{base}.lora_a"), QTensor::quantize(l.a.as_tensor(), ty)?));
        tensors.push((format!("{base}.lora_b"), QTensor::quantize(&b, ty)?));
    }
    if tensors.is_empty() {
        anyhow::bail!("the model carries no adapter to write");
    }
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let meta = [
        ("general.architecture", Value::String(cfg.arch.model_type().into())),
        ("general.type", Value::String("adapter".into())),
        ("adapter.type", Value::String("lora".into())),
        ("adapter.lora.alpha", Value::F32(0.0)),
    ];
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (*k, v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut buf = std::io::Cursor::new(Vec::new());
    candle_core::quantized::gguf_file::write(&mut buf, &meta_refs, &t_refs)?;
    crate::util::write_atomic(out, buf.get_ref())
}
