//! Writing a model as a Hugging Face directory or a GGUF file, with adapters merged
//! (`W + s B A`) or not.

use anyhow::{Context, Result};
use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Tensor};
use serde_json::json;
use std::cell::RefCell;
use std::path::Path;

use crate::model::hf::{save_deferred, save_safetensors, Deferred};
use crate::model::tokenizer::Tok;
use crate::model::BaseTensor;
use crate::model::{LinearWeight, Model};
use crate::progress::Progress;
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

/// One weight of the model in Hugging Face naming, made (dequantized to f32, the adapter folded
/// in) only when asked: writers make each in turn and drop it, so a merge never holds a second
/// copy of the model.
pub struct HfWeight<'a> {
    /// Hugging Face name.
    pub name: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// A projection weight (what a 4-bit checkpoint quantizes).
    pub projection: bool,
    /// The projection's NF4 codes when they can be written as they are (NF4 base, no adapter
    /// folded in).
    pub nf4: Option<&'a Nf4Tensor>,
    make: Box<dyn Fn() -> Result<Tensor> + 'a>,
}

impl HfWeight<'_> {
    /// The weight in f32.
    pub fn make(&self) -> Result<Tensor> {
        (self.make)()
    }
}

/// Every weight of the model in Hugging Face naming, in file order; adapters folded in when
/// `merge`. Nothing is computed until a weight is made.
pub fn hf_weights(model: &Model, merge: bool) -> Vec<HfWeight<'_>> {
    fn plain(name: String, t: &Tensor) -> HfWeight<'_> {
        HfWeight {
            name,
            shape: t.dims().to_vec(),
            projection: false,
            nf4: None,
            make: Box::new(move || Ok(t.to_dtype(DType::F32)?)),
        }
    }
    // The model holds the factor a norm multiplies by; Hugging Face's Gemma stores it less 1.
    fn norm(name: String, t: &Tensor, offset: f64) -> HfWeight<'_> {
        HfWeight {
            make: Box::new(move || Ok(t.to_dtype(DType::F32)?.affine(1.0, -offset)?)),
            ..plain(name, t)
        }
    }
    let mut out = vec![plain(BaseTensor::Embed.hf(0), model.embed.t())];
    for b in &model.blocks {
        let i = b.index;
        for (kind, p) in b.norms() {
            out.push(norm(kind.hf(i), p.t(), model.cfg.arch.norm_offset()));
        }
        for (m, p) in b.proj.iter() {
            let name = m.path(i);
            let lora = p.lora.as_ref().filter(|_| merge);
            let (o, inp) = model.cfg.linear_shape(m);
            out.push(HfWeight {
                name: format!("{name}.weight"),
                shape: vec![o, inp],
                projection: true,
                nf4: match (&p.w, lora) {
                    (LinearWeight::Nf4(q), None) => Some(q.as_ref()),
                    _ => None,
                },
                make: Box::new(move || {
                    let w = p.w.dense()?;
                    Ok(match lora {
                        Some(l) => (w + l.delta()?)?,
                        None => w,
                    })
                }),
            });
            if let Some(bias) = &p.b {
                out.push(plain(format!("{name}.bias"), bias.t()));
            }
        }
    }
    out.push(norm(
        BaseTensor::Norm.hf(0),
        model.norm.t(),
        model.cfg.arch.norm_offset(),
    ));
    if let Some(h) = &model.head {
        out.push(plain(BaseTensor::Head.hf(0), h.t()));
    }
    out
}

