//! Checkpoints: everything a run needs to continue bit for bit. One directory per checkpoint,
//! `checkpoints/step-NNNNNN/`, holding
//!
//! - `trainable.safetensors`: every trainable tensor by name (adapters, or all weights under
//!   full fine-tuning), in its training dtype;
//! - `optimizer.safetensors`: AdamW's moments, `m.NAME` and `v.NAME` (f32), or, under
//!   `train.optimizer = "adamw8bit"`, `m8.NAME` / `v8.NAME` (u8 codes) with `ms.NAME` / `vs.NAME`
//!   (f32 block maxima);
//! - `state.json`: step, optimizer step count, the data sampler (orders, cursors, RNG states,
//!   owed share), the run control (mix share, micro-batch), the callbacks' states, counters and
//!   the metrics lines so far.
//!
//! A checkpoint is written into a hidden temporary directory, every file and the directory
//! fsynced, and renamed into place (a step written again is swapped in with one atomic
//! exchange), then the parent directory is fsynced: a crash or power loss at any moment leaves
//! every visible checkpoint whole. The oldest beyond `keep` are renamed out of sight before
//! they are deleted, and the hidden debris a killed run leaves (temporary, replaced and pruned
//! directories) is removed when the next run starts. A checkpoint is checked against the run
//! that resumes it (data sizes, sampler cursors, micro-batch, optimizer state) before any of it
//! is used.

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor, Var};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use super::callback::Control;
use crate::data::mix::Mixer;
use crate::engine::adam8::Q8Moments;
use crate::engine::optim::AdamW;
use crate::eval::TextMetrics;
use crate::model::hf::save_safetensors;

/// The run's state besides tensors.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunState {
    /// Optimizer steps completed.
    pub step: usize,
    /// AdamW's update count (bias correction).
    pub adam_t: u64,
    /// The row sampler.
    pub mixer: Mixer,
    /// Mix share, micro-batch, learning rates of the last step.
    pub control: Control,
    /// Each callback's state by name.
    pub callbacks: BTreeMap<String, serde_json::Value>,
    /// Non-finite steps in a row.
    pub bad_in_a_row: usize,
    /// The recomputation the run trains with (`train.recompute = "auto"` resolved at its start).
    #[serde(default)]
    pub recompute: Option<String>,
    /// Target tokens trained on.
    pub trained_tokens: usize,
    /// Seconds spent in the loop so far.
    pub elapsed_s: f64,
    /// Domain passes completed.
    pub epoch: u64,
    /// Held-out metrics before training.
    pub eval_before: TextMetrics,
    /// General held-out metrics before training.
    pub general_before: Option<TextMetrics>,
    /// The metrics lines written so far.
    pub metrics: Vec<String>,
}

