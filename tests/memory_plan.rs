//! The memory predictor (`train::memory`) against measured peaks: each policy runs in its own
//! `strata` process (so the peak resident set is its own) on synthetic models of two real
//! shapes, and the prediction must land within 15% of the measured peak.

use anyhow::{Context, Result};

fn measure(shape: &str, policy: &str, recompute: &str) -> Result<(u64, u64)> {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(["bench", "memory", "--shape", shape, "--variant", policy])
        .args(["--seq-len", "128", "--steps", "1", "--recompute", recompute])
        .output()?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("benchmark output")?;
    Ok((
        v["predicted"].as_u64().context("predicted")?,
        v["peak_rss"].as_u64().context("peak_rss")?,
    ))
}

#[test]
fn predicted_peak_is_within_15_percent_of_the_measured_peak() -> Result<()> {
    if strata::util::peak_rss() == 0 {
        eprintln!("no /proc/self/status here: peak memory cannot be measured, skipping");
        return Ok(());
    }
    for (shape, policy, recompute) in [
        ("smollm2", "qlora", "blocks"),
        ("smollm2", "layered", "blocks"),
        ("qwen2-0.5b", "qlora", "blocks"),
        // Selective recomputation: the plan adds the kept frozen products.
        ("smollm2", "qlora", "selective"),
    ] {
        let (predicted, peak) = measure(shape, policy, recompute)?;
        let err = predicted as f64 / peak as f64 - 1.0;
        eprintln!(
            "{shape} {policy} {recompute}: predicted {predicted}, measured {peak} ({:+.1}%)",
            100.0 * err
        );
        assert!(
            err.abs() < 0.15,
            "{shape} {policy} {recompute}: predicted {predicted} bytes, measured {peak} ({:+.1}%)",
            100.0 * err
        );
    }
    Ok(())
}
