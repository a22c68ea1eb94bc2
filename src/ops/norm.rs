//! RMSNorm with a hand-written backward (CPU), and the composed reference it must equal.
//!
//! candle-nn's fused RMSNorm has no backward; the composition of candle primitives is correct
//! but costs eight ops (and their backward bookkeeping) per call.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

use super::{cpu_f32, f32_view};

/// `x / sqrt(mean(x^2) + eps) * w` over the last dimension, composed of candle primitives
/// (any device, any float dtype; the reference for the fused op).
pub fn rms_norm_composed(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    let inv = (ms + eps)?.sqrt()?.recip()?;
    x.broadcast_mul(&inv)?.broadcast_mul(w)
}

/// RMSNorm of `x [n, h]` (f32) with weight `w [h]`: the fused op on CPU f32, the composition
/// elsewhere.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == candle_core::DType::F32 && w.dtype() == x.dtype() && x.rank() == 2 {
        let x = if x.is_contiguous() { x.clone() } else { x.contiguous()? };
        return x.apply_op2(w, RmsNorm { eps: eps as f32 });
    }
    rms_norm_composed(x, w, eps)
}

struct RmsNorm {
    eps: f32,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, w) = (cpu_f32(s1, l1, "rms norm")?, cpu_f32(s2, l2, "rms norm")?);
        let h = w.len();
        if l1.dims().last() != Some(&h) {
            candle_core::bail!("rms norm: input width {:?} does not match weight {h}", l1.dims().last());
        }
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(h * 64).zip(x.par_chunks(h * 64)).for_each(|(yb, xb)| {
            for (yr, xr) in yb.chunks_mut(h).zip(xb.chunks(h)) {
                let inv = 1.0 / (xr.iter().map(|v| v * v).sum::<f32>() / h as f32 + self.eps).sqrt();
                for ((o, &v), &g) in yr.iter_mut().zip(xr).zip(w) {
                    *o = v * inv * g;
                }
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    /// With `r = 1/rms(x)` and `u = g * w`: `dx = r * (u - x * r^2 * mean(u * x))`,
    /// `dw = sum over rows of g * x * r`.
    fn bwd(&self, x: &Tensor, w: &Tensor, _y: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let h = w.elem_count();
        let (xv, wv, gv) = (f32_view(x)?, f32_view(w)?, f32_view(g)?);
        let (xs, ws, gs) = (xv.get(), wv.get(), gv.get());
        let mut dx = vec![0f32; xs.len()];
        let rows = 64;
        let dw_parts: Vec<Vec<f32>> = dx
            .par_chunks_mut(h * rows)
            .zip(xs.par_chunks(h * rows).zip(gs.par_chunks(h * rows)))
            .map(|(db, (xb, gb))| {
                let mut dw = vec![0f32; h];
                for ((dr, xr), gr) in db.chunks_mut(h).zip(xb.chunks(h)).zip(gb.chunks(h)) {
                    let r = 1.0 / (xr.iter().map(|v| v * v).sum::<f32>() / h as f32 + self.eps).sqrt();
                    let dot: f32 = xr
                        .iter()
                        .zip(gr)
                        .zip(ws)
                        .map(|((&xv, &gv), &wv)| gv * wv * xv)
                        .sum::<f32>()
                        / h as f32;
                    for i in 0..h {
                        dr[i] = r * (gr[i] * ws[i] - xr[i] * r * r * dot);
                        dw[i] += gr[i] * xr[i] * r;
                    }
                }
                dw
            })
            .collect();
        let mut dw = vec![0f32; h];
        for p in dw_parts {
            for (a, b) in dw.iter_mut().zip(p) {
                *a += b;
            }
        }
        let dev = x.device();
        // A frozen norm weight needs no gradient, but candle ignores what it does not track.
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            Some(Tensor::from_vec(dw, w.shape(), dev)?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::check_grad;
    use candle_core::{DType, Device, Tensor, Var};

    #[test]
    fn composed_gradient_matches_finite_differences() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f64, 1., (3, 8), &dev)?;
        let w = Tensor::randn(1f64, 0.2, 8, &dev)?;
        let probe = Tensor::randn(0f64, 1., (3, 8), &dev)?;
        check_grad(&x, |x| rms_norm_composed(x, &w, 1e-5)?.mul(&probe)?.sum_all(), 1e-6)?;
        check_grad(&w, |w| rms_norm_composed(&x, w, 1e-5)?.mul(&probe)?.sum_all(), 1e-6)?;
        Ok(())
    }

    #[test]
    fn fused_op_matches_the_composition() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1., (70, 24), &dev)?)?;
        let w = Var::from_tensor(&Tensor::randn(1f32, 0.2, 24, &dev)?)?;
        let probe = Tensor::randn(0f32, 1., (70, 24), &dev)?;
        let a = rms_norm(x.as_tensor(), w.as_tensor(), 1e-5)?;
        let b = rms_norm_composed(x.as_tensor(), w.as_tensor(), 1e-5)?;
        let diff = |a: &Tensor, b: &Tensor| -> Result<f32> { (a - b)?.abs()?.max_all()?.to_scalar::<f32>() };
        assert!(diff(&a, &b)? < 1e-5);
        let ga = a.mul(&probe)?.sum_all()?.backward()?;
        let gb = b.mul(&probe)?.sum_all()?.backward()?;
        assert!(diff(ga.get(x.as_tensor()).unwrap(), gb.get(x.as_tensor()).unwrap())? < 1e-4);
        assert!(diff(ga.get(w.as_tensor()).unwrap(), gb.get(w.as_tensor()).unwrap())? < 1e-3);
        assert_eq!(
            rms_norm(
                &x.as_tensor().to_dtype(DType::F64)?,
                &w.as_tensor().to_dtype(DType::F64)?,
                1e-5
            )?
            .dims(),
            &[70, 24]
        );
        Ok(())
    }
}
