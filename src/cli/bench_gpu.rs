//! `strata bench gpu`: checks the quantized frozen projections and a QLoRA step on a device
//! against the CPU, then measures there: one block's projections (NF4, plain and
//! double-quantized, against dense bf16 and f32 weights) and whole training steps of the
//! shape's synthetic model under LoRA, QLoRA and the layered policy, all in the same run.
//!
//! Built with `--features cuda` it runs on CUDA device 0; `--device cpu` runs the same code on
//! candle's CPU backend (how the tests hold it without a GPU).

use anyhow::{bail, Result};
use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor, Var};
use std::sync::Arc;
use std::time::Instant;

use super::bench::{timed_steps, Args};
use super::bench_memory::synthetic_model;
use crate::cli::policies::policies;
use crate::model::config::ModelConfig;
use crate::model::Proj;
use crate::ops::dequant_device::{default_slab, nf4_device_linear, nf4_device_linear_slab, DeviceNf4, DeviceNf4Linear};
use crate::ops::dequant_linear::{Compact, DequantLinear};
use crate::ops::frozen_matmul;
use crate::ops::lora_linear::{LoraBase, LoraLinear};
use crate::ops::quant_linear::quant_linear;
use crate::quant::nf4::Nf4Tensor;
use crate::util::{device_peak, human_bytes, reset_device_peak};

/// One comparison of a device result with the CPU's.
#[derive(Debug)]
pub struct Check {
    /// What was compared.
    pub name: String,
    /// Largest absolute difference, relative to the CPU result's largest magnitude.
    pub gap: f64,
    /// The largest gap allowed.
    pub tol: f64,
}

impl Check {
    /// Whether the gap is within tolerance.
    pub fn pass(&self) -> bool {
        self.gap <= self.tol
    }
}

/// `max |a - b| / max |b|` (0 when both are zero), read back on the CPU.
fn gap(a: &Tensor, b: &Tensor) -> Result<f64> {
    let a = a.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    let b = b.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    let d = (&a - &b)?.abs()?.max_all()?.to_scalar::<f32>()? as f64;
    let s = b.abs()?.max_all()?.to_scalar::<f32>()? as f64;
    Ok(if s == 0.0 { d } else { d / s })
}

/// Gradients of `sum(y * probe)` with respect to `vars`.
fn grads(y: &Tensor, probe: &Tensor, vars: &[&Var]) -> Result<Vec<Tensor>> {
    let g = y.mul(probe)?.sum_all()?.backward()?;
    vars.iter()
        .map(|v| {
            g.get(v.as_tensor())
                .cloned()
                .ok_or_else(|| anyhow::anyhow!("no gradient reached a variable"))
        })
        .collect()
}

