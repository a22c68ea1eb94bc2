//! The decoder shared by the Llama family, Qwen2 and Qwen3: RMSNorm, GQA attention with RoPE, SwiGLU,
//! tied or untied embeddings. Activations between blocks are `[tokens, hidden]` in f32; frozen
//! projections may be stored in bf16 and run through the frozen-linear op.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};

use super::config::ModelConfig;
use super::lora::Lora;
use super::names::{BaseTensor, PerProj, Proj, SAVABLE};
use super::precision::{keep_rank, BaseDtype};
use super::source::WeightSource;
use crate::ops::attention::{causal_attention, repeat_kv};
use crate::ops::dequant_device::{nf4_device_linear, DeviceNf4};
use crate::ops::dequant_linear::{dequant_linear, gguf_decodable, Compact};
use crate::ops::fused_attention::FusedAttention;
use crate::ops::lora_linear::{KeptProducts, LoraBase, LoraLinear, MaskSeed};
use crate::ops::norm::{rms_norm, rms_norm_composed};
use crate::ops::quant_linear::quant_linear;
use crate::ops::rope::Rope;
use crate::ops::swiglu::{geglu, swiglu};
use crate::ops::trained_linear::{trained_linear, TrainPack};
use crate::ops::{frozen_linear, lm_head};
use crate::rng::mix;
use candle_core::quantized::QTensor;
use std::sync::Arc;

/// How [`Model::load_with`] stores the base.
pub struct LoadSpec<'a> {
    /// Precision of everything the per-module choice does not cover (embeddings and head follow
    /// it: bf16 under bf16 and NF4 bases).
    pub base: BaseDtype,
    /// Base precision of projection `(layer, module)`.
    pub per: &'a dyn Fn(usize, Proj) -> BaseDtype,
    /// Every weight trainable in f32 (full fine-tuning).
    pub full: bool,
    /// Pack frozen bf16 weights for the AVX512-BF16 kernel: faster, but two packed copies sit
    /// beside each bf16 weight (6 bytes a parameter instead of 2).
    pub pack: bool,
    /// Give NF4 projections their device form (`ops::dequant_device`) even on the CPU: the GPU
    /// path, run on the CPU backend (how the tests check it). Always on for other devices.
    pub device_nf4: bool,
}

/// A weight that is either frozen (a constant) or trained (a `Var`).
#[derive(Debug)]
pub enum Param {
    /// Never receives a gradient.
    Frozen(Tensor),
    /// Trained in place by the optimizer.
    Train(Var),
}

impl Param {
    /// The current value.
    pub fn t(&self) -> &Tensor {
        match self {
            Param::Frozen(t) => t,
            Param::Train(v) => v.as_tensor(),
        }
    }
}

/// The weight of a projection: a dense parameter, or a frozen quantized tensor.
#[derive(Debug)]
pub enum LinearWeight {
    /// f32/bf16, frozen or trained.
    Dense(Param),
    /// Frozen in its GGUF quantization type.
    Quant(std::sync::Arc<QTensor>),
    /// Frozen in NF4.
    Nf4(std::sync::Arc<crate::quant::nf4::Nf4Tensor>),
}

impl LinearWeight {
    /// The base precision this weight is held in.
    pub fn precision(&self) -> BaseDtype {
        match self {
            LinearWeight::Dense(p) if p.t().dtype() == DType::BF16 => BaseDtype::Bf16,
            LinearWeight::Dense(_) => BaseDtype::F32,
            LinearWeight::Quant(_) => BaseDtype::AsStored,
            LinearWeight::Nf4(q) => match q.scales {
                crate::quant::nf4::Scales::Plain(_) => BaseDtype::Nf4,
                crate::quant::nf4::Scales::Nested(_) => BaseDtype::Nf4Dq,
            },
        }
    }

    /// The weight as a dense f32 tensor (dequantized when quantized): for merging and export.
    pub fn dense(&self) -> Result<Tensor> {
        Ok(match self {
            LinearWeight::Dense(p) => p.t().to_dtype(DType::F32)?,
            LinearWeight::Quant(q) => q.dequantize(&Device::Cpu)?,
            LinearWeight::Nf4(q) => Tensor::from_vec(q.dequantize(), (q.rows, q.cols), &Device::Cpu)?,
        })
    }

    /// Storage type name and bytes held.
    pub fn storage(&self) -> (String, usize) {
        match self {
            LinearWeight::Dense(p) => dense_storage(p.t()),
            LinearWeight::Quant(q) => (format!("{:?}", q.dtype()).to_lowercase(), q.storage_size_in_bytes()),
            LinearWeight::Nf4(q) => (self.precision().name().into(), q.bytes()),
        }
    }
}

/// Storage type name and bytes of a dense tensor.
fn dense_storage(t: &Tensor) -> (String, usize) {
    (
        format!("{:?}", t.dtype()).to_lowercase(),
        t.elem_count() * t.dtype().size_in_bytes(),
    )
}

/// A projection: weight, optional bias, optional LoRA adapter.
#[derive(Debug)]
pub struct Linear {
    /// `[out, in]`.
    pub w: LinearWeight,
    /// `[out]`.
    pub b: Option<Param>,
    /// The adapter, when the plan targets this module.
    pub lora: Option<Lora>,
    /// `w` packed for the bf16 kernel (frozen bf16 weights on AVX512-BF16 CPUs).
    pub pack: Option<std::sync::Arc<crate::ops::bf16_gemm::LinearPack>>,
    /// An NF4 `w` held on the model's device (any device but the CPU, or the CPU on request):
    /// the forward decodes this copy with `ops::dequant_device`.
    pub nf4_dev: Option<std::sync::Arc<DeviceNf4>>,
    /// A trained `w`'s bf16 working copy under mixed precision ([`Model::mixed_precision`]).
    pub train_pack: Option<Arc<TrainPack>>,
}

