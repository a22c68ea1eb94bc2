//! Synthetic models and files for `strata bench` (and the tests): seeded random weights in
//! Hugging Face naming, tiny configurations, NF4 models built straight from random codes, a
//! tiny GGUF and corpus. Nothing here is read by a training run.

use crate::model::config::{Arch, ModelConfig};
use crate::model::WeightSource;
use crate::model::{BaseTensor, Proj, MODULES};
use candle_core::Device;
use candle_core::Tensor;
use std::collections::HashMap;

/// Tensors held in memory under Hugging Face names: the source of synthetic test models.
pub struct MemSource(pub HashMap<String, Tensor>);

impl WeightSource for MemSource {
    fn get(&self, name: &str) -> anyhow::Result<Tensor> {
        self.0
            .get(name)
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("memory source: missing tensor `{name}`"))
    }
    fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.0.keys().cloned().collect();
        v.sort();
        v
    }
    fn stored_type(&self, name: &str) -> Option<String> {
        self.0.get(name).map(|t| format!("{:?}", t.dtype()).to_lowercase())
    }
    fn describe(&self) -> String {
        "in-memory model".into()
    }
}

/// A tiny config of the given family (4 query heads over 2 KV heads, so GQA is exercised);
/// Gemma 3's with a window of 8 on its (windowed) layers and their local RoPE base, as
/// llama.cpp runs a Gemma 3 GGUF.
pub fn tiny_config(arch: Arch, vocab: usize, tied: bool) -> ModelConfig {
    let gemma = arch == Arch::Gemma3;
    ModelConfig {
        arch,
        hidden_size: 32,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 8,
        intermediate_size: 64,
        vocab_size: vocab,
        rope_theta: 10_000.0,
        rope_scaling: crate::model::config::RopeScaling::None,
        sliding_window: gemma.then_some(8),
        window_layers: None,
        rope_local_theta: gemma.then_some(10_000.0),
        query_pre_attn_scalar: gemma.then_some(8.0),
        // Exactly representable in f32, as GGUF stores it.
        rms_norm_eps: 1e-5f32 as f64,
        tie_word_embeddings: tied,
        max_position_embeddings: 128,
        bos_token_id: None,
        eos_token_id: Some(0),
    }
}

/// [`tiny_config`] widened so that every projection's rows are whole NF4 blocks of 64 (hidden
/// 64, head size 16, MLP 128), as NF4 weights on a device require.
pub fn tiny_nf4_config(arch: Arch, vocab: usize, tied: bool) -> ModelConfig {
    ModelConfig {
        hidden_size: 64,
        head_dim: 16,
        intermediate_size: 128,
        ..tiny_config(arch, vocab, tied)
    }
}

/// A QLoRA model of `src` on `dev`: every projection NF4 with double quantization, LoRA r=4
/// (alpha 8) on all seven, adapter seed 3; `device_nf4` gives NF4 its device form even on the
/// CPU (see `LoadSpec::device_nf4`). B starts at zero, as PEFT initializes it.
pub fn tiny_qlora_model(
    cfg: &ModelConfig,
    src: &dyn WeightSource,
    dev: &Device,
    device_nf4: bool,
) -> anyhow::Result<crate::model::Model> {
    use crate::model::{BaseDtype, LoadSpec, Model};
    let per = |_: usize, _: Proj| BaseDtype::Nf4Dq;
    let spec = LoadSpec {
        base: BaseDtype::Nf4Dq,
        per: &per,
        full: false,
        pack: false,
        device_nf4,
    };
    let mut m = Model::load_with(cfg, src, &spec, dev)?;
    crate::adapter::LoraPlan::uniform(4, 8.0, &MODULES).attach(&mut m, 3)?;
    Ok(m)
}