/// Every weight of the model in Hugging Face naming as `store` writes it (the 4-bit state
/// tensors last), made at once; adapters folded in when `merge`.
pub fn hf_tensors(model: &Model, merge: bool, store: Store) -> Result<Vec<(String, Tensor)>> {
    let mut out = Vec::new();
    let mut quantized = Vec::new();
    for w in hf_weights(model, merge) {
        match store {
            Store::Nf4(dq) if w.projection => match w.nf4 {
                // Already NF4 in the layout asked for: the codes as they are.
                Some(q) if matches!(q.scales, Scales::Nested(_)) == dq => quantized.extend(bnb_tensors(&w.name, q)?),
                _ => {
                    let t = w.make()?;
                    let (o, i) = t.dims2()?;
                    let q = Nf4Tensor::quantize(&t.flatten_all()?.to_vec1::<f32>()?, o, i, 64, dq);
                    quantized.extend(bnb_tensors(&w.name, &q)?);
                }
            },
            _ => out.push((w.name.clone(), w.make()?.to_dtype(store.float())?)),
        }
    }
    out.extend(quantized);
    Ok(out)
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
    let weights = dir.join("model.safetensors");
    match store {
        // Each weight made, converted and written in turn.
        Store::Float(dtype) => {
            let weights_of = hf_weights(model, merge);
            let progress = RefCell::new(Progress::new("writing", weights_of.len() as u64, "tensors"));
            let progress = &progress;
            save_deferred(
                &weights,
                weights_of
                    .into_iter()
                    .map(|w| Deferred {
                        name: w.name.clone(),
                        dtype,
                        shape: w.shape.clone(),
                        make: Box::new(move || {
                            progress.borrow_mut().inc(1, &w.name);
                            w.make()
                        }),
                    })
                    .collect(),
            )?;
            progress.borrow_mut().finish();
        }
        // The 4-bit checkpoint is a quarter of the f32 model: made whole, then written.
        Store::Nf4(_) => save_safetensors(&weights, &hf_tensors(model, merge, store)?)?,
    }
    // A scaling a Hugging Face config cannot state (a GGUF's rope_freqs) stops the export here.
    model
        .cfg
        .rope_scaling
        .to_hf()
        .with_context(|| format!("cannot write {}", dir.display()))?;
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
    tc["add_bos_token"] = json!(tok.add_bos);
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

/// GGUF storage types for `strata merge --out FILE.gguf --dtype T`, by llama.cpp's names, with
/// the `general.file_type` llama.cpp writes for a file mostly of that type.
pub const GGUF_TYPES: [(&str, GgmlDType, u32); 9] = [
    ("f32", GgmlDType::F32, 0),
    ("f16", GgmlDType::F16, 1),
    ("bf16", GgmlDType::BF16, 32),
    ("q8_0", GgmlDType::Q8_0, 7),
    ("q6_k", GgmlDType::Q6K, 18),
    ("q5_k", GgmlDType::Q5K, 16),
    ("q5_0", GgmlDType::Q5_0, 8),
    ("q4_k", GgmlDType::Q4K, 14),
    ("q4_0", GgmlDType::Q4_0, 2),
];

/// The storage type of one GGUF matrix whose rows hold `cols` values: `want` when rows are
/// whole blocks of it, else Q8_0 (blocks of 32) for a quantized `want`, else f16 (llama.cpp's
/// quantizer also falls back to another type for rows that do not divide).
fn gguf_matrix_type(want: GgmlDType, cols: usize) -> GgmlDType {
    let whole = |t: GgmlDType| cols.is_multiple_of(t.block_size());
    match want {
        t if whole(t) => t,
        GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => want,
        _ if whole(GgmlDType::Q8_0) => GgmlDType::Q8_0,
        _ => GgmlDType::F16,
    }
}

/// Checks a GGUF export before any model loads: `source` must be a `.gguf` file (its tokenizer
/// and metadata are reused) and `dtype` one of [`GGUF_TYPES`]; gives the type and file type.
pub fn gguf_export_type(source: &Path, dtype: &str) -> Result<(GgmlDType, u32)> {
    let Some(&(_, want, file_type)) = GGUF_TYPES.iter().find(|t| t.0 == dtype) else {
        let names: Vec<&str> = GGUF_TYPES.iter().map(|t| t.0).collect();
        anyhow::bail!("GGUF storage type `{dtype}`: choose one of {}", names.join(", "));
    };
    if source.extension().and_then(|e| e.to_str()) != Some("gguf") {
        anyhow::bail!(
            "{}: a GGUF export keeps the source GGUF's tokenizer and metadata, so the model must be a .gguf file. \
             For a Hugging Face directory, write a directory (--out DIR) and convert it with llama.cpp's convert_hf_to_gguf.py",
            source.display()
        );
    }
    Ok((want, file_type))
}

/// Writes the model (adapters folded in when `merge`) as a GGUF file at `out`, keeping every
/// metadata entry of the GGUF it was loaded from (`source`: tokenizer, chat template, names)
/// and copying source tensors strata does not model (e.g. `rope_freqs`) as they are, so
/// llama.cpp reads it as it reads the source. Matrices are stored as `dtype` (see
/// [`GGUF_TYPES`]), vectors in f32. Returns a note per matrix stored otherwise than asked.
pub fn write_gguf_file(model: &Model, source: &Path, out: &Path, merge: bool, dtype: &str) -> Result<Vec<String>> {
    let (want, file_type) = gguf_export_type(source, dtype)?;
    let content = crate::model::gguf::read_checked(source)?;
    let mut meta: Vec<(String, Value)> = content
        .metadata
        .iter()
        // candle's writer aligns to 32 bytes; the type entries are set below.
        .filter(|(k, _)| {
            !matches!(
                k.as_str(),
                "general.alignment" | "general.file_type" | "general.quantization_version"
            )
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    meta.sort_by(|a, b| a.0.cmp(&b.0));
    meta.push(("general.file_type".into(), Value::U32(file_type)));
    if !matches!(want, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16) {
        meta.push(("general.quantization_version".into(), Value::U32(2)));
    }
    // The source's tensors that strata does not model pass through as stored.
    let mut f = std::fs::File::open(source).with_context(|| format!("cannot open {}", source.display()))?;
    let mut extra = Vec::new();
    for name in content
        .tensor_infos
        .keys()
        .filter(|n| !crate::model::gguf::is_modelled(model.cfg.arch, n))
    {
        extra.push((name.clone(), content.tensor(&mut f, name, &candle_core::Device::Cpu)?));
    }
    let notes = RefCell::new(Vec::new());
    let ty = |name: &str, t: &Tensor| {
        if t.rank() < 2 {
            return GgmlDType::F32;
        }
        let cols = t.dims()[t.rank() - 1];
        let got = gguf_matrix_type(want, cols);
        if got != want {
            notes.borrow_mut().push(format!(
                "{name}: rows of {cols} are not whole {want:?} blocks; stored as {got:?}"
            ));
        }
        got
    };
    let weights = hf_weights(model, merge);
    let mut progress = Progress::new("writing", weights.len() as u64, "tensors");
    let mut each = |f: &mut dyn FnMut(String, Tensor) -> Result<()>| {
        weights.iter().try_for_each(|w| {
            progress.inc(1, &w.name);
            f(w.name.clone(), w.make()?)
        })
    };
    crate::model::gguf::write_tensors(out, &model.cfg, meta, &mut each, &extra, &ty)?;
    progress.finish();
    Ok(notes.into_inner())
}
