//! Writing a model as a Hugging Face directory, with adapters merged (`W + s B A`) or not.

use anyhow::{Context, Result};
use candle_core::{DType, Tensor};
use serde_json::json;
use std::path::Path;

use crate::model::config::MODULES;
use crate::model::hf::save_safetensors;
use crate::model::tokenizer::Tok;
use crate::model::Model;

/// Every weight of the model in Hugging Face naming; adapters folded in when `merge`.
pub fn hf_tensors(model: &Model, merge: bool, dtype: DType) -> Result<Vec<(String, Tensor)>> {
    let mut out = Vec::new();
    let mut push = |name: String, t: &Tensor| -> Result<()> {
        out.push((name, t.to_dtype(DType::F32)?.to_dtype(dtype)?));
        Ok(())
    };
    push("model.embed_tokens.weight".into(), model.embed.t())?;
    for b in &model.blocks {
        let i = b.index;
        push(format!("model.layers.{i}.input_layernorm.weight"), b.attn_norm.t())?;
        push(
            format!("model.layers.{i}.post_attention_layernorm.weight"),
            b.mlp_norm.t(),
        )?;
        for (mi, m) in MODULES.iter().enumerate() {
            let name = crate::adapter::plan::module_name(i, m);
            let p = &b.proj[mi];
            let mut w = p.w.dense()?;
            if let (true, Some(l)) = (merge, &p.lora) {
                w = (w + l.delta()?)?;
            }
            push(format!("{name}.weight"), &w)?;
            if let Some(bias) = &p.b {
                push(format!("{name}.bias"), bias.t())?;
            }
        }
    }
    push("model.norm.weight".into(), model.norm.t())?;
    if let Some(h) = &model.head {
        push("lm_head.weight".into(), h.t())?;
    }
    Ok(out)
}

/// Writes `config.json`, `model.safetensors`, `tokenizer.json`, `tokenizer_config.json` and
/// `generation_config.json` into `dir`.
pub fn write_hf_dir(model: &Model, tok: &Tok, dir: &Path, merge: bool, dtype: DType) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let torch_dtype = match dtype {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        _ => "float32",
    };
    save_safetensors(&dir.join("model.safetensors"), &hf_tensors(model, merge, dtype)?)?;
    let mut cfg = model.cfg.to_hf_json(torch_dtype);
    cfg["transformers_version"] = json!("4.46.0");
    crate::util::write_atomic(&dir.join("config.json"), serde_json::to_string_pretty(&cfg)?.as_bytes())?;
    crate::util::write_atomic(&dir.join("tokenizer.json"), tok.json.as_bytes())?;
    let name = |id: Option<u32>| id.and_then(|i| tok.inner.id_to_token(i));
    let mut tc = json!({"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": false, "model_max_length": model.cfg.max_position_embeddings});
    if let Some(e) = name(tok.eos) {
        tc["eos_token"] = json!(e);
        tc["pad_token"] = json!(e);
    }
    if let Some(b) = name(tok.bos) {
        tc["bos_token"] = json!(b);
    }
    if let Some(t) = &tok.chat_template {
        tc["chat_template"] = json!(t);
    }
    crate::util::write_atomic(
        &dir.join("tokenizer_config.json"),
        serde_json::to_string_pretty(&tc)?.as_bytes(),
    )?;
    let gc = json!({"bos_token_id": model.cfg.bos_token_id, "eos_token_id": model.cfg.eos_token_id});
    crate::util::write_atomic(
        &dir.join("generation_config.json"),
        serde_json::to_string_pretty(&gc)?.as_bytes(),
    )
}
