//! The steps of an experiment: each a `strata` child process, stamped with what it was made
//! from so that `--reuse` can keep it.

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use super::{Experiment, Sitting};
use crate::data::chat::Conversation;

/// Makes every `[[prepare]]` file that is missing, with the experiment's model.
pub(super) fn prepare_files(ex: &Experiment, model: &Path, sitting: Sitting) -> Result<()> {
    for p in &ex.prepares {
        if p.out.exists() {
            eprintln!("experiment: {} present: {}", p.name, p.out.display());
            continue;
        }
        if sitting == Sitting::FinishedOnly {
            bail!(
                "{} ({}) was never made: nothing of this experiment is finished",
                p.name,
                p.out.display()
            );
        }
        if let Some(dir) = p.out.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        }
        eprintln!("experiment: making {} ({})", p.name, p.out.display());
        let mut args = p.args.clone();
        args.extend([
            "--model".into(),
            model.display().to_string(),
            "--out".into(),
            p.out.display().to_string(),
        ]);
        strata(&args, &ex.out.join(format!("prepare-{}.log", slug(&p.name))))?;
    }
    Ok(())
}

pub(super) fn slug(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect::<String>()
        .split('-')
        .filter(|p| !p.is_empty())
        .collect::<Vec<_>>()
        .join("-")
}

pub(super) fn strata(args: &[String], log: &Path) -> Result<()> {
    let exe = std::env::current_exe().context("cannot find the strata executable")?;
    let out = std::fs::File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
    let status = Command::new(exe)
        .args(args)
        .stdout(out.try_clone()?)
        .stderr(out)
        .status()
        .context("cannot start strata")?;
    if !status.success() {
        let tail: String = std::fs::read_to_string(log)
            .unwrap_or_default()
            .lines()
            .rev()
            .take(5)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n");
        bail!(
            "`strata {}` failed ({status}); log {}:\n{tail}",
            args.join(" "),
            log.display()
        );
    }
    Ok(())
}

pub(super) fn read_json(p: &Path) -> Result<Value> {
    serde_json::from_str(&std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?)
        .with_context(|| format!("{} is not JSON", p.display()))
}

/// What one step of the experiment was made from: the strata version, the step's arguments,
/// and the contents (CRC-32C) of every input file among them (a run's recipe, the model, the
/// sets) and of the data files its recipe reads (`inputs`: directories walked by
/// [`crate::fsio::walk_files`], in name order); the step's `outputs` are left out, since an
/// earlier sitting has written them.
pub(super) fn stamp(args: &[String], inputs: &[PathBuf], outputs: &[&Path]) -> Value {
    let crc = |p: &Path| json!([p.display().to_string(), file_crc(p).unwrap_or(0)]);
    let mut files: Vec<Value> = args
        .iter()
        .map(Path::new)
        .filter(|p| p.is_file() && !outputs.contains(p))
        .map(crc)
        .collect();
    for p in inputs {
        // A path that cannot be walked (not there yet) is stamped as it is, its CRC 0, so
        // that its appearance changes the stamp; the run itself reports what is wrong with it.
        let found = crate::fsio::walk_files(p, &|_| true).unwrap_or_else(|_| vec![p.clone()]);
        files.extend(found.iter().map(|f| crc(f)));
    }
    json!({"strata": env!("CARGO_PKG_VERSION"), "args": args, "files": files})
}

/// CRC-32C of a file's contents, read a megabyte at a time (training data can be larger than
/// memory). Every step of a sitting stamps the same model, sets and data, so each file is read
/// once per process, remembered by its path, size and modification time (a file rewritten
/// between steps is read again).
fn file_crc(p: &Path) -> std::io::Result<u32> {
    use std::collections::HashMap;
    use std::io::Read;
    use std::sync::{Mutex, OnceLock};
    type Key = (PathBuf, u64, Option<std::time::SystemTime>);
    static SEEN: OnceLock<Mutex<HashMap<Key, u32>>> = OnceLock::new();
    let mut f = std::fs::File::open(p)?;
    let meta = f.metadata()?;
    let key = (p.to_path_buf(), meta.len(), meta.modified().ok());
    let seen = SEEN.get_or_init(Default::default);
    if let Some(&crc) = seen.lock().ok().as_ref().and_then(|m| m.get(&key)) {
        return Ok(crc);
    }
    let mut buf = vec![0u8; 1 << 20];
    let mut crc = 0;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        crc = crc32c::crc32c_append(crc, &buf[..n]);
    }
    if let Ok(mut m) = seen.lock() {
        m.insert(key, crc);
    }
    Ok(crc)
}

