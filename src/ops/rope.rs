//! Rotary position embeddings in the Hugging Face "rotate-half" layout.
//!
//! GGUF stores Llama Q/K rows permuted for llama.cpp's interleaved-pair RoPE; the loaders undo
//! that permutation (see `model::gguf`), so the decoder only ever sees the HF layout.

use candle_core::{DType, Device, Result, Tensor, D};

/// How many positions the tables are precomputed for; positions beyond (up to the model's
/// context) are computed when asked, by the same formula. A model's declared context (up to
/// 2^20) would otherwise size tables of gigabytes before anything runs.
pub const TABLE_POSITIONS: usize = 4096;

/// Cos/sin tables, `[n, head_dim]` each (the half table repeated twice), for the first
/// [`TABLE_POSITIONS`] positions of the context, and the frequencies for the rest.
#[derive(Clone, Debug)]
pub struct Rope {
    inv: Vec<f64>,
    /// What cos and sin are multiplied by (YaRN's attention factor; 1 otherwise).
    amplitude: f64,
    /// Dynamic NTK scaling: frequencies for forwards that reach past `original`.
    dynamic: Option<DynamicNtk>,
    head_dim: usize,
    context: usize,
    cos: Tensor,
    sin: Tensor,
    /// First halves of the tables as `[n, head_dim / 2]` f32, for the fused op.
    cos_half: Vec<f32>,
    sin_half: Vec<f32>,
}

/// transformers' dynamic NTK scaling: a forward whose last position is `len - 1 >= original`
/// rotates with base `theta * (factor * len / original - (factor - 1))^(d / (d - 2))`.
#[derive(Clone, Copy, Debug)]
struct DynamicNtk {
    theta: f64,
    factor: f64,
    original: usize,
}

