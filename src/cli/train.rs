//! `strata train RECIPE.toml [--set key=value ...]`.

use anyhow::{Context, Result};
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
}

/// Runs `strata train`.
pub fn run(a: Args) -> Result<()> {
    let recipe = Recipe::load(&a.recipe, &a.sets)?;
    // Save the recipe as it ran: overrides included.
    let text = std::fs::read_to_string(&a.recipe).with_context(|| format!("cannot read {}", a.recipe.display()))?;
    let mut doc: toml::Table = text.parse()?;
    apply_sets(&mut doc, &a.sets)?;
    crate::train::trainer::run(&recipe, &toml::to_string(&doc)?)?;
    Ok(())
}
