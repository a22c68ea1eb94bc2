//! `strata bench train`: tokens/s and peak RSS of a LoRA training step on a synthetic model of
//! SmolLM2-135M's shape, beside a naive candle trainer interleaved in the same process.
//!
//! The naive variant is what a straightforward candle port does: frozen weights through
//! candle's matmul (which also computes their gradients), one graph for the whole forward
//! (no recomputation), materialised logits with a composed log-softmax.

use anyhow::{bail, Result};
use candle_core::{Device, Tensor, D};
use std::time::Instant;

use crate::adapter::LoraPlan;
use crate::engine::{forward_backward, Batch, GradAcc, Recompute};
use crate::model::config::{Arch, ModelConfig};
use crate::model::MODULES;
use crate::model::{BaseDtype, Fwd, Model};
use crate::util::{human_bytes, peak_rss};

/// Arguments of `strata bench`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// What to benchmark: `train` (tok/s against a naive candle trainer), `memory` (peak
    /// memory and tok/s of LoRA, QLoRA and the layered policy, beside their predictions),
    /// `gemm`, or `gpu` (device checks against the CPU ops, then NF4 against dense projections
    /// on the device).
    pub what: String,
    /// Model shape: `smollm2` (SmolLM2-135M), `qwen2-0.5b`, `qwen2-7b`, `qwen3-8b`, `llama3.1-8b`, `gemma3-1b`, `gemma3-4b` or `tiny`.
    #[arg(long, default_value = "smollm2")]
    pub shape: String,
    /// Rows per batch (train: 4, memory: 1).
    #[arg(long)]
    pub batch: Option<usize>,
    /// Tokens per row (train: 256, memory: 512).
    #[arg(long)]
    pub seq_len: Option<usize>,
    /// Policies `bench memory` trains (comma-separated: lora, qlora, layered); the others are
    /// predicted only (`""`: predict all). Default: all three, or qlora and layered for qwen2-7b.
    #[arg(long)]
    pub policies: Option<String>,
    /// Timed rounds (each runs every variant once, interleaved).
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Frozen base precision (f32 or bf16).
    #[arg(long, default_value = "f32")]
    pub base_dtype: String,
    /// Skip the naive baseline (when only strata's own figure is wanted).
    #[arg(long)]
    pub no_baseline: bool,
    /// Timed steps per variant process.
    #[arg(long, default_value_t = 2)]
    pub steps: usize,
    /// What the backward recomputes in `bench memory`: `blocks` (least memory), `selective`
    /// (blocks, keeping the frozen products) or `off` (fastest, most activation memory).
    #[arg(long, default_value = "blocks")]
    pub recompute: String,
    /// Device of `bench gpu`: `cuda` (needs the `cuda` feature) or `cpu` (the same code on the
    /// CPU backend).
    #[arg(long, default_value = "cuda")]
    pub device: String,
    /// What `bench train` trains: `lora` (r=16 on all seven projections of a frozen base) or
    /// `full` (every weight; `--base-dtype` is then ignored).
    #[arg(long, default_value = "lora")]
    pub mode: crate::train::recipe::Mode,
    /// Trained dense weights under `--mode full`: `auto`, `bf16` (mixed precision through the
    /// bf16 kernel) or `f32`, as `train.precision` says.
    #[arg(long, default_value = "auto")]
    pub precision: crate::train::recipe::Precision,
    /// AdamW's moments in `bench train`: `adamw` (f32) or `adamw8bit` (block-quantized 8-bit).
    #[arg(long, default_value = "adamw")]
    pub optimizer: crate::train::recipe::Optimizer,
    /// Run one variant in this process (used by the parent process; prints JSON).
    #[arg(long, hide = true)]
    pub variant: Option<String>,
}

impl Args {
    /// The policies `--policies` names, in its order, or `default` when it is not given.
    pub(crate) fn policy_list(&self, default: &[&str]) -> Vec<String> {
        match &self.policies {
            Some(p) => p
                .split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect(),
            None => default.iter().map(|s| s.to_string()).collect(),
        }
    }
}

