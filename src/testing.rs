//! Test helpers shared by unit tests: finite-difference gradient checks and tiny models.

use candle_core::{Result, Tensor, Var};

/// Checks the autograd gradient of the scalar `f(x)` against central finite differences on
/// every element of `x` (f64 tensors), failing with the worst element if they disagree.
pub fn check_grad(x: &Tensor, f: impl Fn(&Tensor) -> Result<Tensor>, tol: f64) -> Result<()> {
    let var = Var::from_tensor(x)?;
    let y = f(var.as_tensor())?;
    let grads = y.backward()?;
    let g = grads
        .get(var.as_tensor())
        .ok_or_else(|| candle_core::Error::Msg("no gradient reached the input".into()))?
        .flatten_all()?
        .to_vec1::<f64>()?;
    let base = x.flatten_all()?.to_vec1::<f64>()?;
    let h = 1e-5;
    let mut worst = 0.0f64;
    for i in 0..base.len() {
        let mut p = base.clone();
        p[i] += h;
        let fp = f(&Tensor::from_vec(p.clone(), x.shape(), x.device())?)?.to_scalar::<f64>()?;
        p[i] -= 2.0 * h;
        let fm = f(&Tensor::from_vec(p, x.shape(), x.device())?)?.to_scalar::<f64>()?;
        let num = (fp - fm) / (2.0 * h);
        let err = (num - g[i]).abs() / (1.0 + num.abs());
        worst = worst.max(err);
        if err > tol {
            candle_core::bail!(
                "gradient mismatch at element {i}: autograd {} vs finite difference {num}",
                g[i]
            );
        }
    }
    assert!(worst.is_finite());
    Ok(())
}

use crate::model::config::{Arch, ModelConfig, MODULES};
use crate::model::WeightSource;
use candle_core::Device;
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

/// A tiny config of the given family (4 query heads over 2 KV heads, so GQA is exercised).
pub fn tiny_config(arch: Arch, vocab: usize, tied: bool) -> ModelConfig {
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
        // Exactly representable in f32, as GGUF stores it.
        rms_norm_eps: 1e-5f32 as f64,
        tie_word_embeddings: tied,
        max_position_embeddings: 128,
        bos_token_id: None,
        eos_token_id: Some(0),
    }
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
    m.insert("model.embed_tokens.weight".into(), rand(&[cfg.vocab_size, h], 0.0, 0.5));
    for i in 0..cfg.num_layers {
        m.insert(format!("model.layers.{i}.input_layernorm.weight"), rand(&[h], 1.0, 0.1));
        m.insert(
            format!("model.layers.{i}.post_attention_layernorm.weight"),
            rand(&[h], 1.0, 0.1),
        );
        for md in MODULES {
            let (o, inp) = cfg.linear_shape(md).expect("module");
            let name = crate::adapter::plan::module_name(i, md);
            m.insert(format!("{name}.weight"), rand(&[o, inp], 0.0, 0.2));
            if cfg.arch.qkv_bias() && matches!(md, "q_proj" | "k_proj" | "v_proj") {
                m.insert(format!("{name}.bias"), rand(&[o], 0.0, 0.1));
            }
        }
    }
    m.insert("model.norm.weight".into(), rand(&[h], 1.0, 0.1));
    if !cfg.tie_word_embeddings {
        m.insert("lm_head.weight".into(), rand(&[cfg.vocab_size, h], 0.0, 0.2));
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
    let src = random_weights(&cfg, seed);
    let tensors: Vec<(String, Tensor)> = src.0.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    crate::model::gguf::write_gguf(path, &cfg, &tensors, &vocab, dtype)?;
    Ok((cfg, src))
}