/// Every check, on `dev` against the CPU ops: NF4 decoding (exact), NF4 forward and dx, a QLoRA
/// projection's gradients (NF4 base + adapter) against the CPU's fused op, GGUF block types,
/// and the dense frozen product; with the `nccl` feature, NCCL's device sum over one rank.
pub fn checks(dev: &Device) -> Result<Vec<Check>> {
    let cpu = Device::Cpu;
    let mut out = Vec::new();
    let mut push = |name: String, gap: f64, tol: f64| out.push(Check { name, gap, tol });
    #[cfg(feature = "nccl")]
    if dev.is_cuda() {
        push(
            "nccl sum, one rank (identity)".into(),
            crate::dist::one_rank_device_sum_gap(dev)?,
            0.0,
        );
    }
    // Odd sizes: slabs end mid-weight, the last scale group is partial. Under 16 rows the CPU's
    // fused LoRA op stays on its f32 GEMM (not the bf16 kernel), so all references are f32.
    let (n, k, m, r) = (600, 256, 13, 8);
    let mut wv: Vec<f32> = Tensor::randn(0f32, 0.05, (n, k), &cpu)?.flatten_all()?.to_vec1()?;
    // A byte holding the two top levels (0xFF) must decode like any other.
    wv[0] = 0.5;
    wv[1] = 0.5;
    let x_cpu = Var::from_tensor(&Tensor::randn(0f32, 1., (m, k), &cpu)?)?;
    let x_dev = Var::from_tensor(&x_cpu.to_device(dev)?)?;
    let probe = Tensor::randn(0f32, 1., (m, n), &cpu)?;
    let probe_dev = probe.to_device(dev)?;
    for dq in [false, true] {
        let tag = if dq { "nf4-dq" } else { "nf4" };
        let q = Arc::new(Nf4Tensor::quantize(&wv, n, k, 64, dq));
        let d = Arc::new(DeviceNf4::upload(&q, dev)?);
        let eye = Tensor::eye(k, DType::F32, dev)?;
        let want = Tensor::from_vec(q.dequantize(), (n, k), &cpu)?.t()?;
        push(
            format!("{tag} decode (bit-exact)"),
            gap(&nf4_device_linear_slab(&eye, &d, 77)?, &want)?,
            0.0,
        );
        let y_ref = x_cpu.as_tensor().apply_op1(DequantLinear {
            w: Compact::Nf4(q.clone()),
            kernel: false,
        })?;
        let dx_ref = grads(&y_ref, &probe, &[&x_cpu])?;
        for (slab, what) in [(77, "slabs of 77 rows"), (0, "default slabs")] {
            let y = if slab == 0 {
                nf4_device_linear(x_dev.as_tensor(), &d)?
            } else {
                nf4_device_linear_slab(x_dev.as_tensor(), &d, slab)?
            };
            push(format!("{tag} forward, {what}"), gap(&y, &y_ref)?, 1e-5);
            let dx = grads(&y, &probe_dev, &[&x_dev])?;
            push(format!("{tag} dx, {what}"), gap(&dx[0], &dx_ref[0])?, 1e-5);
        }
        // QLoRA: the NF4 base plus s * (x A^T) B^T composed on the device, against the CPU's
        // fused op; gradients for x, A and B.
        let a_cpu = Var::from_tensor(&Tensor::randn(0f32, 0.1, (r, k), &cpu)?)?;
        let b_cpu = Var::from_tensor(&Tensor::randn(0f32, 0.1, (n, r), &cpu)?)?;
        let fused = x_cpu.as_tensor().apply_op3(
            a_cpu.as_tensor(),
            b_cpu.as_tensor(),
            LoraLinear {
                base: LoraBase::Compact(Compact::Nf4(q.clone())),
                scale: 2.0,
                dropout: 0.0,
                seed: None,
                keep: None,
            },
        )?;
        let want = grads(&fused, &probe, &[&x_cpu, &a_cpu, &b_cpu])?;
        let a_dev = Var::from_tensor(&a_cpu.to_device(dev)?)?;
        let b_dev = Var::from_tensor(&b_cpu.to_device(dev)?)?;
        let xa = x_dev.as_tensor().matmul(&a_dev.as_tensor().t()?)?;
        let y = (nf4_device_linear(x_dev.as_tensor(), &d)? + (xa.matmul(&b_dev.as_tensor().t()?)? * 2.0)?)?;
        push(format!("{tag} + LoRA forward"), gap(&y, &fused)?, 1e-5);
        let got = grads(&y, &probe_dev, &[&x_dev, &a_dev, &b_dev])?;
        for (i, v) in ["x", "A", "B"].iter().enumerate() {
            push(format!("{tag} + LoRA d{v}"), gap(&got[i], &want[i])?, 1e-5);
        }
    }
    // GGUF block types: the same bytes on both sides. Forwards quantize activations to 8 bits
    // on both (differently on CUDA), so they agree to that precision; dx is exact arithmetic
    // on the dequantized weight.
    let (gn, gk, gm) = (96, 512, 8);
    let w = Tensor::randn(0f32, 0.05, (gn, gk), &cpu)?;
    let gx_cpu = Var::from_tensor(&Tensor::randn(0f32, 1., (gm, gk), &cpu)?)?;
    let gx_dev = Var::from_tensor(&gx_cpu.to_device(dev)?)?;
    let gprobe = Tensor::randn(0f32, 1., (gm, gn), &cpu)?;
    for ty in [
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q8_0,
        GgmlDType::Q4K,
        GgmlDType::Q6K,
    ] {
        let q = Arc::new(QTensor::quantize(&w, ty)?);
        let qd = Arc::new(qtensor_from_ggml(ty, &q.data()?, vec![gn, gk], dev)?);
        let y_ref = quant_linear(gx_cpu.as_tensor(), &q)?;
        let y = quant_linear(gx_dev.as_tensor(), &qd)?;
        push(format!("{ty:?} forward"), gap(&y, &y_ref)?, 0.05);
        let want = grads(&y_ref, &gprobe, &[&gx_cpu])?;
        let got = grads(&y, &gprobe.to_device(dev)?, &[&gx_dev])?;
        push(format!("{ty:?} dx"), gap(&got[0], &want[0])?, 1e-5);
    }
    // Dense frozen product (f32).
    let wd = Tensor::from_vec(wv, (n, k), &cpu)?;
    let y_ref = frozen_matmul(x_cpu.as_tensor(), &wd)?;
    let y = frozen_matmul(x_dev.as_tensor(), &wd.to_device(dev)?)?;
    push("dense f32 forward".into(), gap(&y, &y_ref)?, 1e-5);
    let want = grads(&y_ref, &probe, &[&x_cpu])?;
    let got = grads(&y, &probe_dev, &[&x_dev])?;
    push("dense f32 dx".into(), gap(&got[0], &want[0])?, 1e-5);
    for (name, g, tol) in qlora_step_gaps(dev)?.into_iter().chain(trainer_gaps(dev)?) {
        push(name, g, tol);
    }
    Ok(out)
}

