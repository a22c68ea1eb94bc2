//! Drawing training rows from a domain source and a general (replay) source at a given share.
//!
//! Each source is walked in its own seeded random order (reshuffled at the end of each pass).
//! How many rows of a micro-batch come from the domain is decided by error diffusion: the share
//! owed accumulates across batches and whole rows are paid out, so over any run the realised
//! share tracks the requested one within one row, with no randomness added and no rounding bias
//! (0.8 of a 4-row batch is not always 3). The whole state is plain numbers, so a checkpoint can
//! hold it and a resumed run draws the same rows.

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

/// The row sampler of a run: domain rows (source 0) and, optionally, general rows (source 1).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Mixer {
    walks: Vec<Walk>,
    owed: f64,
    drawn: [u64; 2],
}

/// A drawn row: which source, which row of it.
pub type RowRef = (usize, usize);

impl Mixer {
    /// A sampler over `domain_rows` domain rows and `general_rows` general rows (0: none).
    pub fn new(domain_rows: usize, general_rows: usize, seed: u64) -> Result<Self> {
        if domain_rows == 0 {
            bail!("the training data packs into no rows");
        }
        let mut walks = vec![Walk::new(domain_rows, mix(&[seed, 0xda7a]))];
        if general_rows > 0 {
            walks.push(Walk::new(general_rows, mix(&[seed, 0x9e4e])));
        }
        Ok(Self {
            walks,
            owed: 0.0,
            drawn: [0, 0],
        })
    }

    /// The next `n` rows with `share` of them (in expectation over batches) from the domain.
    /// Domain rows come first in the batch.
    pub fn next_rows(&mut self, n: usize, share: f64) -> Vec<RowRef> {
        let share = if self.walks.len() == 1 {
            1.0
        } else {
            share.clamp(0.0, 1.0)
        };
        self.owed += share * n as f64;
        let dom = (self.owed.round().max(0.0) as usize).min(n);
        self.owed -= dom as f64;
        self.drawn[0] += dom as u64;
        self.drawn[1] += (n - dom) as u64;
        (0..n)
            .map(|i| {
                let s = usize::from(i >= dom);
                (s, self.walks[s].next())
            })
            .collect()
    }

    /// Checks a sampler read from a checkpoint against the data it will draw from: one walk per
    /// source, each order a permutation of that source's rows, each cursor inside its order.
    pub fn check(&self, domain_rows: usize, general_rows: usize) -> Result<()> {
        let want = if general_rows > 0 { 2 } else { 1 };
        if self.walks.len() != want {
            bail!(
                "it walks {} sources, this run has {want} (domain{})",
                self.walks.len(),
                if want == 2 { " and general" } else { " only" }
            );
        }
        for (w, rows, name) in self
            .walks
            .iter()
            .zip([domain_rows, general_rows])
            .zip(["domain", "general"])
            .map(|((w, r), n)| (w, r, n))
        {
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
        if !self.owed.is_finite() || self.owed.abs() > 1e6 {
            bail!("its owed share {} is not a small finite number", self.owed);
        }
        Ok(())
    }

    /// Completed passes over the domain rows (epochs).
    pub fn domain_passes(&self) -> u64 {
        self.walks[0].passes
    }

    /// Fraction of all rows drawn so far that came from the domain.
    pub fn realised_share(&self) -> f64 {
        let total = self.drawn[0] + self.drawn[1];
        if total == 0 {
            f64::NAN
        } else {
            self.drawn[0] as f64 / total as f64
        }
    }
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
        let mut m = Mixer::new(10, 7, 3)?;
        let mut seen = [vec![0; 10], vec![0; 7]];
        for _ in 0..100 {
            let rows = m.next_rows(4, 0.8);
            assert!(rows.windows(2).all(|w| w[0].0 <= w[1].0), "domain rows first");
            for (s, r) in rows {
                seen[s][r] += 1;
            }
        }
        // 400 rows at 0.8: exactly 320 from the domain (error diffusion), 32 passes over it.
        assert_eq!(seen[0].iter().sum::<i32>(), 320);
        assert!(seen[0].iter().all(|&c| c == 32), "{:?}", seen[0]);
        assert!((m.realised_share() - 0.8).abs() < 1e-12);
        // Deterministic, and the state round-trips through JSON.
        let mut a = Mixer::new(10, 7, 3)?;
        let _ = a.next_rows(3, 0.5);
        let mut b: Mixer = serde_json::from_str(&serde_json::to_string(&a)?)?;
        assert_eq!(a.next_rows(5, 0.7), b.next_rows(5, 0.7));
        // A state that does not fit the data is refused.
        assert!(b.check(10, 7).is_ok());
        assert!(b.check(9, 7).unwrap_err().to_string().contains("packs into 9"));
        assert!(b.check(10, 0).unwrap_err().to_string().contains("walks 2 sources"));
        let mut bad = b.clone();
        bad.walks[0].order[0] = bad.walks[0].order[1];
        assert!(bad.check(10, 7).unwrap_err().to_string().contains("not a permutation"));
        bad = b.clone();
        bad.walks[1].cursor = 8;
        assert!(bad.check(10, 7).unwrap_err().to_string().contains("cursor 8"));
        // Without a general source every row is a domain row.
        let mut d = Mixer::new(5, 0, 1)?;
        assert!(d.next_rows(8, 0.3).iter().all(|r| r.0 == 0));
        Ok(())
    }
}