impl Rope {
    /// Tables for a context of `positions` positions of a head of size `head_dim` with
    /// inverse frequencies `inv` (`head_dim / 2` of them: `model::config::RopeScaling` gives
    /// them, scaled or not).
    pub fn new(head_dim: usize, inv: &[f64], positions: usize, dtype: DType, dev: &Device) -> Result<Self> {
        let half = head_dim / 2;
        if inv.len() != half {
            candle_core::bail!("{} RoPE frequencies for a head of {head_dim}", inv.len());
        }
        let inv = inv.to_vec();
        let built = positions.min(TABLE_POSITIONS);
        let (cos, sin) = rows(&inv, 1.0, 0, built);
        let halves = |v: &[f64]| -> Vec<f32> {
            v.chunks(head_dim)
                .flat_map(|r| r[..half].iter().map(|&x| x as f32))
                .collect()
        };
        let (cos_half, sin_half) = (halves(&cos), halves(&sin));
        let cos = Tensor::from_vec(cos, (built, head_dim), dev)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, (built, head_dim), dev)?.to_dtype(dtype)?;
        Ok(Self {
            inv,
            amplitude: 1.0,
            dynamic: None,
            head_dim,
            context: positions,
            cos,
            sin,
            cos_half,
            sin_half,
        })
    }

    /// The same tables with cos and sin multiplied by `a` (YaRN's attention factor: q and k
    /// both carry it, so attention logits scale by `a^2`).
    pub fn with_amplitude(mut self, a: f64) -> Result<Self> {
        if a != 1.0 {
            self.cos = self.cos.affine(a, 0.0)?;
            self.sin = self.sin.affine(a, 0.0)?;
            for x in self.cos_half.iter_mut().chain(self.sin_half.iter_mut()) {
                *x = (*x as f64 * a) as f32;
            }
            self.amplitude *= a;
        }
        Ok(self)
    }

    /// Dynamic NTK scaling (transformers' `dynamic`): the tables as built up to `original`
    /// positions; a forward reaching further rotates with a base grown from `theta` for its
    /// own length, as transformers computes it for a forward of that length.
    pub fn with_dynamic_ntk(mut self, theta: f64, factor: f64, original: usize) -> Self {
        self.dynamic = Some(DynamicNtk {
            theta,
            factor,
            original,
        });
        self
    }

    /// The frequencies of a forward whose positions run below `len`, when they are not the
    /// tables' (dynamic NTK past the original context).
    fn frequencies_for(&self, len: usize) -> Option<Vec<f64>> {
        let dy = self.dynamic.filter(|dy| len > dy.original)?;
        let d = self.head_dim as f64;
        let base = dy.theta * (dy.factor * len as f64 / dy.original as f64 - (dy.factor - 1.0)).powf(d / (d - 2.0));
        Some(
            (0..self.head_dim / 2)
                .map(|i| 1.0 / base.powf(2.0 * i as f64 / d))
                .collect(),
        )
    }

    fn built(&self) -> usize {
        self.cos_half.len() / (self.head_dim / 2).max(1)
    }

    /// The first half of the cos (`true`) or sin table at `p`, `[d/2]`, with frequencies
    /// `freqs` where they are not the tables'.
    fn half_row(&self, cos: bool, p: usize, freqs: Option<&[f64]>, out: &mut Vec<f32>) {
        let half = self.head_dim / 2;
        match freqs {
            None if p < self.built() => {
                let table = if cos { &self.cos_half } else { &self.sin_half };
                out.extend_from_slice(&table[p * half..(p + 1) * half]);
            }
            _ => out.extend(freqs.unwrap_or(&self.inv).iter().map(|f| {
                let a = p as f64 * f;
                ((if cos { a.cos() } else { a.sin() }) * self.amplitude) as f32
            })),
        }
    }

    /// The first half of the cos (`true`) or sin table for positions `0..t`, as `[t, d/2]`
    /// (the fused attention op's layout).
    pub fn half_table(&self, cos: bool, t: usize) -> Result<Vec<f32>> {
        if t > self.positions() {
            candle_core::bail!(
                "sequence of {t} positions exceeds the RoPE tables ({})",
                self.positions()
            );
        }
        let half = self.head_dim / 2;
        let mut out = Vec::with_capacity(t * half);
        let freqs = self.frequencies_for(t);
        if t <= self.built() && freqs.is_none() {
            out.extend_from_slice(&(if cos { &self.cos_half } else { &self.sin_half })[..t * half]);
        } else {
            (0..t).for_each(|p| self.half_row(cos, p, freqs.as_deref(), &mut out));
        }
        Ok(out)
    }

    /// The first half of the cos (`true`) or sin table at each of `positions`, as `[n, d/2]`.
    pub fn half_table_at(&self, cos: bool, positions: &[usize]) -> Result<Vec<f32>> {
        let mut out = Vec::with_capacity(positions.len() * self.head_dim / 2);
        // As transformers: the forward's length is its furthest position plus one.
        let freqs = self.frequencies_for(positions.iter().max().map_or(0, |p| p + 1));
        for &p in positions {
            if p >= self.positions() {
                candle_core::bail!("position {p} is beyond the RoPE tables ({})", self.positions());
            }
            self.half_row(cos, p, freqs.as_deref(), &mut out);
        }
        Ok(out)
    }

    /// How many positions the model's context covers.
    pub fn positions(&self) -> usize {
        self.context
    }

    /// Rotates `x [b, heads, t, head_dim]` for positions `offset .. offset + t`.
    pub fn apply(&self, x: &Tensor, offset: usize) -> Result<Tensor> {
        let (_, _, t, d) = x.dims4()?;
        if offset + t > self.positions() {
            candle_core::bail!(
                "sequence reaches position {} but the RoPE tables cover {} (the model's context length)",
                offset + t,
                self.positions()
            );
        }
        let freqs = self.frequencies_for(offset + t);
        let (cos, sin) = if offset + t <= self.built() && freqs.is_none() {
            (self.cos.narrow(0, offset, t)?, self.sin.narrow(0, offset, t)?)
        } else {
            let (c, s) = rows(freqs.as_deref().unwrap_or(&self.inv), self.amplitude, offset, t);
            let dt = self.cos.dtype();
            let dev = x.device();
            (
                Tensor::from_vec(c, (t, d), dev)?.to_dtype(dt)?,
                Tensor::from_vec(s, (t, d), dev)?.to_dtype(dt)?,
            )
        };
        let x1 = x.narrow(D::Minus1, 0, d / 2)?;
        let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
        let rot = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        x.broadcast_mul(&cos)?.add(&rot.broadcast_mul(&sin)?)
    }
}