/// Per-forward switches.
#[derive(Clone, Copy, Debug)]
pub struct Fwd {
    /// Seed of this step's dropout masks; `None` disables dropout (evaluation).
    pub dropout_seed: Option<u64>,
    /// Index within the optimizer step of this micro-batch's first token, so that dropout masks
    /// do not depend on how the step is split into micro-batches.
    pub first_token: u64,
    /// Whether adapters contribute (off gives the base model without a second copy).
    pub adapters: bool,
    /// Run the composed candle ops a GPU runs (candle's matmul for frozen weights, composed
    /// norms, attention and SwiGLU), even on the CPU: how the GPU path is held to the fused CPU
    /// path without a GPU (`RunOptions::device_ops`), and the naive baseline `strata bench`
    /// measures.
    pub composed: bool,
    /// Keep the autograd graph across blocks in [`Model::hidden`]. Off for evaluation and
    /// generation: adapters are `Var`s, so candle would otherwise keep every activation alive
    /// until the output is dropped.
    pub graph: bool,
}

impl Fwd {
    /// Evaluation with adapters on.
    pub fn eval() -> Self {
        Self {
            dropout_seed: None,
            first_token: 0,
            adapters: true,
            composed: false,
            graph: false,
        }
    }
}

impl Linear {
    /// `x [n, in] -> [n, out]`.
    pub fn forward(&self, x: &Tensor, fwd: Fwd, site: u64) -> Result<Tensor> {
        self.forward_kept(x, fwd, site, None)
    }

    /// [`Linear::forward`], keeping the frozen product of the fused adapter op in `kept` (the
    /// first forward of a micro-batch) or reading it back (the recomputed one).
    fn forward_kept(&self, x: &Tensor, fwd: Fwd, site: u64, kept: Option<&Arc<KeptProducts>>) -> Result<Tensor> {
        let seed = fwd.dropout_seed.map(|s| MaskSeed {
            seed: mix(&[s, site]),
            first_row: fwd.first_token,
        });
        // A frozen projection with an active adapter on the CPU: one fused op.
        if let (Some(l), true, false, DType::F32, true, None) = (
            &self.lora,
            fwd.adapters,
            fwd.composed,
            x.dtype(),
            x.device().is_cpu(),
            &self.nf4_dev,
        ) {
            let base = match (&self.w, &self.pack) {
                (LinearWeight::Dense(Param::Frozen(w)), Some(p)) => Some(LoraBase::Packed(w.clone(), p.clone())),
                (LinearWeight::Dense(Param::Frozen(w)), None) if w.is_contiguous() && w.dtype() == DType::F32 => {
                    Some(LoraBase::F32(w.clone()))
                }
                (LinearWeight::Dense(Param::Frozen(w)), None) if w.is_contiguous() && w.dtype() == DType::BF16 => {
                    Some(LoraBase::Compact(Compact::Bf16(w.clone())))
                }
                (LinearWeight::Nf4(q), _) => Some(LoraBase::Compact(Compact::Nf4(q.clone()))),
                (LinearWeight::Quant(q), _) if gguf_decodable(q) => Some(LoraBase::Compact(Compact::Gguf(q.clone()))),
                _ => None,
            };
            if let Some(base) = base {
                let op = LoraLinear {
                    base,
                    scale: l.scale as f32,
                    dropout: l.dropout,
                    seed,
                    keep: kept.map(|k| (k.clone(), site)),
                };
                let x = if x.is_contiguous() { x.clone() } else { x.contiguous()? };
                let y = x.apply_op3(l.a.as_tensor(), l.b.as_tensor(), op)?;
                return match &self.b {
                    Some(b) => Ok(y.broadcast_add(&b.t().to_dtype(DType::F32)?)?),
                    None => Ok(y),
                };
            }
        }
        let mut y = match &self.w {
            LinearWeight::Dense(Param::Frozen(w)) if fwd.composed => {
                x.to_dtype(w.dtype())?.matmul(&w.t()?)?.to_dtype(DType::F32)?
            }
            // Unpacked bf16 (memory before speed): decoded a slab at a time (ops::dequant_linear).
            LinearWeight::Dense(Param::Frozen(w))
                if self.pack.is_none() && w.dtype() == DType::BF16 && w.device().is_cpu() =>
            {
                dequant_linear(x, Compact::Bf16(w.clone()))?
            }
            LinearWeight::Dense(Param::Frozen(w)) => frozen_linear(x, w, self.pack.as_ref())?,
            LinearWeight::Dense(Param::Train(w)) => match &self.train_pack {
                Some(p) if !fwd.composed && x.dtype() == DType::F32 => {
                    trained_linear(x, w.as_tensor(), p, kept.map(|k| (k.clone(), site)))?
                }
                _ => x.matmul(&w.as_tensor().t()?)?,
            },
            // GGUF block types decode by slabs like NF4; anything else through candle's QMatMul.
            LinearWeight::Quant(q) if gguf_decodable(q) => dequant_linear(x, Compact::Gguf(q.clone()))?,
            LinearWeight::Quant(q) => quant_linear(x, q)?,
            LinearWeight::Nf4(q) => match &self.nf4_dev {
                Some(d) => nf4_device_linear(x, d)?,
                None => dequant_linear(x, Compact::Nf4(q.clone()))?,
            },
        };
        if let Some(b) = &self.b {
            y = y.broadcast_add(&b.t().to_dtype(DType::F32)?)?;
        }
        if let (Some(l), true) = (&self.lora, fwd.adapters) {
            y = (y + l.forward(x, seed)?)?;
        }
        Ok(y)
    }
}

