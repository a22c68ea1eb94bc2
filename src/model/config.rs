//! Model hyper-parameters, read from a Hugging Face `config.json` or GGUF metadata.

use super::names::{BaseTensor, Proj};
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::path::Path;

/// The decoder families strata implements (one decoder; Qwen2 adds q/k/v biases, Qwen3
/// per-head RMSNorms of queries and keys, Gemma 3 those norms, norms after attention and MLP,
/// a scaled embedding, (1 + w) norm weights and a GELU-gated MLP).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// Llama 2/3, Mistral, SmolLM2.
    Llama,
    /// Qwen2 / Qwen2.5.
    Qwen2,
    /// Qwen3 (dense).
    Qwen3,
    /// Gemma 3 (text).
    Gemma3,
}

impl Arch {
    /// The `model_type` used in Hugging Face configs.
    pub fn model_type(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::Gemma3 => "gemma3_text",
        }
    }

    /// GGUF's `general.architecture` (and its metadata key prefix).
    pub fn gguf_name(self) -> &'static str {
        match self {
            Arch::Gemma3 => "gemma3",
            other => other.model_type(),
        }
    }

    /// The Hugging Face model class.
    pub fn hf_class(self) -> &'static str {
        match self {
            Arch::Llama => "LlamaForCausalLM",
            Arch::Qwen2 => "Qwen2ForCausalLM",
            Arch::Qwen3 => "Qwen3ForCausalLM",
            Arch::Gemma3 => "Gemma3ForCausalLM",
        }
    }

    /// Whether q/k/v projections carry a bias.
    pub fn qkv_bias(self) -> bool {
        self == Arch::Qwen2
    }

    /// Whether queries and keys pass a per-head RMSNorm before RoPE.
    pub fn qk_norm(self) -> bool {
        matches!(self, Arch::Qwen3 | Arch::Gemma3)
    }

    /// Gemma's block: norms after attention and after the MLP too, before each residual add.
    pub fn sandwich_norms(self) -> bool {
        self == Arch::Gemma3
    }

    /// Gemma's MLP: `down(gelu_tanh(gate) * up)` instead of SwiGLU.
    pub fn gelu_mlp(self) -> bool {
        self == Arch::Gemma3
    }

    /// Gemma's embedding: token vectors multiplied by `sqrt(hidden)` (the tied head is not).
    pub fn embed_scaled(self) -> bool {
        self == Arch::Gemma3
    }

    /// What a Hugging Face norm weight is offset by to give the factor the norm multiplies by:
    /// Gemma's RMSNorm multiplies by `1 + w` (llama.cpp's GGUF stores `1 + w` already).
    pub fn norm_offset(self) -> f64 {
        if self == Arch::Gemma3 {
            1.0
        } else {
            0.0
        }
    }

    /// The kinds of this family's per-layer norms, in [`Arch::layer_norms`]'s order.
    pub fn norm_kinds(self) -> Vec<BaseTensor> {
        self.layer_norms(0, 0).into_iter().map(|(k, _)| k).collect()
    }

    /// The per-layer norms of this family, each with its width given the head and hidden sizes.
    pub fn layer_norms(self, head_dim: usize, hidden: usize) -> Vec<(BaseTensor, usize)> {
        let mut v = if self.sandwich_norms() {
            vec![
                (BaseTensor::AttnNorm, hidden),
                (BaseTensor::PostAttnNorm, hidden),
                (BaseTensor::PreMlpNorm, hidden),
                (BaseTensor::PostMlpNorm, hidden),
            ]
        } else {
            vec![(BaseTensor::AttnNorm, hidden), (BaseTensor::MlpNorm, hidden)]
        };
        if self.qk_norm() {
            v.extend([(BaseTensor::QNorm, head_dim), (BaseTensor::KNorm, head_dim)]);
        }
        v
    }
}

