//! Before/after comparisons with the metrics docs/design.md defines, and paired bootstrap intervals.
//!
//! Forgetting rate = (general accuracy before - after) / general accuracy before. Domain gain =
//! domain accuracy after - before. Both come with a 95% interval from a paired bootstrap: the same
//! resampled items are scored before and after, so item difficulty cancels.

use anyhow::{bail, Result};
use serde::Serialize;

use super::perplexity::{totals, RowLoss};
use crate::rng::Rng;

/// A before/after accuracy pair on the same items. An item's score is 1 (right) or 0 (wrong);
/// a model trained at several seeds has one score per seed, and its accuracy is their mean.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Paired {
    /// Items.
    pub items: usize,
    /// Accuracy before.
    pub before: f64,
    /// Accuracy after (the mean over its seeds).
    pub after: f64,
    /// `after - before`, with its 95% interval.
    pub gain: (f64, f64, f64),
    /// `(before - after) / before`, with its 95% interval (NaN when `before` is 0).
    pub forgetting: (f64, f64, f64),
}

/// Per-item scores (1 right, 0 wrong) of per-item outcomes.
pub fn scores(correct: &[bool]) -> Vec<f64> {
    correct.iter().map(|&c| if c { 1.0 } else { 0.0 }).collect()
}

/// The seeds of a model at `k` seeds that one bootstrap draw takes: `k` drawn with replacement,
/// so that how far the seeds fall apart widens the interval as the items do (a two-level
/// bootstrap, seeds then items). One seed draws nothing, so a single model's draws are the
/// items' alone.
fn draw_seeds(rng: &mut Rng, k: usize) -> Vec<usize> {
    match k {
        1 => vec![0],
        _ => (0..k).map(|_| rng.below(k)).collect(),
    }
}

/// Mean score over the items `idx`, each the mean of its scores at the seeds `seeds`.
fn mean(v: &[Vec<f64>], seeds: &[usize], idx: &[usize]) -> f64 {
    let mut s = 0.0;
    for &i in idx {
        s += seeds.iter().map(|&k| v[k][i]).sum::<f64>() / seeds.len() as f64;
    }
    s / idx.len().max(1) as f64
}

/// Summed loss and tokens over the rows `idx`, each row's loss the mean of its losses at the
/// seeds `seeds`.
fn loss_totals(v: &[Vec<RowLoss>], seeds: &[usize], idx: &[usize]) -> (f64, usize) {
    let sum: f64 = seeds.iter().map(|&k| totals(&v[k], idx.iter().copied()).0).sum();
    (sum / seeds.len() as f64, totals(&v[0], idx.iter().copied()).1)
}

/// Whether every seed's scores cover `n` items.
fn covers<T>(v: &[Vec<T>], n: usize) -> bool {
    !v.is_empty() && v.iter().all(|s| s.len() == n)
}