/// What [`Model::block_forward`] keeps across calls and how its rows are attended; the
/// default (nothing kept, whole rows causal) is training and whole-sequence evaluation.
#[derive(Default)]
pub struct BlockState<'a> {
    /// Keys and values of earlier positions, extended by this call (generation).
    pub cache: Option<&'a mut KvCache>,
    /// Selective recomputation: the adapted projections keep their frozen products here on the
    /// first call for a micro-batch and read them back on the second, which then runs none of
    /// their base GEMMs.
    pub kept: Option<&'a Arc<KeptProducts>>,
    /// Rows of a shared trunk and branches (scoring), or of packed documents (training): which
    /// position sees which, at which RoPE position (whole rows, fused CPU attention only).
    pub tree: Option<&'a TreeRows>,
}

/// Rows of trunk-and-branch positions for scoring (see [`crate::ops::fused_attention::Tree`]):
/// which positions see which, and each position's RoPE position (`tree.pos`).
#[derive(Clone, Debug)]
pub struct TreeRows {
    /// Visibility and positions, `[b * t]`.
    pub tree: Arc<crate::ops::fused_attention::Tree>,
}

impl TreeRows {
    /// Rows whose positions belong to `branch` (0: the shared trunk) at RoPE `positions`.
    pub fn new(branch: Vec<u32>, positions: Vec<usize>) -> Self {
        Self {
            tree: Arc::new(crate::ops::fused_attention::Tree { branch, pos: positions }),
        }
    }
}

/// Keys and values of past positions for one block, `[b, kv_heads, t, head_dim]`.
#[derive(Debug, Default, Clone)]
pub struct KvCache {
    k: Option<Tensor>,
    v: Option<Tensor>,
}

impl KvCache {
    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.k.as_ref().map(|k| k.dim(2).unwrap_or(0)).unwrap_or(0)
    }

    /// True before the first forward.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One decoder block.
#[derive(Debug)]
pub struct Block {
    /// Index of the block.
    pub index: usize,
    /// The block's RMSNorm weights with their kinds, in [`Arch::layer_norms`]'s order (for
    /// every family a pre-attention and a pre-MLP norm; Qwen3 and Gemma 3 per-head query and
    /// key norms, `[head_dim]`, applied before RoPE; Gemma 3 norms of the attention and MLP
    /// outputs). Each holds the factor the norm multiplies by (Gemma's `1 + w`).
    ///
    /// [`Arch::layer_norms`]: super::config::Arch::layer_norms
    pub norms: Vec<(BaseTensor, Param)>,
    /// The seven projections, by [`Proj`].
    pub proj: PerProj<Linear>,
}

impl Block {
    /// The block's norms with their kinds, in [`Arch::layer_norms`]'s order.
    ///
    /// [`Arch::layer_norms`]: super::config::Arch::layer_norms
    pub fn norms(&self) -> Vec<(BaseTensor, &Param)> {
        self.norms.iter().map(|(k, p)| (*k, p)).collect()
    }

    /// The norm of kind `kind`, if the block has one.
    pub fn norm(&self, kind: BaseTensor) -> Option<&Param> {
        self.norms.iter().find(|(k, _)| *k == kind).map(|(_, p)| p)
    }

    /// The pre-MLP norm (Llama's `post_attention_layernorm`, Gemma's `pre_feedforward_layernorm`).
    fn mlp_norm(&self) -> Result<&Param> {
        self.norm(BaseTensor::MlpNorm)
            .or_else(|| self.norm(BaseTensor::PreMlpNorm))
            .context("block without a pre-MLP norm")
    }
}

/// The whole decoder.
#[derive(Debug)]
pub struct Model {
    /// Shape of the model.
    pub cfg: ModelConfig,
    /// `[vocab, hidden]`.
    pub embed: Param,
    /// Decoder blocks.
    pub blocks: Vec<Block>,
    /// Final RMSNorm weight.
    pub norm: Param,
    /// Untied LM head `[vocab, hidden]`; `None` when tied to the embedding.
    pub head: Option<Param>,
    rope: Rope,
    /// The windowed layers' own RoPE (Gemma 3's local base), when they have one.
    rope_local: Option<Rope>,
    /// The frozen head packed for the bf16 kernel (bf16 bases on AVX512-BF16 CPUs).
    pub head_pack: Option<std::sync::Arc<lm_head::HeadPack>>,
    /// A trained head's (or tied embedding's) bf16 working copy under mixed precision.
    pub train_head: Option<Arc<TrainPack>>,
    /// Device of every tensor.
    pub device: Device,
    /// The precision the base was loaded in (per-module choices aside).
    pub base: BaseDtype,
}

/// Reads `name` and checks its shape; the tensor keeps its stored dtype.
fn load(src: &dyn WeightSource, name: &str, shape: &[usize]) -> Result<Tensor> {
    let t = src.get(name)?;
    if t.dims() != shape {
        bail!(
            "{}: tensor `{name}` has shape {:?} but the config implies {:?}",
            src.describe(),
            t.dims(),
            shape
        );
    }
    Ok(t)
}

/// A norm weight `[width]` as the model holds it: the factor the norm multiplies by (the
/// family's offset added to a Hugging Face weight, as Gemma's `1 + w`), f32.
fn norm_param(
    cfg: &ModelConfig,
    src: &dyn WeightSource,
    name: &str,
    width: usize,
    full: bool,
    dev: &Device,
) -> Result<Param> {
    let mut t = load(src, name, &[width])?;
    let offset = cfg.arch.norm_offset();
    if offset != 0.0 && !src.norms_shifted() {
        t = t.to_dtype(DType::F32)?.affine(1.0, offset)?;
    }
    param(t, full, DType::F32, dev)
}

/// A trainable f32 `Var` or a frozen tensor in `dtype`, converted from the stored dtype directly
/// (no f32 copy of a 16-bit embedding on the way).
fn param(t: Tensor, train: bool, dtype: DType, dev: &Device) -> Result<Param> {
    Ok(if train {
        Param::Train(Var::from_tensor(&t.to_dtype(DType::F32)?.to_device(dev)?)?)
    } else {
        Param::Frozen(t.to_dtype(dtype)?.to_device(dev)?)
    })
}

