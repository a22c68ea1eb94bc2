//! Data-parallel training under a real `mpirun` (Open MPI, installed by scripts/test-deps.sh):
//! two ranks train the one-process run to the bit, three ranks with uneven shares to f32
//! rounding, the Fisher estimate divides its rows, a checkpoint resumes under another rank
//! count, and a rank that dies or fails ends the whole job with a message instead of a hang.
#![cfg(feature = "mpi")]

use anyhow::{bail, Context, Result};
use candle_core::quantized::GgmlDType;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};
use strata::model::config::Arch;

const BIN: &str = env!("CARGO_BIN_EXE_strata");

fn fresh_dir(tag: &str) -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("strata-dist-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    strata::testing::write_tiny_gguf(&dir.join("tiny.gguf"), Arch::Llama, true, 3, GgmlDType::F32)?;
    strata::testing::write_tiny_corpus(&dir)?;
    Ok(dir)
}

/// Whether `mpirun` is here; under scripts/test.sh (`STRATA_REQUIRE_TOOLS`) it must be.
fn mpirun_missing() -> bool {
    if Command::new("mpirun")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return false;
    }
    if std::env::var_os("STRATA_REQUIRE_TOOLS").is_some() {
        panic!("mpirun is missing; scripts/test-deps.sh installs Open MPI");
    }
    eprintln!("skipped: mpirun is missing (scripts/test-deps.sh installs Open MPI)");
    true
}

/// `strata ARGS` under `mpirun -np N` (root allowed, as CI runs; more ranks than cores allowed).
fn mpirun<S: AsRef<std::ffi::OsStr>>(np: usize, args: &[S]) -> Command {
    let mut c = Command::new("mpirun");
    c.args(["--allow-run-as-root", "--oversubscribe", "-np", &np.to_string(), BIN])
        .args(args);
    c
}

fn solo<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Command {
    let mut c = Command::new(BIN);
    c.args(args);
    c
}

/// Runs `c` to its end within `limit`, killing it (and failing) past that: a hang is a failure.
fn finish(mut c: Command, limit: Duration) -> Result<Output> {
    let child = c.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    wait_for(child, limit)
}