/// How RoPE's frequencies are scaled for a context longer than the model was pretrained on
/// (transformers' `rope_scaling` / `rope_parameters`, llama.cpp's `rope_freqs` tensor). Only the
/// kinds strata computes exactly are here; any other is refused where the config is read.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// The default: `1 / theta^(2i/d)`.
    None,
    /// transformers' `linear`: every frequency divided by `factor`.
    Linear {
        /// The scaling factor.
        factor: f64,
    },
    /// transformers' `llama3` (Llama 3.1+): low frequencies divided by `factor`, high ones kept,
    /// a smooth blend between.
    Llama3 {
        /// Divisor of the low frequencies (8 for Llama 3.1).
        factor: f64,
        /// Wavelengths above `original / low_freq_factor` are scaled.
        low_freq_factor: f64,
        /// Wavelengths below `original / high_freq_factor` are kept.
        high_freq_factor: f64,
        /// The pretraining context.
        original_max_position_embeddings: usize,
    },
    /// llama.cpp's `rope_freqs.weight`: frequency `i` divided by `factors[i]` (how a Llama 3.1
    /// GGUF stores its scaling).
    Factors(Vec<f64>),
    /// transformers' `yarn` (Qwen2.5, DeepSeek; llama.cpp's `yarn`): each frequency blended
    /// between divided by `factor` and kept, by how many turns it makes within the original
    /// context, and cos/sin multiplied by `attention_factor`.
    Yarn {
        /// Ratio of the extended context to the original one.
        factor: f64,
        /// The pretraining context.
        original_max_position_embeddings: usize,
        /// Amplitude of cos and sin (so attention logits scale by its square).
        attention_factor: f64,
        /// Frequencies turning more than this often within the original context are kept.
        beta_fast: f64,
        /// Frequencies turning less than this often are divided by `factor`.
        beta_slow: f64,
        /// Whether the blend's bounds are rounded outward to whole frequencies.
        truncate: bool,
    },
    /// transformers' `dynamic` (NTK-aware): the default frequencies up to the context, and for
    /// a forward reaching further, a larger base computed from that forward's length.
    Dynamic {
        /// How far past the context the base grows (transformers' `factor`).
        factor: f64,
    },
}

impl RopeScaling {
    /// The inverse frequencies of a head of size `head_dim` with base `theta`, scaled.
    pub fn inv_freqs(&self, head_dim: usize, theta: f64) -> Vec<f64> {
        let base: Vec<f64> = (0..head_dim / 2)
            .map(|i| 1.0 / theta.powf(2.0 * i as f64 / head_dim as f64))
            .collect();
        match self {
            RopeScaling::None => base,
            RopeScaling::Linear { factor } => base.iter().map(|f| f / factor).collect(),
            RopeScaling::Factors(k) => base.iter().zip(k).map(|(f, k)| f / k).collect(),
            &RopeScaling::Llama3 {
                factor,
                low_freq_factor: low,
                high_freq_factor: high,
                original_max_position_embeddings: old,
            } => base
                .iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    let (low_wavelen, high_wavelen) = (old as f64 / low, old as f64 / high);
                    if wavelen < high_wavelen {
                        f
                    } else if wavelen > low_wavelen {
                        f / factor
                    } else {
                        let smooth = (old as f64 / wavelen - low) / (high - low);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect(),
            &RopeScaling::Yarn {
                factor,
                original_max_position_embeddings: old,
                beta_fast,
                beta_slow,
                truncate,
                ..
            } => {
                // transformers' `_compute_yarn_parameters` (and llama.cpp's corr_dims): the
                // frequency index at which a frequency makes `turns` rotations in `old` positions.
                let d = head_dim as f64;
                let index =
                    |turns: f64| d * (old as f64 / (turns * 2.0 * std::f64::consts::PI)).ln() / (2.0 * theta.ln());
                let (mut low, mut high) = (index(beta_fast), index(beta_slow));
                if truncate {
                    (low, high) = (low.floor(), high.ceil());
                }
                let (low, mut high) = (low.max(0.0), high.min(d - 1.0));
                if low == high {
                    high += 0.001;
                }
                base.iter()
                    .enumerate()
                    .map(|(i, &f)| {
                        let keep = 1.0 - ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                        f / factor * (1.0 - keep) + f * keep
                    })
                    .collect()
            }
            // The forward's own length decides (`Rope`); within the context it is the default.
            RopeScaling::Dynamic { .. } => base,
        }
    }

    /// The amplitude RoPE's cos and sin carry (YaRN's attention factor; 1 otherwise).
    pub fn amplitude(&self) -> f64 {
        match self {
            RopeScaling::Yarn { attention_factor, .. } => *attention_factor,
            _ => 1.0,
        }
    }

    /// How many positions a model with this scaling and `max_position_embeddings` may use:
    /// YaRN and dynamic NTK extend the context by their factor (transformers itself sets no
    /// limit; strata runs what the scaling was made for, and refuses past it).
    pub fn context(&self, max_position_embeddings: usize) -> usize {
        let extended = match self {
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings: old,
                ..
            } => (*old as f64 * factor).round() as usize,
            RopeScaling::Dynamic { factor } => (max_position_embeddings as f64 * factor).round() as usize,
            _ => 0,
        };
        max_position_embeddings.max(extended).min(1 << 20)
    }

