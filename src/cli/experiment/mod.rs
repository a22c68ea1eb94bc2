//! `strata experiment EXPERIMENT.toml [--quick]`: runs a set of recipes on the same token
//! budget, each training and each evaluation in its own process (so every peak memory is that
//! run's alone), evaluates the base once and every run after, and writes the comparison table
//! (`table.md`), the numbers (`results.json`) and an HTML report with the loss curves and a
//! learning-vs-forgetting scatter.

mod report;
mod runs;
mod spec;
mod steps;

use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use std::time::Instant;

use report::{write_outputs, Outputs};
use runs::{evaluate_base, one_run, prepare_sets};
pub use spec::{EvalSection, Experiment, Files, Prepare, QuickSection, RunEntry};
use steps::prepare_files;

/// Arguments of `strata experiment`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The experiment file (see recipes/forgetting.toml).
    pub experiment: PathBuf,
    /// The short variant: the `[quick]` budget and sample sizes.
    #[arg(long)]
    pub quick: bool,
    /// Keep what an earlier sitting finished (the base's answers and evaluation, each run's
    /// training and evaluation) when its recipe, budget, arguments and evaluation sets are
    /// unchanged (the data files its recipe reads among them), and do only the rest.
    #[arg(long)]
    pub reuse: bool,
    /// Run nothing: report what earlier sittings finished (as `--reuse` would keep it) and
    /// list the runs not finished yet. For reading a long experiment between sittings.
    #[arg(long)]
    pub finished_only: bool,
    /// Only this run, by its name in the file (repeatable): part of an experiment, e.g. its
    /// main table without its sweeps. `--reuse` keeps what the others' sittings finished.
    #[arg(long = "run", value_name = "NAME")]
    pub runs: Vec<String>,
}

/// What the steps of this sitting may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sitting {
    /// Run every step.
    Fresh,
    /// Keep what an earlier sitting finished; run the rest.
    Reuse,
    /// Keep what an earlier sitting finished; run nothing.
    FinishedOnly,
}

/// Runs `strata experiment`.
pub fn run(a: Args) -> Result<()> {
    let mut ex = Experiment::load(&a.experiment)?;
    let sitting = match (a.finished_only, a.reuse) {
        (true, _) => Sitting::FinishedOnly,
        (false, true) => Sitting::Reuse,
        (false, false) => Sitting::Fresh,
    };

    if a.quick {
        ex.use_quick_variant(&a.experiment)?;
    }
    if !a.runs.is_empty() {
        ex.keep_runs(&a.runs, "--run", &a.experiment)?;
    }
    let (recipes, model) = ex.recipes(&a.experiment)?;
    let out = ex.out.clone();
    std::fs::create_dir_all(out.join("mc")).with_context(|| format!("cannot create {}", out.display()))?;
    let start = Instant::now();
    eprintln!(
        "experiment: {} runs of {} tokens each{}, into {}",
        ex.runs.len(),
        ex.tokens,
        if ex.runs.iter().any(|r| r.tokens.is_some()) {
            " (some with their own)"
        } else {
            ""
        },
        out.display()
    );
    prepare_files(&ex, &model, sitting)?;
    // Steps an earlier sitting made count with the time they took then, so the total is the
    // experiment's, however many sittings it took.
    let prepare_secs = start.elapsed().as_secs_f64();
    let sets = prepare_sets(&ex, &out, &model, sitting)?;
    let (base, base_secs) = evaluate_base(&ex, &sets, &model, sitting)?;

    let mut rows = Vec::new();
    let mut failed = Vec::new();
    for (entry, recipe) in ex.runs.iter().zip(&recipes) {
        match one_run(&ex, &sets, &base, entry, recipe, &model, sitting) {
            Ok(row) => rows.push(row),
            Err(_) if sitting == Sitting::FinishedOnly => {
                eprintln!("experiment: run `{}` is not finished yet", entry.name);
                failed.push((entry.name.clone(), "not finished yet".to_string()));
            }
            Err(e) => {
                eprintln!("experiment: run `{}` failed: {e:#}", entry.name);
                failed.push((entry.name.clone(), format!("failed: {e:#}")));
            }
        }
    }
    let total = prepare_secs + sets.seconds + base_secs + rows.iter().map(|r| r.seconds).sum::<f64>();
    let outputs = Outputs {
        quick: a.quick,
        total_seconds: total,
        sitting_seconds: start.elapsed().as_secs_f64(),
    };
    write_outputs(&ex, &sets, &rows, &base, &failed, &outputs)?;
    if !failed.is_empty() && sitting != Sitting::FinishedOnly {
        bail!("{} of {} runs failed (see the table)", failed.len(), ex.runs.len());
    }
    Ok(())
}
