//! Perplexity and next-token accuracy over packed sequences.

use anyhow::Result;
use serde::{Deserialize, Serialize};

use crate::data::mix::{gather, RowRef};
use crate::data::Sequences;
use crate::model::{Fwd, Model};

/// Text metrics over a set of sequences.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
pub struct TextMetrics {
    /// Tokens scored.
    pub tokens: usize,
    /// Mean negative log-likelihood per token (nats).
    pub loss: f64,
    /// `exp(loss)`.
    pub perplexity: f64,
    /// Fraction of tokens whose arg-max prediction is the target.
    pub accuracy: f64,
}

/// Scores `seqs` in batches of `batch` rows (adapters on or off per `fwd`).
pub fn eval_sequences(model: &Model, seqs: &Sequences, batch: usize, fwd: Fwd) -> Result<TextMetrics> {
    let (mut nll, mut count, mut correct) = (0.0, 0usize, 0usize);
    for start in (0..seqs.len()).step_by(batch.max(1)) {
        let end = (start + batch.max(1)).min(seqs.len());
        let rows: Vec<RowRef> = (start..end).map(|r| (0, r)).collect();
        let (ids, tg) = gather(&[seqs], &rows, &model.device)?;
        let out = model.eval_loss(&ids, &tg, fwd)?;
        nll += out.nll_sum;
        count += out.count;
        correct += out.correct;
    }
    let loss = if count > 0 { nll / count as f64 } else { f64::NAN };
    Ok(TextMetrics {
        tokens: count,
        loss,
        perplexity: loss.exp(),
        accuracy: correct as f64 / count.max(1) as f64,
    })
}