/// Writes a checkpoint under `root` and prunes to the newest `keep`; returns its directory.
pub fn save(root: &Path, state: &RunState, params: &[(String, Var)], opt: &AdamW, keep: usize) -> Result<PathBuf> {
    use crate::util::{exchange_paths, sync_dir};
    std::fs::create_dir_all(root).with_context(|| format!("cannot create {}", root.display()))?;
    let name = format!("step-{:06}", state.step);
    let dir = root.join(&name);
    let tmp = root.join(format!(".{name}.tmp{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let tensors: Vec<(String, Tensor)> = params.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect();
    save_safetensors(&tmp.join("trainable.safetensors"), &tensors)?;
    let mut moments = Vec::new();
    for (n, (m, v)) in &opt.moments {
        moments.push((format!("m.{n}"), m.clone()));
        moments.push((format!("v.{n}"), v.clone()));
    }
    let cpu = candle_core::Device::Cpu;
    for (n, q) in &opt.q8 {
        moments.push((format!("m8.{n}"), Tensor::from_slice(&q.m, q.m.len(), &cpu)?));
        moments.push((
            format!("ms.{n}"),
            Tensor::from_slice(&q.m_absmax, q.m_absmax.len(), &cpu)?,
        ));
        moments.push((format!("v8.{n}"), Tensor::from_slice(&q.v, q.v.len(), &cpu)?));
        moments.push((
            format!("vs.{n}"),
            Tensor::from_slice(&q.v_absmax, q.v_absmax.len(), &cpu)?,
        ));
    }
    if !moments.is_empty() {
        save_safetensors(&tmp.join("optimizer.safetensors"), &moments)?;
    }
    crate::util::write_atomic(&tmp.join("state.json"), serde_json::to_string(state)?.as_bytes())?;
    sync_dir(&tmp)?;
    if dir.exists() {
        // Same step written again (a resumed run reaching it): swapped in whole, so some
        // complete step-N is visible at every moment.
        exchange_paths(&tmp, &dir).with_context(|| format!("cannot replace checkpoint {}", dir.display()))?;
        std::fs::remove_dir_all(&tmp).ok();
    } else {
        std::fs::rename(&tmp, &dir).with_context(|| format!("cannot move checkpoint into {}", dir.display()))?;
    }
    sync_dir(root)?;
    let all = list(root)?;
    for old in all.iter().take(all.len().saturating_sub(keep)) {
        // Out of sight first: a half-deleted directory must never look like a checkpoint.
        let name = old
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let gone = root.join(format!(".{name}.prune{}", std::process::id()));
        std::fs::rename(old, &gone).with_context(|| format!("cannot remove old checkpoint {}", old.display()))?;
        sync_dir(root)?;
        std::fs::remove_dir_all(&gone).with_context(|| format!("cannot remove old checkpoint {}", old.display()))?;
    }
    Ok(dir)
}

/// Removes what an interrupted run left under `root`: hidden temporary, replaced and pruned
/// checkpoint directories (`.step-*`). Visible checkpoints are never touched.
pub fn clean_debris(root: &Path) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    let Ok(entries) = std::fs::read_dir(root) else {
        return Ok(removed);
    };
    for e in entries.flatten() {
        let p = e.path();
        let n = e.file_name().to_string_lossy().into_owned();
        let debris = n.starts_with(".step-") && [".tmp", ".old", ".prune"].iter().any(|k| n.contains(k));
        if debris && p.is_dir() {
            std::fs::remove_dir_all(&p).with_context(|| format!("cannot remove {}", p.display()))?;
            removed.push(p);
        }
    }
    if !removed.is_empty() {
        crate::util::sync_dir(root)?;
    }
    Ok(removed)
}

/// Checkpoint directories under `root`, oldest first.
pub fn list(root: &Path) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(root)
        .with_context(|| format!("cannot list {}", root.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_dir()
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("step-"))
                && p.join("state.json").is_file()
        })
        .collect();
    v.sort();
    Ok(v)
}

/// The checkpoint `path` names: a checkpoint directory, a `checkpoints/` directory (its newest),
/// or a run directory (the newest under its `checkpoints/`).
pub fn resolve(path: &Path) -> Result<PathBuf> {
    if path.join("state.json").is_file() {
        return Ok(path.to_path_buf());
    }
    for root in [path.join("checkpoints"), path.to_path_buf()] {
        if root.is_dir() {
            if let Some(last) = list(&root)?.pop() {
                return Ok(last);
            }
        }
    }
    bail!(
        "{}: no checkpoint found (expected a step-NNNNNN directory with state.json, or a run directory with checkpoints/)",
        path.display()
    )
}

/// A loaded checkpoint.
pub struct Loaded {
    /// Where it was read from.
    pub dir: PathBuf,
    /// Its run state.
    pub state: RunState,
    /// Trainable tensors by name.
    pub params: HashMap<String, Tensor>,
    /// Optimizer moments by parameter name.
    pub moments: BTreeMap<String, (Tensor, Tensor)>,
    /// 8-bit optimizer moments by parameter name (`train.optimizer = "adamw8bit"`).
    pub q8: BTreeMap<String, Q8Moments>,
}