fn wait_for(mut child: Child, limit: Duration) -> Result<Output> {
    let start = Instant::now();
    while child.try_wait()?.is_none() {
        if start.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output()?;
            bail!(
                "still running after {limit:?} (a hang); stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(child.wait_with_output()?)
}

fn ok(c: Command) -> Result<Output> {
    let out = finish(c, Duration::from_secs(300))?;
    if !out.status.success() {
        bail!("failed ({}):\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    }
    Ok(out)
}

/// The tiny run with general data mixed in, EWC (on a Fisher file given beforehand),
/// contrastive and distillation terms, dropout, and checkpoints every 6 of 12 steps of 2 x 2 rows.
fn write_recipe(dir: &Path) -> Result<PathBuf> {
    let d = dir.display();
    let text = strata::testing::tiny_lora_recipe(dir, "unused", 12, 7, "checkpoint_every = 6\nkeep_checkpoints = 3\n")
        .replace(
            "seq_len = 16",
            &format!("seq_len = 16\ngeneral = [\"{d}/data/doc1.txt\", \"{d}/data/doc2.txt\"]\ndomain_share = 0.5"),
        )
        + &format!(
            "[retain]\nfisher = \"{d}/fisher.safetensors\"\nfisher_data = [\"{d}/data/doc3.txt\"]\nfisher_rows = 6\n\
             ewc_lambda = 50.0\ncontrastive_lambda = 0.1\nsegment = 4\ndistill_lambda = 0.5\n"
        );
    let path = dir.join("recipe.toml");
    std::fs::write(&path, text)?;
    Ok(path)
}

fn train_args<'a>(recipe: &'a str, out: &'a str) -> Vec<&'a str> {
    vec!["train", recipe, "--set", out]
}

fn step_lines(run: &Path) -> Result<Vec<serde_json::Value>> {
    Ok(std::fs::read_to_string(run.join("metrics.jsonl"))?
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v.get("ce").is_some())
        .collect())
}

fn losses(run: &Path) -> Result<Vec<f64>> {
    Ok(step_lines(run)?.iter().map(|v| v["loss"].as_f64().unwrap()).collect())
}

fn adapter(run: &Path) -> Result<Vec<u8>> {
    std::fs::read(run.join("adapter/adapter_model.safetensors")).with_context(|| format!("{}", run.display()))
}

fn summary(run: &Path) -> Result<serde_json::Value> {
    Ok(serde_json::from_str(&std::fs::read_to_string(
        run.join("summary.json"),
    )?)?)
}

/// The largest difference between two safetensors files' tensors, relative to the largest value.
fn tensors_gap(a: &Path, b: &Path) -> Result<f64> {
    let (ta, tb) = (
        candle_core::safetensors::load(a, &candle_core::Device::Cpu)?,
        candle_core::safetensors::load(b, &candle_core::Device::Cpu)?,
    );
    assert_eq!(ta.len(), tb.len());
    let mut gap: f64 = 0.0;
    for (name, x) in &ta {
        let y = tb.get(name).with_context(|| format!("{name} missing"))?;
        let x = x.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let y = y.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let scale = x.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
        for (p, q) in x.iter().zip(&y) {
            gap = gap.max(((p - q).abs() / scale) as f64);
        }
    }
    Ok(gap)
}

/// Two ranks, each one of the step's two micro-batches, sum to the one-process step bit for
/// bit: the same losses, the same adapter bytes, the same held-out scores; the Fisher estimate
/// divided between them is the one-process estimate to f32 rounding; and a checkpoint of
/// either resumes under the other rank count into the same adapter.
#[test]
fn two_ranks_train_the_one_process_run_and_resume_across_rank_counts() -> Result<()> {
    if mpirun_missing() {
        return Ok(());
    }
    let dir = fresh_dir("two")?;
    let recipe = write_recipe(&dir)?;
    let r = recipe.to_str().unwrap();
    let d = dir.display().to_string();
    // The Fisher, estimated by one process and by two.
    let fisher = |out: &str| {
        vec![
            "fisher".to_string(),
            r.to_string(),
            "--data".into(),
            format!("{d}/data/doc3.txt"),
            "--rows".into(),
            "6".into(),
            "--dtype".into(),
            "f32".into(),
            "--out".into(),
            format!("{d}/{out}"),
        ]
    };
    ok(solo(&fisher("fisher.safetensors")))?;
    ok(mpirun(2, &fisher("fisher-2.safetensors")))?;
    let gap = tensors_gap(&dir.join("fisher.safetensors"), &dir.join("fisher-2.safetensors"))?;
    assert!(gap < 1e-5, "Fisher from two ranks differs by {gap}");

    let out = |name: &str| format!("train.out={d}/{name}");
    let (o1, o2) = (out("one"), out("two"));
    ok(solo(&train_args(r, &o1)))?;
    let two = ok(mpirun(2, &train_args(r, &o2)))?;
    let (one, two_dir) = (dir.join("one"), dir.join("two"));
    assert_eq!(losses(&one)?.len(), 12);
    assert_eq!(losses(&one)?, losses(&two_dir)?, "loss curves differ");
    assert_eq!(adapter(&one)?, adapter(&two_dir)?, "adapter bytes differ");
    assert_eq!(summary(&one)?["eval_after"], summary(&two_dir)?["eval_after"]);
    assert_eq!(summary(&one)?["eval_before"], summary(&two_dir)?["eval_before"]);
    // The retention terms ran (and were added once: the losses match).
    let lines = step_lines(&two_dir)?;
    assert!(lines[5]["ewc"].as_f64().unwrap() > 0.0);
    assert!(lines.iter().any(|v| v["distill"].as_f64().unwrap() > 0.0));
    for v in &lines {
        assert_eq!(v["ranks"].as_u64(), Some(2));
        assert!(v["reduce_bytes"].as_u64().unwrap() > 0);
    }
    // Rank 0 speaks; rank 1's output is silenced.
    let err = String::from_utf8_lossy(&two.stderr);
    assert_eq!(err.matches("strata train:").count(), 1, "{err}");
    assert!(err.contains("divided among 2 ranks"), "{err}");

    // Resume a two-rank checkpoint in one process, and a one-process checkpoint on two ranks.
    let (o3, o4) = (out("two-then-one"), out("one-then-two"));
    let ck2 = format!("{d}/two/checkpoints/step-000006");
    let ck1 = format!("{d}/one/checkpoints/step-000006");
    let mut a = train_args(r, &o3);
    a.extend(["--resume", &ck2]);
    ok(solo(&a))?;
    let mut a = train_args(r, &o4);
    a.extend(["--resume", &ck1]);
    ok(mpirun(2, &a))?;
    for run in ["two-then-one", "one-then-two"] {
        assert_eq!(adapter(&dir.join(run))?, adapter(&one)?, "{run}: adapter bytes differ");
        assert_eq!(losses(&dir.join(run))?, losses(&one)?, "{run}: loss curve differs");
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// Three ranks share a step of 4 rows unevenly (2, 1, 1 rows: uneven token counts); the loss
/// is still the mean over the whole step's tokens, so the run is the one-process run to f32
/// rounding. (Without the contrastive term, whose negatives are the other general rows of a
/// micro-batch: a micro-batch of one row has none, in one process as on three ranks.)
#[test]
fn uneven_shares_give_the_one_process_run() -> Result<()> {
    if mpirun_missing() {
        return Ok(());
    }
    let dir = fresh_dir("uneven")?;
    let recipe = write_recipe(&dir)?;
    let r = recipe.to_str().unwrap();
    let d = dir.display().to_string();
    let (o1, o3) = (format!("train.out={d}/one"), format!("train.out={d}/three"));
    let with = |o: &str| {
        let mut a: Vec<String> = train_args(r, o).into_iter().map(String::from).collect();
        a.extend(["--set".into(), "retain.contrastive_lambda=0".into()]);
        a
    };
    ok(solo(&with(&o1)))?;
    ok(mpirun(3, &with(&o3)))?;
    let (a, b) = (losses(&dir.join("one"))?, losses(&dir.join("three"))?);
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() <= 1e-5 * x.abs(), "losses {a:?} vs {b:?}");
    }
    let gap = tensors_gap(
        &dir.join("one/adapter/adapter_model.safetensors"),
        &dir.join("three/adapter/adapter_model.safetensors"),
    )?;
    assert!(gap < 1e-4, "adapters differ by {gap}");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// The processes `mpirun` (pid `root`) started for rank `rank`, found through /proc.
fn rank_pid(root: u32, rank: usize) -> Option<u32> {
    let want = format!("OMPI_COMM_WORLD_RANK={rank}");
    for e in std::fs::read_dir("/proc").ok()? {
        let Ok(pid) = e.ok()?.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // The parent pid is the second field after the parenthesized command name.
        let ppid = stat
            .rsplit(')')
            .next()?
            .split_whitespace()
            .nth(1)?
            .parse::<u32>()
            .ok()?;
        let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        if ppid == root && env.split(|&b| b == 0).any(|v| v == want.as_bytes()) {
            return Some(pid);
        }
    }
    None
}

/// A rank killed mid-run ends the job (no hang); a rank that fails with an error says it and
/// ends the job; a command that does not run data-parallel refuses a job of two.
#[test]
fn a_dead_or_failing_rank_ends_the_job() -> Result<()> {
    if mpirun_missing() {
        return Ok(());
    }
    let dir = fresh_dir("kill")?;
    let recipe = write_recipe(&dir)?;
    let r = recipe.to_str().unwrap();
    let d = dir.display().to_string();
    let o = format!("train.out={d}/killed");
    let mut a = train_args(r, &o);
    a.extend(["--set", "train.steps=100000", "--set", "retain.ewc_lambda=0"]);
    let child = mpirun(2, &a).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    let root = child.id();
    let start = Instant::now();
    // Wait for training to be under way, then kill rank 1 as the OOM killer would.
    while step_lines(&dir.join("killed")).map_or(0, |l| l.len()) < 2 {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "the job never started training"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let victim = rank_pid(root, 1).context("rank 1's process not found")?;
    Command::new("kill").args(["-9", &victim.to_string()]).status()?;
    let out = wait_for(child, Duration::from_secs(60))?;
    assert!(!out.status.success());

    // A recipe every rank refuses: a step of one row cannot be divided between two ranks.
    let o = format!("train.out={d}/refused");
    let mut a = train_args(r, &o);
    a.extend(["--set", "train.batch=1", "--set", "train.grad_accum=1"]);
    let out = finish(mpirun(2, &a), Duration::from_secs(120))?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot be divided among 2 ranks"), "{err}");
    assert!(err.contains("error (rank"), "{err}");

    let out = finish(
        mpirun(2, &["inspect", &format!("{d}/tiny.gguf")]),
        Duration::from_secs(120),
    )?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("only `strata train` and `strata fisher` run data-parallel"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
