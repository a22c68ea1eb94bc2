//! Model hyper-parameters, read from a Hugging Face `config.json` or GGUF metadata.

use super::names::Proj;
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::path::Path;

/// The decoder families strata implements (one decoder; Qwen2 adds q/k/v biases).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// Llama 2/3, Mistral, SmolLM2.
    Llama,
    /// Qwen2 / Qwen2.5.
    Qwen2,
}

impl Arch {
    /// The `model_type` used in Hugging Face configs.
    pub fn model_type(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
        }
    }

    /// Whether q/k/v projections carry a bias.
    pub fn qkv_bias(self) -> bool {
        self == Arch::Qwen2
    }
}

/// Everything the decoder needs to know about a model's shape.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    /// Decoder family.
    pub arch: Arch,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Number of decoder blocks.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (GQA when fewer than query heads).
    pub num_kv_heads: usize,
    /// Size of one attention head.
    pub head_dim: usize,
    /// Width of the SwiGLU MLP.
    pub intermediate_size: usize,
    /// Vocabulary size (rows of the embedding).
    pub vocab_size: usize,
    /// RoPE base.
    pub rope_theta: f64,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Whether the LM head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Longest sequence the position tables cover.
    pub max_position_embeddings: usize,
    /// Beginning-of-sequence token, if the model has one.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token, if the model has one.
    pub eos_token_id: Option<u32>,
}

fn req_usize(v: &Value, key: &str, file: &Path) -> Result<usize> {
    match v.get(key) {
        Some(x) => x
            .as_u64()
            .filter(|&n| n > 0 && n < (1 << 32))
            .map(|n| n as usize)
            .with_context(|| format!("{}: `{key}` must be a positive integer, found {x}", file.display())),
        None => bail!(
            "{}: missing field `{key}`; is this a decoder-only LLM config.json?",
            file.display()
        ),
    }
}

fn opt_token(v: &Value, key: &str, file: &Path) -> Result<Option<u32>> {
    let id = |x: &Value| {
        x.as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .with_context(|| format!("{}: `{key}` must be a token id, found {x}", file.display()))
    };
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(a)) if a.is_empty() => Ok(None),
        Some(Value::Array(a)) => a.iter().map(id).collect::<Result<Vec<_>>>().map(|ids| Some(ids[0])),
        Some(x) => id(x).map(Some),
    }
}

fn opt_f64(v: &Value, keys: &[&str], file: &Path) -> Result<Option<f64>> {
    let Some((key, x)) = keys.iter().find_map(|k| {
        let (head, tail) = k.split_once('.').map_or((*k, None), |(h, t)| (h, Some(t)));
        let x = v.get(head)?;
        let x = match tail {
            Some(t) => x.get(t)?,
            None => x,
        };
        (!x.is_null()).then_some((k, x))
    }) else {
        return Ok(None);
    };
    x.as_f64()
        .map(Some)
        .with_context(|| format!("{}: `{key}` must be a number, found {x}", file.display()))
}

