//! RMSNorm as a composition of differentiable candle ops (candle-nn's fused one has no backward).

use candle_core::{Result, Tensor, D};

/// `x / sqrt(mean(x^2) + eps) * w` over the last dimension.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    let inv = (ms + eps)?.sqrt()?.recip()?;
    x.broadcast_mul(&inv)?.broadcast_mul(w)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::check_grad;
    use candle_core::{DType, Device, Tensor};

    #[test]
    fn gradient_matches_finite_differences() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f64, 1., (3, 8), &dev)?;
        let w = Tensor::randn(1f64, 0.2, 8, &dev)?;
        let probe = Tensor::randn(0f64, 1., (3, 8), &dev)?;
        check_grad(&x, |x| rms_norm(x, &w, 1e-5)?.mul(&probe)?.sum_all(), 1e-6)?;
        check_grad(&w, |w| rms_norm(&x, w, 1e-5)?.mul(&probe)?.sum_all(), 1e-6)?;
        let y = rms_norm(&x.to_dtype(DType::F32)?, &w.to_dtype(DType::F32)?, 1e-5)?;
        assert_eq!(y.dims(), &[3, 8]);
        Ok(())
    }
}
