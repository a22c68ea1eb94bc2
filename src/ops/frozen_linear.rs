//! `y = x W^T` for a frozen `W` whose backward returns dL/dx only.
//!
//! candle's own matmul backward also computes and stores dL/dW for constant weights (docs/design.md,
//! pitfall 1). Holding the weight inside a `CustomOp1` hides it from the graph: the op has a
//! single input (the activations), so backprop produces exactly one gradient.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CudaStorage, CustomOp1, DType, Layout, Result, Shape, Storage, Tensor};

use super::bf16_gemm::{self, LinearPack, PackedB};
use std::sync::Arc;

struct FrozenMatmul {
    w: Tensor,
}

impl FrozenMatmul {
    fn fwd<S: BackendStorage>(&self, x: &S, xl: &Layout, pick: impl Fn(&Storage) -> Option<&S>) -> Result<(S, Shape)> {
        let (m, k) = xl.shape().dims2()?;
        let (n, k2) = self.w.dims2()?;
        if k != k2 {
            candle_core::bail!("frozen linear: input has {k} features, weight expects {k2}");
        }
        let (ws, wl) = self.w.storage_and_layout();
        let ws = pick(&ws)
            .ok_or_else(|| candle_core::Error::Msg("frozen linear: weight and input on different devices".into()))?;
        let wt = wl.transpose(0, 1)?;
        let y = x.matmul(ws, (1, m, n, k), xl, &wt)?;
        Ok((y, Shape::from((m, n))))
    }
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        self.fwd(s, l, |st| match st {
            Storage::Cpu(c) => Some(c),
            _ => None,
        })
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        self.fwd(s, l, |st| match st {
            Storage::Cuda(c) => Some(c),
            _ => None,
        })
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(g.matmul(&self.w)?))
    }
}

/// `x [m, k] @ w[n, k]^T -> [m, n]`, with `w` treated as a constant: no gradient is computed or
/// kept for it. `x` must have the weight's dtype (the caller converts).
pub fn frozen_matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let x = if x.is_contiguous() { x.clone() } else { x.contiguous()? };
    x.apply_op1(FrozenMatmul { w: w.clone() })
}

/// Whether `w` can run through the bf16 kernel: a bf16 weight on a CPU with AVX512-BF16.
pub fn uses_bf16_kernel(w: &Tensor) -> bool {
    w.dtype() == DType::BF16 && w.device().is_cpu() && w.is_contiguous() && bf16_gemm::available()
}

/// Packs a frozen bf16 weight for [`frozen_linear`] (`None` when the kernel cannot run it).
pub fn pack_weight(w: &Tensor) -> Result<Option<Arc<LinearPack>>> {
    if !uses_bf16_kernel(w) {
        return Ok(None);
    }
    let (n, k) = w.dims2()?;
    let v: Vec<half::bf16> = w.flatten_all()?.to_vec1()?;
    Ok(Some(Arc::new(LinearPack::new(&v, n, k))))
}

/// The frozen projection of f32 activations: `x [m, k]` (f32) times `w [n, k]^T` in `w`'s
/// precision, returning f32. With a pack (bf16 weights on AVX512-BF16 CPUs) it runs strata's
/// kernel (activations rounded to bf16, f32 accumulation); anything else goes through candle.
pub fn frozen_linear(x: &Tensor, w: &Tensor, pack: Option<&Arc<LinearPack>>) -> Result<Tensor> {
    if let (Some(p), DType::F32) = (pack, x.dtype()) {
        let x = if x.is_contiguous() { x.clone() } else { x.contiguous()? };
        return x.apply_op1(Bf16Linear {
            pack: p.clone(),
            forward: true,
        });
    }
    frozen_matmul(&x.to_dtype(w.dtype())?, w)?.to_dtype(DType::F32)
}

/// A custom op's f32 CPU input `x [m, k]` times `b` (one layout of a packed weight) through
/// the bf16 kernel, `[m, b.n]`: the products of the frozen and trained linear ops.
pub(crate) fn packed_product(s: &CpuStorage, l: &Layout, b: &PackedB, op: &str) -> Result<(CpuStorage, Shape)> {
    let (m, k) = l.shape().dims2()?;
    if k.div_ceil(2) != b.kp {
        candle_core::bail!("{op}: input has {k} features, the weight expects {}", 2 * b.kp);
    }
    let x = super::cpu_f32(s, l, op)?;
    let mut y = vec![0f32; m * b.n];
    bf16_gemm::gemm(&bf16_gemm::pack_a(x, m, k), m, b, &mut y);
    Ok((CpuStorage::F32(y), Shape::from((m, b.n))))
}

/// `x W^T` (forward) or `g W` (input gradient) through [`bf16_gemm`] with a packed `W`.
struct Bf16Linear {
    pack: Arc<LinearPack>,
    forward: bool,
}

impl CustomOp1 for Bf16Linear {
    fn name(&self) -> &'static str {
        "bf16-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let b = if self.forward { &self.pack.fwd } else { &self.pack.bwd };
        packed_product(s, l, b, "frozen linear")
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let g = if g.is_contiguous() { g.clone() } else { g.contiguous()? };
        Ok(Some(g.apply_op1_no_bwd(&Bf16Linear {
            pack: self.pack.clone(),
            forward: !self.forward,
        })?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn forward_and_input_gradient_match_candle_matmul() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1., (5, 7), &dev)?)?;
        let w = Tensor::randn(0f32, 1., (3, 7), &dev)?;
        let y = frozen_matmul(x.as_tensor(), &w)?;
        let y_ref = x.as_tensor().matmul(&w.t()?)?;
        let diff = (&y - &y_ref)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "forward differs by {diff}");
        let probe = Tensor::randn(0f32, 1., (5, 3), &dev)?;
        let g = (y * &probe)?.sum_all()?.backward()?;
        let g_ref = (y_ref * &probe)?.sum_all()?.backward()?;
        let a = g.get(x.as_tensor()).unwrap();
        let b = g_ref.get(x.as_tensor()).unwrap();
        let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "dx differs by {diff}");
        // The frozen weight gets no gradient at all (it is not even in the graph).
        assert!(g.get(&w).is_none());
        Ok(())
    }

    #[test]
    fn bf16_kernel_path_matches_candle_on_rounded_inputs() -> Result<()> {
        if !bf16_gemm::available() {
            return Ok(());
        }
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (13, 24), &dev)?
            .to_dtype(DType::BF16)?
            .to_dtype(DType::F32)?;
        let x = Var::from_tensor(&x)?;
        let w = Tensor::randn(0f32, 1., (50, 24), &dev)?.to_dtype(DType::BF16)?;
        let w32 = w.to_dtype(DType::F32)?;
        let y = frozen_linear(x.as_tensor(), &w, pack_weight(&w)?.as_ref())?;
        let y_ref = x.as_tensor().matmul(&w32.t()?)?;
        assert!((&y - &y_ref)?.abs()?.max_all()?.to_scalar::<f32>()? < 1e-3);
        let probe = Tensor::randn(0f32, 1., (13, 50), &dev)?
            .to_dtype(DType::BF16)?
            .to_dtype(DType::F32)?;
        let g = (y * &probe)?.sum_all()?.backward()?;
        let g_ref = (y_ref * &probe)?.sum_all()?.backward()?;
        let d = (g.get(x.as_tensor()).unwrap() - g_ref.get(x.as_tensor()).unwrap())?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(d < 1e-3, "dx differs by {d}");
        Ok(())
    }
}
