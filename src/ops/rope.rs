//! Rotary position embeddings in the Hugging Face "rotate-half" layout.
//!
//! GGUF stores Llama Q/K rows permuted for llama.cpp's interleaved-pair RoPE; the loaders undo
//! that permutation (see `model::gguf`), so the decoder only ever sees the HF layout.

use candle_core::{DType, Device, Result, Tensor, D};

/// Precomputed cos/sin tables, `[max_positions, head_dim]` each (the half table repeated twice).
#[derive(Clone, Debug)]
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
    /// First halves of the tables as `[positions, head_dim / 2]` f32, for the fused op.
    cos_half: Vec<f32>,
    sin_half: Vec<f32>,
}

impl Rope {
    /// Tables for `positions` positions of a head of size `head_dim` with base `theta`.
    pub fn new(head_dim: usize, theta: f64, positions: usize, dtype: DType, dev: &Device) -> Result<Self> {
        let half = head_dim / 2;
        let mut cos = Vec::with_capacity(positions * head_dim);
        let mut sin = Vec::with_capacity(positions * head_dim);
        let inv: Vec<f64> = (0..half)
            .map(|i| 1.0 / theta.powf(2.0 * i as f64 / head_dim as f64))
            .collect();
        for p in 0..positions {
            for _rep in 0..2 {
                for f in &inv {
                    let a = p as f64 * f;
                    cos.push(a.cos());
                    sin.push(a.sin());
                }
            }
        }
        let halves = |v: &[f64]| -> Vec<f32> {
            v.chunks(head_dim)
                .flat_map(|r| r[..half].iter().map(|&x| x as f32))
                .collect()
        };
        let (cos_half, sin_half) = (halves(&cos), halves(&sin));
        let cos = Tensor::from_vec(cos, (positions, head_dim), dev)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, (positions, head_dim), dev)?.to_dtype(dtype)?;
        Ok(Self {
            cos,
            sin,
            cos_half,
            sin_half,
        })
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
        let half = self.cos_half.len() / self.positions().max(1);
        Ok((if cos { &self.cos_half } else { &self.sin_half })[..t * half].to_vec())
    }

    /// The first half of the cos (`true`) or sin table at each of `positions`, as `[n, d/2]`.
    pub fn half_table_at(&self, cos: bool, positions: &[usize]) -> Result<Vec<f32>> {
        let half = self.cos_half.len() / self.positions().max(1);
        let table = if cos { &self.cos_half } else { &self.sin_half };
        let mut out = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            if p >= self.positions() {
                candle_core::bail!("position {p} is beyond the RoPE tables ({})", self.positions());
            }
            out.extend_from_slice(&table[p * half..(p + 1) * half]);
        }
        Ok(out)
    }

    /// How many positions the tables cover.
    pub fn positions(&self) -> usize {
        self.cos.dim(0).unwrap_or(0)
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
        let cos = self.cos.narrow(0, offset, t)?;
        let sin = self.sin.narrow(0, offset, t)?;
        let x1 = x.narrow(D::Minus1, 0, d / 2)?;
        let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
        let rot = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        x.broadcast_mul(&cos)?.add(&rot.broadcast_mul(&sin)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::check_grad;

    #[test]
    fn rotation_preserves_norm_and_gradient_is_right() -> Result<()> {
        let dev = Device::Cpu;
        let rope = Rope::new(8, 10_000.0, 16, DType::F64, &dev)?;
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
}