    /// Reads transformers' `rope_scaling` (or `rope_parameters`) object; `None`, `default` and
    /// an absent one are the default. `max_position_embeddings` stands in for an absent
    /// `original_max_position_embeddings`, as transformers' `standardize_rope_params` does.
    /// Types strata does not compute exactly (`longrope`, ...) and fields that change the math
    /// are refused by name.
    pub fn from_hf(v: Option<&Value>, max_position_embeddings: usize, file: &Path) -> Result<Self> {
        let f = file.display();
        let Some(v) = v.filter(|v| !v.is_null()) else {
            return Ok(RopeScaling::None);
        };
        let obj = v
            .as_object()
            .with_context(|| format!("{f}: `rope_scaling` must be an object, found {v}"))?;
        let ty = obj
            .get("rope_type")
            .or_else(|| obj.get("type"))
            .and_then(|t| t.as_str())
            .unwrap_or("default");
        // An absent or null field is `None`; a present one must be a finite positive number.
        let opt =
            |k: &str| -> Result<Option<f64>> {
                match obj.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(x) => x.as_f64().filter(|x| x.is_finite() && *x > 0.0).map(Some).with_context(|| {
                    format!("{f}: `rope_scaling.{k}` must be a finite positive number for rope_type `{ty}`, found {x}")
                }),
            }
            };
        let num = |k: &str| -> Result<f64> {
            opt(k)?.with_context(|| {
                format!("{f}: `rope_scaling.{k}` must be a finite positive number for rope_type `{ty}`")
            })
        };
        let original = || -> Result<usize> {
            Ok(opt("original_max_position_embeddings")?.map_or(max_position_embeddings, |x| x as usize))
        };
        let known: &[&str] = match ty {
            "default" => &[],
            "linear" => &["factor"],
            "dynamic" => &["factor"],
            "llama3" => &["factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"],
            "yarn" => &[
                "factor",
                "original_max_position_embeddings",
                "attention_factor",
                "beta_fast",
                "beta_slow",
                "mscale",
                "mscale_all_dim",
                "truncate",
            ],
            other => bail!(
                "{f}: rope_scaling type `{other}` is not supported (strata computes default, linear, dynamic, llama3 and yarn exactly); \
                 refusing rather than running the model with the wrong positions"
            ),
        };
        for k in obj.keys() {
            if !known.contains(&k.as_str())
                && !matches!(
                    k.as_str(),
                    "rope_type" | "type" | "rope_theta" | "partial_rotary_factor"
                )
            {
                bail!("{f}: `rope_scaling.{k}` is not a field strata reads for rope_type `{ty}`; refusing rather than ignoring it");
            }
        }
        check_full_rotary(obj.get("partial_rotary_factor"), file)?;
        Ok(match ty {
            "default" => RopeScaling::None,
            "linear" => RopeScaling::Linear { factor: num("factor")? },
            "dynamic" => RopeScaling::Dynamic { factor: num("factor")? },
            "llama3" => {
                let (low, high) = (num("low_freq_factor")?, num("high_freq_factor")?);
                if high <= low {
                    bail!("{f}: `rope_scaling.high_freq_factor` ({high}) must exceed `low_freq_factor` ({low})");
                }
                RopeScaling::Llama3 {
                    factor: num("factor")?,
                    low_freq_factor: low,
                    high_freq_factor: high,
                    original_max_position_embeddings: original()?,
                }
            }
            _ => {
                let old = original()?;
                // transformers: without a factor, the ratio of the two contexts.
                let factor = opt("factor")?.unwrap_or(max_position_embeddings as f64 / old as f64);
                if factor < 1.0 {
                    bail!("{f}: `rope_scaling.factor` is {factor}; YaRN needs a factor of at least 1");
                }
                let mscale = |scale: f64, m: f64| if scale <= 1.0 { 1.0 } else { 0.1 * m * scale.ln() + 1.0 };
                let attention_factor = match (opt("attention_factor")?, opt("mscale")?, opt("mscale_all_dim")?) {
                    (Some(a), _, _) => a,
                    // transformers uses the two only together; `mscale` alone changes nothing.
                    (None, Some(m), Some(all)) => mscale(factor, m) / mscale(factor, all),
                    _ => mscale(factor, 1.0),
                };
                let truncate = match obj.get("truncate") {
                    None | Some(Value::Null) => true,
                    Some(Value::Bool(b)) => *b,
                    Some(x) => bail!("{f}: `rope_scaling.truncate` must be true or false, found {x}"),
                };
                let (beta_fast, beta_slow) = (opt("beta_fast")?.unwrap_or(32.0), opt("beta_slow")?.unwrap_or(1.0));
                RopeScaling::Yarn {
                    factor,
                    original_max_position_embeddings: old,
                    attention_factor,
                    beta_fast,
                    beta_slow,
                    truncate,
                }
            }
        })
    }

    /// transformers' `rope_scaling` object for this scaling (`None` for the default); a GGUF's
    /// per-frequency factors have no such form.
    pub fn to_hf(&self) -> Result<Option<Value>> {
        Ok(match self {
            RopeScaling::None => None,
            RopeScaling::Linear { factor } => Some(json!({"rope_type": "linear", "factor": factor})),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => Some(json!({"rope_type": "llama3", "factor": factor, "low_freq_factor": low_freq_factor,
                "high_freq_factor": high_freq_factor, "original_max_position_embeddings": original_max_position_embeddings})),
            RopeScaling::Factors(_) => bail!(
                "this model's RoPE frequencies come from its GGUF `rope_freqs` tensor, which a Hugging Face config cannot state; export it as GGUF"
            ),
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                attention_factor,
                beta_fast,
                beta_slow,
                truncate,
            } => Some(json!({"rope_type": "yarn", "factor": factor,
                "original_max_position_embeddings": original_max_position_embeddings,
                "attention_factor": attention_factor, "beta_fast": beta_fast, "beta_slow": beta_slow, "truncate": truncate})),
            RopeScaling::Dynamic { factor } => Some(json!({"rope_type": "dynamic", "factor": factor})),
        })
    }
}