/// SmolLM2-135M's shape.
pub fn smollm2_shape() -> ModelConfig {
    ModelConfig {
        arch: Arch::Llama,
        hidden_size: 576,
        num_layers: 30,
        num_heads: 9,
        num_kv_heads: 3,
        head_dim: 64,
        intermediate_size: 1536,
        vocab_size: 49_152,
        rope_theta: 100_000.0,
        rope_scaling: crate::model::config::RopeScaling::None,
        sliding_window: None,
        window_layers: None,
        rope_local_theta: None,
        query_pre_attn_scalar: None,
        rms_norm_eps: 1e-5,
        tie_word_embeddings: true,
        max_position_embeddings: 8192,
        bos_token_id: Some(1),
        eos_token_id: Some(2),
    }
}

/// The naive baseline step: autograd over everything, frozen weights as graph constants.
fn naive_step(model: &Model, batch: &Batch, acc: &mut GradAcc) -> Result<f64> {
    let (b, t) = batch.ids.dims2()?;
    let mut x = model.embed(&batch.ids)?;
    for i in 0..model.blocks.len() {
        x = model.block_forward(
            i,
            &x,
            b,
            t,
            Fwd {
                composed: true,
                ..Fwd::eval()
            },
            crate::model::BlockState::default(),
        )?;
    }
    let h = model.final_norm(&x)?;
    // In the head's own dtype (bf16 under bf16 bases), as the naive projections compute.
    let w = model.head_weight();
    let logits = h
        .to_dtype(w.dtype())?
        .matmul(&w.t()?)?
        .to_dtype(candle_core::DType::F32)?;
    let lse = logits.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let tg: Vec<u32> = batch.targets.clone();
    let idx = Tensor::from_vec(tg, (b * t, 1), &model.device)?;
    let loss = (lse - logits.gather(&idx, 1)?)?.mean_all()?;
    let grads = loss.backward()?;
    for (_, v) in model.trainable() {
        if let Some(g) = grads.get(v.as_tensor()) {
            acc.add(&v, g)?;
        }
    }
    Ok(loss.to_scalar::<f32>()? as f64)
}

/// The variants `strata bench train` compares.
const VARIANTS: [&str; 4] = [
    STRATA_VARIANTS[0].0,
    STRATA_VARIANTS[1].0,
    STRATA_VARIANTS[2].0,
    "naive-candle",
];

/// strata's variants of `bench train` (and `bench memory`'s timed steps), one per recomputation,
/// in [`recompute_variant`]'s order.
const STRATA_VARIANTS: [(&str, Recompute); 3] = [
    ("strata", Recompute::Blocks),
    ("strata-selective", Recompute::Selective),
    ("strata-no-recompute", Recompute::Off),
];

/// The recomputation of a strata variant.
pub(crate) fn variant_recompute(variant: &str) -> Option<Recompute> {
    STRATA_VARIANTS.iter().find(|v| v.0 == variant).map(|v| v.1)
}

/// The variant name of a recomputation; the benchmarks time whole modes, so a partial or
/// automatic one has none.
pub(crate) fn recompute_variant(r: Recompute) -> Result<&'static str> {
    // An exhaustive match, so a new recomputation cannot go without its variant.
    let i = match r {
        Recompute::Blocks => 0,
        Recompute::Selective => 1,
        Recompute::Off => 2,
        Recompute::Partial(_) | Recompute::Auto => {
            bail!(
                "the benchmarks time off, blocks or selective recomputation, not `{}`",
                r.name()
            )
        }
    };
    Ok(STRATA_VARIANTS[i].0)
}

/// Qwen2-7B's shape.
pub fn qwen2_7b_shape() -> ModelConfig {
    ModelConfig {
        arch: Arch::Qwen2,
        hidden_size: 3584,
        num_layers: 28,
        num_heads: 28,
        num_kv_heads: 4,
        head_dim: 128,
        intermediate_size: 18_944,
        vocab_size: 152_064,
        rope_theta: 1_000_000.0,
        rope_scaling: crate::model::config::RopeScaling::None,
        sliding_window: None,
        window_layers: None,
        rope_local_theta: None,
        query_pre_attn_scalar: None,
        rms_norm_eps: 1e-6,
        tie_word_embeddings: false,
        max_position_embeddings: 32_768,
        bos_token_id: None,
        eos_token_id: Some(151_643),
    }
}