/// A projection's weight as `prec` asks: a GGUF's blocks as stored (`as-stored`), a
/// bitsandbytes checkpoint's NF4 codes as stored, NF4 quantized at load, or dense (trainable
/// in f32 under full fine-tuning).
fn projection_weight(
    src: &dyn WeightSource,
    wname: &str,
    [o, inp]: [usize; 2],
    prec: BaseDtype,
    full: bool,
    dev: &Device,
) -> Result<LinearWeight> {
    let quant = match (prec, full) {
        (BaseDtype::AsStored, false) => src.get_quant(wname)?,
        _ => None,
    };
    Ok(match quant {
        Some(q) if q.shape().dims() == [o, inp] && !dev.is_cpu() => {
            // Block bytes as stored, copied onto the device (candle's CUDA kernels).
            let on = candle_core::quantized::ggml_file::qtensor_from_ggml(q.dtype(), &q.data()?, vec![o, inp], dev)?;
            LinearWeight::Quant(std::sync::Arc::new(on))
        }
        Some(q) if q.shape().dims() == [o, inp] => LinearWeight::Quant(std::sync::Arc::new(q)),
        Some(q) => bail!(
            "{}: tensor `{wname}` has shape {:?} but the config implies {:?}",
            src.describe(),
            q.shape().dims(),
            [o, inp]
        ),
        None if !full && matches!(prec, BaseDtype::Nf4 | BaseDtype::Nf4Dq | BaseDtype::AsStored) => {
            match src.get_nf4(wname)? {
                // A bitsandbytes checkpoint: its codes are used as stored.
                Some(q) if (q.rows, q.cols) == (o, inp) => LinearWeight::Nf4(std::sync::Arc::new(q)),
                Some(q) => bail!(
                    "{}: NF4 tensor `{wname}` has shape [{}, {}] but the config implies [{o}, {inp}]",
                    src.describe(),
                    q.rows,
                    q.cols
                ),
                None if prec == BaseDtype::AsStored => {
                    LinearWeight::Dense(param(load(src, wname, &[o, inp])?, full, DType::F32, dev)?)
                }
                None => {
                    let w: Vec<f32> = load(src, wname, &[o, inp])?
                        .to_dtype(DType::F32)?
                        .flatten_all()?
                        .to_vec1()?;
                    LinearWeight::Nf4(std::sync::Arc::new(crate::quant::nf4::Nf4Tensor::quantize(
                        &w,
                        o,
                        inp,
                        64,
                        prec == BaseDtype::Nf4Dq,
                    )))
                }
            }
        }
        None => LinearWeight::Dense(param(load(src, wname, &[o, inp])?, full, prec.dtype(), dev)?),
    })
}

/// Projection `m` of layer `i` as the load spec says: GGUF blocks as stored, NF4 (a
/// bitsandbytes checkpoint's codes, or quantized here), or dense (trainable under full
/// fine-tuning), with its bias, kernel pack and device copy.
fn load_linear(
    cfg: &ModelConfig,
    src: &dyn WeightSource,
    spec: &LoadSpec<'_>,
    dev: &Device,
    i: usize,
    m: Proj,
) -> Result<Linear> {
    let full = spec.full;
    let (o, inp) = cfg.linear_shape(m);
    let name = m.path(i);
    let wname = format!("{name}.weight");
    let w = projection_weight(src, &wname, [o, inp], (spec.per)(i, m), full, dev)?;
    let b = if cfg.arch.qkv_bias() && m.has_qkv_bias() {
        Some(param(load(src, &format!("{name}.bias"), &[o])?, full, DType::F32, dev)?)
    } else {
        None
    };
    let pack = match &w {
        LinearWeight::Dense(Param::Frozen(t)) if spec.pack => crate::ops::frozen_linear::pack_weight(t)?,
        _ => None,
    };
    let nf4_dev = match &w {
        LinearWeight::Nf4(q) if spec.device_nf4 || !dev.is_cpu() => Some(std::sync::Arc::new(
            DeviceNf4::upload(q, dev).with_context(|| wname.clone())?,
        )),
        _ => None,
    };
    Ok(Linear {
        w,
        b,
        lora: None,
        pack,
        nf4_dev,
        train_pack: None,
    })
}

impl Model {
    /// Builds the model from a weight source. `full` makes every weight trainable in f32 (full
    /// fine-tuning); otherwise every weight is frozen, projections stored in `base`.
    pub fn load(cfg: &ModelConfig, src: &dyn WeightSource, base: BaseDtype, full: bool, dev: &Device) -> Result<Self> {
        Self::load_with(
            cfg,
            src,
            &LoadSpec {
                base,
                per: &|_, _| base,
                full,
                pack: true,
                device_nf4: false,
            },
            dev,
        )
    }