/// Refuses config fields that would change the decoder's math away from what strata computes:
/// another activation, biases the family does not have, an attention sliding window in use.
fn check_math_fields(v: &Value, arch: Arch, file: &Path) -> Result<()> {
    let f = file.display();
    let field = |k: &str| v.get(k).filter(|x| !x.is_null());
    // Gemma's MLP is GELU-gated with the tanh approximation; the others are SwiGLU.
    let (want, mlp) = match arch {
        Arch::Gemma3 => (&["gelu_pytorch_tanh", "gelu_tanh"][..], "GELU-gated (tanh)"),
        _ => (&["silu"][..], "SwiGLU (silu)"),
    };
    for k in ["hidden_act", "hidden_activation"] {
        if let Some(a) = field(k) {
            if !a.as_str().is_some_and(|a| want.contains(&a)) {
                bail!(
                    "{f}: `{k}` is {a}; strata's {} MLP is {mlp} and does not run other activations",
                    arch.model_type()
                );
            }
        }
    }
    for k in ["attn_logit_softcapping", "final_logit_softcapping"] {
        if let Some(c) = field(k) {
            bail!("{f}: `{k}` is {c}; strata does not soft-cap logits (Gemma 2's form); refusing rather than running without it");
        }
    }
    if let Some(b) = field("use_bidirectional_attention").filter(|b| b.as_bool() != Some(false)) {
        bail!("{f}: `use_bidirectional_attention` is {b}; strata runs causal decoders only");
    }
    // Qwen2's q/k/v biases are fixed by the family (its config has no switch).
    if arch != Arch::Qwen2 {
        if let Some(b) = field("attention_bias") {
            if b.as_bool() != Some(false) {
                bail!(
                    "{f}: `attention_bias` is {b}; strata runs {} without attention biases",
                    arch.model_type()
                );
            }
        }
    }
    if let Some(b) = field("mlp_bias") {
        if b.as_bool() != Some(false) {
            bail!("{f}: `mlp_bias` is {b}; strata's MLP has no biases");
        }
    }
    Ok(())
}

