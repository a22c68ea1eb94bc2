//! GGUF files: validation of untrusted headers, configuration and tokenizer from metadata,
//! tensors mapped to Hugging Face names (dequantized to f32), Llama Q/K rows un-permuted.
//!
//! llama.cpp stores Llama-family `attn_q`/`attn_k` rows permuted for its interleaved-pair RoPE;
//! strata's decoder uses the Hugging Face rotate-half layout, so rows are put back on load
//! (Qwen2 GGUFs use NeoX RoPE and are not permuted).

use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use std::fs::File;
use std::path::{Path, PathBuf};

use super::config::{Arch, ModelConfig, RopeScaling};
use super::names::{gguf_proj, gguf_to_hf, hf_to_gguf, Proj};
use super::source::{ModelSource, WeightSource};
use super::tokenizer::{tokenizer_json_from_gguf, GgufVocab, Tok};

/// A validated GGUF file.
pub struct GgufSource {
    path: PathBuf,
    content: Content,
    arch: Arch,
    heads: usize,
    kv_heads: usize,
}

fn as_u64(v: &Value) -> Option<u64> {
    match *v {
        Value::U8(x) => Some(x as u64),
        Value::U16(x) => Some(x as u64),
        Value::U32(x) => Some(x as u64),
        Value::U64(x) => Some(x),
        Value::I8(x) if x >= 0 => Some(x as u64),
        Value::I16(x) if x >= 0 => Some(x as u64),
        Value::I32(x) if x >= 0 => Some(x as u64),
        Value::I64(x) if x >= 0 => Some(x as u64),
        _ => None,
    }
}

fn as_i64(v: &Value) -> Option<i64> {
    match *v {
        Value::I8(x) => Some(x as i64),
        Value::I16(x) => Some(x as i64),
        Value::I32(x) => Some(x as i64),
        Value::I64(x) => Some(x),
        _ => as_u64(v).and_then(|x| i64::try_from(x).ok()),
    }
}

/// Reads and checks a GGUF header against the file's size before any tensor is touched (see
/// [`super::gguf_read`]).
pub fn read_checked(path: &Path) -> Result<Content> {
    super::gguf_read::read_header(path)
}

/// Whether strata's decoder holds the GGUF tensor `name` (the rest, e.g. `rope_freqs`, are
/// not read, and an export copies them as stored).
pub fn is_modelled(arch: Arch, name: &str) -> bool {
    gguf_to_hf(name, &arch.norm_kinds()).is_some()
}

/// llama.cpp's query scale for Gemma 3 (after gemma_pytorch): the head size, except for the 27B
/// (62 layers), whose `query_pre_attn_scalar` is hidden / heads.
pub fn gemma_query_scalar(layers: usize, hidden: usize, heads: usize, head_dim: usize) -> f64 {
    if layers == 62 {
        (hidden / heads) as f64
    } else {
        head_dim as f64
    }
}

/// The head count llama.cpp interleaved the rows of GGUF tensor `name` over (its Q/K
/// permutation for Llama's RoPE, undone by [`permute_rows`]), or `None` for a tensor stored as
/// Hugging Face has it.
pub fn permuted_heads(arch: Arch, heads: usize, kv_heads: usize, name: &str) -> Option<usize> {
    match (arch, gguf_proj(name)) {
        (Arch::Llama, Some(Proj::Q)) => Some(heads),
        (Arch::Llama, Some(Proj::K)) => Some(kv_heads),
        _ => None,
    }
}

/// llama.cpp's Q/K row permutation (`convert_hf_to_gguf.py::permute`) and its inverse, on the
/// row dimension of `[rows, ...]` tensors (weights or biases).
pub fn permute_rows(w: &Tensor, n_head: usize, to_gguf: bool) -> Result<Tensor> {
    let dims = w.dims().to_vec();
    let rows = dims[0];
    if n_head == 0 || !rows.is_multiple_of(2 * n_head) {
        bail!("cannot permute {rows} rows into {n_head} RoPE heads");
    }
    let half = rows / n_head / 2;
    let rest: usize = dims[1..].iter().product();
    let (a, b) = if to_gguf { (2, half) } else { (half, 2) };
    Ok(w.reshape((n_head, a, b, rest))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)?)
}

