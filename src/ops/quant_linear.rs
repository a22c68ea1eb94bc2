//! A frozen projection stored in its GGUF quantization type (Q4_0, Q4_1, Q8_0, K-quants ...),
//! dequantized inside the op.
//!
//! candle's `QMatMul` has no backward and silently cuts the gradient (docs/design.md, pitfall 3). Here
//! the forward runs candle's quantized matmul (activations quantized to 8 bits, as llama.cpp
//! does) and the backward is `dx = g dequant(W)`, the dequantized copy living only for that
//! product. On CUDA (`cuda` feature) the forward is candle's CUDA quantized matmul and the
//! backward dequantizes on the device; the weight must have been loaded onto that device.

use candle_core::quantized::QTensor;
use candle_core::{CpuStorage, CudaStorage, CustomOp1, Layout, Result, Shape, Tensor};
use std::sync::Arc;

/// `x [m, k] -> [m, n]` against a quantized `W [n, k]`.
pub struct QuantLinear {
    /// The quantized weight.
    pub w: Arc<QTensor>,
}

impl CustomOp1 for QuantLinear {
    fn name(&self) -> &'static str {
        "quant-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        if !self.w.device().is_cpu() {
            candle_core::bail!(
                "quant-linear: the weight is on {:?}, the activations on the CPU",
                self.w.device().location()
            );
        }
        CustomOp1::cpu_fwd(self.w.as_ref(), s, l)
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        // candle's CUDA matmul assumes (and would panic otherwise) that the weight is on CUDA.
        if !self.w.device().is_cuda() {
            candle_core::bail!(
                "quant-linear: the weight is on {:?}, the activations on CUDA",
                self.w.device().location()
            );
        }
        CustomOp1::cuda_fwd(self.w.as_ref(), s, l)
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let w = self.w.dequantize(g.device())?;
        Ok(Some(g.matmul(&w)?))
    }
}

/// `x W^T` for f32 `x [m, k]` and a quantized weight.
pub fn quant_linear(x: &Tensor, w: &Arc<QTensor>) -> Result<Tensor> {
    let x = if x.is_contiguous() { x.clone() } else { x.contiguous()? };
    x.apply_op1(QuantLinear { w: w.clone() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::GgmlDType;
    use candle_core::{Device, Var};

    /// Gradients through the quantized op equal dense gradients on the dequantized weight; the
    /// forward matches within the activation quantization error.
    #[test]
    fn gradient_equals_dense_gradient_on_dequantized_weight() -> Result<()> {
        let dev = Device::Cpu;
        for ty in [GgmlDType::Q4_1, GgmlDType::Q8_0, GgmlDType::Q4K, GgmlDType::Q6K] {
            let w = Tensor::randn(0f32, 1., (8, 256), &dev)?;
            let q = Arc::new(QTensor::quantize(&w, ty)?);
            let wd = q.dequantize(&dev)?;
            let x = Var::from_tensor(&Tensor::randn(0f32, 1., (5, 256), &dev)?)?;
            let y = quant_linear(x.as_tensor(), &q)?;
            let y_ref = x.as_tensor().matmul(&wd.t()?)?;
            let scale = y_ref.abs()?.max_all()?.to_scalar::<f32>()?;
            let d = (&y - &y_ref)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(d < 0.05 * scale, "{ty:?}: forward differs by {d} (scale {scale})");
            let probe = Tensor::randn(0f32, 1., (5, 8), &dev)?;
            let d = crate::testing::dx_gap(&y, &y_ref, &x, &probe)?;
            assert!(d < 1e-4, "{ty:?}: dx differs by {d}");
        }
        Ok(())
    }
}