/// The attention window a config puts in force and the layers it applies to (`None`: all):
/// Qwen's configs carry a window that only `use_sliding_window` switches on; Mistral's applies
/// whenever it is set; Gemma 3's to five layers of every six (`sliding_window_pattern`), and
/// transformers 5 lists each layer's kind in `layer_types`.
fn sliding_window(v: &Value, arch: Arch, layers: usize, file: &Path) -> Result<(Option<usize>, Option<Vec<bool>>)> {
    let f = file.display();
    let listed = match v.get("layer_types").filter(|l| !l.is_null()) {
        None => None,
        Some(l) => {
            let kinds = l
                .as_array()
                .with_context(|| format!("{f}: `layer_types` must be a list"))?;
            if kinds.len() != layers {
                bail!("{f}: `layer_types` lists {} layers for {layers}", kinds.len());
            }
            let windowed = kinds
                .iter()
                .map(|k| match k.as_str() {
                    Some("sliding_attention") => Ok(true),
                    Some("full_attention") => Ok(false),
                    _ => {
                        bail!("{f}: `layer_types` entry {k} is not one strata runs (sliding_attention, full_attention)")
                    }
                })
                .collect::<Result<Vec<bool>>>()?;
            Some(windowed)
        }
    };
    let layers_windowed = match (&listed, arch) {
        (Some(l), _) => Some(l.clone()),
        (None, Arch::Gemma3) => {
            let every =
                match v
                    .get("sliding_window_pattern")
                    .or_else(|| v.get("_sliding_window_pattern"))
                {
                    None | Some(Value::Null) => 6,
                    Some(x) => x.as_u64().filter(|&n| n > 0).with_context(|| {
                        format!("{f}: `sliding_window_pattern` must be a positive integer, found {x}")
                    })? as usize,
                };
            Some((0..layers).map(|i| (i + 1) % every != 0).collect())
        }
        // transformers' Qwen2/Qwen3: the window from layer `max_window_layers` up.
        (None, Arch::Qwen2 | Arch::Qwen3) => {
            let on = v.get("use_sliding_window").and_then(|x| x.as_bool()).unwrap_or(false);
            v.get("max_window_layers")
                .and_then(|x| x.as_u64())
                .map(|first| (0..layers).map(|i| on && i as u64 >= first).collect())
        }
        (None, _) => None,
    };
    let on = match &layers_windowed {
        Some(l) => l.iter().any(|&w| w),
        None => match arch {
            Arch::Qwen2 | Arch::Qwen3 => v.get("use_sliding_window").and_then(|x| x.as_bool()).unwrap_or(false),
            Arch::Llama | Arch::Gemma3 => true,
        },
    };
    let window = match v.get("sliding_window").filter(|x| !x.is_null() && on) {
        None => None,
        Some(w) => match w.as_u64().filter(|&w| w > 0 && w < 1 << 32) {
            Some(w) => Some(w as usize),
            None => bail!("{f}: `sliding_window` must be a positive integer, found {w}"),
        },
    };
    // Every layer windowed is Mistral's form, said without a list.
    let layers_windowed = layers_windowed.filter(|l| window.is_some() && !l.iter().all(|&w| w));
    Ok((window, layers_windowed))
}

/// RoPE as a config states it: the base, its scaling, and Gemma 3's separate base for its
/// windowed layers (`rope_local_base_freq`, or transformers 5's `rope_parameters` keyed by layer
/// kind), whose RoPE is never scaled.
fn hf_rope(v: &Value, arch: Arch, max_position: usize, file: &Path) -> Result<(f64, RopeScaling, Option<f64>)> {
    let params = v.get("rope_parameters").filter(|p| !p.is_null());
    if let Some(by_kind) = params.filter(|p| p.get("full_attention").is_some()) {
        let f = file.display();
        if let Some(k) = by_kind.as_object().and_then(|o| {
            o.keys()
                .find(|k| !matches!(k.as_str(), "full_attention" | "sliding_attention"))
        }) {
            bail!("{f}: `rope_parameters.{k}` is not a layer kind strata runs (full_attention, sliding_attention)");
        }
        let full = &by_kind["full_attention"];
        let theta = opt_f64(full, &["rope_theta"], file)?.unwrap_or(10_000.0);
        let scaling = RopeScaling::from_hf(Some(full), max_position, file)?;
        let local = match by_kind.get("sliding_attention").filter(|x| !x.is_null()) {
            None => None,
            Some(sl) => {
                if RopeScaling::from_hf(Some(sl), max_position, file)? != RopeScaling::None {
                    bail!("{f}: `rope_parameters.sliding_attention` scales RoPE; strata runs windowed layers with the default RoPE only");
                }
                Some(opt_f64(sl, &["rope_theta"], file)?.unwrap_or(10_000.0))
            }
        };
        return Ok((theta, scaling, local));
    }
    let default_theta = if arch == Arch::Gemma3 { 1e6 } else { 10_000.0 };
    // transformers 5 writes the theta inside `rope_parameters`, beside the scaling.
    let theta = opt_f64(v, &["rope_theta", "rope_parameters.rope_theta"], file)?.unwrap_or(default_theta);
    let scaling = RopeScaling::from_hf(v.get("rope_scaling").or(params), max_position, file)?;
    let local = match arch {
        Arch::Gemma3 => Some(opt_f64(v, &["rope_local_base_freq"], file)?.unwrap_or(10_000.0)),
        _ => None,
    };
    Ok((theta, scaling, local))
}