    /// [`Model::load`] with each projection's base precision chosen per layer and module (the
    /// layered plan: e.g. bf16 below, NF4 above).
    pub fn load_with(cfg: &ModelConfig, src: &dyn WeightSource, spec: &LoadSpec<'_>, dev: &Device) -> Result<Self> {
        cfg.validate()?;
        let (base, full) = (spec.base, spec.full);
        let h = cfg.hidden_size;
        // Embeddings and the head follow the base: 16-bit under bf16 and NF4 bases (bitsandbytes
        // leaves them unquantized too), f32 otherwise.
        let pd = match base {
            BaseDtype::Bf16 | BaseDtype::Nf4 | BaseDtype::Nf4Dq => DType::BF16,
            _ => DType::F32,
        };
        let embed = param(
            load(src, &BaseTensor::Embed.hf(0), &[cfg.vocab_size, h])?,
            full,
            pd,
            dev,
        )?;
        let mut blocks = Vec::with_capacity(cfg.num_layers);
        // Decoding a large quantized model's blocks takes a while: a bar on a terminal.
        let mut progress = crate::progress::Progress::new("loading", cfg.num_layers as u64, "layers");
        for i in 0..cfg.num_layers {
            progress.set(i as u64, "");
            let proj = Proj::ALL
                .into_iter()
                .map(|m| load_linear(cfg, src, spec, dev, i, m))
                .collect::<Result<Vec<_>>>()?;
            let norms = cfg
                .arch
                .layer_norms(cfg.head_dim, h)
                .into_iter()
                .map(|(kind, width)| Ok((kind, norm_param(cfg, src, &kind.hf(i), width, full, dev)?)))
                .collect::<Result<Vec<_>>>()?;
            blocks.push(Block {
                index: i,
                norms,
                proj: PerProj(proj.try_into().expect("one Linear per projection")),
            });
        }
        progress.set(cfg.num_layers as u64, "");
        progress.finish();
        let norm = norm_param(cfg, src, &BaseTensor::Norm.hf(0), h, full, dev)?;
        let head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(param(
                load(src, &BaseTensor::Head.hf(0), &[cfg.vocab_size, h])?,
                full,
                pd,
                dev,
            )?)
        };
        let rope = cfg.rope(DType::F32, dev)?;
        let rope_local = cfg.rope_local(DType::F32, dev)?;
        let mut model = Self {
            cfg: cfg.clone(),
            embed,
            blocks,
            norm,
            head,
            rope,
            rope_local,
            head_pack: None,
            train_head: None,
            device: dev.clone(),
            base,
        };
        if pd == DType::BF16 && !full && spec.pack {
            model.head_pack = lm_head::HeadPack::of_head(model.head_weight())?.map(std::sync::Arc::new);
        }
        Ok(model)
    }

    /// The base parameters of `modules` (names from [`SAVABLE`]) with their Hugging Face names,
    /// in a fixed order.
    pub fn savable(&self, modules: &[String]) -> Result<Vec<(String, &Tensor)>> {
        let mut out = Vec::new();
        for m in modules {
            let arch = self.cfg.arch;
            let Some(kind) = BaseTensor::from_module(m, &arch.norm_kinds()) else {
                if SAVABLE.contains(&m.as_str()) {
                    bail!("`{m}`: {} has no such norm", arch.model_type());
                }
                bail!("`{m}` cannot be trained beside adapters; choose from {SAVABLE:?}");
            };
            if arch.norm_offset() != 0.0 && !matches!(kind, BaseTensor::Embed | BaseTensor::Head) {
                // The model holds Gemma's 1 + w; a PEFT file must hold w. Not written yet.
                bail!("`{m}`: training {}'s norms beside adapters is not supported (its norms hold 1 + w); train embed_tokens / lm_head, or use full fine-tuning", arch.model_type());
            }
            match kind {
                BaseTensor::Head if self.head.is_none() => {
                    bail!("lm_head is tied to embed_tokens in this model: list embed_tokens instead")
                }
                BaseTensor::Embed => out.push((kind.hf(0), self.embed.t())),
                BaseTensor::Norm => out.push((kind.hf(0), self.norm.t())),
                BaseTensor::Head => out.push((kind.hf(0), self.head.as_ref().expect("checked above").t())),
                _ => {
                    for b in &self.blocks {
                        for (k, p) in b.norms() {
                            if k == kind {
                                out.push((kind.hf(b.index), p.t()));
                            }
                        }
                    }
                }
            }
        }
        Ok(out)
    }

    fn base_param_mut(&mut self, name: &str) -> Result<&mut Param> {
        for kind in [BaseTensor::Embed, BaseTensor::Norm, BaseTensor::Head] {
            if name == kind.hf(0) {
                return match kind {
                    BaseTensor::Embed => Ok(&mut self.embed),
                    BaseTensor::Norm => Ok(&mut self.norm),
                    _ => self.head.as_mut().context("the model has no separate lm_head"),
                };
            }
        }
        let rest = name
            .strip_prefix(super::names::LAYERS)
            .and_then(|r| r.strip_prefix('.'))
            .context("unknown base parameter")?;
        let (i, _) = rest.split_once('.').context("unknown base parameter")?;
        let i: usize = i.parse().context("unknown base parameter")?;
        let b = self.blocks.get_mut(i).context("layer index out of range")?;
        match b.norms.iter_mut().find(|(k, _)| name == k.hf(i)) {
            Some((_, p)) => Ok(p),
            None => bail!("unknown base parameter `{name}`"),
        }
    }

    /// Whether `name` is the embedding or the head, whose packed copy a change makes stale.
    fn is_head_or_embed(name: &str) -> bool {
        name == BaseTensor::Embed.hf(0) || name == BaseTensor::Head.hf(0)
    }

    /// Replaces a base parameter's value (shape checked), keeping it trainable or frozen.
    pub fn set_base(&mut self, name: &str, t: Tensor) -> Result<()> {
        let p = self.base_param_mut(name)?;
        if t.dims() != p.t().dims() {
            bail!("shape {:?}, the model has {:?}", t.dims(), p.t().dims());
        }
        match p {
            Param::Train(v) => v.set(&t.to_dtype(v.dtype())?)?,
            Param::Frozen(old) => *old = t.to_dtype(old.dtype())?,
        }
        if Self::is_head_or_embed(name) {
            self.head_pack = None;
        }
        // A trained weight's bf16 working copy follows its new value.
        self.refresh_packs()
    }

    /// Makes the base parameters of `modules` trainable (f32), beside the adapters.
    pub fn train_modules(&mut self, modules: &[String]) -> Result<()> {
        let names: Vec<String> = self.savable(modules)?.into_iter().map(|(n, _)| n).collect();
        for name in names {
            let p = self.base_param_mut(&name)?;
            if let Param::Frozen(t) = p {
                *p = Param::Train(Var::from_tensor(&t.to_dtype(DType::F32)?)?);
            }
            if Self::is_head_or_embed(&name) {
                // The packed head is a frozen copy; a trained head must be read live.
                self.head_pack = None;
            }
        }
        Ok(())
    }

    /// bf16 mixed precision for every trained dense weight (full fine-tuning, a trained head or
    /// embedding): the f32 weight stays the master the optimizer updates, and the GEMMs read a
    /// bf16 copy packed for the AVX512-BF16 kernel (forward, input and weight gradients), which
    /// [`Model::refresh_packs`] brings up to date after each update. Returns the bytes the
    /// copies hold; 0 where the kernel cannot run them (the f32 path stays).
    pub fn mixed_precision(&mut self) -> Result<usize> {
        let mut bytes = 0;
        for b in &mut self.blocks {
            for lin in b.proj.values_mut() {
                if let LinearWeight::Dense(Param::Train(w)) = &lin.w {
                    lin.train_pack = TrainPack::new(w.as_tensor())?;
                    bytes += lin.train_pack.as_ref().map_or(0, |p| p.bytes());
                }
            }
        }
        if let Param::Train(w) = self.head.as_ref().unwrap_or(&self.embed) {
            self.train_head = TrainPack::new(w.as_tensor())?;
            bytes += self.train_head.as_ref().map_or(0, |p| p.bytes());
        }
        Ok(bytes)
    }

    /// Repacks every bf16 working copy from its f32 master ([`Model::mixed_precision`]): after
    /// each optimizer update and whenever trained values are restored.
    pub fn refresh_packs(&self) -> Result<()> {
        for b in &self.blocks {
            for lin in b.proj.values() {
                if let (LinearWeight::Dense(Param::Train(w)), Some(p)) = (&lin.w, &lin.train_pack) {
                    p.refresh(w.as_tensor())?;
                }
            }
        }
        if let (Param::Train(w), Some(p)) = (self.head.as_ref().unwrap_or(&self.embed), &self.train_head) {
            p.refresh(w.as_tensor())?;
        }
        Ok(())
    }

    /// The weight gradients the trained projections' bf16 packs summed since the last call
    /// (`ops::trained_linear`: they bypass candle's graph), each with its `Var`.
    pub fn take_pack_grads(&self) -> Result<Vec<(Var, Tensor)>> {
        let mut out = Vec::new();
        for b in &self.blocks {
            for lin in b.proj.values() {
                if let (LinearWeight::Dense(Param::Train(w)), Some(p)) = (&lin.w, &lin.train_pack) {
                    if let Some(g) = p.take_grad()? {
                        out.push((w.clone(), g));
                    }
                }
            }
        }
        Ok(out)
    }

    /// Every adapter with its PEFT module name.
    pub fn loras(&self) -> Vec<(String, &Lora)> {
        let mut v = Vec::new();
        for b in &self.blocks {
            for (p, lin) in b.proj.iter() {
                if let Some(l) = &lin.lora {
                    v.push((p.path(b.index), l));
                }
            }
        }
        v
    }

    /// Each layer's rank for keeping its frozen products ([`keep_rank`]).
    pub fn keep_ranks(&self) -> Vec<u8> {
        self.blocks
            .iter()
            .map(|b| keep_rank(b.proj.values().filter(|p| p.lora.is_some()).map(|p| p.w.precision())))
            .collect()
    }

    /// Every base weight with its Hugging Face name, in a fixed order (embeddings, then each
    /// block's norms, projection weights and biases, then the final norm and head).
    fn base_params_mut(&mut self) -> Vec<(String, &mut Param)> {
        let mut v: Vec<(String, &mut Param)> = vec![(BaseTensor::Embed.hf(0), &mut self.embed)];
        for b in &mut self.blocks {
            let i = b.index;
            let Block { norms, proj, .. } = b;
            for (k, p) in norms.iter_mut() {
                v.push((k.hf(i), p));
            }
            for (p, lin) in Proj::ALL.into_iter().zip(proj.values_mut()) {
                let name = p.path(i);
                if let LinearWeight::Dense(w) = &mut lin.w {
                    v.push((format!("{name}.weight"), w));
                }
                if let Some(bias) = &mut lin.b {
                    v.push((format!("{name}.bias"), bias));
                }
            }
        }
        v.push((BaseTensor::Norm.hf(0), &mut self.norm));
        if let Some(h) = &mut self.head {
            v.push((BaseTensor::Head.hf(0), h));
        }
        v
    }

    /// Every trainable tensor with its name (adapters as `<module>.lora_A.weight`).
    pub fn trainable(&self) -> Vec<(String, Var)> {
        let mut v = Vec::new();
        let mut push = |name: String, p: &Param| {
            if let Param::Train(var) = p {
                v.push((name, var.clone()));
            }
        };
        push(BaseTensor::Embed.hf(0), &self.embed);
        for b in &self.blocks {
            for (k, p) in b.norms() {
                push(k.hf(b.index), p);
            }
            for (p, lin) in b.proj.iter() {
                let name = p.path(b.index);
                if let LinearWeight::Dense(w) = &lin.w {
                    push(format!("{name}.weight"), w);
                }
                if let Some(bias) = &lin.b {
                    push(format!("{name}.bias"), bias);
                }
            }
        }
        push(BaseTensor::Norm.hf(0), &self.norm);
        if let Some(h) = &self.head {
            push(BaseTensor::Head.hf(0), h);
        }
        for (name, l) in self.loras() {
            v.push((format!("{name}.lora_A.weight"), l.a.clone()));
            v.push((format!("{name}.lora_B.weight"), l.b.clone()));
        }
        v
    }

    /// Freezes every trained base weight whose name (as [`Model::trainable`] gives it) is not
    /// in `keep`, so gradients are computed for those alone; adapters are left as they are.
    pub fn freeze_except(&mut self, keep: &[String]) {
        for (name, p) in self.base_params_mut() {
            if let Param::Train(v) = p {
                if !keep.contains(&name) {
                    *p = Param::Frozen(v.as_tensor().detach());
                }
            }
        }
    }

    /// The LM head weight (the embedding when tied).
    pub fn head_weight(&self) -> &Tensor {
        self.head.as_ref().unwrap_or(&self.embed).t()
    }

    /// Whether the LM head (the embedding when tied) is trained.
    pub fn head_trained(&self) -> bool {
        matches!(self.head.as_ref().unwrap_or(&self.embed), Param::Train(_))
    }

    /// A trained head's bf16 working copy under mixed precision, read-locked; `None` for a
    /// frozen head or without mixed precision.
    pub fn train_head_pack(&self) -> Result<Option<std::sync::RwLockReadGuard<'_, lm_head::HeadPack>>> {
        match &self.train_head {
            Some(p) if self.head_trained() => Ok(Some(p.read()?)),
            _ => Ok(None),
        }
    }

    /// Token embeddings `ids [b, t] -> [b * t, hidden]` (f32).
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let flat = ids.flatten_all()?;
        let x = self.embed.t().index_select(&flat, 0)?.to_dtype(DType::F32)?;
        match self.embed_scale() {
            Some(s) => Ok(x.affine(s, 0.0)?),
            None => Ok(x),
        }
    }

    /// What token vectors are multiplied by on the way in: Gemma's sqrt(hidden), in f32 as
    /// llama.cpp computes it (`None`: unscaled).
    pub fn embed_scale(&self) -> Option<f64> {
        self.cfg
            .arch
            .embed_scaled()
            .then(|| (self.cfg.hidden_size as f32).sqrt() as f64)
    }

    /// Runs one block on `x [b * t, hidden]` for a batch of `b` rows of `t` positions; `state`
    /// says what the block keeps across calls (see [`BlockState`]).
    pub fn block_forward(
        &self,
        i: usize,
        x: &Tensor,
        b: usize,
        t: usize,
        fwd: Fwd,
        state: BlockState<'_>,
    ) -> Result<Tensor> {
        let BlockState { cache, kept, tree } = state;
        let cfg = &self.cfg;
        let blk = &self.blocks[i];
        let d = cfg.head_dim;
        // Each projection's dropout stream: a function of where it sits, not of the call order.
        let site = |m: Proj| ((i as u64) << 8) | m.index() as u64;
        let norm = |x: &Tensor, w: &Param| {
            if fwd.composed {
                rms_norm_composed(x, w.t(), cfg.rms_norm_eps)
            } else {
                rms_norm(x, w.t(), cfg.rms_norm_eps)
            }
        };
        let attn_norm = blk
            .norm(BaseTensor::AttnNorm)
            .context("block without an attention norm")?;
        let h = norm(x, attn_norm)?;
        let p = |m: Proj, x: &Tensor| blk.proj[m].forward_kept(x, fwd, site(m), kept);
        let (mut q, mut k, v) = (p(Proj::Q, &h)?, p(Proj::K, &h)?, p(Proj::V, &h)?);
        if let (Some(qn), Some(kn)) = (blk.norm(BaseTensor::QNorm), blk.norm(BaseTensor::KNorm)) {
            // Qwen3, Gemma 3: each head's query and key normalised over its own d values, before RoPE.
            let per_head = |y: &Tensor, w: &Param| -> Result<Tensor> {
                let (rows, width) = y.dims2()?;
                Ok(norm(&y.contiguous()?.reshape((rows * width / d, d))?, w)?.reshape((rows, width))?)
            };
            (q, k) = (per_head(&q, qn)?, per_head(&k, kn)?);
        }
        // Gemma's query_pre_attn_scalar: the attention ops scale scores by 1 / sqrt(d); RoPE is
        // linear, so scaling the queries first gives the model's scale.
        let qs = cfg.query_scale();
        if qs != 1.0 {
            q = q.affine(qs, 0.0)?;
        }
        let att = self.attention(i, (q, k, v), (b, t), fwd, cache, tree)?;
        // Gemma's sandwich: each sub-layer's output normed before its residual add.
        let post = |y: Tensor, kind: BaseTensor| -> Result<Tensor> {
            match blk.norm(kind) {
                Some(w) => Ok(norm(&y, w)?),
                None => Ok(y),
            }
        };
        let x = (x + post(p(Proj::O, &att)?, BaseTensor::PostAttnNorm)?)?;
        let h = norm(&x, blk.mlp_norm()?)?;
        let (g, u) = (p(Proj::Gate, &h)?, p(Proj::Up, &h)?);
        let act = match (cfg.arch.gelu_mlp(), fwd.composed) {
            (true, true) => (g.gelu()? * u)?,
            (true, false) => geglu(&g, &u)?,
            (false, true) => (g.silu()? * u)?,
            (false, false) => swiglu(&g, &u)?,
        };
        Ok((&x + post(p(Proj::Down, &act)?, BaseTensor::PostMlpNorm)?)?)
    }

    /// Block `i`'s attention over its projected `(q, k, v)` rows `[b * t, heads * d]` (RoPE
    /// applied here; the output is `[b * t, heads * d]`): the fused CPU op for whole rows
    /// (causal, or trunk-and-branch / packed documents per `tree`), candle's ops with a KV
    /// cache (generation) or off the fused path.
    fn attention(
        &self,
        i: usize,
        (q, k, v): (Tensor, Tensor, Tensor),
        (b, t): (usize, usize),
        fwd: Fwd,
        cache: Option<&mut KvCache>,
        tree: Option<&TreeRows>,
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (nh, nkv, d) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let window = cfg.layer_window(i);
        let rope = match &self.rope_local {
            Some(local) if cfg.layer_rope_local(i) => local,
            _ => &self.rope,
        };
        let fused = cache.is_none() && self.device.is_cpu() && !fwd.composed;
        if tree.is_some() && !fused {
            bail!("trunk-and-branch scoring and packing with document boundaries run on the fused CPU attention only (data.packing = \"stream\" elsewhere)");
        }
        if fused {
            // Whole rows on the CPU (training, evaluation): RoPE at each position's own index,
            // which a tree sets per position.
            let (cos, sin) = match tree {
                Some(rows) => (
                    rope.half_table_at(true, &rows.tree.pos)?,
                    rope.half_table_at(false, &rows.tree.pos)?,
                ),
                None => (rope.half_table(true, t)?, rope.half_table(false, t)?),
            };
            let op = FusedAttention {
                b,
                t,
                heads: nh,
                kv_heads: nkv,
                d,
                cos,
                sin,
                tree: tree.map(|rows| rows.tree.clone()),
                window,
            };
            return Ok(q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, op)?);
        }
        let heads =
            |y: Tensor, n: usize| -> Result<Tensor> { Ok(y.reshape((b, t, n, d))?.transpose(1, 2)?.contiguous()?) };
        let offset = cache.as_ref().map(|c| c.len()).unwrap_or(0);
        let q = rope.apply(&heads(q, nh)?, offset)?;
        let mut k = rope.apply(&heads(k, nkv)?, offset)?;
        let mut v = heads(v, nkv)?;
        if let Some(c) = cache {
            if let (Some(pk), Some(pv)) = (&c.k, &c.v) {
                k = Tensor::cat(&[pk, &k], 2)?;
                v = Tensor::cat(&[pv, &v], 2)?;
            }
            c.k = Some(k.clone());
            c.v = Some(v.clone());
        }
        let k = repeat_kv(&k, nh / nkv)?.contiguous()?;
        let v = repeat_kv(&v, nh / nkv)?.contiguous()?;
        Ok(causal_attention(&q, &k, &v, window)?
            .transpose(1, 2)?
            .reshape((b * t, nh * d))?)
    }

    /// The final RMSNorm.
    pub fn final_norm(&self, x: &Tensor) -> Result<Tensor> {
        Ok(rms_norm(x, self.norm.t(), self.cfg.rms_norm_eps)?)
    }

    /// Final normed hidden states `[b * t, hidden]` for `ids [b, t]`, extending `caches` if given.
    pub fn hidden(&self, ids: &Tensor, fwd: Fwd, caches: Option<&mut [KvCache]>) -> Result<Tensor> {
        self.hidden_with(ids, fwd, caches, None)
    }

    /// Final normed hidden states `[b * t, hidden]` of trunk-and-branch rows `ids [b, t]`.
    pub fn hidden_tree(&self, ids: &Tensor, fwd: Fwd, rows: &TreeRows) -> Result<Tensor> {
        self.hidden_with(ids, fwd, None, Some(rows))
    }

    fn hidden_with(
        &self,
        ids: &Tensor,
        fwd: Fwd,
        mut caches: Option<&mut [KvCache]>,
        tree: Option<&TreeRows>,
    ) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let mut x = self.embed(ids)?;
        for i in 0..self.blocks.len() {
            let whole = caches.is_none();
            let state = BlockState {
                cache: caches.as_mut().map(|cs| &mut cs[i]),
                tree: tree.filter(|_| whole),
                kept: None,
            };
            x = self
                .block_forward(i, &x, b, t, fwd, state)
                .with_context(|| format!("block {i}"))?;
            if !fwd.graph {
                x = x.detach();
            }
        }
        self.final_norm(&x)
    }

    /// Logits `[b * t, vocab]` (materialised: for generation and tests, not training).
    pub fn logits(&self, ids: &Tensor, fwd: Fwd, caches: Option<&mut [KvCache]>) -> Result<Tensor> {
        self.head_logits(&self.hidden(ids, fwd, caches)?)
    }

    /// Logits of final hidden states `h [n, hidden]`, f32.
    pub fn head_logits(&self, h: &Tensor) -> Result<Tensor> {
        let w = self.head_weight();
        Ok(h.to_dtype(w.dtype())?.matmul(&w.t()?)?.to_dtype(DType::F32)?)
    }

    /// Mean next-token loss and counts over `ids [b, t]` with `targets` (flattened, IGNORE-able);
    /// with `documents`, packed documents are kept apart.
    pub fn eval_loss(
        &self,
        ids: &Tensor,
        targets: &[u32],
        fwd: Fwd,
        documents: Option<&TreeRows>,
    ) -> Result<lm_head::HeadOutput> {
        let h = self.hidden_with(ids, fwd, None, documents)?;
        self.head_loss(&h, targets, true)
    }

    /// Head + cross-entropy over final hidden states `h [n, hidden]` (no gradient).
    pub fn head_loss(&self, h: &Tensor, targets: &[u32], per_token: bool) -> Result<lm_head::HeadOutput> {
        Ok(lm_head::lm_head_loss(
            &h.detach(),
            self.head_weight(),
            targets,
            lm_head::HeadOptions {
                chunk: lm_head::chunk_rows(self.cfg.vocab_size),
                per_token,
                pack: self.head_pack.as_deref(),
                ..Default::default()
            },
        )?)
    }

    /// Fresh per-block caches for generation.
    pub fn new_caches(&self) -> Vec<KvCache> {
        vec![KvCache::default(); self.blocks.len()]
    }

    /// Bytes held by weights, by storage type.
    pub fn weight_bytes(&self) -> Vec<(String, usize)> {
        let mut acc: std::collections::BTreeMap<String, usize> = Default::default();
        let dense = |p: &Param| dense_storage(p.t());
        let mut parts = vec![dense(&self.embed), dense(&self.norm)];
        if let Some(h) = &self.head {
            parts.push(dense(h));
        }
        for b in &self.blocks {
            parts.extend(b.norms.iter().map(|(_, p)| dense(p)));
            for p in b.proj.values() {
                parts.push(p.w.storage());
                if let Some(bb) = &p.b {
                    parts.push(dense(bb));
                }
            }
        }
        for (ty, bytes) in parts {
            *acc.entry(ty).or_default() += bytes;
        }
        acc.into_iter().collect()
    }
}