/// Reads the checkpoint `path` resolves to.
pub fn load(path: &Path, dev: &Device) -> Result<Loaded> {
    let dir = resolve(path)?;
    let text = crate::fsio::read_text(&dir.join("state.json"), crate::fsio::TOKENIZER_CAP, "checkpoint state")?;
    let state: RunState =
        serde_json::from_str(&text).with_context(|| format!("{}: not a strata checkpoint state", dir.display()))?;
    let params = candle_core::safetensors::load(dir.join("trainable.safetensors"), dev)
        .with_context(|| format!("cannot read {}", dir.join("trainable.safetensors").display()))?;
    let mut moments = BTreeMap::new();
    let mut q8 = BTreeMap::new();
    let opt_file = dir.join("optimizer.safetensors");
    if state.adam_t > 0 && !opt_file.is_file() {
        bail!(
            "{}: optimizer.safetensors is missing, but the run had taken {} optimizer steps; the checkpoint is incomplete (resume from another one)",
            dir.display(),
            state.adam_t
        );
    }
    if opt_file.is_file() {
        let mut raw = candle_core::safetensors::load(&opt_file, dev)
            .with_context(|| format!("cannot read {}", opt_file.display()))?;
        let names: Vec<String> = raw
            .keys()
            .filter_map(|k| k.strip_prefix("m.").map(String::from))
            .collect();
        for n in names {
            let m = raw.remove(&format!("m.{n}")).expect("listed");
            let v = raw
                .remove(&format!("v.{n}"))
                .with_context(|| format!("{}: moment v.{n} is missing", opt_file.display()))?;
            moments.insert(n, (m, v));
        }
        let names: Vec<String> = raw
            .keys()
            .filter_map(|k| k.strip_prefix("m8.").map(String::from))
            .collect();
        for n in names {
            let mut take = |prefix: &str| {
                raw.remove(&format!("{prefix}.{n}"))
                    .with_context(|| format!("{}: 8-bit moment {prefix}.{n} is missing", opt_file.display()))
            };
            let (m, ms, v, vs) = (take("m8")?, take("ms")?, take("v8")?, take("vs")?);
            let bytes = |t: Tensor, what: &str| -> Result<Vec<u8>> {
                t.flatten_all()?
                    .to_vec1::<u8>()
                    .with_context(|| format!("{}: {what}.{n} must hold u8 codes", opt_file.display()))
            };
            let floats = |t: Tensor, what: &str| -> Result<Vec<f32>> {
                t.flatten_all()?
                    .to_vec1::<f32>()
                    .with_context(|| format!("{}: {what}.{n} must hold f32 maxima", opt_file.display()))
            };
            let q = Q8Moments {
                m: bytes(m, "m8")?,
                m_absmax: floats(ms, "ms")?,
                v: bytes(v, "v8")?,
                v_absmax: floats(vs, "vs")?,
            };
            q8.insert(n, q);
        }
    }
    Ok(Loaded {
        dir,
        state,
        params,
        moments,
        q8,
    })
}