/// Whether every seed's rows are `base`'s rows (the same token counts).
fn same_rows(v: &[Vec<RowLoss>], base: &[RowLoss]) -> bool {
    covers(v, base.len()) && v.iter().all(|s| s.iter().zip(base).all(|(a, b)| a.1 == b.1))
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
/// resampled rows on both sides, so that how hard a row is cancels). `after` holds the rows'
/// losses at each of the model's seeds.
pub fn paired_ratio(
    before: &[RowLoss],
    after: &[Vec<RowLoss>],
    resamples: usize,
    seed: u64,
) -> Result<(f64, f64, f64)> {
    if before.is_empty() || !same_rows(after, before) {
        bail!(
            "a paired perplexity comparison needs the same rows before and after ({} vs {} rows)",
            before.len(),
            after.first().map_or(0, Vec::len)
        );
    }
    let ratio = |idx: &[usize], seeds: &[usize]| {
        let (b, n) = totals(before, idx.iter().copied());
        let (a, _) = loss_totals(after, seeds, idx);
        ((a - b) / n.max(1) as f64).exp()
    };
    let all: Vec<usize> = (0..before.len()).collect();
    let every: Vec<usize> = (0..after.len()).collect();
    let mut rng = Rng::new(seed);
    let draws = (0..resamples)
        .map(|_| {
            let seeds = draw_seeds(&mut rng, after.len());
            let idx: Vec<usize> = (0..before.len()).map(|_| rng.below(before.len())).collect();
            ratio(&idx, &seeds)
        })
        .collect();
    let (lo, hi) = quantiles95(draws);
    Ok((ratio(&all, &every), lo, hi))
}

/// Compares per-item scores before and after (`after`: one list per seed of the model), with
/// `resamples` bootstrap draws.
pub fn paired(before: &[f64], after: &[Vec<f64>], resamples: usize, seed: u64) -> Result<Paired> {
    let n = before.len();
    if n == 0 || !covers(after, n) {
        bail!(
            "paired comparison needs the same non-empty item set before and after ({} vs {})",
            n,
            after.first().map_or(0, Vec::len)
        );
    }
    let before = [before.to_vec()];
    let all: Vec<usize> = (0..n).collect();
    let every: Vec<usize> = (0..after.len()).collect();
    let (b, a) = (mean(&before, &[0], &all), mean(after, &every, &all));
    let mut rng = Rng::new(seed);
    let (mut gains, mut forgets) = (Vec::with_capacity(resamples), Vec::with_capacity(resamples));
    let mut idx = vec![0usize; n];
    for _ in 0..resamples {
        let seeds = draw_seeds(&mut rng, after.len());
        idx.iter_mut().for_each(|i| *i = rng.below(n));
        let (bb, aa) = (mean(&before, &[0], &idx), mean(after, &seeds, &idx));
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
/// draws resample the items once for all three, so that what they share cancels (and each
/// run's seeds, where it has several). NaN where the reference learned nothing.
#[derive(Clone, Copy, Debug, Serialize, PartialEq)]
pub struct Share {
    /// The point estimate.
    pub share: f64,
    /// 2.5% quantile of the draws.
    pub lo: f64,
    /// 97.5% quantile of the draws.
    pub hi: f64,
}

/// [`Share`] from `gain(items, reference seeds, run seeds) -> (run gain, reference gain)`.
fn share_of(
    items: usize,
    seeds: (usize, usize),
    resamples: usize,
    seed: u64,
    gain: impl Fn(&[usize], &[usize], &[usize]) -> (f64, f64),
) -> Share {
    let ratio = |idx: &[usize], rs: &[usize], us: &[usize]| {
        let (run, reference) = gain(idx, rs, us);
        if reference == 0.0 {
            f64::NAN
        } else {
            run / reference
        }
    };
    let all: Vec<usize> = (0..items).collect();
    let every = |k: usize| (0..k).collect::<Vec<usize>>();
    let mut rng = Rng::new(seed);
    let mut idx = vec![0usize; items];
    let draws = (0..resamples)
        .map(|_| {
            let rs = draw_seeds(&mut rng, seeds.0);
            let us = draw_seeds(&mut rng, seeds.1);
            idx.iter_mut().for_each(|i| *i = rng.below(items));
            ratio(&idx, &rs, &us)
        })
        .collect();
    let (lo, hi) = quantiles95(draws);
    Share {
        share: ratio(&all, &every(seeds.0), &every(seeds.1)),
        lo,
        hi,
    }
}

/// A run's accuracy gain as a share of the reference run's, per-item scores of the base, the
/// reference and the run (each per seed) on the same items ([`Share`]).
pub fn gain_share(
    base: &[f64],
    reference: &[Vec<f64>],
    run: &[Vec<f64>],
    resamples: usize,
    seed: u64,
) -> Result<Share> {
    let n = base.len();
    if n == 0 || !covers(reference, n) || !covers(run, n) {
        bail!(
            "a gain share needs the same non-empty item set for the base, the reference and the run ({}, {}, {} items)",
            n,
            reference.first().map_or(0, Vec::len),
            run.first().map_or(0, Vec::len)
        );
    }
    let base = [base.to_vec()];
    Ok(share_of(
        n,
        (reference.len(), run.len()),
        resamples,
        seed,
        |idx, rs, us| {
            let b = mean(&base, &[0], idx);
            (mean(run, us, idx) - b, mean(reference, rs, idx) - b)
        },
    ))
}

/// A run's perplexity reduction as a share of the reference run's (`1 - after / before` of
/// each, on the same rows, each per seed: [`Share`]).
pub fn reduction_share(
    base: &[RowLoss],
    reference: &[Vec<RowLoss>],
    run: &[Vec<RowLoss>],
    resamples: usize,
    seed: u64,
) -> Result<Share> {
    if base.is_empty() || !same_rows(reference, base) || !same_rows(run, base) {
        bail!(
            "a perplexity reduction share needs the same rows for the base, the reference and the run ({}, {}, {} rows)",
            base.len(),
            reference.first().map_or(0, Vec::len),
            run.first().map_or(0, Vec::len)
        );
    }
    Ok(share_of(
        base.len(),
        (reference.len(), run.len()),
        resamples,
        seed,
        |idx, rs, us| {
            let (b, n) = totals(base, idx.iter().copied());
            let reduction = |o: &[Vec<RowLoss>], seeds: &[usize]| {
                1.0 - ((loss_totals(o, seeds, idx).0 - b) / n.max(1) as f64).exp()
            };
            (reduction(run, us), reduction(reference, rs))
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formulas_and_intervals() -> Result<()> {
        // 10 items: 8 right before, 6 right after.
        let before = scores(&[true, true, true, true, true, true, true, true, false, false]);
        let after = scores(&[true, true, true, true, true, true, false, false, false, false]);
        let p = paired(&before, std::slice::from_ref(&after), 2000, 1)?;
        assert!((p.before - 0.8).abs() < 1e-12 && (p.after - 0.6).abs() < 1e-12);
        assert!((p.gain.0 + 0.2).abs() < 1e-12);
        assert!((p.forgetting.0 - 0.25).abs() < 1e-12);
        assert!(p.gain.1 <= p.gain.0 && p.gain.0 <= p.gain.2);
        assert!(p.forgetting.1 <= p.forgetting.0 && p.forgetting.0 <= p.forgetting.2);
        // No change on any item: a zero-width interval at zero.
        let same = paired(&before, std::slice::from_ref(&before), 500, 2)?;
        assert_eq!(same.gain, (0.0, 0.0, 0.0));
        // Intervals narrow with more items.
        let big_b = scores(&(0..4000).map(|i| i % 5 != 0).collect::<Vec<_>>());
        let big_a = scores(&(0..4000).map(|i| i % 5 != 0 && i % 17 != 0).collect::<Vec<_>>());
        let big = paired(&big_b, &[big_a], 1000, 3)?;
        assert!(big.forgetting.2 - big.forgetting.1 < 0.02, "{:?}", big.forgetting);
        assert!(paired(&before, &[after[..5].to_vec()], 10, 0).is_err());
        assert!(paired(&before, &[], 10, 0).is_err());
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
        let s = gain_share(
            &base,
            std::slice::from_ref(&reference),
            std::slice::from_ref(&run),
            1000,
            7,
        )?;
        assert!((s.share - 0.8).abs() < 1e-12, "{s:?}");
        assert!(s.lo <= s.share && s.share <= s.hi && s.hi - s.lo < 0.2, "{s:?}");
        // The reference against itself: exactly one, in every draw.
        let one = gain_share(
            &base,
            std::slice::from_ref(&reference),
            std::slice::from_ref(&reference),
            200,
            1,
        )?;
        assert_eq!((one.share, one.lo, one.hi), (1.0, 1.0, 1.0));
        // No reference gain: undefined, not a number made up.
        assert!(
            gain_share(&base, std::slice::from_ref(&base), std::slice::from_ref(&run), 100, 1)?
                .share
                .is_nan()
        );
        assert!(gain_share(&base, std::slice::from_ref(&reference), &[run[..10].to_vec()], 100, 1).is_err());

        // Perplexity: the reference lowers every row's loss by 0.2 nats per token, the run by 0.1.
        let rows = |d: f64| -> Vec<RowLoss> { (0..40).map(|i| ((3.0 + 0.01 * i as f64 - d) * 100.0, 100)).collect() };
        let r = reduction_share(&rows(0.0), &[rows(0.2)], &[rows(0.1)], 500, 3)?;
        let want = (1.0 - (-0.1f64).exp()) / (1.0 - (-0.2f64).exp());
        assert!((r.share - want).abs() < 1e-9, "{r:?} vs {want}");
        assert!(r.lo <= r.share + 1e-9 && r.share <= r.hi + 1e-9);
        assert!(reduction_share(&rows(0.0), &[rows(0.2)], &[rows(0.1)[..39].to_vec()], 10, 0).is_err());
        Ok(())
    }

    #[test]
    fn seeds_are_pooled_and_their_spread_widens_the_interval() -> Result<()> {
        // 2,000 items, 60% right before. Seed A loses 6 points, seed B gains 2.
        let n = 2000;
        let before = scores(&(0..n).map(|i| i % 5 < 3).collect::<Vec<_>>());
        let a = scores(&(0..n).map(|i| i % 5 < 3 && i % 50 >= 3).collect::<Vec<_>>());
        let b = scores(&(0..n).map(|i| i % 5 < 3 || i % 50 == 3).collect::<Vec<_>>());
        let (pa, pb) = (
            paired(&before, std::slice::from_ref(&a), 1000, 1)?,
            paired(&before, std::slice::from_ref(&b), 1000, 1)?,
        );
        let both = paired(&before, &[a.clone(), b.clone()], 1000, 1)?;
        // The point estimate is the seeds' mean.
        assert!((both.after - (pa.after + pb.after) / 2.0).abs() < 1e-12, "{both:?}");
        // The interval spans both seeds' own estimates: the seeds disagree by more than the
        // items' sampling says each is sure of.
        assert!(
            both.gain.1 <= pa.gain.0 && pb.gain.0 <= both.gain.2,
            "{both:?} {pa:?} {pb:?}"
        );
        assert!(
            both.gain.2 - both.gain.1 > 2.0 * (pa.gain.2 - pa.gain.1),
            "{both:?} {pa:?}"
        );
        // Two seeds that agree item for item give the one seed's estimate and a like interval.
        let twice = paired(&before, &[a.clone(), a.clone()], 1000, 1)?;
        assert!((twice.gain.0 - pa.gain.0).abs() < 1e-12);
        assert!(
            ((twice.gain.2 - twice.gain.1) - (pa.gain.2 - pa.gain.1)).abs() < 0.01,
            "{twice:?} {pa:?}"
        );
        // Seeds of different item sets are refused.
        assert!(paired(&before, &[a.clone(), b[..10].to_vec()], 10, 0).is_err());

        // Shares: the reference at two seeds that agree, the run at seeds A and B.
        let s = gain_share(&before, &[b.clone(), b.clone()], &[a.clone(), b.clone()], 1000, 2)?;
        let want = ((pa.gain.0 + pb.gain.0) / 2.0) / pb.gain.0;
        assert!(
            (s.share - want).abs() < 1e-9 && s.lo < s.share && s.share < s.hi,
            "{s:?} vs {want}"
        );

        // Perplexity: rows' losses are averaged over the seeds.
        let rows = |d: f64| -> Vec<RowLoss> { (0..40).map(|i| ((3.0 + 0.01 * i as f64 - d) * 100.0, 100)).collect() };
        let r = paired_ratio(&rows(0.0), &[rows(0.1), rows(0.3)], 500, 3)?;
        assert!(
            (r.0 - (-0.2f64).exp()).abs() < 1e-9 && r.1 <= (-0.3f64).exp() + 1e-9,
            "{r:?}"
        );
        let r = reduction_share(&rows(0.0), &[rows(0.2)], &[rows(0.1), rows(0.3)], 500, 3)?;
        let want = (1.0 - (-0.2f64).exp()) / (1.0 - (-0.2f64).exp());
        assert!((r.share - want).abs() < 1e-9 && r.lo < 0.9 && r.hi > 1.1, "{r:?}");
        Ok(())
    }
}