/// Qwen3-8B's shape (per-head q/k norms, untied head).
pub fn qwen3_8b_shape() -> ModelConfig {
    ModelConfig {
        arch: Arch::Qwen3,
        hidden_size: 4096,
        num_layers: 36,
        num_heads: 32,
        num_kv_heads: 8,
        head_dim: 128,
        intermediate_size: 12_288,
        vocab_size: 151_936,
        rope_theta: 1_000_000.0,
        rope_scaling: crate::model::config::RopeScaling::None,
        sliding_window: None,
        window_layers: None,
        rope_local_theta: None,
        query_pre_attn_scalar: None,
        rms_norm_eps: 1e-6,
        tie_word_embeddings: false,
        max_position_embeddings: 40_960,
        bos_token_id: None,
        eos_token_id: Some(151_645),
    }
}

/// Llama 3.1-8B's shape (its `llama3` RoPE scaling, 128k context).
pub fn llama31_8b_shape() -> ModelConfig {
    ModelConfig {
        arch: Arch::Llama,
        hidden_size: 4096,
        num_layers: 32,
        num_heads: 32,
        num_kv_heads: 8,
        head_dim: 128,
        intermediate_size: 14_336,
        vocab_size: 128_256,
        rope_theta: 500_000.0,
        rope_scaling: crate::model::config::RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        },
        sliding_window: None,
        window_layers: None,
        rope_local_theta: None,
        query_pre_attn_scalar: None,
        rms_norm_eps: 1e-5,
        tie_word_embeddings: false,
        max_position_embeddings: 131_072,
        bos_token_id: Some(128_000),
        eos_token_id: Some(128_001),
    }
}

/// Gemma 3's text shape: five windowed layers of every six on a local RoPE base, tied head,
/// head size 256, 262k vocabulary.
fn gemma3_shape(hidden: usize, layers: usize, heads: usize, kv: usize, mlp: usize, window: usize) -> ModelConfig {
    ModelConfig {
        arch: Arch::Gemma3,
        hidden_size: hidden,
        num_layers: layers,
        num_heads: heads,
        num_kv_heads: kv,
        head_dim: 256,
        intermediate_size: mlp,
        vocab_size: 262_144,
        rope_theta: 1_000_000.0,
        rope_scaling: crate::model::config::RopeScaling::None,
        sliding_window: Some(window),
        window_layers: Some((0..layers).map(|i| (i + 1) % 6 != 0).collect()),
        rope_local_theta: Some(10_000.0),
        query_pre_attn_scalar: Some(256.0),
        rms_norm_eps: 1e-6,
        tie_word_embeddings: true,
        max_position_embeddings: 32_768,
        bos_token_id: Some(2),
        eos_token_id: Some(1),
    }
}

/// Gemma 3 1B's shape.
pub fn gemma3_1b_shape() -> ModelConfig {
    gemma3_shape(1152, 26, 4, 1, 6912, 512)
}

/// Gemma 3 4B's text model (its global layers' RoPE scaled linearly by 8, 128k context).
pub fn gemma3_4b_shape() -> ModelConfig {
    ModelConfig {
        vocab_size: 262_208,
        rope_scaling: crate::model::config::RopeScaling::Linear { factor: 8.0 },
        max_position_embeddings: 131_072,
        ..gemma3_shape(2560, 34, 8, 4, 10_240, 1024)
    }
}

/// Qwen2-0.5B's shape.
pub fn qwen2_05b_shape() -> ModelConfig {
    ModelConfig {
        arch: Arch::Qwen2,
        hidden_size: 896,
        num_layers: 24,
        num_heads: 14,
        num_kv_heads: 2,
        head_dim: 64,
        intermediate_size: 4864,
        vocab_size: 151_936,
        rope_theta: 1_000_000.0,
        rope_scaling: crate::model::config::RopeScaling::None,
        sliding_window: None,
        window_layers: None,
        rope_local_theta: None,
        query_pre_attn_scalar: None,
        rms_norm_eps: 1e-6,
        tie_word_embeddings: true,
        max_position_embeddings: 32_768,
        bos_token_id: None,
        eos_token_id: Some(151_643),
    }
}

