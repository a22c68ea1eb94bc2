//! A training run, top to bottom, in named phases (torchtune's recipe shape, llm.c's loop):
//!
//! - [`prepare`]: data, the Fisher, the memory plan, the model and its adapters, EWC, the step
//!   count and schedules, callbacks, and the state to start from (fresh or a checkpoint);
//! - [`step`]: one optimizer step: the rows it draws, the objective over its micro-batches
//!   (cross-entropy, contrastive, EWC), clipping, AdamW, and what it logs;
//! - [`evaluate`]: held-out scoring before, during and after;
//! - [`checkpoint`]: when the run writes its state;
//! - [`finish`]: the adapter or model, the report and the summary.
//!
//! The loop itself is [`run_with`], on one screen.

mod checkpoint;
mod evaluate;
mod finish;
mod prepare;
mod step;

use anyhow::Result;
use std::path::PathBuf;

use super::callback::{Callback, Control};
use super::recipe::{DataFormat, Recipe};
use crate::data::{self, Sequences};
pub use finish::RunSummary;
use prepare::Run;

/// How a run starts beyond its recipe.
pub struct RunOptions {
    /// Continue from this checkpoint (a checkpoint, `checkpoints/` or run directory).
    pub resume: Option<PathBuf>,
    /// Callbacks added after the built-in ones.
    pub callbacks: Vec<Box<dyn Callback>>,
    /// Run the ops a GPU runs (composed candle ops, NF4 in its device form) on the CPU
    /// backend: how `bench gpu --device cpu` and the tests hold the GPU path without a GPU.
    pub device_ops: bool,
    /// The job this process is a rank of: a job of several ranks trains data-parallel (rows of
    /// each step divided among them, gradients summed, rank 0 writing every output).
    pub comm: crate::dist::Comm,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            resume: None,
            callbacks: Vec::new(),
            device_ops: false,
            comm: crate::dist::solo(),
        }
    }
}

/// Runs a recipe to completion. `recipe_text` is saved beside the outputs.
pub fn run(recipe: &Recipe, recipe_text: &str) -> Result<RunSummary> {
    run_with(recipe, recipe_text, RunOptions::default())
}

/// [`run`] with a resume point and extra callbacks.
pub fn run_with(recipe: &Recipe, recipe_text: &str, opts: RunOptions) -> Result<RunSummary> {
    let mut run = Run::prepare(recipe, recipe_text, opts)?;
    run.begin()?;
    while run.st.step < run.steps && !run.ctl.stop {
        let rows = run.begin_step()?;
        let out = run.step(&rows)?;
        run.end_step(&out)?;
        run.evaluate_due()?;
        run.checkpoint_due(out.skipped)?;
    }
    run.finish()
}

/// Loads the recipe's sequences (`paths` in the recipe's format).
pub fn load_sequences(recipe: &Recipe, tok: &crate::model::tokenizer::Tok, paths: &[PathBuf]) -> Result<Sequences> {
    load_sequences_as(recipe, tok, paths, recipe.data.format, recipe.train.device == "cpu")
}

/// [`load_sequences`] with the files read as `format` (a data source's own).
pub fn load_sequences_as(
    recipe: &Recipe,
    tok: &crate::model::tokenizer::Tok,
    paths: &[PathBuf],
    format: DataFormat,
    fused_cpu: bool,
) -> Result<Sequences> {
    match format {
        DataFormat::Chat(f) => data::chat::load_chat(paths, tok, recipe.data.seq_len, f, &recipe.data.row_options()),
        DataFormat::Text => data::pack(
            tok,
            &data::text::load_documents_mapped(paths, &recipe.data.row_options())?,
            recipe.data.seq_len,
            recipe.data.packing.by_documents(fused_cpu),
        ),
    }
}

/// Whether an error is an allocation failure (a CUDA out-of-memory, an allocator refusing).
fn is_oom(e: &anyhow::Error) -> bool {
    let s = format!("{e:#}").to_lowercase();
    s.contains("out of memory") || s.contains("out_of_memory") || s.contains("memory allocation")
}

/// Runs `f(micro_batch)`; when it fails for lack of memory, halves the micro-batch (keeping the
/// effective batch) and runs the step again, down to one row.
pub fn with_oom_retry<T>(ctl: &mut Control, mut f: impl FnMut(usize) -> Result<T>) -> Result<T> {
    loop {
        match f(ctl.micro_batch) {
            Err(e) if is_oom(&e) && ctl.micro_batch > 1 => {
                let m = ctl.micro_batch;
                ctl.set_micro_batch(m / 2);
                eprintln!(
                    "out of memory at micro-batch {m}; retrying the step at {}",
                    ctl.micro_batch
                );
            }
            r => return r,
        }
    }
}
