//! Drawing training rows from several sources at given weights (a domain source and a general
//! replay source are the common pair).
//!
//! Each source is walked in its own seeded random order (reshuffled at the end of each pass).
//! How many rows of a micro-batch come from each source is decided by error diffusion: what a
//! source is owed accumulates across batches and whole rows are paid out, so over any run each
//! realised share tracks the requested one within one row, with no randomness added and no
//! rounding bias (0.8 of a 4-row batch is not always 3). The whole state is plain numbers, so a
//! checkpoint can hold it and a resumed run draws the same rows.

use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::Sequences;
use crate::rng::{mix, Rng};

/// One source's walk through its rows.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Walk {
    order: Vec<usize>,
    cursor: usize,
    rng: [u64; 4],
    passes: u64,
}

impl Walk {
    fn new(rows: usize, seed: u64) -> Self {
        let mut rng = Rng::new(seed);
        let mut order: Vec<usize> = (0..rows).collect();
        rng.shuffle(&mut order);
        Self {
            order,
            cursor: 0,
            rng: rng.state(),
            passes: 0,
        }
    }

    fn next(&mut self) -> usize {
        if self.cursor == self.order.len() {
            let mut rng = Rng::from_state(self.rng);
            rng.shuffle(&mut self.order);
            self.rng = rng.state();
            self.cursor = 0;
        }
        self.cursor += 1;
        if self.cursor == self.order.len() {
            self.passes += 1;
        }
        self.order[self.cursor - 1]
    }
}

/// The row sampler of a run over one or more sources (source 0 first in every batch).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Mixer {
    walks: Vec<Walk>,
    /// What each source but the last is owed (the last takes the rest of every batch). A
    /// checkpoint of the two-source sampler that came before stored one number here.
    #[serde(deserialize_with = "owed_compat")]
    owed: Vec<f64>,
    drawn: Vec<u64>,
}

/// Reads `owed` as a list, or as the single number the two-source sampler stored.
fn owed_compat<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Vec<f64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Owed {
        One(f64),
        Many(Vec<f64>),
    }
    Ok(match Owed::deserialize(d)? {
        Owed::One(x) => vec![x],
        Owed::Many(v) => v,
    })
}

/// A drawn row: which source, which row of it.
pub type RowRef = (usize, usize);

/// Each source's walk seed: the first two as the two-source sampler had them, so its runs
/// draw the same rows.
fn walk_seed(seed: u64, source: usize) -> u64 {
    match source {
        0 => mix(&[seed, 0xda7a]),
        1 => mix(&[seed, 0x9e4e]),
        i => mix(&[seed, 0x5eed, i as u64]),
    }
}

impl Mixer {
    /// A sampler over sources of `rows[i]` rows each.
    pub fn new(rows: &[usize], seed: u64) -> Result<Self> {
        if let Some(i) = rows.iter().position(|&r| r == 0) {
            bail!(
                "the training data{} packs into no rows",
                if i == 0 {
                    String::new()
                } else {
                    format!(" of source {}", i + 1)
                }
            );
        }
        Ok(Self {
            walks: rows
                .iter()
                .enumerate()
                .map(|(i, &r)| Walk::new(r, walk_seed(seed, i)))
                .collect(),
            owed: vec![0.0; rows.len() - 1],
            drawn: vec![0; rows.len()],
        })
    }

    /// The next `n` rows, each source's count by its share of `weights` (in expectation over
    /// batches), grouped by source in source order.
    pub fn next_rows(&mut self, n: usize, weights: &[f64]) -> Vec<RowRef> {
        let total: f64 = weights.iter().map(|w| w.max(0.0)).sum();
        let mut left = n;
        let mut counts = Vec::with_capacity(self.walks.len());
        for (i, owed) in self.owed.iter_mut().enumerate() {
            let w = weights.get(i).copied().unwrap_or(0.0).max(0.0);
            // Weights that already sum to 1 (the pair's share and its complement) are used as
            // they are, so the pair's rounding is exactly the two-source sampler's.
            let share = if total == 1.0 {
                w
            } else if total > 0.0 {
                w / total
            } else {
                0.0
            };
            *owed += share.clamp(0.0, 1.0) * n as f64;
            let take = (owed.round().max(0.0) as usize).min(left);
            *owed -= take as f64;
            left -= take;
            counts.push(take);
        }
        counts.push(left);
        let mut out = Vec::with_capacity(n);
        for (s, &c) in counts.iter().enumerate() {
            self.drawn[s] += c as u64;
            out.extend((0..c).map(|_| (s, self.walks[s].next())));
        }
        out
    }