/// Runs `strata bench`.
pub fn run(mut a: Args) -> Result<()> {
    let memory = a.what == "memory";
    a.batch.get_or_insert(if memory { 1 } else { 4 });
    a.seq_len
        .get_or_insert(if memory || a.what == "gpu" { 512 } else { 256 });
    let cfg = match a.shape.as_str() {
        "smollm2" => smollm2_shape(),
        "qwen2-7b" => qwen2_7b_shape(),
        "qwen2-0.5b" => qwen2_05b_shape(),
        "qwen3-8b" => qwen3_8b_shape(),
        "llama3.1-8b" => llama31_8b_shape(),
        "gemma3-1b" => gemma3_1b_shape(),
        "gemma3-4b" => gemma3_4b_shape(),
        "tiny" => crate::cli::synthetic::tiny_config(Arch::Llama, 1000, true),
        o => bail!("unknown shape `{o}`; choose smollm2, qwen2-0.5b, qwen2-7b, qwen3-8b, llama3.1-8b, gemma3-1b, gemma3-4b or tiny"),
    };
    match a.what.as_str() {
        "train" => {}
        "memory" => return super::bench_memory::run(&a, &cfg),
        "gemm" => return bench_gemm(a.rounds),
        "gpu" => return super::bench_gpu::run(&a, &cfg),
        o => bail!("unknown benchmark `{o}`; available: train, memory, gemm, gpu"),
    }
    let (batch, seq_len) = (a.batch.unwrap_or(4), a.seq_len.unwrap_or(256));
    if let Some(v) = &a.variant {
        return run_variant(&a, &cfg, v);
    }
    let what = match a.mode {
        crate::train::recipe::Mode::Full => format!("full fine-tuning, precision {}", a.precision.name()),
        crate::train::recipe::Mode::Lora => {
            format!("LoRA r=16 alpha=32 on all 7 projections, {} frozen base", a.base_dtype)
        }
    };
    println!(
        "bench train: {} shape ({} layers, hidden {}, vocab {}), {what}, \
         batch {} x {}; each variant in its own process (clean peak RSS), {} interleaved rounds of 1 warm-up + {} timed steps",
        a.shape, cfg.num_layers, cfg.hidden_size, cfg.vocab_size, batch, seq_len, a.rounds, a.steps
    );
    let exe = std::env::current_exe()?;
    let variants: Vec<&str> = VARIANTS
        .iter()
        .copied()
        .filter(|v| !(a.no_baseline && *v == "naive-candle"))
        .collect();
    let mut results: Vec<(Vec<f64>, u64)> = vec![(Vec::new(), 0); variants.len()];
    for round in 0..a.rounds {
        for (i, v) in variants.iter().enumerate() {
            let mut cmd = std::process::Command::new(&exe);
            if *v == "naive-candle" {
                // The naive port runs as a plain candle program would: candle's elementwise
                // pool at its default size (strata's binary holds it to one thread).
                cmd.env("CANDLE_NUM_THREADS", candle_core::utils::get_num_threads().to_string())
                    .env_remove("STRATA_CHOSE_CANDLE_THREADS");
            }
            let out = cmd
                .args([
                    "bench",
                    "train",
                    "--shape",
                    &a.shape,
                    "--base-dtype",
                    &a.base_dtype,
                    "--mode",
                    a.mode.name(),
                    "--precision",
                    a.precision.name(),
                    "--optimizer",
                    a.optimizer.name(),
                    "--variant",
                    v,
                ])
                .args([
                    "--batch",
                    &batch.to_string(),
                    "--seq-len",
                    &seq_len.to_string(),
                    "--steps",
                    &a.steps.to_string(),
                ])
                .output()?;
            if !out.status.success() {
                bail!("variant {v} failed: {}", String::from_utf8_lossy(&out.stderr));
            }
            let line = String::from_utf8_lossy(&out.stdout);
            let j: serde_json::Value = serde_json::from_str(line.trim())?;
            let tps = j["tok_per_s"].as_f64().unwrap_or(0.0);
            let peak = j["peak_rss"].as_u64().unwrap_or(0);
            eprintln!(
                "round {}: {v:<22} {tps:>7.0} tok/s  peak {}",
                round + 1,
                human_bytes(peak)
            );
            results[i].0.push(tps);
            results[i].1 = results[i].1.max(peak);
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let meds: Vec<f64> = results.iter_mut().map(|(v, _)| median(v)).collect();
    let base = variants.iter().position(|v| *v == "naive-candle");
    println!("\n| variant | tok/s (median) | peak RSS | speed vs naive candle | peak RSS vs naive candle |");
    println!("|---|---|---|---|---|");
    for (i, v) in variants.iter().enumerate() {
        let (sr, mr) = match base {
            Some(b) => (
                format!("{:.2}x", meds[i] / meds[b]),
                format!("{:.2}x", results[i].1 as f64 / results[b].1 as f64),
            ),
            None => ("-".into(), "-".into()),
        };
        println!("| {v} | {:.0} | {} | {sr} | {mr} |", meds[i], human_bytes(results[i].1));
    }
    Ok(())
}

/// One variant in this process: a warm-up step, then `steps` timed steps; prints a JSON line.
fn run_variant(a: &Args, cfg: &ModelConfig, variant: &str) -> Result<()> {
    let src = crate::cli::synthetic::random_weights(cfg, 0);
    let full = a.mode == crate::train::recipe::Mode::Full;
    let base = if full {
        BaseDtype::F32
    } else {
        BaseDtype::parse(&a.base_dtype)?
    };
    let mut model = Model::load(cfg, &src, base, full, &Device::Cpu)?;
    drop(src);
    if full {
        if a.precision.bf16_on(&Device::Cpu)? {
            model.mixed_precision()?;
        }
    } else {
        LoraPlan::uniform(16, 32.0, &MODULES).attach(&mut model, 0)?;
    }
    let (batch, seq_len) = (a.batch.unwrap_or(4), a.seq_len.unwrap_or(256));
    let secs = timed_steps(&model, variant, batch, seq_len, a.steps, a.optimizer)?;
    let n = batch * seq_len;
    println!(
        "{}",
        serde_json::json!({"variant": variant, "tok_per_s": n as f64 / secs, "step_s": secs, "peak_rss": peak_rss()})
    );
    Ok(())
}

/// Seconds a whole optimizer step takes on random tokens (`rows x seq_len`), as the peer
/// benchmark times it: forward, backward, global-norm clipping at 1.0, AdamW. One warm-up step,
/// then the mean of `steps`.
pub(crate) fn timed_steps(
    model: &Model,
    variant: &str,
    rows: usize,
    seq_len: usize,
    steps: usize,
    optimizer: crate::train::recipe::Optimizer,
) -> Result<f64> {
    let n = rows * seq_len;
    let vocab = model.cfg.vocab_size;
    let mut rng = crate::rng::Rng::new(1);
    let ids: Vec<u32> = (0..n).map(|_| rng.below(vocab) as u32).collect();
    let targets: Vec<u32> = (0..n).map(|_| rng.below(vocab) as u32).collect();
    let batch = Batch {
        ids: Tensor::from_vec(ids, (rows, seq_len), &model.device)?,
        targets,
        documents: None,
    };
    let params = model.trainable();
    let mut opt = optimizer.build(0.0);
    let mut step = || -> Result<f64> {
        let mut acc = GradAcc::default();
        let loss = match (variant, variant_recompute(variant)) {
            ("naive-candle", _) => naive_step(model, &batch, &mut acc)?,
            (_, Some(r)) => {
                forward_backward(model, &batch, 1.0 / n as f64, r, Fwd::eval(), &mut acc)?.nll_sum / n as f64
            }
            (o, None) => bail!("unknown variant `{o}`; choose from {VARIANTS:?}"),
        };
        let norm = acc.norm()?;
        if norm > 1.0 {
            acc.scale(1.0 / norm)?;
        }
        opt.step(&params, &acc, |_| 1e-4)?;
        model.refresh_packs()?;
        Ok(loss)
    };
    step()?;
    model.device.synchronize()?;
    let t0 = Instant::now();
    for _ in 0..steps.max(1) {
        step()?;
    }
    // Devices run asynchronously: the time counts once the last update has landed.
    model.device.synchronize()?;
    Ok(t0.elapsed().as_secs_f64() / steps.max(1) as f64)
}

/// GFLOP/s of the linear products on SmolLM2's shapes (1,024 tokens, and the head's input
/// gradient over one 256-row chunk of logits, whose k is the vocabulary): strata's bf16 kernel
/// (activation conversion and weight packing included) against candle's f32 and bf16 matmuls,
/// interleaved.
fn bench_gemm(rounds: usize) -> Result<()> {
    use crate::ops::bf16_gemm::{available, gemm, pack_a, PackedB};
    use candle_core::DType;
    if !available() {
        bail!("this CPU has no AVX512-BF16; the bf16 kernel cannot run here");
    }
    println!(
        "{:<22} {:>14} {:>14} {:>14} {:>10}",
        "shape (m x k x n)", "strata bf16", "candle f32", "candle bf16", "ratio"
    );
    for (m, k, n) in [
        (1024, 576, 576),
        (1024, 576, 1536),
        (1024, 1536, 576),
        (1024, 576, 49_152),
        (256, 49_152, 576),
    ] {
        let x = Tensor::randn(0f32, 1., (m, k), &Device::Cpu)?;
        let w = Tensor::randn(0f32, 1., (n, k), &Device::Cpu)?;
        let wb = w.to_dtype(DType::BF16)?;
        let wv: Vec<half::bf16> = wb.flatten_all()?.to_vec1()?;
        let xv: Vec<f32> = x.flatten_all()?.to_vec1()?;
        let xb = x.to_dtype(DType::BF16)?;
        let flops = 2.0 * (m * k * n) as f64;
        let (mut t1, mut t2, mut t3) = (f64::MAX, f64::MAX, f64::MAX);
        let mut c = vec![0f32; m * n];
        for _ in 0..rounds.max(1) {
            let t0 = Instant::now();
            let b = PackedB::from_transposed(&wv, n, k);
            gemm(&pack_a(&xv, m, k), m, &b, &mut c);
            t1 = t1.min(t0.elapsed().as_secs_f64());
            let t0 = Instant::now();
            x.matmul(&w.t()?)?;
            t2 = t2.min(t0.elapsed().as_secs_f64());
            let t0 = Instant::now();
            xb.matmul(&wb.t()?)?;
            t3 = t3.min(t0.elapsed().as_secs_f64());
        }
        println!(
            "{:<22} {:>9.0} GF/s {:>9.0} GF/s {:>9.0} GF/s {:>9.2}x",
            format!("{m} x {k} x {n}"),
            flops / t1 / 1e9,
            flops / t2 / 1e9,
            flops / t3 / 1e9,
            t2 / t1
        );
    }
    println!("(best of {rounds}; ratio = strata bf16 over candle f32)");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every variant of `bench train` runs a step on a tiny model, over f32 and bf16 bases (the
    /// naive baseline once broke when embeddings became bf16 under bf16 bases).
    #[test]
    fn every_variant_steps_on_f32_and_bf16_bases() -> Result<()> {
        let cfg = crate::cli::synthetic::tiny_config(Arch::Llama, 300, true);
        let src = crate::cli::synthetic::random_weights(&cfg, 1);
        for base in [BaseDtype::F32, BaseDtype::Bf16] {
            let mut model = Model::load(&cfg, &src, base, false, &Device::Cpu)?;
            LoraPlan::uniform(4, 8.0, &MODULES).attach(&mut model, 0)?;
            for v in VARIANTS {
                let secs = timed_steps(&model, v, 2, 8, 1, crate::train::recipe::Optimizer::AdamW)?;
                assert!(secs > 0.0, "{v} on {base:?}");
            }
        }
        Ok(())
    }
}
