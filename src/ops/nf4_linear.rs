//! A frozen projection stored in NF4 (with or without double quantization): `y = x W^T` with
//! the weight dequantized a slab of rows at a time inside the product, and a backward that
//! returns dL/dx only. No dequantized copy of the weight outlives one slab.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use std::sync::Arc;

use super::{cpu_f32, sgemm_ld};
use crate::quant::nf4::Nf4Tensor;

/// Weight rows dequantized per slab: large enough for the GEMM to run at speed, small enough
/// (`SLAB * in` floats) to stay in cache-sized memory.
const SLAB: usize = 128;

/// `x [m, k] -> [m, n]` against an NF4 `W [n, k]`.
pub struct Nf4Linear {
    /// The quantized weight.
    pub w: Arc<Nf4Tensor>,
}

impl CustomOp1 for Nf4Linear {
    fn name(&self) -> &'static str {
        "nf4-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = cpu_f32(s, l, "nf4-linear")?;
        let (m, k) = l.shape().dims2()?;
        let (n, wk) = (self.w.rows, self.w.cols);
        if k != wk {
            candle_core::bail!("nf4-linear: input width {k} does not match the weight's {wk}");
        }
        let mut y = vec![0f32; m * n];
        let mut slab = vec![0f32; SLAB * k];
        for r0 in (0..n).step_by(SLAB) {
            let nc = SLAB.min(n - r0);
            let w = &mut slab[..nc * k];
            self.w.dequant_rows(r0, w);
            // y[:, r0..r0+nc] = x [m, k] * w^T: w read as [k, nc] (row stride 1, column stride k).
            sgemm_ld(m, nc, k, (x, k, 1), (w, 1, k), (&mut y[r0..], n), false, 1.0, true);
        }
        Ok((CpuStorage::F32(y), Shape::from((m, n))))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let (m, k) = x.dims2()?;
        let n = self.w.rows;
        let g: Vec<f32> = g.contiguous()?.flatten_all()?.to_vec1()?;
        let mut dx = vec![0f32; m * k];
        let mut slab = vec![0f32; SLAB * k];
        for r0 in (0..n).step_by(SLAB) {
            let nc = SLAB.min(n - r0);
            let w = &mut slab[..nc * k];
            self.w.dequant_rows(r0, w);
            // dx += g[:, r0..r0+nc] * w [nc, k].
            sgemm_ld(m, k, nc, (&g[r0..], n, 1), (w, k, 1), (&mut dx, k), r0 > 0, 1.0, true);
        }
        Ok(Some(Tensor::from_vec(dx, (m, k), x.device())?))
    }
}

/// `x W^T` for f32 `x [m, k]` and an NF4 weight.
pub fn nf4_linear(x: &Tensor, w: &Arc<Nf4Tensor>) -> Result<Tensor> {
    let x = if x.is_contiguous() { x.clone() } else { x.contiguous()? };
    x.apply_op1(Nf4Linear { w: w.clone() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Forward and dx equal the dense product with the dequantized weight, with and without
    /// double quantization, across slab boundaries.
    #[test]
    fn gradient_equals_dense_gradient_on_dequantized_weight() -> Result<()> {
        let dev = Device::Cpu;
        for dq in [false, true] {
            let (n, k) = (300, 96);
            let w: Vec<f32> = Tensor::randn(0f32, 0.05, (n, k), &dev)?.flatten_all()?.to_vec1()?;
            let q = Arc::new(Nf4Tensor::quantize(&w, n, k, 64, dq));
            let wd = Tensor::from_vec(q.dequantize(), (n, k), &dev)?;
            let x = Var::from_tensor(&Tensor::randn(0f32, 1., (7, k), &dev)?)?;
            let y = nf4_linear(x.as_tensor(), &q)?;
            let y_ref = x.as_tensor().matmul(&wd.t()?)?;
            let d = (&y - &y_ref)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(d < 1e-4, "dq {dq}: forward differs by {d}");
            let probe = Tensor::randn(0f32, 1., (7, n), &dev)?;
            let g = y.mul(&probe)?.sum_all()?.backward()?;
            let g_ref = y_ref.mul(&probe)?.sum_all()?.backward()?;
            let d = (g.get(x.as_tensor()).unwrap() - g_ref.get(x.as_tensor()).unwrap())?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?;
            assert!(d < 1e-4, "dq {dq}: dx differs by {d}");
            // NF4 keeps the weight within its 16 levels of each block's scale.
            let err = (wd - Tensor::from_vec(w, (n, k), &dev)?)?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?;
            assert!(err < 0.05, "dq {dq}: quantization error {err}");
            assert!(q.bytes() < n * k * 4 / 7, "{} bytes", q.bytes());
        }
        Ok(())
    }
}
