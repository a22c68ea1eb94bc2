//! The `strata` command line: one file per subcommand; `main.rs` only dispatches.

pub mod bench;
pub mod bench_gpu;
pub mod bench_memory;
pub mod board;
pub mod data;
pub mod eval;
pub mod experiment;
pub mod fisher;
pub mod generate;
pub mod inspect;
pub mod merge;
pub mod policies;
pub mod synthetic;
pub mod train;

use clap::{Parser, Subcommand};

/// strata: teach an LLM a new domain without making it forget.
#[derive(Parser, Debug)]
#[command(name = "strata", version, about)]
pub struct Cli {
    /// The subcommand.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Train adapters (or the full model) as a recipe says.
    Train(train::Args),
    /// Build evaluation sets from the fetched assets (`strata data build`).
    Data(data::Args),
    /// Perplexity and next-token accuracy of a model (with or without an adapter) on text.
    Eval(eval::Args),
    /// Run a set of recipes on one token budget and compare learning and forgetting.
    Experiment(experiment::Args),
    /// Estimate the Fisher information EWC uses, for a recipe's model and plan.
    Fisher(fisher::Args),
    /// Sample text from a model, with or without an adapter.
    Generate(generate::Args),
    /// Write a model (adapter merged, or not) as a Hugging Face directory.
    Merge(merge::Args),
    /// Architecture, parameters by precision, and the memory fine-tuning it would need.
    Inspect(inspect::Args),
    /// Benchmarks measured against a baseline in the same process.
    Bench(bench::Args),
    /// Serve a local page of the runs and experiments under a directory, live while they train.
    Board(board::Args),
}

impl Cli {
    /// Whether this invocation fine-tunes every weight with f32 GEMMs (`strata train` of a
    /// `mode = "full"` recipe at `train.precision = "f32"`, or where the bf16 kernel cannot
    /// run): the one job whose matmuls and gradient sums lean on candle's own pool (see
    /// `main`). Under bf16 mixed precision the GEMMs are strata's, on rayon's pool, and
    /// candle's spinning workers only compete with them (176 against 142 tok/s on SmolLM2's
    /// shape, 2 cores). A recipe that does not parse says no; the run itself reports why.
    pub fn trains_every_weight(&self) -> bool {
        let f32_gemms = |p: crate::train::recipe::Precision| !p.bf16_on_cpu();
        match &self.command {
            Command::Train(a) => crate::train::recipe::Recipe::load(&a.recipe, &a.sets)
                .map(|r| r.full() && f32_gemms(r.train.precision))
                .unwrap_or(false),
            Command::Bench(a) => a.mode == crate::train::recipe::Mode::Full && f32_gemms(a.precision),
            _ => false,
        }
    }
}

/// Runs the parsed command line as a rank of `comm`'s job (a job of one outside a launcher).
/// Only `train` and `fisher` divide their work among ranks; the others refuse a job of more.
pub fn run(cli: Cli, comm: crate::dist::Comm) -> anyhow::Result<()> {
    if comm.size() > 1 && !matches!(cli.command, Command::Train(_) | Command::Fisher(_)) {
        anyhow::bail!(
            "only `strata train` and `strata fisher` run data-parallel; start this command without the MPI launcher"
        );
    }
    match cli.command {
        Command::Train(a) => train::run(a, comm),
        Command::Fisher(a) => fisher::run(a, comm),
        Command::Data(a) => data::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Experiment(a) => experiment::run(a),
        Command::Generate(a) => generate::run(a),
        Command::Merge(a) => merge::run(a),
        Command::Inspect(a) => inspect::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Board(a) => board::run(a),
    }
}

/// The model arguments shared by `eval`, `generate` and `merge`.
#[derive(clap::Args, Debug)]
pub struct ModelArgs {
    /// A `.gguf` file or a Hugging Face directory.
    #[arg(long)]
    pub model: std::path::PathBuf,
    /// A PEFT adapter directory to apply (for `merge`: to fold into the weights).
    #[arg(long)]
    pub adapter: Option<std::path::PathBuf>,
}

impl ModelArgs {
    /// Opens the model frozen in `base_dtype` (`auto` or a precision) on `dev` with the adapter
    /// applied (`pack`: see [`crate::adapter::open_adapted`]).
    pub fn load(
        &self,
        base_dtype: &str,
        dev: &candle_core::Device,
        pack: bool,
    ) -> anyhow::Result<(crate::model::ModelSource, crate::model::Model)> {
        crate::adapter::open_adapted(
            &self.model,
            self.adapter.as_deref(),
            base_choice(base_dtype)?,
            dev,
            pack,
        )
    }
}

/// A `--base-dtype` value: `auto` (the adapter's recorded bases, `None`) or a precision.
pub fn base_choice(s: &str) -> anyhow::Result<Option<crate::model::BaseDtype>> {
    match s {
        "auto" => Ok(None),
        b => Ok(Some(crate::model::BaseDtype::parse(b)?)),
    }
}
