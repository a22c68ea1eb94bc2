//! The gated MLP activations as one op each with its backward (CPU f32), the composition
//! elsewhere: `silu(gate) * up` (SwiGLU) and Gemma's `gelu_tanh(gate) * up` (GeGLU).

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::fast_exp::exp_in_place;
use super::{cpu_f32, f32_view};

/// `silu(g) * u`.
pub fn swiglu(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    fused_or(g, u, SwiGlu, Tensor::silu)
}

/// `op` on contiguous f32 CPU tensors of one shape; elsewhere `act(g) * u` composed.
fn fused_or(
    g: &Tensor,
    u: &Tensor,
    op: impl CustomOp2 + Send + Sync + 'static,
    act: fn(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    if g.device().is_cpu() && g.dtype() == candle_core::DType::F32 && u.dtype() == g.dtype() && g.shape() == u.shape() {
        let c = |t: &Tensor| {
            if t.is_contiguous() {
                Ok(t.clone())
            } else {
                t.contiguous()
            }
        };
        return c(g)?.apply_op2(&c(u)?, op);
    }
    act(g)? * u
}

struct SwiGlu;

const CHUNK: usize = 1 << 14;

/// `y = f(g, u)` chunk by chunk across the pool.
fn forward_map(g: &[f32], u: &[f32], f: impl Fn(&mut [f32], &[f32], &[f32]) + Sync) -> Vec<f32> {
    let mut y = vec![0f32; g.len()];
    y.par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
        .for_each(|(yc, (gc, uc))| f(yc, gc, uc));
    y
}

/// `(dg, du) = f(g, u, dy)` chunk by chunk across the pool, as the op's two input gradients.
fn backward_map(
    g: &Tensor,
    u: &Tensor,
    dy: &Tensor,
    f: impl Fn(&mut [f32], &mut [f32], &[f32], &[f32], &[f32]) + Sync,
) -> Result<(Option<Tensor>, Option<Tensor>)> {
    let (gv, uv, dv) = (f32_view(g)?, f32_view(u)?, f32_view(dy)?);
    let (gs, us, ds) = (gv.get(), uv.get(), dv.get());
    let mut dg = vec![0f32; gs.len()];
    let mut du = vec![0f32; gs.len()];
    dg.par_chunks_mut(CHUNK)
        .zip(du.par_chunks_mut(CHUNK))
        .zip(gs.par_chunks(CHUNK).zip(us.par_chunks(CHUNK).zip(ds.par_chunks(CHUNK))))
        .for_each(|((dgc, duc), (gc, (uc, dc)))| f(dgc, duc, gc, uc, dc));
    Ok((
        Some(Tensor::from_vec(dg, g.shape(), g.device())?),
        Some(Tensor::from_vec(du, u.shape(), u.device())?),
    ))
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (g, u) = (cpu_f32(s1, l1, "swiglu")?, cpu_f32(s2, l2, "swiglu")?);
        let y = forward_map(g, u, |yc, gc, uc| {
            // e^-g first, in the output's place.
            yc.iter_mut().zip(gc).for_each(|(o, &a)| *o = -a);
            exp_in_place(yc);
            for ((o, &a), &b) in yc.iter_mut().zip(gc).zip(uc) {
                *o = a / (1.0 + *o) * b;
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    /// `d/dg = u * s * (1 + g * (1 - s))` with `s = sigmoid(g)`; `d/du = g * s`.
    fn bwd(&self, g: &Tensor, u: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        backward_map(g, u, dy, |dgc, duc, gc, uc, dc| {
            dgc.iter_mut().zip(gc).for_each(|(o, &a)| *o = -a);
            exp_in_place(dgc);
            for i in 0..gc.len() {
                let s = 1.0 / (1.0 + dgc[i]);
                dgc[i] = dc[i] * uc[i] * s * (1.0 + gc[i] * (1.0 - s));
                duc[i] = dc[i] * gc[i] * s;
            }
        })
    }
}

/// `gelu_tanh(g) * u` (Gemma's MLP gate; candle's `gelu` is the same tanh form).
pub fn geglu(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    fused_or(g, u, GeGlu, Tensor::gelu)
}

struct GeGlu;

/// sqrt(2 / pi) and the cubic coefficient of the tanh approximation.
const GELU_K: f32 = 0.797_884_6;
const GELU_C: f32 = 0.044_715;

impl CustomOp2 for GeGlu {
    fn name(&self) -> &'static str {
        "geglu"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (g, u) = (cpu_f32(s1, l1, "geglu")?, cpu_f32(s2, l2, "geglu")?);
        let y = forward_map(g, u, |yc, gc, uc| {
            for ((o, &a), &b) in yc.iter_mut().zip(gc).zip(uc) {
                let t = (GELU_K * (a + GELU_C * a * a * a)).tanh();
                *o = 0.5 * a * (1.0 + t) * b;
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    /// `d/dg = u * (0.5 (1 + t) + 0.5 g (1 - t^2) k (1 + 3 c g^2))` with
    /// `t = tanh(k (g + c g^3))`; `d/du = gelu_tanh(g)`.
    fn bwd(&self, g: &Tensor, u: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        backward_map(g, u, dy, |dgc, duc, gc, uc, dc| {
            for i in 0..gc.len() {
                let a = gc[i];
                let t = (GELU_K * (a + GELU_C * a * a * a)).tanh();
                let d = 0.5 * (1.0 + t) + 0.5 * a * (1.0 - t * t) * GELU_K * (1.0 + 3.0 * GELU_C * a * a);
                dgc[i] = dc[i] * uc[i] * d;
                duc[i] = dc[i] * 0.5 * a * (1.0 + t);
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::check_grad;
    use candle_core::{Device, Var};

    #[test]
    fn fused_matches_composition_and_finite_differences() -> Result<()> {
        let dev = Device::Cpu;
        let g = Var::from_tensor(&Tensor::randn(0f32, 2., (9, 7), &dev)?)?;
        let u = Var::from_tensor(&Tensor::randn(0f32, 1., (9, 7), &dev)?)?;
        let probe = Tensor::randn(0f32, 1., (9, 7), &dev)?;
        let a = swiglu(g.as_tensor(), u.as_tensor())?;
        let b = (g.as_tensor().silu()? * u.as_tensor())?;
        let diff = |a: &Tensor, b: &Tensor| -> Result<f32> { (a - b)?.abs()?.max_all()?.to_scalar::<f32>() };
        assert!(diff(&a, &b)? < 1e-5);
        let ga = a.mul(&probe)?.sum_all()?.backward()?;
        let gb = b.mul(&probe)?.sum_all()?.backward()?;
        assert!(diff(ga.get(g.as_tensor()).unwrap(), gb.get(g.as_tensor()).unwrap())? < 1e-4);
        assert!(diff(ga.get(u.as_tensor()).unwrap(), gb.get(u.as_tensor()).unwrap())? < 1e-4);
        // The composition (f64 path) against finite differences.
        let u64_ = u.as_tensor().to_dtype(candle_core::DType::F64)?;
        let p64 = probe.to_dtype(candle_core::DType::F64)?;
        check_grad(
            &g.as_tensor().to_dtype(candle_core::DType::F64)?,
            |g| swiglu(g, &u64_)?.mul(&p64)?.sum_all(),
            1e-6,
        )?;
        Ok(())
    }

    /// Gemma's gate, `gelu_tanh(g) * u` (candle's `gelu` is the tanh form): its values against
    /// the formula, its gradient against finite differences.
    #[test]
    fn gelu_gate_values_and_finite_differences() -> Result<()> {
        let dev = Device::Cpu;
        let g = Tensor::randn(0f64, 2., (5, 6), &dev)?;
        let u = Tensor::randn(0f64, 1., (5, 6), &dev)?;
        let probe = Tensor::randn(0f64, 1., (5, 6), &dev)?;
        let got = g.gelu()?.flatten_all()?.to_vec1::<f64>()?;
        for (x, y) in g.flatten_all()?.to_vec1::<f64>()?.into_iter().zip(got) {
            let want = 0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh());
            assert!((y - want).abs() < 1e-12, "gelu({x}) = {y}, want {want}");
        }
        check_grad(&g, |g| (g.gelu()? * &u)?.mul(&probe)?.sum_all(), 1e-6)?;
        check_grad(&u, |u| (g.gelu()? * u)?.mul(&probe)?.sum_all(), 1e-6)?;
        // The fused f32 op against that composition, forward and both gradients.
        let f32v = |t: &Tensor| -> Result<Var> { Var::from_tensor(&t.to_dtype(candle_core::DType::F32)?) };
        let (gf, uf, pf) = (f32v(&g)?, f32v(&u)?, probe.to_dtype(candle_core::DType::F32)?);
        let a = geglu(gf.as_tensor(), uf.as_tensor())?;
        let b = (gf.as_tensor().gelu()? * uf.as_tensor())?;
        let diff = |a: &Tensor, b: &Tensor| -> Result<f32> { (a - b)?.abs()?.max_all()?.to_scalar::<f32>() };
        assert!(diff(&a, &b)? < 1e-5, "{}", diff(&a, &b)?);
        let ga = a.mul(&pf)?.sum_all()?.backward()?;
        let gb = b.mul(&pf)?.sum_all()?.backward()?;
        for v in [&gf, &uf] {
            let d = diff(ga.get(v.as_tensor()).unwrap(), gb.get(v.as_tensor()).unwrap())?;
            assert!(d < 1e-4, "gradient differs by {d}");
        }
        Ok(())
    }
}
