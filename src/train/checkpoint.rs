//! Checkpoints: everything a run needs to continue bit for bit. One directory per checkpoint,
//! `checkpoints/step-NNNNNN/`, holding
//!
//! - `trainable.safetensors`: every trainable tensor by name (adapters, or all weights under
//!   full fine-tuning), in its training dtype;
//! - `optimizer.safetensors`: AdamW's moments, `m.NAME` and `v.NAME`;
//! - `state.json`: step, optimizer step count, the data sampler (orders, cursors, RNG states,
//!   owed share), the run control (mix share, micro-batch), the callbacks' states, counters and
//!   the metrics lines so far.
//!
//! A checkpoint is written into a hidden temporary directory and renamed into place, so a crash
//! mid-write leaves the previous checkpoints as they were; the oldest beyond `keep` are removed
//! after the new one is in place.

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor, Var};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use super::callback::Control;
use crate::data::mix::Mixer;
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
    if !moments.is_empty() {
        save_safetensors(&tmp.join("optimizer.safetensors"), &moments)?;
    }
    crate::util::write_atomic(&tmp.join("state.json"), serde_json::to_string(state)?.as_bytes())?;
    if dir.exists() {
        // Same step written again (a resumed run reaching it): replace it whole.
        let old = root.join(format!(".{name}.old{}", std::process::id()));
        std::fs::rename(&dir, &old)?;
        std::fs::rename(&tmp, &dir)?;
        std::fs::remove_dir_all(&old).ok();
    } else {
        std::fs::rename(&tmp, &dir).with_context(|| format!("cannot move checkpoint into {}", dir.display()))?;
    }
    let all = list(root)?;
    for old in all.iter().take(all.len().saturating_sub(keep)) {
        std::fs::remove_dir_all(old).with_context(|| format!("cannot remove old checkpoint {}", old.display()))?;
    }
    Ok(dir)
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
}

/// Reads the checkpoint `path` resolves to.
pub fn load(path: &Path, dev: &Device) -> Result<Loaded> {
    let dir = resolve(path)?;
    let text = std::fs::read_to_string(dir.join("state.json"))
        .with_context(|| format!("cannot read {}", dir.join("state.json").display()))?;
    let state: RunState =
        serde_json::from_str(&text).with_context(|| format!("{}: not a strata checkpoint state", dir.display()))?;
    let params = candle_core::safetensors::load(dir.join("trainable.safetensors"), dev)
        .with_context(|| format!("cannot read {}", dir.join("trainable.safetensors").display()))?;
    let mut moments = BTreeMap::new();
    let opt_file = dir.join("optimizer.safetensors");
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
    }
    Ok(Loaded {
        dir,
        state,
        params,
        moments,
    })
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