/// Cos and sin rows times `amplitude`, `[n, head_dim]` each (the half row repeated), for
/// positions `start .. start + n`.
fn rows(inv: &[f64], amplitude: f64, start: usize, n: usize) -> (Vec<f64>, Vec<f64>) {
    let mut cos = Vec::with_capacity(n * inv.len() * 2);
    let mut sin = Vec::with_capacity(n * inv.len() * 2);
    for p in start..start + n {
        for _rep in 0..2 {
            for f in inv {
                let a = p as f64 * f;
                cos.push(a.cos() * amplitude);
                sin.push(a.sin() * amplitude);
            }
        }
    }
    (cos, sin)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::check_grad;

    fn default_inv(d: usize) -> Vec<f64> {
        (0..d / 2)
            .map(|i| 1.0 / 10_000f64.powf(2.0 * i as f64 / d as f64))
            .collect()
    }

    #[test]
    fn rotation_preserves_norm_and_gradient_is_right() -> Result<()> {
        let dev = Device::Cpu;
        let rope = Rope::new(8, &default_inv(8), 16, DType::F64, &dev)?;
        let x = Tensor::randn(0f64, 1., (1, 2, 5, 8), &dev)?;
        let y = rope.apply(&x, 3)?;
        let n0 = x.sqr()?.sum_all()?.to_scalar::<f64>()?;
        let n1 = y.sqr()?.sum_all()?.to_scalar::<f64>()?;
        assert!((n0 - n1).abs() < 1e-9);
        // Position 0 is the identity.
        let y0 = rope.apply(&x.narrow(2, 0, 1)?, 0)?;
        let d = (y0 - x.narrow(2, 0, 1)?)?.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(d < 1e-12);
        let probe = Tensor::randn(0f64, 1., (1, 2, 5, 8), &dev)?;
        check_grad(&x, |x| rope.apply(x, 3)?.mul(&probe)?.sum_all(), 1e-6)?;
        assert!(rope.apply(&x, 12).is_err());
        Ok(())
    }

    /// Positions past the precomputed tables give what the tables would hold: the same
    /// rotation, the same half rows; a long context costs no table memory up front.
    #[test]
    fn positions_past_the_tables_match_them() -> Result<()> {
        let dev = Device::Cpu;
        let n = TABLE_POSITIONS + 8;
        let long = Rope::new(8, &default_inv(8), 1 << 20, DType::F64, &dev)?;
        assert_eq!(long.built(), TABLE_POSITIONS);
        let x = Tensor::randn(0f64, 1., (1, 2, 8, 8), &dev)?;
        let at = TABLE_POSITIONS - 4;
        // A fresh table covering every position as the reference.
        let full = Rope {
            cos_half: long.half_table(true, n)?,
            sin_half: long.half_table(false, n)?,
            cos: Tensor::from_vec(rows(&long.inv, 1.0, 0, n).0, (n, 8), &dev)?,
            sin: Tensor::from_vec(rows(&long.inv, 1.0, 0, n).1, (n, 8), &dev)?,
            ..long.clone()
        };
        assert_eq!(full.built(), n);
        let d = (long.apply(&x, at)? - full.apply(&x, at)?)?
            .abs()?
            .max_all()?
            .to_scalar::<f64>()?;
        assert_eq!(d, 0.0);
        let ps = [3, TABLE_POSITIONS - 1, TABLE_POSITIONS, TABLE_POSITIONS + 5];
        assert_eq!(long.half_table_at(false, &ps)?, full.half_table_at(false, &ps)?);
        assert_eq!(long.half_table(true, 16)?, full.half_table(true, 16)?);
        Ok(())
    }
}
