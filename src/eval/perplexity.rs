//! Perplexity and next-token accuracy over packed sequences, with a bootstrap interval over rows.

use anyhow::Result;
use serde::{Deserialize, Serialize};

use super::compare::quantiles95;
use crate::data::mix::{gather, RowRef};
use crate::data::Sequences;
use crate::dist::Collective;
use crate::model::decoder::TreeRows;
use crate::model::{Fwd, Model};
use crate::rng::Rng;

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
    /// 95% bootstrap interval of the perplexity, rows resampled (NaN for fewer than two rows).
    #[serde(default)]
    pub perplexity_ci: (f64, f64),
}

/// One row's summed NLL and scored tokens: the unit that intervals resample.
pub type RowLoss = (f64, usize);

/// Bootstrap draws behind every perplexity interval.
pub const RESAMPLES: usize = 1000;

/// Scores `seqs` in batches of `batch` rows (adapters on or off per `fwd`); returns the metrics
/// and each row's loss.
pub fn eval_rows(model: &Model, seqs: &Sequences, batch: usize, fwd: Fwd) -> Result<(TextMetrics, Vec<RowLoss>)> {
    eval_rows_on(model, seqs, batch, fwd, &crate::dist::Solo)
}

/// [`eval_rows`] with the batches divided among the ranks of `comm`'s job: each rank scores its
/// share, and every rank returns the whole set's metrics and rows. The batches are the
/// one-process run's, so the result is its result to the bit.
pub fn eval_rows_on(
    model: &Model,
    seqs: &Sequences,
    batch: usize,
    fwd: Fwd,
    comm: &dyn Collective,
) -> Result<(TextMetrics, Vec<RowLoss>)> {
    let batch = batch.max(1);
    let batches = crate::dist::shard(seqs.len().div_ceil(batch), comm.rank(), comm.size());
    let first = (batches.start * batch).min(seqs.len());
    let last = (batches.end * batch).min(seqs.len());
    let mut rows_out = Vec::with_capacity(seqs.len());
    let mut correct = 0usize;
    let mut progress = crate::progress::Progress::new("perplexity", (last - first) as u64, "rows");
    for start in (first..last).step_by(batch) {
        let end = (start + batch).min(last);
        let rows: Vec<RowRef> = (start..end).map(|r| (0, r)).collect();
        let (ids, tg) = gather(&[seqs], &rows, &model.device)?;
        let docs = crate::data::mix::documents(&[seqs], &rows).map(|(b, p)| TreeRows::new(b, p));
        let out = model.eval_loss(&ids, &tg, fwd, docs.as_ref())?;
        correct += out.correct;
        let per = out.per_token.unwrap_or_default();
        let t = seqs.seq_len;
        for r in 0..end - start {
            let nll: f64 = per[r * t..(r + 1) * t].iter().map(|&x| x as f64).sum();
            let count = tg[r * t..(r + 1) * t]
                .iter()
                .filter(|&&x| x != crate::ops::lm_head::IGNORE)
                .count();
            rows_out.push((nll, count));
        }
        progress.set((end - first) as u64, "");
    }
    progress.finish();
    if comm.size() > 1 {
        (rows_out, correct) = gather_rows(comm, rows_out, correct, first, seqs.len())?;
    }
    let (nll, count) = totals(&rows_out, 0..rows_out.len());
    let loss = if count > 0 { nll / count as f64 } else { f64::NAN };
    let m = TextMetrics {
        tokens: count,
        loss,
        perplexity: loss.exp(),
        accuracy: correct as f64 / count.max(1) as f64,
        perplexity_ci: perplexity_interval(&rows_out, RESAMPLES, 0),
    };
    Ok((m, rows_out))
}

/// Every rank's rows (`mine` starting at row `first` of `n`) and correct predictions, on every
/// rank: each rank's values in place in zeros, summed (adding zeros changes no bit).
fn gather_rows(
    comm: &dyn Collective,
    mine: Vec<RowLoss>,
    correct: usize,
    first: usize,
    n: usize,
) -> Result<(Vec<RowLoss>, usize)> {
    let mut all = vec![0.0f64; 2 * n + 1];
    for (i, (nll, count)) in mine.into_iter().enumerate() {
        all[first + i] = nll;
        all[n + first + i] = count as f64;
    }
    all[2 * n] = correct as f64;
    comm.sum_f64(&mut all)?;
    let rows = (0..n).map(|i| (all[i], all[n + i] as usize)).collect();
    Ok((rows, all[2 * n] as usize))
}

/// Scores `seqs` in batches of `batch` rows (adapters on or off per `fwd`).
pub fn eval_sequences(model: &Model, seqs: &Sequences, batch: usize, fwd: Fwd) -> Result<TextMetrics> {
    Ok(eval_rows(model, seqs, batch, fwd)?.0)
}

/// [`eval_sequences`] divided among the ranks of `comm`'s job ([`eval_rows_on`]).
pub fn eval_sequences_on(
    model: &Model,
    seqs: &Sequences,
    batch: usize,
    fwd: Fwd,
    comm: &dyn Collective,
) -> Result<TextMetrics> {
    Ok(eval_rows_on(model, seqs, batch, fwd, comm)?.0)
}

pub(crate) fn totals(rows: &[RowLoss], idx: impl Iterator<Item = usize>) -> (f64, usize) {
    idx.fold((0.0, 0), |(s, n), i| (s + rows[i].0, n + rows[i].1))
}

/// 95% interval of the perplexity over `rows` resampled with replacement.
pub fn perplexity_interval(rows: &[RowLoss], resamples: usize, seed: u64) -> (f64, f64) {
    if rows.len() < 2 {
        return (f64::NAN, f64::NAN);
    }
    let mut rng = Rng::new(seed);
    let draws = (0..resamples)
        .map(|_| {
            let (s, n) = totals(rows, (0..rows.len()).map(|_| rng.below(rows.len())));
            (s / n.max(1) as f64).exp()
        })
        .collect();
    quantiles95(draws)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::compare::paired_ratio;

    #[test]
    fn intervals_cover_the_estimate_and_pairing_cancels_row_difficulty() -> Result<()> {
        // Rows of very different difficulty, each 10% harder after.
        let before: Vec<RowLoss> = (0..200).map(|i| ((1 + i % 7) as f64 * 10.0, 10)).collect();
        let after: Vec<RowLoss> = before.iter().map(|&(s, n)| (s + 0.1 * n as f64, n)).collect();
        let (lo, hi) = perplexity_interval(&before, 500, 1);
        let (s, n) = totals(&before, 0..before.len());
        let ppl = (s / n as f64).exp();
        assert!(lo < ppl && ppl < hi, "{lo} {ppl} {hi}");
        let (r, rlo, rhi) = paired_ratio(&before, std::slice::from_ref(&after), 500, 1)?;
        assert!((r - 0.1f64.exp()).abs() < 1e-9);
        // Every row moved by the same amount: the paired interval is (nearly) a point.
        assert!(rhi - rlo < 1e-9, "{rlo} {rhi}");
        assert!(paired_ratio(&before, &[after[1..].to_vec()], 10, 1).is_err());
        assert!(perplexity_interval(&before[..1], 10, 1).0.is_nan());
        Ok(())
    }
}