/// `strata train` itself on `dev` against the same recipe on the CPU: a tiny GGUF with an
/// NF4-DQ base under a layered plan (layer 0 f32 with r=8, layer 1 NF4-DQ with r=4),
/// dropout, gradient accumulation; every step's loss and the held-out loss after.
fn trainer_gaps(dev: &Device) -> Result<Vec<(String, f64, f64)>> {
    use crate::model::config::Arch;
    let name = match dev.location() {
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Cpu => "cpu".to_string(),
        o => bail!("bench gpu: no recipe device name for {o:?}"),
    };
    let dir = std::env::temp_dir().join(format!("strata-device-train-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let vocab = crate::model::tokenizer::tiny_vocab().tokens.len();
    let cfg = crate::cli::synthetic::tiny_nf4_config(Arch::Qwen2, vocab, false);
    crate::cli::synthetic::write_gguf_of(&dir.join("tiny.gguf"), &cfg, 4, GgmlDType::F32)?;
    crate::cli::synthetic::write_tiny_corpus(&dir)?;
    // 14-token rows one at a time and no bf16 weights: the CPU's products stay on its f32
    // GEMM, so the two runs differ only by summation order.
    let recipe = |device: &str, out: &str| {
        format!(
            r#"
[model]
path = "{0}/tiny.gguf"
base_dtype = "nf4-dq"
[lora]
r = 4
alpha = 8
dropout = 0.1
[[lora.layers]]
layers = "0"
r = 8
base = "f32"
[data]
train = ["{0}/data"]
seq_len = 14
eval_fraction = 0.2
[train]
batch = 1
grad_accum = 2
steps = 6
lr = 5e-3
warmup = 1
seed = 3
device = "{device}"
out = "{0}/{out}"
"#,
            dir.display()
        )
    };
    // On the CPU backend the second run takes the device's ops there, so the check still
    // compares two different paths.
    let mut runs = Vec::new();
    for (device, out, device_ops) in [("cpu", "host", false), (name.as_str(), "device", dev.is_cpu())] {
        let text = recipe(device, out);
        let r = crate::train::recipe::Recipe::parse(&text, "device-check.toml", &[])?;
        let opts = crate::train::trainer::RunOptions {
            device_ops,
            ..Default::default()
        };
        let summary = crate::train::trainer::run_with(&r, &text, opts)?;
        let losses: Vec<f64> = std::fs::read_to_string(dir.join(out).join("metrics.jsonl"))?
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?.get("loss")?.as_f64())
            .collect();
        runs.push((summary, losses));
    }
    let _ = std::fs::remove_dir_all(&dir);
    let ((a, la), (b, lb)) = (&runs[0], &runs[1]);
    if la.len() != 6 || lb.len() != 6 {
        bail!(
            "device train check: {} and {} step losses, expected 6 each",
            la.len(),
            lb.len()
        );
    }
    let rel = |x: f64, y: f64| (x - y).abs() / y.abs().max(1e-12);
    let steps = la.iter().zip(lb).map(|(x, y)| rel(*y, *x)).fold(0f64, f64::max);
    Ok(vec![
        ("train: every step's loss".into(), steps, 1e-3),
        (
            "train: held-out loss after".into(),
            rel(b.eval_after.loss, a.eval_after.loss),
            1e-3,
        ),
    ])
}

/// One QLoRA micro-batch (NF4-DQ base, LoRA r=4 on every projection, recomputation) on `dev`
/// against the CPU's fused path: the loss and every adapter gradient.
fn qlora_step_gaps(dev: &Device) -> Result<Vec<(String, f64, f64)>> {
    use crate::engine::{forward_backward, Batch, GradAcc, Recompute};
    use crate::model::config::Arch;
    use crate::model::Fwd;
    let cpu = Device::Cpu;
    let cfg = crate::cli::synthetic::tiny_nf4_config(Arch::Qwen2, 300, false);
    let src = crate::cli::synthetic::random_weights(&cfg, 1);
    let host = crate::cli::synthetic::tiny_qlora_model(&cfg, &src, &cpu, false)?;
    let on_dev = crate::cli::synthetic::tiny_qlora_model(&cfg, &src, dev, true)?;
    // B starts at zero (A would get no gradient): the same random B on both sides.
    for ((_, a), (_, b)) in host.loras().into_iter().zip(on_dev.loras()) {
        let v = Tensor::randn(0f32, 0.1, a.b.as_tensor().shape(), &cpu)?;
        a.b.set(&v)?;
        b.b.set(&v.to_device(dev)?)?;
        b.a.set(&a.a.as_tensor().to_device(dev)?)?;
    }
    // 14 rows: the CPU's NF4 products stay on its f32 GEMM (not the bf16 kernel).
    let (rows, t) = (2, 7);
    let mut rng = crate::rng::Rng::new(5);
    let ids: Vec<u32> = (0..rows * t).map(|_| rng.below(300) as u32).collect();
    let targets: Vec<u32> = (0..rows * t).map(|_| rng.below(300) as u32).collect();
    let batch = |on: &Device| -> Result<Batch> {
        Ok(Batch {
            ids: Tensor::from_vec(ids.clone(), (rows, t), on)?,
            targets: targets.clone(),
            documents: None,
        })
    };
    let mut g_host = GradAcc::default();
    let s_host = forward_backward(&host, &batch(&cpu)?, 0.1, Recompute::Blocks, Fwd::eval(), &mut g_host)?;
    let mut g_dev = GradAcc::default();
    // Composed ops everywhere, as any device but the CPU runs them.
    let fwd = Fwd {
        composed: true,
        ..Fwd::eval()
    };
    let s_dev = forward_backward(&on_dev, &batch(dev)?, 0.1, Recompute::Blocks, fwd, &mut g_dev)?;
    let mut out = vec![(
        "QLoRA step loss".to_string(),
        (s_dev.nll_sum - s_host.nll_sum).abs() / s_host.nll_sum.abs().max(1e-12),
        1e-5,
    )];
    let (mut worst, mut name) = (0f64, String::new());
    for ((n, vh), (_, vd)) in host.trainable().iter().zip(&on_dev.trainable()) {
        let (Some(a), Some(b)) = (g_host.get(vh), g_dev.get(vd)) else {
            bail!("{n}: no gradient in the QLoRA step");
        };
        let g = gap(&b, &a)?;
        if g >= worst {
            (worst, name) = (g, n.clone());
        }
    }
    out.push((format!("QLoRA step grads (worst: {name})"), worst, 1e-4));
    Ok(out)
}

/// Seconds for the best of `rounds` calls of `f` (after one warm-up), the device synchronized.
fn best(dev: &Device, rounds: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    dev.synchronize()?;
    let mut t = f64::MAX;
    for _ in 0..rounds.max(1) {
        let t0 = Instant::now();
        f()?;
        dev.synchronize()?;
        t = t.min(t0.elapsed().as_secs_f64());
    }
    Ok(t)
}

/// Runs the checks (stopping with an error if one fails), then times one block of `cfg`'s
/// projections at `tokens` rows: forward and dx, NF4 / NF4-DQ / dense bf16 / dense f32.
pub fn run(a: &Args, cfg: &ModelConfig) -> Result<()> {
    let (rows, seq) = (a.batch.unwrap_or(4), a.seq_len.unwrap_or(512));
    let (tokens, rounds) = (rows * seq, a.rounds);
    let dev = crate::util::device(&a.device)?;
    println!("bench gpu on {:?}: checks against the CPU ops", dev.location());
    let results = checks(&dev)?;
    for c in &results {
        println!(
            "  {:<34} gap {:>9.2e}  (tolerance {:.0e})  {}",
            c.name,
            c.gap,
            c.tol,
            if c.pass() { "ok" } else { "FAILED" }
        );
    }
    let failed = results.iter().filter(|c| !c.pass()).count();
    if failed > 0 {
        bail!("{failed} of {} device checks failed", results.len());
    }
    println!(
        "\none block of the {}-layer shape (hidden {}, intermediate {}): its 7 projections, \
         forward + dx at {tokens} tokens, best of {rounds}",
        cfg.num_layers, cfg.hidden_size, cfg.intermediate_size
    );
    println!(
        "{:<10} {:>12} {:>12} {:>10} {:>14}",
        "weights", "ms / block", "TFLOP/s", "vs bf16", "weight bytes"
    );
    let mut flops = 0f64;
    let mut per: Vec<(String, f64, usize)> = Vec::new();
    for kind in ["nf4", "nf4-dq", "bf16", "f32"] {
        let (mut secs, mut bytes) = (0f64, 0usize);
        for m in Proj::ALL {
            let (n, k) = cfg.linear_shape(m);
            if kind == "nf4" {
                flops += 4.0 * (tokens * n * k) as f64;
            }
            let x = Tensor::randn(0f32, 1., (tokens, k), &dev)?;
            let g = Tensor::randn(0f32, 1., (tokens, n), &dev)?;
            let w = Tensor::randn(0f32, 0.02, (n, k), &dev)?;
            match kind {
                "nf4" | "nf4-dq" => {
                    let wv: Vec<f32> = w.flatten_all()?.to_vec1()?;
                    let d = Arc::new(DeviceNf4::upload(
                        &Nf4Tensor::quantize(&wv, n, k, 64, kind == "nf4-dq"),
                        &dev,
                    )?);
                    bytes += d.bytes();
                    let back = DeviceNf4Linear {
                        w: d.clone(),
                        slab: default_slab(&d),
                        forward: false,
                    };
                    secs += best(&dev, rounds, || {
                        nf4_device_linear(&x, &d)?;
                        g.apply_op1_no_bwd(&back)?;
                        Ok(())
                    })?;
                }
                _ => {
                    let dt = if kind == "bf16" { DType::BF16 } else { DType::F32 };
                    let (w, x, g) = (w.to_dtype(dt)?, x.to_dtype(dt)?, g.to_dtype(dt)?);
                    bytes += w.elem_count() * dt.size_in_bytes();
                    secs += best(&dev, rounds, || {
                        frozen_matmul(&x, &w)?;
                        g.matmul(&w)?;
                        Ok(())
                    })?;
                }
            }
        }
        per.push((kind.to_string(), secs, bytes));
    }
    let bf16 = per.iter().find(|p| p.0 == "bf16").map(|p| p.1).unwrap_or(f64::NAN);
    for (kind, secs, bytes) in &per {
        println!(
            "{:<10} {:>12.2} {:>12.2} {:>9.2}x {:>14}",
            kind,
            secs * 1e3,
            flops / secs / 1e12,
            secs / bf16,
            human_bytes(*bytes as u64)
        );
    }
    println!("(vs bf16 = time over dense bf16's; NF4 computes in f32 after decoding, bf16 in bf16)");
    train_steps(a, cfg, &dev, rows, seq)
}

/// Whole training steps of `cfg`'s synthetic model on `dev` under each policy (forward,
/// backward with recomputation, clipping, AdamW): tok/s and the device's peak memory. Policies
/// run in the order given (`--policies`), each row also printed as it lands.
fn train_steps(a: &Args, cfg: &ModelConfig, dev: &Device, rows: usize, seq: usize) -> Result<()> {
    let wanted = a.policy_list(&["lora", "qlora", "layered"]);
    let all = policies(cfg)?;
    println!(
        "\ntraining steps on {:?}: synthetic model of the shape, batch {rows} x {seq}, 1 warm-up + {} timed steps",
        dev.location(),
        a.steps
    );
    let mut done: Vec<(&str, f64, Option<u64>, f64)> = Vec::new();
    for w in &wanted {
        let Some(p) = all.iter().find(|p| p.name == w && p.plan.is_some()) else {
            bail!("unknown policy `{w}`; choose from lora, qlora, layered");
        };
        dev.synchronize()?;
        reset_device_peak(dev);
        let t0 = Instant::now();
        let model = synthetic_model(cfg, p, dev)?;
        dev.synchronize()?;
        let build = t0.elapsed().as_secs_f64();
        let secs = timed_steps(&model, "strata", rows, seq, a.steps, a.optimizer)?;
        let speed = (rows * seq) as f64 / secs;
        let peak = device_peak(dev);
        eprintln!(
            "  {}: {speed:.1} tok/s, peak {:?} bytes, built in {build:.1} s",
            p.name, peak
        );
        done.push((p.name, speed, peak, build));
    }
    let lora = done.iter().find(|d| d.0 == "lora").map(|d| d.1);
    println!(
        "{:<10} {:>10} {:>10} {:>16} {:>10}",
        "policy", "tok/s", "vs lora", "peak device mem", "build s"
    );
    for (name, speed, peak, build) in &done {
        println!(
            "{:<10} {:>10.1} {:>10} {:>16} {:>10.1}",
            name,
            speed,
            lora.map(|l| format!("{:.2}x", speed / l)).unwrap_or_else(|| "-".into()),
            peak.map(human_bytes).unwrap_or_else(|| "- (CPU: RSS)".into()),
            build
        );
    }
    println!("(peak device mem: the CUDA pool's high-water mark from model build to the last step)");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The device checks pass on the CPU backend (the same code a GPU runs).
    #[test]
    fn checks_pass_on_the_cpu_backend() -> Result<()> {
        let rows = checks(&Device::Cpu)?;
        assert!(rows.len() >= 20, "{} checks", rows.len());
        for c in &rows {
            assert!(c.pass(), "{}: gap {} over {}", c.name, c.gap, c.tol);
        }
        Ok(())
    }
}