/// Refuses a `partial_rotary_factor` other than 1: strata rotates every dimension of a head.
fn check_full_rotary(v: Option<&Value>, file: &Path) -> Result<()> {
    match v {
        None | Some(Value::Null) => Ok(()),
        Some(x) if x.as_f64() == Some(1.0) => Ok(()),
        Some(x) => bail!(
            "{}: `partial_rotary_factor` is {x}; strata rotates the whole head and does not run models that rotate part of it",
            file.display()
        ),
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
    /// RoPE frequency scaling for long contexts.
    pub rope_scaling: RopeScaling,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Whether the LM head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Longest sequence the position tables cover.
    pub max_position_embeddings: usize,
    /// Mistral-style attention window: each position sees at most this many (itself included).
    pub sliding_window: Option<usize>,
    /// Which layers attend within the window (`None`: every layer, Mistral's form); Gemma 3
    /// interleaves windowed (local) layers with global ones.
    pub window_layers: Option<Vec<bool>>,
    /// RoPE base of the windowed layers when it is not `rope_theta` (Gemma 3's local base);
    /// those layers' RoPE is unscaled.
    pub rope_local_theta: Option<f64>,
    /// Gemma's `query_pre_attn_scalar`: attention scores are scaled by its inverse square root
    /// (`None`: the head size's).
    pub query_pre_attn_scalar: Option<f64>,
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
            "qwen3" => Arch::Qwen3,
            "gemma3_text" => Arch::Gemma3,
            "" => bail!("{}: missing field `model_type`", file.display()),
            "gemma3" => bail!(
                "{}: model_type `gemma3` is Gemma 3's image-and-text model; strata runs its text model (`gemma3_text`, Gemma3ForCausalLM, as Gemma 3 270M and 1B ship, or a GGUF of the text weights)",
                file.display()
            ),
            other => bail!(
                "{}: model_type `{other}` is not supported; strata runs llama, mistral, qwen2, qwen3 and gemma3_text",
                file.display()
            ),
        };
        check_math_fields(v, arch, file)?;
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
        let max_position = v
            .get("max_position_embeddings")
            .and_then(|x| x.as_u64())
            .map(|x| x as usize)
            .unwrap_or(4096);
        check_full_rotary(v.get("partial_rotary_factor"), file)?;
        let layers = req_usize(v, "num_hidden_layers", file)?;
        let (sliding_window, window_layers) = sliding_window(v, arch, layers, file)?;
        let (rope_theta, rope_scaling, rope_local_theta) = hf_rope(v, arch, max_position, file)?;
        let query_pre_attn_scalar = match arch {
            // transformers' Gemma 3 default.
            Arch::Gemma3 => Some(opt_f64(v, &["query_pre_attn_scalar"], file)?.unwrap_or(256.0)),
            _ => None,
        };
        if let Some(s) = query_pre_attn_scalar.filter(|s| !(s.is_finite() && *s > 0.0)) {
            bail!(
                "{}: `query_pre_attn_scalar` is {s}; it must be finite and positive",
                file.display()
            );
        }
        let cfg = Self {
            arch,
            hidden_size: hidden,
            num_layers: layers,
            num_heads: heads,
            num_kv_heads: kv,
            head_dim,
            intermediate_size: req_usize(v, "intermediate_size", file)?,
            vocab_size: req_usize(v, "vocab_size", file)?,
            rope_theta,
            rope_scaling,
            rope_local_theta,
            rms_norm_eps: opt_f64(v, &["rms_norm_eps"], file)?.unwrap_or(1e-6),
            tie_word_embeddings: v.get("tie_word_embeddings").and_then(|x| x.as_bool()).unwrap_or(false),
            max_position_embeddings: max_position,
            sliding_window,
            window_layers,
            query_pre_attn_scalar,
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
        if let RopeScaling::Factors(k) = &self.rope_scaling {
            if k.len() != self.head_dim / 2 || k.iter().any(|x| !(x.is_finite() && *x > 0.0)) {
                bail!(
                    "rope_freqs holds {} factors for a head of {} (it needs {}, each finite and positive)",
                    k.len(),
                    self.head_dim,
                    self.head_dim / 2
                );
            }
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
        if let RopeScaling::Yarn {
            factor,
            original_max_position_embeddings: old,
            attention_factor,
            ..
        } = self.rope_scaling
        {
            if old == 0
                || !(factor.is_finite() && factor >= 1.0)
                || !(attention_factor.is_finite() && attention_factor > 0.0)
            {
                bail!("YaRN scaling needs an original context of at least 1, a finite factor of at least 1 and a finite positive attention factor (found {old}, {factor}, {attention_factor})");
            }
        }
        if let Some(l) = self.window_layers.as_ref().filter(|l| l.len() != self.num_layers) {
            bail!("the window pattern lists {} layers for {}", l.len(), self.num_layers);
        }
        if let Some(t) = self.rope_local_theta.filter(|t| !(t.is_finite() && *t > 1.0)) {
            bail!("local rope theta {t} must be a finite number above 1");
        }
        if let Some(s) = self.query_pre_attn_scalar.filter(|s| !(s.is_finite() && *s > 0.0)) {
            bail!("query_pre_attn_scalar {s} must be finite and positive");
        }
        if self.max_position_embeddings > 1 << 20 {
            bail!(
                "max_position_embeddings {} is implausibly large",
                self.max_position_embeddings
            );
        }
        Ok(())
    }

    /// How many positions the model runs: the configured context, extended by its RoPE scaling.
    pub fn context(&self) -> usize {
        self.rope_scaling.context(self.max_position_embeddings)
    }

    /// The attention window of layer `i` (`None`: it attends to every earlier position).
    pub fn layer_window(&self, i: usize) -> Option<usize> {
        let w = self.sliding_window?;
        match &self.window_layers {
            Some(l) if !l.get(i).copied().unwrap_or(false) => None,
            _ => Some(w),
        }
    }

    /// Whether layer `i` uses the local RoPE ([`ModelConfig::rope_local`]).
    pub fn layer_rope_local(&self, i: usize) -> bool {
        self.rope_local_theta.is_some() && self.layer_window(i).is_some()
    }

    /// The windowed layers' own RoPE tables (Gemma 3's local base, unscaled), if they have one.
    pub fn rope_local(
        &self,
        dtype: candle_core::DType,
        dev: &candle_core::Device,
    ) -> Result<Option<crate::ops::rope::Rope>> {
        let Some(theta) = self.rope_local_theta else {
            return Ok(None);
        };
        Ok(Some(crate::ops::rope::Rope::new(
            self.head_dim,
            &RopeScaling::None.inv_freqs(self.head_dim, theta),
            self.context(),
            dtype,
            dev,
        )?))
    }

    /// How much queries are multiplied by so that the attention op's `1 / sqrt(head_dim)` gives
    /// the model's score scale (1 unless `query_pre_attn_scalar` differs from the head size).
    pub fn query_scale(&self) -> f64 {
        self.query_pre_attn_scalar
            .map_or(1.0, |s| (self.head_dim as f64 / s).sqrt())
    }

    /// The RoPE tables this model's attention uses, scaled as its config says.
    pub fn rope(&self, dtype: candle_core::DType, dev: &candle_core::Device) -> Result<crate::ops::rope::Rope> {
        let mut rope = crate::ops::rope::Rope::new(
            self.head_dim,
            &self.rope_scaling.inv_freqs(self.head_dim, self.rope_theta),
            self.context(),
            dtype,
            dev,
        )?
        .with_amplitude(self.rope_scaling.amplitude())?;
        if let RopeScaling::Dynamic { factor } = self.rope_scaling {
            rope = rope.with_dynamic_ntk(self.rope_theta, factor, self.max_position_embeddings);
        }
        Ok(rope)
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
            + self
                .arch
                .layer_norms(self.head_dim, self.hidden_size)
                .iter()
                .map(|(_, w)| w)
                .sum::<usize>()
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
        let mut v = json!({
            "architectures": [self.arch.hf_class()],
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
            "attention_bias": self.arch.qkv_bias(),
            "torch_dtype": torch_dtype,
        });
        if let Some(b) = self.bos_token_id {
            v["bos_token_id"] = json!(b);
        }
        if let Some(e) = self.eos_token_id {
            v["eos_token_id"] = json!(e);
        }
        if let Ok(Some(s)) = self.rope_scaling.to_hf() {
            v["rope_scaling"] = s;
        }
        if self.arch.gelu_mlp() {
            v["hidden_activation"] = json!("gelu_pytorch_tanh");
        } else {
            v["hidden_act"] = json!("silu");
        }
        if let Some(w) = self.sliding_window {
            v["sliding_window"] = json!(w);
            if matches!(self.arch, Arch::Qwen2 | Arch::Qwen3) {
                v["use_sliding_window"] = json!(true);
            }
            let kinds: Vec<&str> = (0..self.num_layers)
                .map(|i| match self.layer_window(i) {
                    Some(_) => "sliding_attention",
                    None => "full_attention",
                })
                .collect();
            v["layer_types"] = json!(kinds);
        }
        if let Some(t) = self.rope_local_theta {
            v["rope_local_base_freq"] = json!(t);
        }
        if let Some(s) = self.query_pre_attn_scalar {
            // transformers' config type is an integer (a whole number written as one).
            v["query_pre_attn_scalar"] = match s.fract() == 0.0 && s < 1e15 {
                true => json!(s as u64),
                false => json!(s),
            };
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

    /// Llama 3.1's scaling against values computed apart from this code (transformers'
    /// `_compute_llama3_parameters`, written out in Python in float64): high frequencies kept,
    /// low ones divided by 8, the band between blended.
    #[test]
    fn llama3_frequencies_match_transformers() {
        let s = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        };
        let inv = s.inv_freqs(128, 500_000.0);
        for (i, want) in [
            (0, 1.0),
            (20, 0.016560440080994446),
            (29, 0.002166570763503359),
            (32, 0.0005248461609929547),
            (34, 0.00017850781276799638),
            (40, 3.428102195952591e-05),
            (63, 3.068925988914511e-07),
        ] {
            assert!((inv[i] / want - 1.0).abs() < 1e-12, "{i}: {} vs {want}", inv[i]);
        }
        let lin = RopeScaling::Linear { factor: 4.0 }.inv_freqs(8, 10_000.0);
        assert_eq!(lin[1], 1.0 / 10_000f64.powf(0.25) / 4.0);
    }

    /// `rope_scaling` is read (both spellings of its type, transformers 5's `rope_parameters`),
    /// written back, and anything strata does not compute exactly is refused by name.
    #[test]
    fn rope_scaling_is_read_or_refused() {
        let p = Path::new("config.json");
        let base = json!({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
            "num_hidden_layers": 2, "intermediate_size": 128, "vocab_size": 100, "rope_theta": 500000.0});
        let with = |k: &str, v: Value| {
            let mut c = base.clone();
            c[k] = v;
            ModelConfig::from_hf_json(&c, p)
        };
        let l3 = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192});
        let c = with("rope_scaling", l3.clone()).unwrap();
        assert!(matches!(
            c.rope_scaling,
            RopeScaling::Llama3 {
                original_max_position_embeddings: 8192,
                ..
            }
        ));
        assert_eq!(ModelConfig::from_hf_json(&c.to_hf_json("float32"), p).unwrap(), c);
        let mut v5 = l3.clone();
        v5["rope_theta"] = json!(500000.0);
        assert_eq!(with("rope_parameters", v5).unwrap().rope_scaling, c.rope_scaling);
        let c = with("rope_scaling", json!({"type": "linear", "factor": 2.0})).unwrap();
        assert_eq!(c.rope_scaling, RopeScaling::Linear { factor: 2.0 });
        assert_eq!(
            with("rope_scaling", Value::Null).unwrap().rope_scaling,
            RopeScaling::None
        );
        for (v, want) in [
            (
                json!({"rope_type": "longrope", "factor": 4.0}),
                "type `longrope` is not supported",
            ),
            (
                json!({"rope_type": "yarn", "factor": 4.0, "beta_fast": 0}),
                "`rope_scaling.beta_fast`",
            ),
            (json!({"rope_type": "yarn", "factor": 0.5}), "at least 1"),
            (
                json!({"rope_type": "yarn", "factor": 2.0, "truncate": "no"}),
                "`rope_scaling.truncate`",
            ),
            (
                json!({"rope_type": "dynamic", "factor": 2.0, "partial_rotary_factor": 0.5}),
                "partial_rotary_factor",
            ),
            (json!({"rope_type": "dynamic"}), "`rope_scaling.factor` must be"),
            (
                json!({"rope_type": "linear", "factor": 2.0, "beta": 3}),
                "`rope_scaling.beta`",
            ),
            (json!({"rope_type": "linear"}), "`rope_scaling.factor` must be"),
            (
                json!({"rope_type": "llama3", "factor": 8.0}),
                "`rope_scaling.low_freq_factor`",
            ),
        ] {
            let e = format!("{:#}", with("rope_scaling", v).unwrap_err());
            assert!(e.contains(want) && e.contains("config.json"), "{want}: {e}");
        }
        // transformers: YaRN's original context defaults to max_position_embeddings, and its
        // attention factor to 1 + 0.1 ln(factor).
        let mut y = base.clone();
        y["max_position_embeddings"] = json!(4096);
        y["rope_scaling"] = json!({"rope_type": "yarn", "factor": 4.0});
        let c = ModelConfig::from_hf_json(&y, p).unwrap();
        assert_eq!(c.context(), 16384);
        assert!(
            matches!(c.rope_scaling, RopeScaling::Yarn { original_max_position_embeddings: 4096, attention_factor, .. }
            if (attention_factor - (1.0 + 0.1 * 4f64.ln())).abs() < 1e-15)
        );
        y["partial_rotary_factor"] = json!(0.25);
        y["rope_scaling"] = Value::Null;
        let e = format!("{:#}", ModelConfig::from_hf_json(&y, p).unwrap_err());
        assert!(e.contains("partial_rotary_factor"), "{e}");
        let f = ModelConfig {
            rope_scaling: RopeScaling::Factors(vec![1.0; 8]),
            ..ModelConfig::from_hf_json(&base, p).unwrap()
        };
        assert!(f.rope_scaling.to_hf().unwrap_err().to_string().contains("rope_freqs"));
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
