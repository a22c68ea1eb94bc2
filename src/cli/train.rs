//! `strata train RECIPE.toml [--set key=value ...] [--resume DIR]`.

use anyhow::Result;
use std::path::PathBuf;

use crate::train::recipe::{apply_sets, Recipe};

/// Arguments of `strata train`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The recipe (see recipes/README.md).
    pub recipe: PathBuf,
    /// Override a recipe field, e.g. `--set train.lr=1e-4` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// Continue bit-exactly from a checkpoint: a `checkpoints/step-NNNNNN` directory, or a run
    /// directory (its newest checkpoint). Use the recipe that wrote it.
    #[arg(long, value_name = "DIR")]
    pub resume: Option<PathBuf>,
}

/// Runs `strata train`, as one rank of `comm`'s job.
pub fn run(a: Args, comm: crate::dist::Comm) -> Result<()> {
    let recipe = Recipe::load(&a.recipe, &a.sets)?;
    // Save the recipe as it ran: overrides included.
    let text = crate::fsio::read_text(&a.recipe, crate::fsio::CONFIG_CAP, "recipe")?;
    let mut doc: toml::Table = text.parse()?;
    apply_sets(&mut doc, &a.sets)?;
    let opts = crate::train::trainer::RunOptions {
        resume: a.resume,
        comm,
        ..Default::default()
    };
    crate::train::trainer::run_with(&recipe, &toml::to_string(&doc)?, opts)?;
    Ok(())
}
