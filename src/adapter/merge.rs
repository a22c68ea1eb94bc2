//! Writing a model as a Hugging Face directory, with adapters merged (`W + s B A`) or not.

use anyhow::{Context, Result};
use candle_core::{DType, Tensor};
use serde_json::json;
use std::path::Path;

use crate::model::config::MODULES;
use crate::model::hf::save_safetensors;
use crate::model::tokenizer::Tok;
use crate::model::{LinearWeight, Model};
use crate::quant::nf4::{dynamic_map, Nf4Tensor, Scales, NESTED_BLOCK, NF4_CODE};

/// How `write_hf_dir` stores the weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Store {
    /// Every tensor in this float type.
    Float(DType),
    /// A bitsandbytes 4-bit checkpoint: projections in NF4 (`true`: double-quantized scales),
    /// everything else bf16; loads with `from_pretrained` as a `*-bnb-4bit` model does.
    Nf4(bool),
}

impl Store {
    /// `f32`, `bf16`, `f16`, `nf4` or `nf4-dq`.
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "f32" => Store::Float(DType::F32),
            "bf16" => Store::Float(DType::BF16),
            "f16" => Store::Float(DType::F16),
            "nf4" => Store::Nf4(false),
            "nf4-dq" => Store::Nf4(true),
            o => anyhow::bail!("stored precision `{o}`: choose f32, bf16, f16, nf4 or nf4-dq"),
        })
    }

    fn float(self) -> DType {
        match self {
            Store::Float(d) => d,
            Store::Nf4(_) => DType::BF16,
        }
    }
}

/// The tensors bitsandbytes saves for one 4-bit weight `name` (`QuantState.as_dict(packed=True)`).
fn bnb_tensors(name: &str, q: &Nf4Tensor) -> Result<Vec<(String, Tensor)>> {
    let dev = &candle_core::Device::Cpu;
    let mut state = json!({
        "quant_type": "nf4", "blocksize": q.blocksize, "dtype": "bfloat16", "shape": [q.rows, q.cols],
    });
    let mut out = vec![(
        name.to_string(),
        Tensor::from_vec(q.packed.clone(), (q.packed.len(), 1), dev)?,
    )];
    match &q.scales {
        Scales::Plain(a) => out.push((format!("{name}.absmax"), Tensor::new(a.as_slice(), dev)?)),
        Scales::Nested(n) => {
            out.push((format!("{name}.absmax"), Tensor::new(n.codes.as_slice(), dev)?));
            out.push((format!("{name}.nested_absmax"), Tensor::new(n.absmax2.as_slice(), dev)?));
            out.push((
                format!("{name}.nested_quant_map"),
                Tensor::new(&dynamic_map()[..], dev)?,
            ));
            state["nested_blocksize"] = json!(NESTED_BLOCK);
            state["nested_dtype"] = json!("float32");
            state["nested_offset"] = json!(n.offset);
        }
    }
    out.push((format!("{name}.quant_map"), Tensor::new(&NF4_CODE[..], dev)?));
    let bytes = serde_json::to_vec(&state)?;
    out.push((
        format!("{name}.quant_state.bitsandbytes__nf4"),
        Tensor::from_vec(bytes.clone(), bytes.len(), dev)?,
    ));
    Ok(out)
}

/// Every weight of the model in Hugging Face naming; adapters folded in when `merge`.
pub fn hf_tensors(model: &Model, merge: bool, store: Store) -> Result<Vec<(String, Tensor)>> {
    let dtype = store.float();
    let mut out = Vec::new();
    let mut push = |name: String, t: &Tensor| -> Result<()> {
        out.push((name, t.to_dtype(DType::F32)?.to_dtype(dtype)?));
        Ok(())
    };
    let mut quantized = Vec::new();
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
            let folded = merge && p.lora.is_some();
            match (store, &p.w) {
                // Already NF4 in the layout asked for, nothing folded in: the codes as they are.
                (Store::Nf4(dq), LinearWeight::Nf4(q)) if !folded && p.w.precision() == nf4_precision(dq) => {
                    quantized.extend(bnb_tensors(&format!("{name}.weight"), q)?);
                }
                _ => {
                    let mut w = p.w.dense()?;
                    if let (true, Some(l)) = (merge, &p.lora) {
                        w = (w + l.delta()?)?;
                    }
                    match store {
                        Store::Nf4(dq) => {
                            let (o, i) = w.dims2()?;
                            let q = Nf4Tensor::quantize(&w.flatten_all()?.to_vec1::<f32>()?, o, i, 64, dq);
                            quantized.extend(bnb_tensors(&format!("{name}.weight"), &q)?);
                        }
                        Store::Float(_) => push(format!("{name}.weight"), &w)?,
                    }
                }
            }
            if let Some(bias) = &p.b {
                push(format!("{name}.bias"), bias.t())?;
            }
        }
    }
    push("model.norm.weight".into(), model.norm.t())?;
    if let Some(h) = &model.head {
        push("lm_head.weight".into(), h.t())?;
    }
    out.extend(quantized);
    Ok(out)
}

fn nf4_precision(dq: bool) -> crate::model::BaseDtype {
    if dq {
        crate::model::BaseDtype::Nf4Dq
    } else {
        crate::model::BaseDtype::Nf4
    }
}

/// Writes `config.json`, `model.safetensors`, `tokenizer.json`, `tokenizer_config.json` and
/// `generation_config.json` into `dir`.
pub fn write_hf_dir(model: &Model, tok: &Tok, dir: &Path, merge: bool, store: Store) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let torch_dtype = match store.float() {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        _ => "float32",
    };
    save_safetensors(&dir.join("model.safetensors"), &hf_tensors(model, merge, store)?)?;
    let mut cfg = model.cfg.to_hf_json(torch_dtype);
    cfg["transformers_version"] = json!("4.46.0");
    if let Store::Nf4(dq) = store {
        // What transformers writes for a model loaded with BitsAndBytesConfig(load_in_4bit=True).
        cfg["quantization_config"] = json!({
            "quant_method": "bitsandbytes",
            "load_in_4bit": true,
            "load_in_8bit": false,
            "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_use_double_quant": dq,
            "bnb_4bit_compute_dtype": "bfloat16",
            "bnb_4bit_quant_storage": "uint8",
            "llm_int8_enable_fp32_cpu_offload": false,
            "llm_int8_has_fp16_weight": false,
            "llm_int8_skip_modules": null,
            "llm_int8_threshold": 6.0,
        });
    }
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