impl ModelConfig {
    /// Parses a Hugging Face `config.json`.
    pub fn from_hf_file(path: &Path) -> Result<Self> {
        let text = crate::fsio::read_text(path, crate::fsio::CONFIG_CAP, "config.json")?;
        let v: Value = serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))?;
        Self::from_hf_json(&v, path)
    }

    /// Parses the JSON value of a Hugging Face `config.json` (`file` names it in errors).
    pub fn from_hf_json(v: &Value, file: &Path) -> Result<Self> {
        let mt = v.get("model_type").and_then(|m| m.as_str()).unwrap_or("");
        let arch = match mt {
            "llama" | "mistral" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            "" => bail!("{}: missing field `model_type`", file.display()),
            other => bail!(
                "{}: model_type `{other}` is not supported; strata runs llama, mistral and qwen2",
                file.display()
            ),
        };
        let hidden = req_usize(v, "hidden_size", file)?;
        let heads = req_usize(v, "num_attention_heads", file)?;
        let kv = match v.get("num_key_value_heads") {
            Some(Value::Null) | None => heads,
            Some(_) => req_usize(v, "num_key_value_heads", file)?,
        };
        let head_dim = match v.get("head_dim") {
            Some(x) if x.is_u64() => req_usize(v, "head_dim", file)?,
            _ => hidden / heads,
        };
        let cfg = Self {
            arch,
            hidden_size: hidden,
            num_layers: req_usize(v, "num_hidden_layers", file)?,
            num_heads: heads,
            num_kv_heads: kv,
            head_dim,
            intermediate_size: req_usize(v, "intermediate_size", file)?,
            vocab_size: req_usize(v, "vocab_size", file)?,
            // transformers 5 writes it inside `rope_parameters`.
            rope_theta: opt_f64(v, &["rope_theta", "rope_parameters.rope_theta"], file)?.unwrap_or(10_000.0),
            rms_norm_eps: opt_f64(v, &["rms_norm_eps"], file)?.unwrap_or(1e-6),
            tie_word_embeddings: v.get("tie_word_embeddings").and_then(|x| x.as_bool()).unwrap_or(false),
            max_position_embeddings: v
                .get("max_position_embeddings")
                .and_then(|x| x.as_u64())
                .map(|x| x as usize)
                .unwrap_or(4096),
            bos_token_id: opt_token(v, "bos_token_id", file)?,
            eos_token_id: opt_token(v, "eos_token_id", file)?,
        };
        cfg.validate()
            .with_context(|| format!("{}: inconsistent model config", file.display()))?;
        Ok(cfg)
    }

    /// Checks the relations between sizes that the decoder relies on.
    pub fn validate(&self) -> Result<()> {
        if self.head_dim == 0 || self.num_heads == 0 || self.num_kv_heads == 0 {
            bail!(
                "head_dim {}, {} heads and {} key/value heads: each must be at least 1",
                self.head_dim,
                self.num_heads,
                self.num_kv_heads
            );
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 1.0) {
            bail!("rope theta {} must be a finite number above 1", self.rope_theta);
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0 && self.rms_norm_eps < 1.0) {
            bail!(
                "RMSNorm epsilon {} must be a finite number in (0, 1)",
                self.rms_norm_eps
            );
        }
        for (what, id) in [("bos", self.bos_token_id), ("eos", self.eos_token_id)] {
            if let Some(id) = id.filter(|&id| id as usize >= self.vocab_size) {
                bail!("{what} token id {id} is outside the vocabulary of {}", self.vocab_size);
            }
        }
        // Every size the decoder multiplies must fit, with room: 2^40 elements is far beyond
        // any model that runs on one machine.
        let fits = |a: usize, b: usize| a.checked_mul(b).filter(|&p| p < 1 << 40);
        let widest = [
            fits(self.num_heads, self.head_dim),
            fits(self.vocab_size, self.hidden_size),
            fits(self.intermediate_size, self.hidden_size),
            fits(self.num_heads, self.head_dim).and_then(|q| fits(q, self.hidden_size)),
        ];
        if widest.iter().any(Option::is_none) || self.num_layers > 1 << 16 {
            bail!(
                "sizes too large to be a real model: hidden {}, {} layers, {} heads of {}, intermediate {}, vocab {}",
                self.hidden_size,
                self.num_layers,
                self.num_heads,
                self.head_dim,
                self.intermediate_size,
                self.vocab_size
            );
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            bail!(
                "{} query heads are not a multiple of {} key/value heads",
                self.num_heads,
                self.num_kv_heads
            );
        }
        if !self.head_dim.is_multiple_of(2) {
            bail!("head_dim {} must be even for RoPE", self.head_dim);
        }
        if self.max_position_embeddings > 1 << 20 {
            bail!(
                "max_position_embeddings {} is implausibly large",
                self.max_position_embeddings
            );
        }
        Ok(())
    }

    /// Output width of the query projection.
    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }

    /// Output width of the key and value projections.
    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// `[out, in]` of a projection.
    pub fn linear_shape(&self, p: Proj) -> (usize, usize) {
        let (h, i) = (self.hidden_size, self.intermediate_size);
        match p {
            Proj::Q => (self.q_dim(), h),
            Proj::K | Proj::V => (self.kv_dim(), h),
            Proj::O => (h, self.q_dim()),
            Proj::Gate | Proj::Up => (i, h),
            Proj::Down => (h, i),
        }
    }

    /// Parameters of the whole model.
    pub fn num_params(&self) -> usize {
        let per_layer: usize = Proj::ALL
            .into_iter()
            .map(|p| {
                let (o, i) = self.linear_shape(p);
                o * i
            })
            .sum::<usize>()
            + 2 * self.hidden_size
            + if self.arch.qkv_bias() {
                self.q_dim() + 2 * self.kv_dim()
            } else {
                0
            };
        let emb = self.vocab_size * self.hidden_size;
        per_layer * self.num_layers + emb * if self.tie_word_embeddings { 1 } else { 2 } + self.hidden_size
    }

    /// The Hugging Face `config.json` for this model.
    pub fn to_hf_json(&self, torch_dtype: &str) -> Value {
        let archs = match self.arch {
            Arch::Llama => "LlamaForCausalLM",
            Arch::Qwen2 => "Qwen2ForCausalLM",
        };
        let mut v = json!({
            "architectures": [archs],
            "model_type": self.arch.model_type(),
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
            "vocab_size": self.vocab_size,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": "silu",
            "attention_bias": self.arch.qkv_bias(),
            "torch_dtype": torch_dtype,
        });
        if let Some(b) = self.bos_token_id {
            v["bos_token_id"] = json!(b);
        }
        if let Some(e) = self.eos_token_id {
            v["eos_token_id"] = json!(e);
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_and_bad_fields_are_named() {
        let p = Path::new("config.json");
        let e = ModelConfig::from_hf_json(&json!({"model_type": "llama"}), p).unwrap_err();
        assert!(e.to_string().contains("missing field `hidden_size`"), "{e}");
        let e = ModelConfig::from_hf_json(&json!({"model_type": "gpt2"}), p).unwrap_err();
        assert!(e.to_string().contains("not supported"), "{e}");
        let v = json!({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 3,
            "num_hidden_layers": 2, "intermediate_size": 128, "vocab_size": 100});
        let e = ModelConfig::from_hf_json(&v, p).unwrap_err();
        assert!(format!("{e:#}").contains("not a multiple"), "{e:#}");
    }

    #[test]
    fn hf_json_roundtrip() {
        let v = json!({"model_type": "qwen2", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
            "num_hidden_layers": 2, "intermediate_size": 128, "vocab_size": 100, "rope_theta": 1e6, "eos_token_id": [5, 6]});
        let c = ModelConfig::from_hf_json(&v, Path::new("x")).unwrap();
        assert_eq!(c.head_dim, 16);
        assert_eq!(c.eos_token_id, Some(5));
        let back = ModelConfig::from_hf_json(&c.to_hf_json("float32"), Path::new("x")).unwrap();
        assert_eq!(back, c);
    }
}
