//! The Fisher information a recipe's EWC needs: which weights it protects, estimated on the
//! recipe's general data with the recipe's model and adapter, or read from the file it names.

use anyhow::{bail, Result};
use candle_core::Device;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::recipe::Recipe;
use crate::dist::Collective;
use crate::model::{BaseDtype, Model};
use crate::retain::fisher::{self, Estimator, Fisher, FisherMeta, FisherTensor};

/// The weights a recipe's EWC protects: the adapted projections (LoRA) or every weight (full).
pub fn protected_names(recipe: &Recipe, model: &Model) -> Result<Vec<String>> {
    let all: Vec<String> = model
        .trainable()
        .into_iter()
        .map(|(n, _)| n)
        .filter(|n| !n.contains(".lora_"))
        .collect();
    if recipe.full() {
        return Ok(all);
    }
    let Some(plan) = recipe.plan(model.cfg.num_layers)? else {
        bail!("the recipe has no LoRA plan to protect");
    };
    let mut names = Vec::new();
    for layer in 0..model.cfg.num_layers {
        for m in crate::model::Proj::ALL {
            if plan.resolve(layer, m)?.is_some() {
                names.push(format!("{}.weight", m.path(layer)));
            }
        }
    }
    Ok(names)
}

/// Estimates the Fisher information a recipe's EWC needs, on `rows` evenly spaced rows of
/// `data` (packed at the recipe's sequence length), with the recipe's starting adapter attached,
/// on the recipe's device (`train.device`).
/// Under data parallelism (`comm` of several ranks) the rows are divided among the ranks and
/// every rank returns the whole estimate.
pub fn fisher_for(
    recipe: &Recipe,
    data: &[PathBuf],
    rows: usize,
    est: Estimator,
    seed: u64,
    comm: &dyn Collective,
) -> Result<Fisher> {
    if data.is_empty() {
        bail!("no data to estimate the Fisher information on (retain.fisher_data or --data)");
    }
    let src = crate::model::open(&recipe.model.path)?;
    let dev = crate::util::device(&crate::dist::rank_device(&recipe.train.device, comm))?;
    let mut model = Model::load(&src.config, src.weights.as_ref(), BaseDtype::F32, true, &dev)?;
    if let Some(dir) = &recipe.model.adapter {
        crate::adapter::peft::load(&mut model, dir)?;
    }
    let names = protected_names(recipe, &model)?;
    // Loaded with every weight trainable (f32, as EWC compares them); only the protected ones
    // need gradients, so the embeddings, norms and unadapted projections are frozen again.
    model.freeze_except(&names);
    let mut seqs = super::trainer::load_sequences(recipe, &src.tokenizer, data)?;
    seqs.subsample(rows);
    eprintln!(
        "fisher: {} weights ({:.1} M values), {} rows of {} tokens, {:?} labels",
        names.len(),
        model
            .trainable()
            .iter()
            .filter(|(n, _)| names.contains(n))
            .map(|(_, v)| v.elem_count())
            .sum::<usize>() as f64
            / 1e6,
        seqs.len(),
        seqs.seq_len,
        est
    );
    let tensors: BTreeMap<String, FisherTensor> = fisher::estimate(&model, &seqs, &names, est, seed, comm)?
        .into_iter()
        .map(|(n, t)| (n, FisherTensor::Full(t)))
        .collect();
    Ok(Fisher {
        tensors,
        meta: FisherMeta {
            model: recipe.model.path.display().to_string(),
            estimator: est,
            rows: seqs.len(),
            seq_len: seqs.seq_len,
            stages: 1,
            decay: 1.0,
            format: "full".into(),
            data: data.to_vec(),
        },
    })
}

/// The Fisher file a recipe names: read when present, otherwise estimated and written there
/// (so later runs reuse it).
/// The Fisher is read onto `dev`, where the run's weights are. Under data parallelism the ranks
/// estimate it together, rank 0 writes it, and every rank reads it back (the run directory is
/// shared, as the checkpoints' resume needs).
pub fn load_or_estimate(recipe: &Recipe, path: &Path, dev: &Device, comm: &dyn Collective) -> Result<Fisher> {
    // One answer for every rank: a file that appears while they look must not split them.
    if crate::dist::from_rank0(comm, path.exists())? {
        let f = Fisher::load(path, dev)?;
        eprintln!(
            "fisher: reusing {} ({} weights, {:?}, {} rows)",
            path.display(),
            f.tensors.len(),
            f.meta.estimator,
            f.meta.rows
        );
        return Ok(f);
    }
    let r = recipe.retain.as_ref().expect("checked by the caller");
    let f = fisher_for(
        recipe,
        &r.fisher_data,
        r.fisher_rows,
        r.fisher_estimator,
        recipe.train.seed,
        comm,
    )?;
    crate::dist::on_rank0(comm, || f.save(path, r.fisher_format, candle_core::DType::BF16))?;
    eprintln!("fisher: wrote {}", path.display());
    // Read back, so this run uses exactly what later runs will.
    crate::dist::agree(comm, Fisher::load(path, dev))
}