impl RunState {
    /// Checks the state against the run resuming it: `rows` packed rows per data source,
    /// `steps` planned steps of `per_step` rows. A sampler whose orders, cursors or walks do not
    /// fit the data (the data changed since, or the file was edited) is refused. A state of an
    /// earlier version (the pair's domain share, one owed share) is read into this one's form.
    pub fn check(&mut self, rows: &[usize], steps: usize, per_step: usize, dir: &Path) -> Result<()> {
        let at = || dir.join("state.json").display().to_string();
        self.mixer.upgrade();
        if let Some(share) = self.control.legacy_domain_share.take() {
            if self.control.weights.is_empty() {
                self.control.weights = if rows.len() == 1 {
                    vec![1.0]
                } else {
                    vec![share, 1.0 - share]
                };
            }
        }
        let c = &self.control;
        if c.total_steps != steps || c.effective_batch != per_step {
            bail!(
                "{}: written by a run of {} steps of {} rows; this recipe plans {steps} steps of {per_step}. Resume with the recipe that wrote it",
                dir.display(),
                c.total_steps,
                c.effective_batch
            );
        }
        if self.step > steps || c.step != self.step {
            bail!(
                "{}: step {} (control step {}) does not fit a run of {steps} steps",
                at(),
                self.step,
                c.step
            );
        }
        if c.micro_batch == 0 || c.micro_batch > per_step || !per_step.is_multiple_of(c.micro_batch) {
            bail!(
                "{}: micro-batch {} does not divide the {per_step} rows of a step",
                at(),
                c.micro_batch
            );
        }
        if c.weights.len() != rows.len() || c.weights.iter().any(|w| !(w.is_finite() && *w >= 0.0)) {
            bail!(
                "{}: source weights {:?} do not fit this run's {} data source(s) (each finite, at least 0)",
                at(),
                c.weights,
                rows.len()
            );
        }
        if let Some((g, lr)) = c.lr.iter().find(|(_, lr)| !(lr.is_finite() && **lr >= 0.0)) {
            bail!(
                "{}: learning rate {lr} of group {g:?} is not a finite number >= 0",
                at()
            );
        }
        if !self.elapsed_s.is_finite() || self.elapsed_s < 0.0 {
            bail!("{}: elapsed_s {} is not a finite number >= 0", at(), self.elapsed_s);
        }
        self.mixer
            .check(rows)
            .with_context(|| format!("{}: the data sampler does not fit this run's data (was the training data changed since the checkpoint?)", at()))
    }
}

/// Checks optimizer moments read from a checkpoint: after `adam_t` steps, each trainable
/// tensor has both moments, of its shape, finite; and no moment belongs to a tensor this run
/// does not train.
pub fn check_moments(
    params: &[(String, Var)],
    moments: &BTreeMap<String, (Tensor, Tensor)>,
    q8: &BTreeMap<String, Q8Moments>,
    adam_t: u64,
    dir: &Path,
) -> Result<()> {
    if adam_t == 0 {
        return Ok(());
    }
    let at = || dir.join("optimizer.safetensors").display().to_string();
    if moments.len() + q8.len() != params.len() {
        bail!(
            "{}: moments for {} tensors, this run trains {}; resume with the recipe that wrote it",
            at(),
            moments.len() + q8.len(),
            params.len()
        );
    }
    for (name, var) in params {
        if let Some(q) = q8.get(name) {
            q.check(var.as_tensor().elem_count())
                .map_err(|e| anyhow::anyhow!("{}: 8-bit moments of `{name}`: {e}", at()))?;
            continue;
        }
        let (m, v) = moments
            .get(name)
            .with_context(|| format!("{}: no moments for `{name}`", at()))?;
        for (which, t) in [("m", m), ("v", v)] {
            if t.dims() != var.dims() {
                bail!(
                    "{}: {which}.{name} has shape {:?}, the tensor has {:?}",
                    at(),
                    t.dims(),
                    var.dims()
                );
            }
            let bad = t.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            if bad.iter().any(|x| !x.is_finite()) || (which == "v" && bad.iter().any(|&x| x < 0.0)) {
                bail!(
                    "{}: {which}.{name} holds values no optimizer writes (non-finite{})",
                    at(),
                    if which == "v" { " or negative" } else { "" }
                );
            }
        }
    }
    Ok(())
}

/// Puts checkpointed values into the model's trainable tensors, checking names and shapes.
pub fn restore_params(params: &[(String, Var)], saved: &HashMap<String, Tensor>, dir: &Path) -> Result<()> {
    if saved.len() != params.len() {
        bail!(
            "{}: the checkpoint holds {} trainable tensors, this recipe trains {}; resume with the recipe that wrote it",
            dir.display(),
            saved.len(),
            params.len()
        );
    }
    for (name, var) in params {
        let t = saved.get(name).with_context(|| {
            format!(
                "{}: no tensor `{name}`; resume with the recipe that wrote it",
                dir.display()
            )
        })?;
        if t.dims() != var.dims() {
            bail!(
                "{}: `{name}` has shape {:?}, the model expects {:?}",
                dir.display(),
                t.dims(),
                var.dims()
            );
        }
        var.set(&t.to_dtype(var.dtype())?)?;
    }
    Ok(())
}
