//! Before/after comparisons with the metrics docs/design.md defines, and paired bootstrap intervals.
//!
//! Forgetting rate = (general accuracy before - after) / general accuracy before. Domain gain =
//! domain accuracy after - before. Both come with a 95% interval from a paired bootstrap: the same
//! resampled items are scored before and after, so item difficulty cancels.

use anyhow::{bail, Result};
use serde::Serialize;

use super::perplexity::{totals, RowLoss};
use crate::rng::Rng;

/// A before/after accuracy pair on the same items. An item's score is 1 (right) or 0 (wrong),
/// or, for a run trained at several seeds, the share of its seeds that got it right.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Paired {
    /// Items.
    pub items: usize,
    /// Accuracy before.
    pub before: f64,
    /// Accuracy after.
    pub after: f64,
    /// `after - before`, with its 95% interval.
    pub gain: (f64, f64, f64),
    /// `(before - after) / before`, with its 95% interval (NaN when `before` is 0).
    pub forgetting: (f64, f64, f64),
}

fn mean(v: &[f64], idx: impl Iterator<Item = usize>) -> f64 {
    let (mut s, mut n) = (0.0, 0usize);
    for i in idx {
        s += v[i];
        n += 1;
    }
    s / n.max(1) as f64
}

/// Per-item scores (1 right, 0 wrong) of per-item outcomes.
pub fn scores(correct: &[bool]) -> Vec<f64> {
    correct.iter().map(|&c| if c { 1.0 } else { 0.0 }).collect()
}

/// The 2.5% and 97.5% quantiles of `v` (finite values only; NaN when none).
pub fn quantiles95(mut v: Vec<f64>) -> (f64, f64) {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| v[((q * (v.len() - 1) as f64).round() as usize).min(v.len() - 1)];
    (at(0.025), at(0.975))
}

/// Perplexity after / before on the same rows, with a 95% paired-bootstrap interval (the same
/// resampled rows on both sides, so that how hard a row is cancels).
pub fn paired_ratio(before: &[RowLoss], after: &[RowLoss], resamples: usize, seed: u64) -> Result<(f64, f64, f64)> {
    if before.len() != after.len() || before.is_empty() || before.iter().zip(after).any(|(b, a)| b.1 != a.1) {
        bail!(
            "a paired perplexity comparison needs the same rows before and after ({} vs {} rows)",
            before.len(),
            after.len()
        );
    }
    let ratio = |idx: &[usize]| {
        let (b, n) = totals(before, idx.iter().copied());
        let (a, _) = totals(after, idx.iter().copied());
        ((a - b) / n.max(1) as f64).exp()
    };
    let all: Vec<usize> = (0..before.len()).collect();
    let mut rng = Rng::new(seed);
    let draws = (0..resamples)
        .map(|_| {
            let idx: Vec<usize> = (0..before.len()).map(|_| rng.below(before.len())).collect();
            ratio(&idx)
        })
        .collect();
    let (lo, hi) = quantiles95(draws);
    Ok((ratio(&all), lo, hi))
}

/// Compares per-item scores before and after, with `resamples` bootstrap draws.
pub fn paired(before: &[f64], after: &[f64], resamples: usize, seed: u64) -> Result<Paired> {
    if before.len() != after.len() || before.is_empty() {
        bail!(
            "paired comparison needs the same non-empty item set before and after ({} vs {})",
            before.len(),
            after.len()
        );
    }
    let n = before.len();
    let (b, a) = (mean(before, 0..n), mean(after, 0..n));
    let mut rng = Rng::new(seed);
    let (mut gains, mut forgets) = (Vec::with_capacity(resamples), Vec::with_capacity(resamples));
    let mut idx = vec![0usize; n];
    for _ in 0..resamples {
        idx.iter_mut().for_each(|i| *i = rng.below(n));
        let (bb, aa) = (mean(before, idx.iter().copied()), mean(after, idx.iter().copied()));
        gains.push(aa - bb);
        forgets.push((bb - aa) / bb);
    }
    let (gl, gh) = quantiles95(gains);
    let (fl, fh) = quantiles95(forgets);
    Ok(Paired {
        items: n,
        before: b,
        after: a,
        gain: (a - b, gl, gh),
        forgetting: ((b - a) / b, fl, fh),
    })
}

/// A run's learning as a share of a reference run's (plain fine-tuning's), from the same base
/// on the same items: `(run - base) / (reference - base)` with a 95% bootstrap interval whose
/// draws resample the items once for all three, so that what they share cancels. NaN where the
/// reference learned nothing.
#[derive(Clone, Copy, Debug, Serialize, PartialEq)]
pub struct Share {
    /// The point estimate.
    pub share: f64,
    /// 2.5% quantile of the draws.
    pub lo: f64,
    /// 97.5% quantile of the draws.
    pub hi: f64,
}

fn share_of(items: usize, resamples: usize, seed: u64, gain: impl Fn(&[usize]) -> (f64, f64)) -> Share {
    let ratio = |idx: &[usize]| {
        let (run, reference) = gain(idx);
        if reference == 0.0 {
            f64::NAN
        } else {
            run / reference
        }
    };
    let all: Vec<usize> = (0..items).collect();
    let mut rng = Rng::new(seed);
    let mut idx = vec![0usize; items];
    let draws = (0..resamples)
        .map(|_| {
            idx.iter_mut().for_each(|i| *i = rng.below(items));
            ratio(&idx)
        })
        .collect();
    let (lo, hi) = quantiles95(draws);
    Share {
        share: ratio(&all),
        lo,
        hi,
    }
}

