//! A real training run (tiny synthetic model) killed with SIGKILL at seeded random moments,
//! some of them while a checkpoint is being written, and resumed each time, as a user would
//! after a crash or a pre-empted machine: the final adapter and optimizer state are byte for
//! byte those of a run never interrupted, and nothing half-written is left behind.

use anyhow::Result;
use candle_core::quantized::GgmlDType;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use strata::model::config::Arch;

/// Steps of the run (a checkpoint after each).
const STEPS: usize = 40;

fn recipe(dir: &Path, out: &str) -> PathBuf {
    let text = strata::testing::tiny_lora_recipe(dir, out, STEPS, 11, "checkpoint_every = 1\nkeep_checkpoints = 2");
    let p = dir.join(format!("{out}.toml"));
    std::fs::write(&p, text).unwrap();
    p
}

fn train(recipe: &Path, resume: Option<&Path>) -> Child {
    let mut c = Command::new(env!("CARGO_BIN_EXE_strata"));
    c.arg("train").arg(recipe).stdout(Stdio::null()).stderr(Stdio::null());
    if let Some(r) = resume {
        c.arg("--resume").arg(r);
    }
    c.spawn().expect("strata starts")
}

/// The step of the newest visible checkpoint (0: none yet).
fn newest_step(out: &Path) -> usize {
    std::fs::read_dir(out.join("checkpoints"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_string_lossy().strip_prefix("step-")?.parse().ok())
                .max()
                .unwrap_or(0)
        })
        .unwrap_or(0)
}

/// A visible checkpoint exists under the run's `checkpoints/`.
fn has_checkpoint(out: &Path) -> bool {
    newest_step(out) > 0
}

/// A checkpoint is being written now (its hidden temporary directory exists).
fn writing_checkpoint(out: &Path) -> bool {
    std::fs::read_dir(out.join("checkpoints"))
        .map(|d| d.flatten().any(|e| e.file_name().to_string_lossy().contains(".tmp")))
        .unwrap_or(false)
}

/// Hidden files or directories anywhere under `dir` (temporaries, replaced or pruned
/// checkpoints).
fn debris(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if e.file_name().to_string_lossy().starts_with('.') {
            out.push(p.clone());
        }
        if p.is_dir() {
            out.extend(debris(&p));
        }
    }
    out
}

/// The last checkpoint's optimizer moments and the final adapter of the run in `out`.
fn results(out: &Path) -> (Vec<u8>, Vec<u8>) {
    let ck = out.join(format!("checkpoints/step-{STEPS:06}"));
    (
        std::fs::read(out.join("adapter/adapter_model.safetensors")).expect("final adapter"),
        std::fs::read(ck.join("optimizer.safetensors")).expect("final optimizer state"),
    )
}

#[test]
fn runs_killed_at_random_moments_resume_to_the_same_bytes() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("strata-fault-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    strata::testing::write_tiny_gguf(&dir.join("tiny.gguf"), Arch::Llama, true, 3, GgmlDType::F32)?;
    strata::testing::write_tiny_corpus(&dir)?;

    // The run never interrupted, and how long it takes: timed on a second run, since the
    // first start of a freshly built binary reads it from disk and can take longer than the
    // whole run, putting every kill deadline past the killed runs' end.
    let whole = train(&recipe(&dir, "whole"), None).wait()?;
    assert!(whole.success());
    let t = Instant::now();
    assert!(train(&recipe(&dir, "timed"), None).wait()?.success());
    let span = t.elapsed();

    // The same run killed again and again, resumed from its newest checkpoint each time.
    let r = recipe(&dir, "killed");
    let out = dir.join("killed");
    let mut rng = strata::rng::Rng::new(2026);
    let (mut kills, mut mid_checkpoint) = (0, 0);
    for round in 0..12 {
        let resume = has_checkpoint(&out).then_some(out.as_path());
        let mut child = train(&r, resume);
        // Every round kills at a random moment of a random step 1-6 steps past the checkpoint
        // it resumed from, counted by the checkpoints the run writes (so that however loaded
        // the machine is, the kills land before the run ends); odd rounds kill earlier if they
        // see a checkpoint being written.
        let target = newest_step(&out) + 1 + rng.below(6);
        let into_step = (span / STEPS as u32).mul_f64(rng.next_f64());
        let mut reached: Option<Instant> = None;
        let done = loop {
            if let Some(status) = child.try_wait()? {
                break Some(status);
            }
            let in_checkpoint = round % 2 == 1 && writing_checkpoint(&out);
            if reached.is_none() && newest_step(&out) >= target {
                reached = Some(Instant::now());
            }
            if in_checkpoint || reached.is_some_and(|t| t.elapsed() >= into_step) {
                child.kill()?;
                child.wait()?;
                kills += 1;
                mid_checkpoint += usize::from(in_checkpoint);
                break None;
            }
            std::thread::sleep(Duration::from_micros(50));
        };
        if let Some(status) = done {
            assert!(status.success(), "round {round}: the run failed");
            break;
        }
    }
    assert!(kills >= 4, "only {kills} kills landed");
    assert!(mid_checkpoint >= 1, "no kill landed while a checkpoint was written");
    // Whatever the last kill interrupted, one more resume finishes the run.
    let status = train(&r, has_checkpoint(&out).then_some(out.as_path())).wait()?;
    assert!(status.success());

    let (adapter, moments) = results(&out);
    let (adapter_ref, moments_ref) = results(&dir.join("whole"));
    assert!(
        adapter == adapter_ref,
        "the resumed run's adapter differs from the uninterrupted run's"
    );
    assert!(moments == moments_ref, "the resumed run's optimizer state differs");
    let left = debris(&out);
    assert!(left.is_empty(), "debris left: {left:?}");
    let kept: Vec<_> = std::fs::read_dir(out.join("checkpoints"))?
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(kept.len(), 2, "{kept:?}");
    eprintln!("{kills} kills ({mid_checkpoint} while writing a checkpoint), resumed to the same bytes");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