    /// Checks a sampler read from a checkpoint against the data it will draw from: one walk per
    /// source, each order a permutation of that source's rows, each cursor inside its order.
    pub fn check(&self, rows: &[usize]) -> Result<()> {
        if self.walks.len() != rows.len() {
            bail!("it walks {} sources, this run has {}", self.walks.len(), rows.len());
        }
        if self.owed.len() != rows.len() - 1 || self.drawn.len() != rows.len() {
            bail!("its share state does not fit {} sources", rows.len());
        }
        for (i, (w, &rows)) in self.walks.iter().zip(rows).enumerate() {
            let name = format!("source {}", i + 1);
            if w.order.len() != rows {
                bail!(
                    "its {name} order has {} rows, the {name} data packs into {rows}",
                    w.order.len()
                );
            }
            let mut seen = vec![false; rows];
            for &r in &w.order {
                if r >= rows || std::mem::replace(&mut seen[r], true) {
                    bail!("its {name} order is not a permutation of the {rows} rows (row {r})");
                }
            }
            if w.cursor > rows {
                bail!("its {name} cursor {} is beyond the {rows} rows", w.cursor);
            }
        }
        if let Some(o) = self.owed.iter().find(|o| !o.is_finite() || o.abs() > 1e6) {
            bail!("its owed share {o} is not a small finite number");
        }
        Ok(())
    }

    /// A sampler of the one-source runs of earlier versions kept a share it never used; it
    /// reads as this version's (which keeps none).
    pub fn upgrade(&mut self) {
        if self.walks.len() == 1 {
            self.owed.clear();
            self.drawn.truncate(1);
        }
        if self.drawn.len() < self.walks.len() {
            self.drawn.resize(self.walks.len(), 0);
        }
    }

    /// Completed passes over the first source's rows (epochs).
    pub fn domain_passes(&self) -> u64 {
        self.walks[0].passes
    }

    /// Fraction of all rows drawn so far from each source.
    pub fn realised_shares(&self) -> Vec<f64> {
        let total: u64 = self.drawn.iter().sum();
        self.drawn
            .iter()
            .map(|&d| if total == 0 { f64::NAN } else { d as f64 / total as f64 })
            .collect()
    }
}

/// Each position's document and its position inside it for drawn rows, when any of their
/// sources packs with document boundaries (a row of a source that does not is one document).
pub fn documents(sources: &[&Sequences], rows: &[RowRef]) -> Option<(Vec<u32>, Vec<usize>)> {
    if rows.iter().all(|&(s, _)| sources[s].starts.is_empty()) {
        return None;
    }
    let (mut branch, mut positions) = (Vec::new(), Vec::new());
    for &(s, r) in rows {
        match sources[s].documents(&[r]) {
            Some((b, p)) => {
                branch.extend(b);
                positions.extend(p);
            }
            None => {
                let n = sources[s].seq_len;
                branch.extend(std::iter::repeat_n(1, n));
                positions.extend(0..n);
            }
        }
    }
    Some((branch, positions))
}

