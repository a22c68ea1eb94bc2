//! Test helpers (built for the crate's own tests and, through the `testing` feature, its
//! integration tests; not part of the shipped library): finite-difference gradient checks, and
//! the synthetic models `strata bench` also uses.

pub use crate::cli::synthetic::*;

use candle_core::{Result, Tensor, Var};

/// Checks the autograd gradient of the scalar `f(x)` against central finite differences on
/// every element of `x` (f64 tensors), failing with the worst element if they disagree.
pub fn check_grad(x: &Tensor, f: impl Fn(&Tensor) -> Result<Tensor>, tol: f64) -> Result<()> {
    let var = Var::from_tensor(x)?;
    let y = f(var.as_tensor())?;
    let grads = y.backward()?;
    let g = grads
        .get(var.as_tensor())
        .ok_or_else(|| candle_core::Error::Msg("no gradient reached the input".into()))?
        .flatten_all()?
        .to_vec1::<f64>()?;
    let base = x.flatten_all()?.to_vec1::<f64>()?;
    let h = 1e-5;
    let mut worst = 0.0f64;
    for i in 0..base.len() {
        let mut p = base.clone();
        p[i] += h;
        let fp = f(&Tensor::from_vec(p.clone(), x.shape(), x.device())?)?.to_scalar::<f64>()?;
        p[i] -= 2.0 * h;
        let fm = f(&Tensor::from_vec(p, x.shape(), x.device())?)?.to_scalar::<f64>()?;
        let num = (fp - fm) / (2.0 * h);
        let err = (num - g[i]).abs() / (1.0 + num.abs());
        worst = worst.max(err);
        if err > tol {
            candle_core::bail!(
                "gradient mismatch at element {i}: autograd {} vs finite difference {num}",
                g[i]
            );
        }
    }
    assert!(worst.is_finite());
    Ok(())
}

/// The largest difference between the input gradients two computations of the same function give
/// (`y` and `y_ref` of input `x`), both seeded with `probe`.
pub fn dx_gap(y: &Tensor, y_ref: &Tensor, x: &Var, probe: &Tensor) -> Result<f32> {
    let g = y.mul(probe)?.sum_all()?.backward()?;
    let g_ref = y_ref.mul(probe)?.sum_all()?.backward()?;
    let missing = || candle_core::Error::Msg("no gradient reached the input".into());
    let (a, b) = (
        g.get(x.as_tensor()).ok_or_else(missing)?,
        g_ref.get(x.as_tensor()).ok_or_else(missing)?,
    );
    (a - b)?.abs()?.max_all()?.to_scalar::<f32>()
}
