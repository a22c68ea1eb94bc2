//! Phase three: held-out scoring, before training (in [`super::prepare`]), every
//! `train.eval_every` steps, and after (in [`super::finish`]).

use anyhow::Result;
use serde_json::json;

use super::prepare::{Run, RunData};
use crate::dist::Collective;
use crate::eval::{eval_sequences_on, TextMetrics};
use crate::model::{Fwd, Model};

impl Run<'_> {
    /// Scores the held-out rows when `train.eval_every` says so (the last step is scored by
    /// [`Run::finish`]).
    pub fn evaluate_due(&mut self) -> Result<()> {
        let every = self.recipe.train.eval_every;
        let step = self.st.step;
        if every == 0 || !step.is_multiple_of(every) || step >= self.steps {
            return Ok(());
        }
        let comm = self.comm.as_ref();
        let m = self
            .progress
            .suspend(|| eval_sequences_on(&self.model, &self.data.held, self.eval_batch(), self.eval_fwd, comm))?;
        self.emit(json!({"step": step, "eval": m}))?;
        self.progress.println(&format!(
            "held-out at step {step}: loss {:.4}, perplexity {:.2}",
            m.loss, m.perplexity
        ));
        Ok(())
    }

    /// The held-out and general held-out scores now.
    pub fn evaluate(&self) -> Result<(TextMetrics, Option<TextMetrics>)> {
        score(
            &self.model,
            &self.data,
            self.eval_batch(),
            self.eval_fwd,
            self.comm.as_ref(),
        )
    }
}

/// The held-out and general held-out scores of `model`, `batch` rows at a time, the rows
/// divided among the ranks of `comm`'s job (every rank gets the whole scores, which are the
/// one-process scores to the bit).
pub(super) fn score(
    model: &Model,
    data: &RunData,
    batch: usize,
    fwd: Fwd,
    comm: &dyn Collective,
) -> Result<(TextMetrics, Option<TextMetrics>)> {
    let m = eval_sequences_on(model, &data.held, batch, fwd, comm)?;
    let g = match &data.held_general {
        Some(h) => Some(eval_sequences_on(model, h, batch, fwd, comm)?),
        None => None,
    };
    Ok((m, g))
}

/// The held-out line printed before and after training.
pub(super) fn report(when: &str, m: &TextMetrics, general: Option<&TextMetrics>) {
    eprintln!(
        "held-out {when}: loss {:.4}, perplexity {:.2}, accuracy {:.2}%{}",
        m.loss,
        m.perplexity,
        100.0 * m.accuracy,
        general.map_or(String::new(), |g| format!(
            "; general: loss {:.4}, perplexity {:.2}",
            g.loss, g.perplexity
        ))
    );
}
