//! `y = x W^T` for a frozen `W` whose backward returns dL/dx only.
//!
//! candle's own matmul backward also computes and stores dL/dW for constant weights (DESIGN
//! pitfall 1). Holding the weight inside a `CustomOp1` hides it from the graph: the op has a
//! single input (the activations), so backprop produces exactly one gradient.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CudaStorage, CustomOp1, Layout, Result, Shape, Storage, Tensor};

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
}