/// Builds the ids tensor `[rows, seq_len]` and flat targets of drawn rows.
pub fn gather(sources: &[&Sequences], rows: &[RowRef], dev: &Device) -> Result<(Tensor, Vec<u32>)> {
    let seq_len = sources[0].seq_len;
    let (mut ids, mut targets) = (Vec::with_capacity(rows.len() * seq_len), Vec::new());
    for &(s, r) in rows {
        let src = sources[s];
        if src.seq_len != seq_len {
            bail!(
                "data sources pack to different row lengths ({} and {seq_len})",
                src.seq_len
            );
        }
        ids.extend_from_slice(&src.inputs[r]);
        targets.extend_from_slice(&src.targets[r]);
    }
    Ok((Tensor::from_vec(ids, (rows.len(), seq_len), dev)?, targets))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn share_is_met_without_bias_and_walks_cover_every_row() -> Result<()> {
        let mut m = Mixer::new(&[10, 7], 3)?;
        let mut seen = [vec![0; 10], vec![0; 7]];
        for _ in 0..100 {
            let rows = m.next_rows(4, &[0.8, 0.2]);
            assert!(rows.windows(2).all(|w| w[0].0 <= w[1].0), "domain rows first");
            for (s, r) in rows {
                seen[s][r] += 1;
            }
        }
        // 400 rows at 0.8: exactly 320 from the domain (error diffusion), 32 passes over it.
        assert_eq!(seen[0].iter().sum::<i32>(), 320);
        assert!(seen[0].iter().all(|&c| c == 32), "{:?}", seen[0]);
        assert!((m.realised_shares()[0] - 0.8).abs() < 1e-12);
        // Deterministic, and the state round-trips through JSON.
        let mut a = Mixer::new(&[10, 7], 3)?;
        let _ = a.next_rows(3, &[0.5, 0.5]);
        let mut b: Mixer = serde_json::from_str(&serde_json::to_string(&a)?)?;
        assert_eq!(a.next_rows(5, &[0.7, 0.3]), b.next_rows(5, &[0.7, 0.3]));
        // A state that does not fit the data is refused.
        assert!(b.check(&[10, 7]).is_ok());
        assert!(b.check(&[9, 7]).unwrap_err().to_string().contains("packs into 9"));
        assert!(b.check(&[10]).unwrap_err().to_string().contains("walks 2 sources"));
        let mut bad = b.clone();
        bad.walks[0].order[0] = bad.walks[0].order[1];
        assert!(bad
            .check(&[10, 7])
            .unwrap_err()
            .to_string()
            .contains("not a permutation"));
        bad = b.clone();
        bad.walks[1].cursor = 8;
        assert!(bad.check(&[10, 7]).unwrap_err().to_string().contains("cursor 8"));
        // With one source every row is its.
        let mut d = Mixer::new(&[5], 1)?;
        assert!(d.next_rows(8, &[0.3]).iter().all(|r| r.0 == 0));
        Ok(())
    }

    /// Three sources at 5:3:2 get exactly their shares of 1,000 rows, whatever the batch size
    /// does to the rounding; a weight of 0 draws nothing, and weights need not sum to 1.
    #[test]
    fn several_sources_get_their_shares() -> Result<()> {
        let mut m = Mixer::new(&[11, 13, 17], 9)?;
        let mut count = [0usize; 3];
        for i in 0..250 {
            let rows = m.next_rows(4, &[5.0, 3.0, 2.0]);
            assert_eq!(rows.len(), 4, "batch {i}");
            assert!(rows.windows(2).all(|w| w[0].0 <= w[1].0));
            rows.iter().for_each(|r| count[r.0] += 1);
        }
        assert_eq!(count, [500, 300, 200]);
        let mut z = Mixer::new(&[3, 3, 3], 1)?;
        let rows: Vec<_> = (0..10).flat_map(|_| z.next_rows(3, &[1.0, 0.0, 1.0])).collect();
        assert!(rows.iter().all(|r| r.0 != 1));
        assert_eq!(rows.iter().filter(|r| r.0 == 0).count(), 15);
        assert!(Mixer::new(&[3, 0], 1).unwrap_err().to_string().contains("source 2"));
        Ok(())
    }

    /// A checkpoint written by the two-source sampler of earlier versions (its owed share one
    /// number, its draws a pair) reads and goes on drawing what it would have drawn.
    #[test]
    fn a_two_source_checkpoint_of_the_earlier_form_reads() -> Result<()> {
        let mut m = Mixer::new(&[10, 7], 3)?;
        let _ = m.next_rows(3, &[0.8, 0.2]);
        let mut v = serde_json::to_value(&m)?;
        v["owed"] = serde_json::json!(m.owed[0]);
        let mut old: Mixer = serde_json::from_value(v)?;
        old.upgrade();
        old.check(&[10, 7])?;
        assert_eq!(old.next_rows(4, &[0.8, 0.2]), m.next_rows(4, &[0.8, 0.2]));
        Ok(())
    }
}