/// Random weights for `cfg` from a seeded generator (uniform with the given mean and standard
/// deviation: cheap enough for 7B-shaped benchmarks; norms near 1).
pub fn random_weights(cfg: &ModelConfig, seed: u64) -> MemSource {
    let mut rng = crate::rng::Rng::new(seed);
    let mut m = HashMap::new();
    let mut rand = |shape: &[usize], mean: f64, std: f64| -> Tensor {
        let n: usize = shape.iter().product();
        let half_width = (std * 3f64.sqrt()) as f32;
        let v: Vec<f32> = (0..n)
            .map(|_| mean as f32 + (rng.next_f32() * 2.0 - 1.0) * half_width)
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).expect("shape")
    };
    let h = cfg.hidden_size;
    m.insert(BaseTensor::Embed.hf(0), rand(&[cfg.vocab_size, h], 0.0, 0.5));
    for i in 0..cfg.num_layers {
        // Norm factors near 1 (Gemma's weight w is the factor less 1).
        for (kind, width) in cfg.arch.layer_norms(cfg.head_dim, h) {
            m.insert(kind.hf(i), rand(&[width], 1.0 - cfg.arch.norm_offset(), 0.1));
        }
        for md in Proj::ALL {
            let (o, inp) = cfg.linear_shape(md);
            let name = md.path(i);
            m.insert(format!("{name}.weight"), rand(&[o, inp], 0.0, 0.2));
            if cfg.arch.qkv_bias() && md.has_qkv_bias() {
                m.insert(format!("{name}.bias"), rand(&[o], 0.0, 0.1));
            }
        }
    }
    m.insert(BaseTensor::Norm.hf(0), rand(&[h], 1.0 - cfg.arch.norm_offset(), 0.1));
    if !cfg.tie_word_embeddings {
        m.insert(BaseTensor::Head.hf(0), rand(&[cfg.vocab_size, h], 0.0, 0.2));
    }
    MemSource(m)
}

/// A tiny model of `arch` over the tiny BPE vocabulary, written to `path` as a GGUF whose
/// matrices are stored as `dtype`; returns its config and weights.
pub fn write_tiny_gguf(
    path: &std::path::Path,
    arch: Arch,
    tied: bool,
    seed: u64,
    dtype: candle_core::quantized::GgmlDType,
) -> anyhow::Result<(ModelConfig, MemSource)> {
    let vocab = crate::model::tokenizer::tiny_vocab();
    let cfg = tiny_config(arch, vocab.tokens.len(), tied);
    let src = write_gguf_of(path, &cfg, seed, dtype)?;
    Ok((cfg, src))
}

/// Six small text documents in `dir/data` (repetitive, so a tiny model learns them in a few
/// steps): the corpus of the end-to-end training tests and `bench gpu`'s trainer check.
pub fn write_tiny_corpus(dir: &std::path::Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir.join("data"))?;
    for i in 0..6 {
        let text = format!("the cat {i} sat on the mat. the dog {i} ran to the cat. ").repeat(8);
        std::fs::write(dir.join(format!("data/doc{i}.txt")), text)?;
    }
    Ok(())
}

/// Random weights for `cfg` (whose vocabulary is the tiny BPE's) written to `path` as a GGUF
/// with the tiny tokenizer; returns the weights.
pub fn write_gguf_of(
    path: &std::path::Path,
    cfg: &ModelConfig,
    seed: u64,
    dtype: candle_core::quantized::GgmlDType,
) -> anyhow::Result<MemSource> {
    let vocab = crate::model::tokenizer::tiny_vocab();
    let src = random_weights(cfg, seed);
    let tensors: Vec<(String, Tensor)> = src.0.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    crate::model::gguf::write_gguf(path, cfg, &tensors, &vocab, dtype)?;
    Ok(src)
}

/// A synthetic model generated tensor by tensor on request, in 16-bit or directly in NF4 from
/// random codes: a 7B-shaped model without a download and without ever holding it in f32.
pub struct SyntheticSource {
    shapes: HashMap<String, Vec<usize>>,
    /// Projections served as NF4 (`true`: with double quantization), by weight name.
    nf4: HashMap<String, bool>,
    seed: u64,
}

