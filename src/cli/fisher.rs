//! `strata fisher RECIPE --data FILES --out F`: the diagonal Fisher information EWC uses,
//! estimated for a recipe's model and plan, optionally accumulated onto an earlier stage's.

use anyhow::Result;
use candle_core::{DType, Device};
use std::path::PathBuf;

use crate::retain::{Estimator, Fisher};
use crate::train::fisher::fisher_for;
use crate::train::recipe::Recipe;

/// Arguments of `strata fisher`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The recipe whose model, adapter and plan the Fisher is for.
    pub recipe: PathBuf,
    /// General data (files or directories) to estimate on.
    #[arg(long, num_args = 1.., required_unless_present = "penalty_of")]
    pub data: Vec<PathBuf>,
    /// Rows (examples) averaged, evenly spaced through the data.
    #[arg(long, default_value_t = 64)]
    pub rows: usize,
    /// `empirical` (the data's labels) or `sampled` (labels drawn from the model).
    #[arg(long, default_value = "empirical")]
    pub estimator: String,
    /// `full` (every entry) or `factored` (row and column sums: practical at 7B).
    #[arg(long, default_value = "full")]
    pub format: String,
    /// Entry precision of the `full` format (`bf16` or `f32`).
    #[arg(long, default_value = "bf16")]
    pub dtype: String,
    /// An earlier stage's Fisher to add, scaled by `--decay` (online EWC).
    #[arg(long)]
    pub accumulate: Option<PathBuf>,
    /// Decay of the earlier stage's Fisher.
    #[arg(long, default_value_t = 0.9)]
    pub decay: f64,
    /// Override a recipe field (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// Output safetensors file (provenance goes to `OUT.json`).
    #[arg(long, required_unless_present = "penalty_of")]
    pub out: Option<PathBuf>,
    /// Instead of estimating: print the EWC penalty (per unit lambda) that this trained adapter
    /// pays against `--fisher`, to calibrate `retain.ewc_lambda` from a run without EWC.
    #[arg(long, requires = "fisher")]
    pub penalty_of: Option<PathBuf>,
    /// The Fisher file for `--penalty-of`.
    #[arg(long)]
    pub fisher: Option<PathBuf>,
}

/// Runs `strata fisher`, its rows divided among the ranks of `comm`'s job (rank 0 writes).
pub fn run(a: Args, comm: crate::dist::Comm) -> Result<()> {
    let recipe = Recipe::load(&a.recipe, &a.sets)?;
    if let (Some(adapter), Some(fisher)) = (&a.penalty_of, &a.fisher) {
        let (_, model) = crate::adapter::open_adapted(
            &recipe.model.path,
            Some(adapter),
            Some(crate::model::BaseDtype::F32),
            &Device::Cpu,
            false,
        )?;
        let f = Fisher::load(fisher, &Device::Cpu)?;
        let p = crate::retain::Ewc::from_base(&model, &f, 1.0)?.penalty(None, 1.0)?;
        println!(
            "EWC penalty of {} at lambda = 1: {p:.6e} (0.5 * sum F * (s B A)^2)",
            adapter.display()
        );
        return Ok(());
    }
    let out = a.out.clone().expect("clap requires --out");
    let dtype = match a.dtype.as_str() {
        "bf16" => DType::BF16,
        "f32" => DType::F32,
        o => anyhow::bail!("--dtype `{o}`: expected bf16 or f32"),
    };
    let start = std::time::Instant::now();
    let mut f = fisher_for(
        &recipe,
        &a.data,
        a.rows,
        Estimator::parse(&a.estimator)?,
        recipe.train.seed,
        comm.as_ref(),
    )?;
    if let Some(old) = &a.accumulate {
        f.accumulate(&Fisher::load(old, &Device::Cpu)?, a.decay)?;
    }
    let format = crate::retain::FisherFormat::parse(&a.format)?;
    crate::dist::on_rank0(comm.as_ref(), || f.save(&out, format, dtype))?;
    if comm.rank() > 0 {
        return Ok(());
    }
    let bytes = std::fs::metadata(&out)?.len();
    println!(
        "wrote {} ({} weights, {} format, {}, {} stage(s)) in {:.0} s",
        out.display(),
        f.tensors.len(),
        a.format,
        crate::util::human_bytes(bytes),
        f.meta.stages,
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
