//! A frozen projection held compactly (NF4 with or without double quantization, or bf16 without
//! the bf16 kernel's packs): `y = x W^T` with the weight decoded to f32 a slab of rows at a time
//! inside the product, and a backward that returns dL/dx only. No decoded copy of the weight
//! outlives one slab, so the weight costs its stored bytes and nothing more.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use std::sync::Arc;

use super::{cpu_f32, sgemm_ld};
use crate::quant::nf4::Nf4Tensor;

/// A weight `[rows, cols]` the op decodes slab by slab.
#[derive(Clone)]
pub enum Compact {
    /// NF4 codes and scales.
    Nf4(Arc<Nf4Tensor>),
    /// A contiguous bf16 tensor.
    Bf16(Tensor),
}

impl Compact {
    /// `[rows, cols]`.
    pub fn dims(&self) -> Result<(usize, usize)> {
        match self {
            Compact::Nf4(q) => Ok((q.rows, q.cols)),
            Compact::Bf16(t) => t.dims2(),
        }
    }

    /// Calls `f(decode)` where `decode(r0, out)` writes rows `r0..` into `out` in f32.
    fn with_decoder<R>(&self, f: impl FnOnce(&dyn Fn(usize, &mut [f32])) -> R) -> Result<R> {
        match self {
            Compact::Nf4(q) => Ok(f(&|r0, out| q.dequant_rows(r0, out))),
            Compact::Bf16(t) => {
                let cols = t.dims2()?.1;
                let (st, l) = t.storage_and_layout();
                let data = match &*st {
                    candle_core::Storage::Cpu(CpuStorage::BF16(v)) => match l.contiguous_offsets() {
                        Some((a, b)) => &v[a..b],
                        None => candle_core::bail!("dequant-linear: the bf16 weight must be contiguous"),
                    },
                    _ => candle_core::bail!("dequant-linear: expected a bf16 weight on the CPU"),
                };
                Ok(f(&|r0, out: &mut [f32]| {
                    let src = &data[r0 * cols..r0 * cols + out.len()];
                    for (o, s) in out.iter_mut().zip(src) {
                        *o = s.to_f32();
                    }
                }))
            }
        }
    }
}

/// Weight rows dequantized per slab: large enough for the GEMM to run at speed, small enough
/// (`SLAB * in` floats) to stay in cache-sized memory.
const SLAB: usize = 128;

/// `y [m, n] = x [m, k] W^T` for a compact `W [n, k]`, a slab of rows decoded at a time.
pub(crate) fn x_wt(x: &[f32], m: usize, w: &Compact, y: &mut [f32]) -> Result<()> {
    let (n, k) = w.dims()?;
    let mut slab = vec![0f32; SLAB * k];
    w.with_decoder(|decode| {
        for r0 in (0..n).step_by(SLAB) {
            let nc = SLAB.min(n - r0);
            let ws = &mut slab[..nc * k];
            decode(r0, ws);
            // y[:, r0..r0+nc] = x [m, k] * ws^T: ws read as [k, nc] (row stride 1, column stride k).
            sgemm_ld(m, nc, k, (x, k, 1), (ws, 1, k), (&mut y[r0..], n), false, 1.0, true);
        }
    })
}

/// `dx [m, k] = g [m, n] W` for a compact `W [n, k]`, a slab of rows decoded at a time.
pub(crate) fn g_w(g: &[f32], m: usize, w: &Compact, dx: &mut [f32]) -> Result<()> {
    let (n, k) = w.dims()?;
    let mut slab = vec![0f32; SLAB * k];
    w.with_decoder(|decode| {
        for r0 in (0..n).step_by(SLAB) {
            let nc = SLAB.min(n - r0);
            let ws = &mut slab[..nc * k];
            decode(r0, ws);
            // dx += g[:, r0..r0+nc] * ws [nc, k].
            sgemm_ld(m, k, nc, (&g[r0..], n, 1), (ws, k, 1), (&mut *dx, k), r0 > 0, 1.0, true);
        }
    })
}

/// `x [m, k] -> [m, n]` against a compact `W [n, k]`.
pub struct DequantLinear {
    /// The weight.
    pub w: Compact,
}

impl CustomOp1 for DequantLinear {
    fn name(&self) -> &'static str {
        "dequant-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = cpu_f32(s, l, "dequant-linear")?;
        let (m, k) = l.shape().dims2()?;
        let (n, wk) = self.w.dims()?;
        if k != wk {
            candle_core::bail!("dequant-linear: input width {k} does not match the weight's {wk}");
        }
        let mut y = vec![0f32; m * n];
        x_wt(x, m, &self.w, &mut y)?;
        Ok((CpuStorage::F32(y), Shape::from((m, n))))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let (m, k) = x.dims2()?;
        let g: Vec<f32> = g.contiguous()?.flatten_all()?.to_vec1()?;
        let mut dx = vec![0f32; m * k];
        g_w(&g, m, &self.w, &mut dx)?;
        Ok(Some(Tensor::from_vec(dx, (m, k), x.device())?))
    }
}

/// `x W^T` for f32 `x [m, k]` and a compact weight.
pub fn dequant_linear(x: &Tensor, w: Compact) -> Result<Tensor> {
    if let Compact::Bf16(t) = &w {
        if t.dtype() != DType::BF16 {
            candle_core::bail!("dequant-linear: expected a bf16 weight, got {:?}", t.dtype());
        }
    }
    let x = if x.is_contiguous() { x.clone() } else { x.contiguous()? };
    x.apply_op1(DequantLinear { w })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Forward and dx equal the dense product with the dequantized weight, with and without
    /// double quantization, across slab boundaries; the same for an unpacked bf16 weight.
    #[test]
    fn gradient_equals_dense_gradient_on_dequantized_weight() -> Result<()> {
        let dev = Device::Cpu;
        for dq in [false, true] {
            let (n, k) = (300, 96);
            let w: Vec<f32> = Tensor::randn(0f32, 0.05, (n, k), &dev)?.flatten_all()?.to_vec1()?;
            let q = Arc::new(Nf4Tensor::quantize(&w, n, k, 64, dq));
            let wd = Tensor::from_vec(q.dequantize(), (n, k), &dev)?;
            let x = Var::from_tensor(&Tensor::randn(0f32, 1., (7, k), &dev)?)?;
            let y = dequant_linear(x.as_tensor(), Compact::Nf4(q.clone()))?;
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
            let err = (&wd - Tensor::from_vec(w, (n, k), &dev)?)?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?;
            assert!(err < 0.05, "dq {dq}: quantization error {err}");
            assert!(q.bytes() < n * k * 4 / 7, "{} bytes", q.bytes());
            // The same weight held in bf16 goes through the same op.
            let wb = wd.to_dtype(candle_core::DType::BF16)?;
            let y = dequant_linear(x.as_tensor(), Compact::Bf16(wb.clone()))?;
            let y_ref = x.as_tensor().matmul(&wb.to_dtype(candle_core::DType::F32)?.t()?)?;
            let d = (&y - &y_ref)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(d < 1e-4, "bf16: forward differs by {d}");
            let g = y.mul(&probe)?.sum_all()?.backward()?;
            let g_ref = y_ref.mul(&probe)?.sum_all()?.backward()?;
            let d = (g.get(x.as_tensor()).unwrap() - g_ref.get(x.as_tensor()).unwrap())?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?;
            assert!(d < 1e-4, "bf16: dx differs by {d}");
        }
        Ok(())
    }
}