impl GgufSource {
    fn meta(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    fn meta_usize(&self, key: &str) -> Result<usize> {
        let v = self
            .meta(key)
            .with_context(|| format!("{}: missing metadata `{key}`", self.path.display()))?;
        as_u64(v)
            .filter(|&x| x > 0 && x < 1 << 32)
            .map(|x| x as usize)
            .with_context(|| format!("{}: metadata `{key}` must be a positive integer", self.path.display()))
    }

    /// A float setting, when present: a number of another type is an error naming the key.
    fn meta_float(&self, key: &str) -> Result<Option<f64>> {
        Ok(match self.meta(key) {
            None => None,
            Some(Value::F32(x)) => Some(*x as f64),
            Some(Value::F64(x)) => Some(*x),
            Some(v) => Some(as_u64(v).with_context(|| {
                format!(
                    "{}: metadata `{key}` must be a number, found {v:?}",
                    self.path.display()
                )
            })? as f64),
        })
    }

    /// A token id setting, when present (checked against the vocabulary by the config).
    fn meta_token(&self, key: &str) -> Result<Option<u32>> {
        self.meta(key)
            .map(|v| {
                as_u64(v).and_then(|x| u32::try_from(x).ok()).with_context(|| {
                    format!(
                        "{}: metadata `{key}` must be a token id, found {v:?}",
                        self.path.display()
                    )
                })
            })
            .transpose()
    }

    fn meta_str(&self, key: &str) -> Option<&str> {
        match self.meta(key)? {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    fn config(&self) -> Result<ModelConfig> {
        let a = self.arch.gguf_name();
        let k = |s: &str| format!("{a}.{s}");
        let hidden = self.meta_usize(&k("embedding_length"))?;
        let heads = self.meta_usize(&k("attention.head_count"))?;
        let kv = if self.meta(&k("attention.head_count_kv")).is_some() {
            self.meta_usize(&k("attention.head_count_kv"))?
        } else {
            heads
        };
        let head_dim = if self.meta(&k("attention.key_length")).is_some() {
            self.meta_usize(&k("attention.key_length"))?
        } else {
            hidden / heads
        };
        let embd = self
            .content
            .tensor_infos
            .get("token_embd.weight")
            .with_context(|| format!("{}: no token_embd.weight tensor", self.path.display()))?;
        let &[vocab, embd_width] = embd.shape.dims() else {
            bail!(
                "{}: token_embd.weight has shape {:?}; it must be a matrix [vocab, embedding_length]",
                self.path.display(),
                embd.shape.dims()
            );
        };
        if embd_width != hidden {
            bail!(
                "{}: token_embd.weight rows have {embd_width} values but `{}` is {hidden}",
                self.path.display(),
                k("embedding_length")
            );
        }
        let layers = self.meta_usize(&k("block_count"))?;
        let sliding_window = match self.meta(&k("attention.sliding_window")) {
            None => None,
            Some(_) => Some(self.meta_usize(&k("attention.sliding_window"))?),
        };
        let gemma = self.arch == Arch::Gemma3 && sliding_window.is_some();
        let cfg = ModelConfig {
            arch: self.arch,
            hidden_size: hidden,
            num_layers: layers,
            num_heads: heads,
            num_kv_heads: kv,
            head_dim,
            intermediate_size: self.meta_usize(&k("feed_forward_length"))?,
            vocab_size: vocab,
            rope_theta: self.meta_float(&k("rope.freq_base"))?.unwrap_or(10_000.0),
            rope_scaling: self.rope_scaling()?,
            rms_norm_eps: self.meta_float(&k("attention.layer_norm_rms_epsilon"))?.unwrap_or(1e-5),
            tie_word_embeddings: !self.content.tensor_infos.contains_key("output.weight"),
            max_position_embeddings: self.meta_usize(&k("context_length")).unwrap_or(4096).min(1 << 20),
            sliding_window,
            // llama.cpp's Gemma 3: five windowed layers of every six, the windowed ones on an
            // unscaled RoPE of base 10,000 (`rope.freq_base_swa` where a newer file states it).
            window_layers: gemma
                .then(|| (0..layers).map(|i| i % 6 < 5).collect::<Vec<bool>>())
                .filter(|l| !l.iter().all(|&w| w)),
            rope_local_theta: match gemma {
                true => Some(self.meta_float(&k("rope.freq_base_swa"))?.unwrap_or(10_000.0)),
                false => None,
            },
            query_pre_attn_scalar: (self.arch == Arch::Gemma3)
                .then(|| gemma_query_scalar(layers, hidden, heads, head_dim)),
            bos_token_id: self.meta_token("tokenizer.ggml.bos_token_id")?,
            eos_token_id: self.meta_token("tokenizer.ggml.eos_token_id")?,
        };
        cfg.validate()
            .with_context(|| format!("{}: inconsistent model metadata", self.path.display()))?;
        Ok(cfg)
    }

    /// RoPE scaling as llama.cpp stores it: the `rope_freqs.weight` factors (Llama 3.1+),
    /// `rope.scaling.type = linear` with its factor, or `yarn` with its factor, original
    /// context and betas. Any other type, and any `rope.scaling.*` key strata does not read,
    /// is refused by name.
    fn rope_scaling(&self) -> Result<RopeScaling> {
        let p = self.path.display();
        let a = self.arch.gguf_name();
        let prefix = format!("{a}.rope.scaling.");
        const READ: [&str; 6] = [
            "type",
            "factor",
            "original_context_length",
            "yarn_beta_fast",
            "yarn_beta_slow",
            "finetuned",
        ];
        for key in self.content.metadata.keys() {
            if let Some(rest) = key.strip_prefix(&prefix) {
                let neutral = rest == "attn_factor" && self.meta_float(key)? == Some(1.0);
                if !READ.contains(&rest) && !neutral {
                    bail!("{p}: metadata `{key}` is not one strata reads; refusing rather than running the model with positions it may not match");
                }
            }
        }
        let ty = match self.meta(&format!("{prefix}type")) {
            None => "none".to_string(),
            Some(Value::String(t)) => t.clone(),
            Some(v) => bail!("{p}: metadata `{prefix}type` must be a string, found {v:?}"),
        };
        let factor = match self.meta_float(&format!("{prefix}factor"))? {
            Some(f) => Some(f),
            None => self.meta_float(&format!("{a}.rope.scale_linear"))?,
        };
        let positive = |key: &str, default: f64| -> Result<f64> {
            match self.meta_float(&format!("{prefix}{key}"))? {
                None => Ok(default),
                Some(x) if x.is_finite() && x > 0.0 => Ok(x),
                Some(x) => bail!("{p}: metadata `{prefix}{key}` is {x}; it must be finite and positive"),
            }
        };
        let scaled = match (ty.as_str(), factor) {
            ("none", None) => None,
            ("none" | "linear", Some(1.0)) => None,
            ("none" | "linear", Some(f)) if f.is_finite() && f > 0.0 => Some(RopeScaling::Linear { factor: f }),
            ("linear" | "yarn", None) => bail!("{p}: `{prefix}type` is {ty} but no `{prefix}factor` is given"),
            ("yarn", Some(f)) if f.is_finite() && f >= 1.0 => {
                let context = self.meta_usize(&format!("{a}.context_length")).unwrap_or(4096);
                let old = match self.meta(&format!("{prefix}original_context_length")) {
                    None => context,
                    Some(_) => self.meta_usize(&format!("{prefix}original_context_length"))?,
                };
                // llama.cpp multiplies cos and sin by attn_factor (1 here) times
                // 1 + 0.1 ln(factor): transformers' default attention factor.
                Some(RopeScaling::Yarn {
                    factor: f,
                    original_max_position_embeddings: old,
                    attention_factor: 1.0 + 0.1 * f.ln(),
                    beta_fast: positive("yarn_beta_fast", 32.0)?,
                    beta_slow: positive("yarn_beta_slow", 1.0)?,
                    truncate: true,
                })
            }
            (_, Some(f)) if matches!(ty.as_str(), "none" | "linear" | "yarn") => {
                bail!("{p}: metadata `{prefix}factor` is {f}; it must be finite and positive (at least 1 for yarn)")
            }
            (other, _) => bail!(
                "{p}: metadata `{prefix}type` is `{other}`, which strata does not compute exactly (none, linear, yarn, or Llama 3's rope_freqs); refusing rather than running the model with the wrong positions"
            ),
        };
        let freqs = match self.content.tensor_infos.get("rope_freqs.weight") {
            None => None,
            Some(_) => {
                let t = self.qtensor("rope_freqs.weight")?.dequantize(&Device::Cpu)?;
                let v = t.flatten_all()?.to_vec1::<f32>()?;
                Some(v.into_iter().map(f64::from).collect::<Vec<_>>())
            }
        };
        Ok(match (scaled, freqs) {
            (None, None) => RopeScaling::None,
            (Some(s), None) => s,
            (None, Some(k)) => RopeScaling::Factors(k),
            (Some(_), Some(_)) => {
                bail!("{p}: both a `rope_freqs` tensor and `{prefix}type` {ty}: strata does not combine them")
            }
        })
    }

    fn vocab(&self) -> Result<GgufVocab> {
        let p = self.path.display();
        let arr = |key: &str| -> Result<&Vec<Value>> {
            match self.meta(key) {
                Some(Value::Array(a)) => Ok(a),
                Some(_) => bail!("{p}: metadata `{key}` is not an array"),
                None => bail!("{p}: metadata `{key}` is missing"),
            }
        };
        let strings = |key: &str| -> Result<Vec<String>> {
            arr(key)?
                .iter()
                .enumerate()
                .map(|(i, v)| match v {
                    Value::String(s) => Ok(s.clone()),
                    _ => bail!("{p}: element {i} of `{key}` is not a string"),
                })
                .collect()
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let merges = if self.meta("tokenizer.ggml.merges").is_some() {
            strings("tokenizer.ggml.merges")?
        } else {
            vec![]
        };
        let types = match self.meta("tokenizer.ggml.token_type") {
            None => vec![],
            Some(_) => arr("tokenizer.ggml.token_type")?
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    as_i64(v)
                        .with_context(|| format!("{p}: element {i} of `tokenizer.ggml.token_type` is not an integer"))
                })
                .collect::<Result<_>>()?,
        };
        let scores = match self.meta("tokenizer.ggml.scores") {
            None => vec![],
            Some(_) => arr("tokenizer.ggml.scores")?
                .iter()
                .enumerate()
                .map(|(i, v)| match *v {
                    Value::F32(x) => Ok(x),
                    Value::F64(x) => Ok(x as f32),
                    _ => bail!("{p}: element {i} of `tokenizer.ggml.scores` is not a number"),
                })
                .collect::<Result<_>>()?,
        };
        let add_space_prefix = match self.meta("tokenizer.ggml.add_space_prefix") {
            None => true,
            Some(Value::Bool(b)) => *b,
            Some(v) => bail!("{p}: metadata `tokenizer.ggml.add_space_prefix` must be true or false, found {v:?}"),
        };
        Ok(GgufVocab {
            model: self.meta_str("tokenizer.ggml.model").unwrap_or("").to_string(),
            pre: self.meta_str("tokenizer.ggml.pre").unwrap_or("").to_string(),
            tokens,
            types,
            merges,
            scores,
            add_space_prefix,
        })
    }

    /// The GGUF name of Hugging Face tensor `name` in this file's family.
    fn gguf_name(&self, name: &str) -> Option<String> {
        hf_to_gguf(name, &self.arch.norm_kinds())
    }

    fn qtensor(&self, gname: &str) -> Result<QTensor> {
        let mut f = File::open(&self.path).with_context(|| format!("cannot open {}", self.path.display()))?;
        self.content
            .tensor(&mut f, gname, &Device::Cpu)
            .map_err(|e| anyhow::anyhow!("{}: tensor `{gname}`: {e}", self.path.display()))
    }
}

impl WeightSource for GgufSource {
    fn get(&self, name: &str) -> Result<Tensor> {
        let g = self
            .gguf_name(name)
            .with_context(|| format!("{}: no GGUF tensor corresponds to `{name}`", self.path.display()))?;
        if !self.content.tensor_infos.contains_key(&g) {
            bail!("{}: missing tensor `{g}` (for `{name}`)", self.path.display());
        }
        let t = self.qtensor(&g)?.dequantize(&Device::Cpu)?;
        match permuted_heads(self.arch, self.heads, self.kv_heads, &g) {
            Some(n) => permute_rows(&t, n, false),
            None => Ok(t),
        }
    }

    fn get_quant(&self, name: &str) -> Result<Option<QTensor>> {
        use candle_core::quantized::GgmlDType;
        let Some(g) = self.gguf_name(name) else { return Ok(None) };
        let Some(info) = self.content.tensor_infos.get(&g) else {
            return Ok(None);
        };
        if matches!(info.ggml_dtype, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16) || info.shape.rank() != 2 {
            return Ok(None);
        }
        let q = self.qtensor(&g)?;
        let Some(n_head) = permuted_heads(self.arch, self.heads, self.kv_heads, &g) else {
            return Ok(Some(q));
        };
        // Un-permute whole rows: each row is a run of complete quantization blocks.
        let (rows, cols) = q.shape().dims2()?;
        let bytes = q.data()?;
        let row_bytes = bytes.len() / rows;
        if n_head == 0 || !rows.is_multiple_of(2 * n_head) || row_bytes * rows != bytes.len() {
            bail!(
                "{}: tensor `{g}` rows cannot be split into {n_head} RoPE heads",
                self.path.display()
            );
        }
        let half = rows / n_head / 2;
        let mut out = Vec::with_capacity(bytes.len());
        for r in 0..rows {
            // HF row (head h, half s, index j) is GGUF row (h, j, s).
            let (h, rest) = (r / (2 * half), r % (2 * half));
            let (s, j) = (rest / half, rest % half);
            let src = h * 2 * half + j * 2 + s;
            out.extend_from_slice(&bytes[src * row_bytes..(src + 1) * row_bytes]);
        }
        Ok(Some(candle_core::quantized::ggml_file::qtensor_from_ggml(
            info.ggml_dtype,
            &out,
            vec![rows, cols],
            &Device::Cpu,
        )?))
    }

    fn names(&self) -> Vec<String> {
        let norms = self.arch.norm_kinds();
        let mut v: Vec<String> = self
            .content
            .tensor_infos
            .keys()
            .filter_map(|g| gguf_to_hf(g, &norms))
            .collect();
        v.sort();
        v
    }

    fn stored_bytes(&self, name: &str) -> Option<u64> {
        let info = self.content.tensor_infos.get(&self.gguf_name(name)?)?;
        let ty = info.ggml_dtype;
        Some((info.shape.elem_count() / ty.block_size() * ty.type_size()) as u64)
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        Some(
            self.content
                .tensor_infos
                .get(&self.gguf_name(name)?)?
                .shape
                .dims()
                .to_vec(),
        )
    }

    fn stored_type(&self, name: &str) -> Option<String> {
        let g = self.gguf_name(name)?;
        Some(format!("{:?}", self.content.tensor_infos.get(&g)?.ggml_dtype).to_lowercase())
    }

    fn norms_shifted(&self) -> bool {
        // llama.cpp's converter stores Gemma's norm weights as 1 + w.
        self.arch.norm_offset() != 0.0
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }
}

/// Opens and validates a GGUF model file.
pub fn open_gguf(path: &Path) -> Result<ModelSource> {
    let (src, config, vocab) = read_gguf(path)?;
    let json = tokenizer_json_from_gguf(&vocab, &path.display().to_string())?;
    let template = src.meta_str("tokenizer.chat_template").map(String::from);
    let mut tokenizer = Tok::from_json(json, config.eos_token_id, config.bos_token_id, template)?;
    tokenizer.unbroken = super::tokenizer::spanning_pieces(&vocab);
    // llama.cpp: stated in the file, else on for SentencePiece vocabularies.
    tokenizer.add_bos = match src.meta("tokenizer.ggml.add_bos_token") {
        Some(Value::Bool(b)) => *b,
        _ => vocab.model == "llama",
    };
    Ok(ModelSource {
        path: path.to_path_buf(),
        config,
        weights: Box::new(src),
        tokenizer,
    })
}

/// A GGUF file's tensors, configuration and vocabulary, each checked, before the tokenizer is
/// built from the vocabulary (the part [`open_gguf`] adds).
pub fn read_gguf(path: &Path) -> Result<(GgufSource, ModelConfig, GgufVocab)> {
    let content = read_checked(path)?;
    let arch = match content.metadata.get("general.architecture") {
        Some(Value::String(s)) if s == "llama" => Arch::Llama,
        Some(Value::String(s)) if s == "qwen2" => Arch::Qwen2,
        Some(Value::String(s)) if s == "qwen3" => Arch::Qwen3,
        Some(Value::String(s)) if s == "gemma3" => Arch::Gemma3,
        Some(Value::String(s)) => bail!(
            "{}: architecture `{s}` is not supported (llama, qwen2, qwen3, gemma3)",
            path.display()
        ),
        _ => bail!("{}: missing metadata `general.architecture`", path.display()),
    };
    let mut src = GgufSource {
        path: path.to_path_buf(),
        content,
        arch,
        heads: 0,
        kv_heads: 0,
    };
    let config = src.config()?;
    src.heads = config.num_heads;
    src.kv_heads = config.num_kv_heads;
    let vocab = src.vocab()?;
    if vocab.tokens.len() != config.vocab_size {
        bail!(
            "{}: {} tokenizer tokens but the embedding has {} rows",
            path.display(),
            vocab.tokens.len(),
            config.vocab_size
        );
    }
    Ok((src, config, vocab))
}

/// Writes a GGUF file for `cfg` from Hugging Face-named tensors (Llama Q/K permuted as
/// llama.cpp expects) with `vocab` as its tokenizer, matrices stored as `dtype` and vectors as
/// f32. Synthetic test models are written this way; exports go through [`write_tensors`].
pub fn write_gguf(
    path: &Path,
    cfg: &ModelConfig,
    tensors: &[(String, Tensor)],
    vocab: &GgufVocab,
    dtype: GgmlDType,
) -> Result<()> {
    let ty = |_: &str, t: &Tensor| if t.rank() == 1 { GgmlDType::F32 } else { dtype };
    let mut each =
        |f: &mut dyn FnMut(String, Tensor) -> Result<()>| tensors.iter().try_for_each(|(n, t)| f(n.clone(), t.clone()));
    write_tensors(path, cfg, metadata(cfg, vocab)?, &mut each, &[], &ty)
}

/// Refuses a Gemma 3 that llama.cpp would run otherwise than strata: llama.cpp fixes the window
/// pattern (five windowed layers of six), the windowed layers' RoPE base (10,000) and the query
/// scale (see [`gemma_query_scalar`]) instead of reading them from the file.
fn check_gemma_gguf(cfg: &ModelConfig) -> Result<()> {
    let pattern: Vec<bool> = (0..cfg.num_layers).map(|i| i % 6 < 5).collect();
    let ours: Vec<bool> = (0..cfg.num_layers).map(|i| cfg.layer_window(i).is_some()).collect();
    if cfg.sliding_window.is_some() && ours != pattern {
        bail!("this Gemma 3's windowed layers are not llama.cpp's fixed pattern (five of every six), which a GGUF cannot state; write a Hugging Face directory");
    }
    if cfg.sliding_window.is_some() && cfg.rope_local_theta.unwrap_or(cfg.rope_theta) != 10_000.0 {
        bail!("this Gemma 3's windowed layers use a RoPE base other than llama.cpp's fixed 10,000; write a Hugging Face directory");
    }
    let want = gemma_query_scalar(cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.head_dim);
    if cfg.query_pre_attn_scalar.is_some_and(|s| s != want) {
        bail!("this Gemma 3's query_pre_attn_scalar is not the one llama.cpp derives ({want}); write a Hugging Face directory");
    }
    Ok(())
}

/// A source of Hugging Face-named tensors handed over one at a time (see [`write_tensors`]).
pub type EachTensor<'a> = dyn FnMut(&mut dyn FnMut(String, Tensor) -> Result<()>) -> Result<()> + 'a;

/// A GGUF's metadata for `cfg` with `vocab`: architecture, shapes and tokenizer.
fn metadata(cfg: &ModelConfig, vocab: &GgufVocab) -> Result<Vec<(String, Value)>> {
    let a = cfg.arch.gguf_name();
    if cfg.arch == Arch::Gemma3 {
        check_gemma_gguf(cfg)?;
    }
    let mut meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(a.into())),
        (format!("{a}.block_count"), Value::U32(cfg.num_layers as u32)),
        (format!("{a}.embedding_length"), Value::U32(cfg.hidden_size as u32)),
        (
            format!("{a}.feed_forward_length"),
            Value::U32(cfg.intermediate_size as u32),
        ),
        (format!("{a}.attention.head_count"), Value::U32(cfg.num_heads as u32)),
        (
            format!("{a}.attention.head_count_kv"),
            Value::U32(cfg.num_kv_heads as u32),
        ),
        (format!("{a}.attention.key_length"), Value::U32(cfg.head_dim as u32)),
        (format!("{a}.rope.freq_base"), Value::F32(cfg.rope_theta as f32)),
        (
            format!("{a}.attention.layer_norm_rms_epsilon"),
            Value::F32(cfg.rms_norm_eps as f32),
        ),
        (
            format!("{a}.context_length"),
            Value::U32(cfg.max_position_embeddings as u32),
        ),
        ("tokenizer.ggml.model".into(), Value::String(vocab.model.clone())),
        ("tokenizer.ggml.pre".into(), Value::String(vocab.pre.clone())),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(vocab.tokens.iter().map(|t| Value::String(t.clone())).collect()),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(vocab.types.iter().map(|&t| Value::I32(t as i32)).collect()),
        ),
        (
            "tokenizer.ggml.merges".into(),
            Value::Array(vocab.merges.iter().map(|t| Value::String(t.clone())).collect()),
        ),
    ];
    if !vocab.scores.is_empty() {
        meta.push((
            "tokenizer.ggml.scores".into(),
            Value::Array(vocab.scores.iter().map(|&x| Value::F32(x)).collect()),
        ));
        meta.push((
            "tokenizer.ggml.add_space_prefix".into(),
            Value::Bool(vocab.add_space_prefix),
        ));
    }
    if let Some(e) = cfg.eos_token_id {
        meta.push(("tokenizer.ggml.eos_token_id".into(), Value::U32(e)));
    }
    match cfg.rope_scaling {
        RopeScaling::Linear { factor } => {
            meta.push((format!("{a}.rope.scaling.type"), Value::String("linear".into())));
            meta.push((format!("{a}.rope.scaling.factor"), Value::F32(factor as f32)));
        }
        RopeScaling::Yarn {
            factor,
            original_max_position_embeddings,
            beta_fast,
            beta_slow,
            attention_factor,
            truncate,
        } => {
            // llama.cpp's YaRN always rounds the blend's bounds and derives the amplitude.
            if !truncate || (attention_factor / (1.0 + 0.1 * factor.ln()) - 1.0).abs() > 1e-6 {
                bail!("this model's YaRN scaling (attention_factor {attention_factor}, truncate {truncate}) has no GGUF form: llama.cpp derives the attention factor from the factor and always truncates");
            }
            meta.push((format!("{a}.rope.scaling.type"), Value::String("yarn".into())));
            meta.push((format!("{a}.rope.scaling.factor"), Value::F32(factor as f32)));
            meta.push((
                format!("{a}.rope.scaling.original_context_length"),
                Value::U32(original_max_position_embeddings as u32),
            ));
            meta.push((format!("{a}.rope.scaling.yarn_beta_fast"), Value::F32(beta_fast as f32)));
            meta.push((format!("{a}.rope.scaling.yarn_beta_slow"), Value::F32(beta_slow as f32)));
        }
        RopeScaling::Dynamic { .. } => {
            bail!("dynamic NTK RoPE scaling has no GGUF form (llama.cpp does not implement it); write a Hugging Face directory")
        }
        // llama.cpp states these as a `rope_freqs` tensor, which this writer does not make.
        RopeScaling::Llama3 { .. } | RopeScaling::Factors(_) => {
            bail!("this writer does not make the `rope_freqs` tensor a Llama 3 scaling needs in GGUF")
        }
        RopeScaling::None => {}
    }
    if let Some(b) = cfg.bos_token_id {
        meta.push(("tokenizer.ggml.bos_token_id".into(), Value::U32(b)));
    }
    if let Some(w) = cfg.sliding_window {
        meta.push((format!("{a}.attention.sliding_window"), Value::U32(w as u32)));
    }
    Ok(meta)
}