/// A run's accuracy gain as a share of the reference run's, per-item scores of the base, the
/// reference and the run on the same items ([`Share`]).
pub fn gain_share(base: &[f64], reference: &[f64], run: &[f64], resamples: usize, seed: u64) -> Result<Share> {
    let n = base.len();
    if n == 0 || reference.len() != n || run.len() != n {
        bail!(
            "a gain share needs the same non-empty item set for the base, the reference and the run ({}, {}, {} items)",
            n,
            reference.len(),
            run.len()
        );
    }
    Ok(share_of(n, resamples, seed, |idx| {
        let b = mean(base, idx.iter().copied());
        (
            mean(run, idx.iter().copied()) - b,
            mean(reference, idx.iter().copied()) - b,
        )
    }))
}

/// A run's perplexity reduction as a share of the reference run's (`1 - after / before` of
/// each, on the same rows: [`Share`]).
pub fn reduction_share(
    base: &[RowLoss],
    reference: &[RowLoss],
    run: &[RowLoss],
    resamples: usize,
    seed: u64,
) -> Result<Share> {
    let same = |o: &[RowLoss]| o.len() == base.len() && o.iter().zip(base).all(|(a, b)| a.1 == b.1);
    if base.is_empty() || !same(reference) || !same(run) {
        bail!(
            "a perplexity reduction share needs the same rows for the base, the reference and the run ({}, {}, {} rows)",
            base.len(),
            reference.len(),
            run.len()
        );
    }
    Ok(share_of(base.len(), resamples, seed, |idx| {
        let (b, n) = totals(base, idx.iter().copied());
        let reduction = |o: &[RowLoss]| 1.0 - ((totals(o, idx.iter().copied()).0 - b) / n.max(1) as f64).exp();
        (reduction(run), reduction(reference))
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formulas_and_intervals() -> Result<()> {
        // 10 items: 8 right before, 6 right after.
        let before = scores(&[true, true, true, true, true, true, true, true, false, false]);
        let after = scores(&[true, true, true, true, true, true, false, false, false, false]);
        let p = paired(&before, &after, 2000, 1)?;
        assert!((p.before - 0.8).abs() < 1e-12 && (p.after - 0.6).abs() < 1e-12);
        assert!((p.gain.0 + 0.2).abs() < 1e-12);
        assert!((p.forgetting.0 - 0.25).abs() < 1e-12);
        assert!(p.gain.1 <= p.gain.0 && p.gain.0 <= p.gain.2);
        assert!(p.forgetting.1 <= p.forgetting.0 && p.forgetting.0 <= p.forgetting.2);
        // No change on any item: a zero-width interval at zero.
        let same = paired(&before, &before, 500, 2)?;
        assert_eq!(same.gain, (0.0, 0.0, 0.0));
        // Intervals narrow with more items.
        let big_b = scores(&(0..4000).map(|i| i % 5 != 0).collect::<Vec<_>>());
        let big_a = scores(&(0..4000).map(|i| i % 5 != 0 && i % 17 != 0).collect::<Vec<_>>());
        let big = paired(&big_b, &big_a, 1000, 3)?;
        assert!(big.forgetting.2 - big.forgetting.1 < 0.02, "{:?}", big.forgetting);
        assert!(paired(&before, &after[..5], 10, 0).is_err());
        Ok(())
    }

    #[test]
    fn shares_of_the_reference_gain() -> Result<()> {
        // 1,000 items: the reference gains 10 points, the run 8 of them, on items both got
        // wrong before.
        let n = 1000;
        let base = scores(&(0..n).map(|i| i % 2 == 0).collect::<Vec<_>>());
        let reference = scores(&(0..n).map(|i| i % 2 == 0 || i % 10 == 1).collect::<Vec<_>>());
        let run = scores(
            &(0..n)
                .map(|i| i % 2 == 0 || (i % 10 == 1 && i % 50 != 1))
                .collect::<Vec<_>>(),
        );
        let s = gain_share(&base, &reference, &run, 1000, 7)?;
        assert!((s.share - 0.8).abs() < 1e-12, "{s:?}");
        assert!(s.lo <= s.share && s.share <= s.hi && s.hi - s.lo < 0.2, "{s:?}");
        // The reference against itself: exactly one, in every draw.
        let one = gain_share(&base, &reference, &reference, 200, 1)?;
        assert_eq!((one.share, one.lo, one.hi), (1.0, 1.0, 1.0));
        // No reference gain: undefined, not a number made up.
        assert!(gain_share(&base, &base, &run, 100, 1)?.share.is_nan());
        assert!(gain_share(&base, &reference, &run[..10], 100, 1).is_err());

        // Perplexity: the reference lowers every row's loss by 0.2 nats per token, the run by 0.1.
        let rows = |d: f64| -> Vec<RowLoss> { (0..40).map(|i| ((3.0 + 0.01 * i as f64 - d) * 100.0, 100)).collect() };
        let r = reduction_share(&rows(0.0), &rows(0.2), &rows(0.1), 500, 3)?;
        let want = (1.0 - (-0.1f64).exp()) / (1.0 - (-0.2f64).exp());
        assert!((r.share - want).abs() < 1e-9, "{r:?} vs {want}");
        assert!(r.lo <= r.share + 1e-9 && r.share <= r.hi + 1e-9);
        assert!(reduction_share(&rows(0.0), &rows(0.2), &rows(0.1)[..39], 10, 0).is_err());
        Ok(())
    }
}
