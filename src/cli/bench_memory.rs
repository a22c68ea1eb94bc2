//! `strata bench memory`: peak resident memory and tok/s of LoRA, QLoRA and the layered
//! policy on a synthetic model (SmolLM2-135M or Qwen2-7B shaped, built directly in bf16 and NF4
//! from random codes, no download), each policy in its own process so each peak is its own,
//! printed beside what `train::memory` predicted for it. Full fine-tuning is predicted only.

use anyhow::{bail, Context, Result};
use candle_core::Device;
use std::time::Instant;

use super::bench::{recompute_variant, timed_steps, Args};
use crate::cli::policies::{policies, Policy};
use crate::cli::synthetic::SyntheticSource;
use crate::engine::Recompute;
use crate::model::config::ModelConfig;
use crate::model::{BaseDtype, LoadSpec, Model, Proj};
use crate::util::{current_rss, human_bytes, peak_rss};

/// Runs `strata bench memory` (the parent, or one policy with `--variant`).
pub fn run(a: &Args, cfg: &ModelConfig) -> Result<()> {
    let (rows, seq) = (a.batch.unwrap_or(1), a.seq_len.unwrap_or(512));
    if let Some(v) = &a.variant {
        return run_policy(a, cfg, v, rows, seq);
    }
    let recompute = Recompute::parse(&a.recompute).context("--recompute")?;
    recompute_variant(recompute).context("--recompute")?;
    let measured = match a.shape.as_str() {
        "qwen2-7b" | "qwen3-8b" | "llama3.1-8b" => a.policy_list(&["qlora", "layered"]),
        _ => a.policy_list(&["lora", "qlora", "layered"]),
    };
    let all = policies(cfg)?;
    for m in &measured {
        if m == "full" || !all.iter().any(|p| p.name == m) {
            bail!("--policies: `{m}` is not one of lora, qlora, layered (full fine-tuning is predicted only)");
        }
    }
    println!(
        "bench memory: {} shape ({} layers, hidden {}, MLP {}, vocab {}), micro-batch {rows} x {seq} tokens, \
         adapters on all 7 projections, bf16 weights unpacked (decoded slab by slab), {}; \
         each policy in its own process, 1 warm-up + {} timed steps",
        a.shape,
        cfg.num_layers,
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.vocab_size,
        match recompute {
            Recompute::Off => "no recomputation",
            Recompute::Blocks => "per-block recomputation",
            _ => "selective recomputation (blocks re-run, frozen products kept)",
        },
        a.steps
    );
    let exe = std::env::current_exe()?;
    println!();
    println!("| policy | weights | predicted peak | measured peak | prediction error | tok/s |");
    println!("|---|---|---|---|---|---|");
    for p in &all {
        let label = p.label(cfg);
        if !measured.iter().any(|m| m == p.name) {
            let pred = p.predict(cfg, rows, seq, false, recompute, current_rss())?;
            // Full fine-tuning holds its weights as trained f32 parameters.
            let w = match p.plan {
                Some(_) => pred.weights(),
                None => 4 * cfg.num_params() as u64,
            };
            println!(
                "| {label} | {} | {} | (predicted only) | | |",
                human_bytes(w),
                human_bytes(pred.total())
            );
            continue;
        }
        let out = std::process::Command::new(&exe)
            .args(["bench", "memory", "--shape", &a.shape, "--variant", p.name])
            .args(["--batch", &rows.to_string(), "--seq-len", &seq.to_string()])
            .args(["--steps", &a.steps.to_string()])
            .args(["--recompute", &recompute.name()])
            .output()
            .context("cannot start the benchmark process")?;
        eprint!("{}", String::from_utf8_lossy(&out.stderr));
        if !out.status.success() {
            bail!(
                "policy {} failed: {}",
                p.name,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let line = String::from_utf8_lossy(&out.stdout);
        let v: serde_json::Value = serde_json::from_str(line.trim()).context("malformed benchmark output")?;
        let (peak, pred) = (
            v["peak_rss"].as_u64().unwrap_or(0),
            v["predicted"].as_u64().unwrap_or(0),
        );
        println!(
            "| {label} | {} | {} | {} | {:+.1}% | {:.1} |",
            human_bytes(v["weights"].as_u64().unwrap_or(0)),
            human_bytes(pred),
            human_bytes(peak),
            100.0 * (pred as f64 / peak.max(1) as f64 - 1.0),
            v["tok_per_s"].as_f64().unwrap_or(0.0)
        );
    }
    println!("\n(weights: stored bytes of every weight, adapters excluded; peak: the process's VmHWM)");
    Ok(())
}

/// One policy in this process: predict, build the synthetic model, train; one JSON line.
fn run_policy(a: &Args, cfg: &ModelConfig, name: &str, rows: usize, seq: usize) -> Result<()> {
    let runtime = current_rss();
    let p = policies(cfg)?
        .into_iter()
        .find(|p| p.name == name && p.plan.is_some())
        .with_context(|| format!("unknown policy `{name}`"))?;
    let recompute = Recompute::parse(&a.recompute)?;
    let pred = p.predict(cfg, rows, seq, false, recompute, runtime)?;
    let t0 = Instant::now();
    let model = synthetic_model(cfg, &p, &Device::Cpu)?;
    let build_s = t0.elapsed().as_secs_f64();
    let secs = timed_steps(&model, recompute_variant(recompute)?, rows, seq, a.steps, a.optimizer)?;
    println!(
        "{}",
        serde_json::json!({
            "policy": name, "tok_per_s": (rows * seq) as f64 / secs, "step_s": secs, "build_s": build_s,
            "peak_rss": peak_rss(), "predicted": pred.total(), "weights": pred.weights(), "parts": pred.to_json(),
        })
    );
    Ok(())
}

/// `cfg`'s synthetic model under policy `p` on `dev`, with its adapters: NF4 layers are built
/// directly from random codes (never in f32), the rest from seeded random weights.
pub(crate) fn synthetic_model(cfg: &ModelConfig, p: &Policy, dev: &Device) -> Result<Model> {
    let bases = p.bases(cfg)?;
    let src = SyntheticSource::new(cfg, 0, &|l, m| match bases[l][m] {
        BaseDtype::Nf4 => Some(false),
        BaseDtype::Nf4Dq => Some(true),
        _ => None,
    });
    let per = |l: usize, m: Proj| bases[l][m];
    let mut model = Model::load_with(
        cfg,
        &src,
        &LoadSpec {
            base: p.base,
            per: &per,
            full: false,
            pack: false,
            device_nf4: false,
        },
        dev,
    )?;
    p.plan
        .as_ref()
        .context("full fine-tuning has no synthetic adapter model")?
        .attach(&mut model, 0)?;
    Ok(model)
}