/// Writes `meta` and the Hugging Face-named tensors `each` hands over as a GGUF file at
/// `path`, atomically: each tensor is mapped to its GGUF name, Llama Q/K rows permuted as
/// llama.cpp expects, and stored as `ty(gguf_name, tensor)` as it arrives (so only the stored
/// form of the model is held, plus one tensor);
/// `extra` are tensors copied as they are (GGUF-named). Tensors are written in name order, so
/// the same model always gives the same file.
pub fn write_tensors(
    path: &Path,
    cfg: &ModelConfig,
    meta: Vec<(String, Value)>,
    each: &mut EachTensor<'_>,
    extra: &[(String, QTensor)],
    ty: &dyn Fn(&str, &Tensor) -> GgmlDType,
) -> Result<()> {
    let mut qts = Vec::new();
    let norms = cfg.arch.norm_kinds();
    each(&mut |name, t| {
        let g = hf_to_gguf(&name, &norms).with_context(|| format!("no GGUF name for tensor `{name}`"))?;
        let mut t = t.to_dtype(candle_core::DType::F32)?;
        // Hugging Face's Gemma norm weight w is llama.cpp's 1 + w (as its converter writes it).
        if cfg.arch.norm_offset() != 0.0 && g.ends_with("norm.weight") {
            t = t.affine(1.0, cfg.arch.norm_offset())?;
        }
        if let Some(n) = permuted_heads(cfg.arch, cfg.num_heads, cfg.num_kv_heads, &g) {
            t = permute_rows(&t, n, true)?;
        }
        let to = ty(&g, &t);
        let q = QTensor::quantize(&t, to).with_context(|| format!("cannot store `{g}` as {to:?}"))?;
        qts.push((g, q));
        Ok(())
    })?;
    let mut qts: Vec<(&str, &QTensor)> = qts.iter().chain(extra).map(|(k, v)| (k.as_str(), v)).collect();
    qts.sort_by(|a, b| a.0.cmp(b.0));
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    crate::util::write_atomic_with(path, |tmp| {
        let f = File::create(tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
        let mut w = std::io::BufWriter::new(f);
        candle_core::quantized::gguf_file::write(&mut w, &meta_refs, &qts)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        use std::io::Write;
        w.flush().with_context(|| format!("cannot write {}", tmp.display()))?;
        w.get_ref()
            .sync_all()
            .with_context(|| format!("cannot flush {} to disk", tmp.display()))?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutation_roundtrips_and_names_map_both_ways() -> Result<()> {
        let w = Tensor::arange(0f32, 48., &Device::Cpu)?.reshape((12, 4))?;
        let p = permute_rows(&w, 3, true)?;
        assert_ne!(p.to_vec2::<f32>()?, w.to_vec2::<f32>()?);
        assert_eq!(permute_rows(&p, 3, false)?.to_vec2::<f32>()?, w.to_vec2::<f32>()?);
        for n in [
            "model.layers.3.self_attn.q_proj.weight",
            "model.layers.0.mlp.down_proj.weight",
            "lm_head.weight",
            "model.layers.2.self_attn.k_proj.bias",
        ] {
            assert_eq!(gguf_to_hf(&hf_to_gguf(n, &[]).unwrap(), &[]).unwrap(), n);
        }
        Ok(())
    }
}
