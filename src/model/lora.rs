//! The LoRA layer: `y = W x (+ b) + s * B (A dropout(x))`, A kaiming-uniform, B zero (PEFT init).

use candle_core::{DType, Device, Result, Tensor, Var};

use crate::rng::Rng;

/// Rank, alpha and scale of one module's adapter (what a plan resolves to).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ModuleLora {
    /// Rank.
    pub r: usize,
    /// Alpha.
    pub alpha: f64,
    /// `alpha / r` or `alpha / sqrt(r)`.
    pub scale: f64,
}

/// One adapter pair on a projection.
#[derive(Debug)]
pub struct Lora {
    /// `[r, in]`.
    pub a: Var,
    /// `[out, r]`.
    pub b: Var,
    /// Rank.
    pub r: usize,
    /// Alpha.
    pub alpha: f64,
    /// The output scale applied to `B A x`.
    pub scale: f64,
    /// Input dropout probability during training.
    pub dropout: f32,
}

impl Lora {
    /// PEFT's default init: `kaiming_uniform_(A, a=sqrt(5))` i.e. U(-1/sqrt(in), 1/sqrt(in)), `B = 0`.
    pub fn init(out: usize, inp: usize, ml: ModuleLora, dropout: f32, rng: &mut Rng, dev: &Device) -> Result<Self> {
        let ModuleLora { r, alpha, scale } = ml;
        let bound = 1.0 / (inp as f32).sqrt();
        let a: Vec<f32> = (0..r * inp).map(|_| (rng.next_f32() * 2.0 - 1.0) * bound).collect();
        let a = Var::from_tensor(&Tensor::from_vec(a, (r, inp), dev)?)?;
        let b = Var::from_tensor(&Tensor::zeros((out, r), DType::F32, dev)?)?;
        Ok(Self {
            a,
            b,
            r,
            alpha,
            scale,
            dropout,
        })
    }

    /// The adapter's contribution `s * B A x` for `x [n, in]` (f32). `dropout_seed` is set during
    /// training; the mask is a pure function of it, so a recomputed forward sees the same mask.
    pub fn forward(&self, x: &Tensor, dropout_seed: Option<crate::ops::lora_linear::MaskSeed>) -> Result<Tensor> {
        let x = match dropout_seed {
            Some(seed) if self.dropout > 0.0 => {
                let (rows, width) = x.dims2()?;
                let mask = crate::ops::lora_linear::dropout_mask(seed, self.dropout, rows, width);
                (x * Tensor::from_vec(mask, x.shape(), x.device())?)?
            }
            _ => x.clone(),
        };
        let xa = x.matmul(&self.a.as_tensor().t()?)?;
        xa.matmul(&self.b.as_tensor().t()?)? * self.scale
    }

    /// `s * B A`, the change this adapter makes to the weight `[out, in]`.
    pub fn delta(&self) -> Result<Tensor> {
        self.b.as_tensor().matmul(self.a.as_tensor())? * self.scale
    }
}