/// The seconds an earlier sitting took over a step, when `--reuse` may keep it: its stamp
/// file holds `stamp` and its outputs exist.
pub(super) fn reusable(sitting: Sitting, stamp_file: &Path, stamp: &Value, outputs: &[&Path]) -> Option<f64> {
    if sitting == Sitting::Fresh || !outputs.iter().all(|p| p.exists()) {
        return None;
    }
    let kept: Value = serde_json::from_str(&std::fs::read_to_string(stamp_file).ok()?).ok()?;
    (kept["stamp"] == *stamp).then(|| kept["seconds"].as_f64()).flatten()
}

/// Runs `strata ARGS` for a step unless `--reuse` keeps it (`inputs`: data files read by the
/// step that its arguments do not name), returning the seconds the step took (in this sitting
/// or the one that made it).
pub(super) fn step(
    sitting: Sitting,
    what: &str,
    stamp_file: &Path,
    args: &[Vec<String>],
    inputs: &[PathBuf],
    logs: &[PathBuf],
    outputs: &[&Path],
) -> Result<f64> {
    let st = stamp(&args.concat(), inputs, outputs);
    if let Some(secs) = reusable(sitting, stamp_file, &st, outputs) {
        eprintln!("experiment: {what}: kept from an earlier sitting");
        return Ok(secs);
    }
    if sitting == Sitting::FinishedOnly {
        bail!("not finished in an earlier sitting (--finished-only runs nothing)");
    }
    eprintln!("experiment: {what}");
    let _ = std::fs::remove_file(stamp_file);
    let t = Instant::now();
    for (a, log) in args.iter().zip(logs) {
        strata(a, log)?;
    }
    let secs = t.elapsed().as_secs_f64();
    crate::util::write_atomic(stamp_file, json!({"stamp": st, "seconds": secs}).to_string().as_bytes())?;
    Ok(secs)
}

pub(super) fn head_lines(src: &Path, dst: &Path, n: usize) -> Result<()> {
    let text = std::fs::read_to_string(src)
        .with_context(|| format!("cannot read {} (run `strata data build`)", src.display()))?;
    let kept: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let kept = if n == 0 { &kept[..] } else { &kept[..n.min(kept.len())] };
    crate::util::write_atomic(dst, (kept.join("\n") + "\n").as_bytes())
}

/// The last turn of each conversation of a chat file (a prompt, or the answer
/// `strata generate --prompts` appended).
pub(super) fn last_turns(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let c: Conversation = serde_json::from_str(l).with_context(|| {
                format!(
                    "{}: a line is not a {{\"messages\": [...]}} conversation",
                    path.display()
                )
            })?;
            Ok(c.messages.last().map(|m| m.content.clone()).unwrap_or_default())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A data file a step reads through its recipe is part of its stamp: changing it, or one
    /// file inside a named directory, makes the step run again under `--reuse`.
    #[test]
    fn the_stamp_changes_with_a_data_file_under_a_directory() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("strata-stamp-{}", std::process::id()));
        let data = dir.join("data");
        std::fs::create_dir_all(data.join("sub"))?;
        std::fs::write(data.join("a.jsonl"), "{\"text\": \"one\"}\n")?;
        std::fs::write(data.join("sub/b.jsonl"), "{\"text\": \"two\"}\n")?;
        let args = vec!["train".to_string(), "recipe.toml".to_string()];
        let inputs = [data.clone()];
        let before = stamp(&args, &inputs, &[]);
        assert_eq!(
            before,
            stamp(&args, &inputs, &[]),
            "a stamp is a function of its inputs"
        );
        assert_eq!(before["files"].as_array().map(Vec::len), Some(2));
        std::fs::write(data.join("sub/b.jsonl"), "{\"text\": \"three\"}\n")?;
        assert_ne!(
            before,
            stamp(&args, &inputs, &[]),
            "a changed file inside the directory"
        );
        // Without inputs the stamp is what it was before data files counted.
        assert_eq!(stamp(&args, &[], &[])["files"], json!([]));
        // Read in pieces, the same sum as the whole at once.
        let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(data.join("big.bin"), &big)?;
        assert_eq!(file_crc(&data.join("big.bin"))?, crc32c::crc32c(&big));
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