impl SyntheticSource {
    /// A source for `cfg` whose projections `(layer, module)` come as NF4 where `nf4(layer,
    /// module)` says so (`Some(double_quant)`), bf16 otherwise.
    pub fn new(cfg: &ModelConfig, seed: u64, nf4: &dyn Fn(usize, Proj) -> Option<bool>) -> Self {
        let (h, v) = (cfg.hidden_size, cfg.vocab_size);
        let mut shapes = HashMap::new();
        let mut quant = HashMap::new();
        shapes.insert(BaseTensor::Embed.hf(0), vec![v, h]);
        shapes.insert(BaseTensor::Norm.hf(0), vec![h]);
        if !cfg.tie_word_embeddings {
            shapes.insert(BaseTensor::Head.hf(0), vec![v, h]);
        }
        for i in 0..cfg.num_layers {
            for (kind, width) in cfg.arch.layer_norms(cfg.head_dim, h) {
                shapes.insert(kind.hf(i), vec![width]);
            }
            for m in Proj::ALL {
                let (o, inp) = cfg.linear_shape(m);
                let name = format!("{}.weight", m.path(i));
                if let Some(dq) = nf4(i, m) {
                    quant.insert(name.clone(), dq);
                }
                shapes.insert(name, vec![o, inp]);
                if cfg.arch.qkv_bias() && m.has_qkv_bias() {
                    shapes.insert(format!("{}.bias", m.path(i)), vec![o]);
                }
            }
        }
        Self {
            shapes,
            nf4: quant,
            seed,
        }
    }

    fn rng(&self, name: &str) -> crate::rng::Rng {
        let h = name
            .bytes()
            .fold(0xcbf29ce484222325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3));
        crate::rng::Rng::new(crate::rng::mix(&[self.seed, h]))
    }
}

impl WeightSource for SyntheticSource {
    fn get(&self, name: &str) -> anyhow::Result<Tensor> {
        let shape = self
            .shapes
            .get(name)
            .ok_or_else(|| anyhow::anyhow!("synthetic model: no tensor `{name}`"))?;
        let n: usize = shape.iter().product();
        let mut rng = self.rng(name);
        // Norms near 1, everything else small (uniform, std about 0.02).
        let (mean, half) = if name.ends_with("norm.weight") {
            (1.0, 0.1)
        } else {
            (0.0, 0.035)
        };
        let v: Vec<half::bf16> = (0..n)
            .map(|_| half::bf16::from_f32(mean + (rng.next_f32() * 2.0 - 1.0) * half))
            .collect();
        Ok(Tensor::from_vec(v, shape.as_slice(), &Device::Cpu)?)
    }
    fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.shapes.keys().cloned().collect();
        v.sort();
        v
    }
    fn stored_type(&self, name: &str) -> Option<String> {
        self.shapes.get(name)?;
        Some(match self.nf4.get(name) {
            Some(true) => "nf4-dq".into(),
            Some(false) => "nf4".into(),
            None => "bf16".into(),
        })
    }
    fn describe(&self) -> String {
        "synthetic model".into()
    }
    fn get_nf4(&self, name: &str) -> anyhow::Result<Option<crate::quant::nf4::Nf4Tensor>> {
        use crate::quant::nf4::{NestedAbsmax, Nf4Tensor, Scales};
        let Some(&dq) = self.nf4.get(name) else { return Ok(None) };
        let (rows, cols) = (self.shapes[name][0], self.shapes[name][1]);
        let n = rows * cols;
        let mut rng = self.rng(name);
        let mut packed = vec![0u8; n.div_ceil(2)];
        for chunk in packed.chunks_mut(8) {
            let r = rng.next_u64().to_le_bytes();
            chunk.copy_from_slice(&r[..chunk.len()]);
        }
        let blocks = n.div_ceil(64);
        // Block scales around 0.05 (what a bf16 checkpoint of std 0.02 gives).
        let scales = if dq {
            Scales::Nested(NestedAbsmax {
                codes: (0..blocks).map(|_| rng.next_u64() as u8).collect(),
                absmax2: (0..blocks.div_ceil(crate::quant::nf4::NESTED_BLOCK))
                    .map(|_| 0.01)
                    .collect(),
                offset: 0.05,
            })
        } else {
            Scales::Plain((0..blocks).map(|_| 0.04 + 0.02 * rng.next_f32()).collect())
        };
        Ok(Some(Nf4Tensor {
            packed,
            scales,
            blocksize: 64,
            rows,
            cols,
        }))
    }
}
