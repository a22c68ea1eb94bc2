//! A frozen projection with its LoRA adapter as one op: `y = x W^T + s * (d(x) A^T) B^T`, where
//! `d` is the adapter's input dropout, with a hand-written backward returning dx, dA and dB.
//!
//! Composed from candle ops, each adapted projection is five graph nodes (frozen matmul, two
//! small matmuls, a scale, an add) with their backward bookkeeping; on a 2-core CPU that costs
//! more than the rank-16 arithmetic. Here it is one node; the small products run through the
//! `gemm` crate on slices. The dropout mask is regenerated from its seed in the backward, so
//! nothing but the inputs is kept.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use std::sync::Arc;

use super::bf16_gemm::{self, LinearPack};
use super::dequant_linear::{g_w, use_kernel, x_wt, Compact};
use super::{cpu_f32, sgemm};
use crate::rng::{mix, Rng};
use rayon::prelude::*;

/// The frozen weight under the adapter.
#[derive(Clone)]
pub enum LoraBase {
    /// A contiguous f32 `W [out, in]` on the CPU.
    F32(Tensor),
    /// A bf16 `W` and its packs for the bf16 kernel.
    Packed(Tensor, Arc<LinearPack>),
    /// NF4 or unpacked bf16, decoded a slab at a time (`ops::dequant_linear`).
    Compact(Compact),
}

impl LoraBase {
    /// `[out, in]`.
    fn dims(&self) -> Result<(usize, usize)> {
        match self {
            LoraBase::F32(w) | LoraBase::Packed(w, _) => w.dims2(),
            LoraBase::Compact(c) => c.dims(),
        }
    }
}

/// The op: the frozen weight, the scale and the dropout.
pub struct LoraLinear {
    /// Frozen `W [out, in]`.
    pub base: LoraBase,
    /// `alpha / r` (or rsLoRA's `alpha / sqrt(r)`).
    pub scale: f32,
    /// Dropout probability on the adapter input.
    pub dropout: f32,
    /// Seed of this call's dropout mask (`None`: no dropout).
    pub seed: Option<MaskSeed>,
}

/// Where a dropout mask comes from: a seed (the step's, mixed with the op's site) and the index
/// of `x`'s first row (token) within the optimizer step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaskSeed {
    /// Seed of the step and site.
    pub seed: u64,
    /// Index within the step of the first row of `x`.
    pub first_row: u64,
}

/// The dropout mask for `rows x width` inputs: `0` or `1 / (1 - p)`, a pure function of the
/// seed (the composed `Lora::forward` draws the same mask, so both paths agree). Each row draws
/// from its own stream, seeded by its index within the step, so splitting a step into
/// micro-batches of any size gives every token the same mask. Each 64-bit draw decides four
/// elements (16 bits each, so `p` is resolved to 1/65536); rows fill in parallel.
pub fn dropout_mask(s: MaskSeed, p: f32, rows: usize, width: usize) -> Vec<f32> {
    let drop_below = (p.clamp(0.0, 1.0) as f64 * 65536.0).round() as u32;
    let keep = 1.0 - drop_below as f32 / 65536.0;
    let scale = if keep > 0.0 { 1.0 / keep } else { 0.0 };
    let mut mask = vec![0f32; rows * width];
    if width == 0 {
        return mask;
    }
    mask.par_chunks_mut(width).enumerate().for_each(|(r, row)| {
        let mut rng = Rng::new(mix(&[s.seed, s.first_row + r as u64]));
        for quad in row.chunks_mut(4) {
            let bits = rng.next_u64();
            for (j, m) in quad.iter_mut().enumerate() {
                *m = if ((bits >> (16 * j)) & 0xffff) as u32 >= drop_below {
                    scale
                } else {
                    0.0
                };
            }
        }
    });
    mask
}

impl LoraLinear {
    /// Runs `f` on the f32 weight's data in place (no copy on the hot path).
    fn with_w<R>(w: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
        let (st, l) = w.storage_and_layout();
        match &*st {
            candle_core::Storage::Cpu(c) => Ok(f(cpu_f32(c, l, "lora linear weight")?)),
            _ => candle_core::bail!("lora linear: the weight is not on the CPU"),
        }
    }

    /// `x W^T` into `y [m, out]`.
    fn base_fwd(&self, x: &[f32], m: usize, k: usize, y: &mut [f32]) -> Result<()> {
        let (n, _) = self.base.dims()?;
        match &self.base {
            LoraBase::Packed(_, p) => bf16_gemm::gemm(&bf16_gemm::pack_a(x, m, k), m, &p.fwd, y),
            LoraBase::F32(w) => Self::with_w(w, |w| sgemm(m, n, k, (x, k, 1), (w, 1, k), y, false, 1.0, true))?,
            LoraBase::Compact(c) => x_wt(x, m, c, y, use_kernel(m))?,
        }
        Ok(())
    }

    /// `g W` into `dx [m, in]`.
    fn base_bwd(&self, g: &[f32], m: usize, n: usize, dx: &mut [f32]) -> Result<()> {
        let (_, k) = self.base.dims()?;
        match &self.base {
            LoraBase::Packed(_, p) => bf16_gemm::gemm(&bf16_gemm::pack_a(g, m, n), m, &p.bwd, dx),
            LoraBase::F32(w) => Self::with_w(w, |w| sgemm(m, k, n, (g, n, 1), (w, k, 1), dx, false, 1.0, true))?,
            LoraBase::Compact(c) => g_w(g, m, c, dx, use_kernel(m))?,
        }
        Ok(())
    }

    fn dropped(&self, x: &[f32]) -> Option<Vec<f32>> {
        match self.seed {
            Some(seed) if self.dropout > 0.0 => {
                let k = self.base.dims().map(|d| d.1).unwrap_or(1).max(1);
                let mask = dropout_mask(seed, self.dropout, x.len() / k, k);
                Some(x.iter().zip(&mask).map(|(a, b)| a * b).collect())
            }
            _ => None,
        }
    }
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "lora-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (m, k) = l1.shape().dims2()?;
        let (r, ka) = l2.shape().dims2()?;
        let (n, rb) = l3.shape().dims2()?;
        let (wn, wk) = self.base.dims()?;
        if ka != k || rb != r || wk != k || wn != n {
            candle_core::bail!("lora linear: x [{m}, {k}], A [{r}, {ka}], B [{n}, {rb}] and W [{wn}, {wk}] do not fit");
        }
        let (x, a, b) = (
            cpu_f32(s1, l1, "lora linear")?,
            cpu_f32(s2, l2, "lora linear")?,
            cpu_f32(s3, l3, "lora linear")?,
        );
        let mut y = vec![0f32; m * n];
        self.base_fwd(x, m, k, &mut y)?;
        let xd = self.dropped(x);
        let xd = xd.as_deref().unwrap_or(x);
        let mut u = vec![0f32; m * r];
        sgemm(m, r, k, (xd, k, 1), (a, 1, k), &mut u, false, 1.0, true);
        sgemm(m, n, r, (&u, r, 1), (b, 1, r), &mut y, true, self.scale, true);
        Ok((CpuStorage::F32(y), Shape::from((m, n))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (m, k) = x.dims2()?;
        let (r, n) = (a.dim(0)?, b.dim(0)?);
        let vec = |t: &Tensor| t.flatten_all()?.to_vec1::<f32>();
        let (xs, av, bv, gv) = (vec(x)?, vec(a)?, vec(b)?, vec(g)?);
        let mask = match self.seed {
            Some(seed) if self.dropout > 0.0 => Some(dropout_mask(seed, self.dropout, m, k)),
            _ => None,
        };
        let xd: Vec<f32> = match &mask {
            Some(mk) => xs.iter().zip(mk).map(|(p, q)| p * q).collect(),
            None => xs,
        };
        let mut u = vec![0f32; m * r];
        sgemm(m, r, k, (&xd, k, 1), (&av, 1, k), &mut u, false, 1.0, true);
        // dB = s g^T u; du = s g B; dA = du^T d(x); dx = g W + d(du A).
        let mut db = vec![0f32; n * r];
        sgemm(n, r, m, (&gv, 1, n), (&u, r, 1), &mut db, false, self.scale, true);
        let mut du = vec![0f32; m * r];
        sgemm(m, r, n, (&gv, n, 1), (&bv, r, 1), &mut du, false, self.scale, true);
        let mut da = vec![0f32; r * k];
        sgemm(r, k, m, (&du, 1, r), (&xd, k, 1), &mut da, false, 1.0, true);
        let mut dx = vec![0f32; m * k];
        match &mask {
            Some(mk) => {
                let mut dxl = vec![0f32; m * k];
                sgemm(m, k, r, (&du, r, 1), (&av, k, 1), &mut dxl, false, 1.0, true);
                self.base_bwd(&gv, m, n, &mut dx)?;
                for ((o, l), q) in dx.iter_mut().zip(&dxl).zip(mk) {
                    *o += l * q;
                }
            }
            None => {
                self.base_bwd(&gv, m, n, &mut dx)?;
                sgemm(m, k, r, (&du, r, 1), (&av, k, 1), &mut dx, true, 1.0, true);
            }
        }
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, (m, k), dev)?),
            Some(Tensor::from_vec(da, (r, k), dev)?),
            Some(Tensor::from_vec(db, (n, r), dev)?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::plan::ModuleLora;
    use crate::adapter::Lora;
    use crate::ops::dequant_linear::dequant_linear;
    use crate::ops::frozen_linear::{frozen_linear, pack_weight};
    use candle_core::{DType, Device, Var};

    /// `kind`: 0 f32, 1 packed bf16, 2 unpacked bf16, 3 NF4.
    fn check(kind: u8, dropout: f32) -> Result<()> {
        let bf16 = kind == 1;
        let dev = Device::Cpu;
        let (m, k, n, r) = (37, 24, 50, 4);
        let mut rng = Rng::new(5);
        let ml = ModuleLora {
            r,
            alpha: 8.0,
            scale: 2.0,
        };
        let lora = Lora::init(n, k, ml, dropout, &mut rng, &dev).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        lora.b.set(&Tensor::randn(0f32, 0.5, (n, r), &dev)?)?;
        let mut w = Tensor::randn(0f32, 1., (n, k), &dev)?;
        let mut x = Tensor::randn(0f32, 1., (m, k), &dev)?;
        if bf16 {
            if !bf16_gemm::available() {
                return Ok(());
            }
            w = w.to_dtype(DType::BF16)?;
            x = x.to_dtype(DType::BF16)?.to_dtype(DType::F32)?;
        }
        let x = Var::from_tensor(&x)?;
        let seed = Some(MaskSeed { seed: 9, first_row: 5 });
        let (base_out, base) = match kind {
            0 => (frozen_linear(x.as_tensor(), &w, None)?, LoraBase::F32(w.clone())),
            1 => {
                let pack = pack_weight(&w)?.expect("bf16 kernel");
                (
                    frozen_linear(x.as_tensor(), &w, Some(&pack))?,
                    LoraBase::Packed(w.clone(), pack),
                )
            }
            2 => {
                let c = Compact::Bf16(w.to_dtype(DType::BF16)?);
                (dequant_linear(x.as_tensor(), c.clone())?, LoraBase::Compact(c))
            }
            _ => {
                let wv: Vec<f32> = w.flatten_all()?.to_vec1()?;
                let c = Compact::Nf4(Arc::new(crate::quant::nf4::Nf4Tensor::quantize(&wv, n, k, 64, true)));
                (dequant_linear(x.as_tensor(), c.clone())?, LoraBase::Compact(c))
            }
        };
        let composed = (base_out + lora.forward(x.as_tensor(), seed)?)?;
        let op = LoraLinear {
            base,
            scale: 2.0,
            dropout,
            seed,
        };
        let fused = x.as_tensor().apply_op3(lora.a.as_tensor(), lora.b.as_tensor(), op)?;
        let probe = Tensor::randn(0f32, 1., (m, n), &dev)?;
        let diff = |a: &Tensor, b: &Tensor| -> Result<f32> { (a - b)?.abs()?.max_all()?.to_scalar::<f32>() };
        let tol = if bf16 { 2e-2 } else { 1e-4 };
        assert!(diff(&composed, &fused)? < tol, "forward");
        let gc = composed.mul(&probe)?.sum_all()?.backward()?;
        let gf = fused.mul(&probe)?.sum_all()?.backward()?;
        for (name, v) in [
            ("x", x.as_tensor()),
            ("A", lora.a.as_tensor()),
            ("B", lora.b.as_tensor()),
        ] {
            let d = diff(gc.get(v).unwrap(), gf.get(v).unwrap())?;
            assert!(d < tol * 5.0, "d{name} differs by {d} (kind {kind}, dropout {dropout})");
        }
        Ok(())
    }

    #[test]
    fn dropout_mask_rate_and_determinism() {
        let s = |seed, first_row| MaskSeed { seed, first_row };
        let a = dropout_mask(s(3, 0), 0.25, 1000, 100);
        assert_eq!(a, dropout_mask(s(3, 0), 0.25, 1000, 100));
        assert_ne!(a, dropout_mask(s(4, 0), 0.25, 1000, 100));
        let dropped = a.iter().filter(|&&m| m == 0.0).count() as f64 / a.len() as f64;
        assert!((dropped - 0.25).abs() < 0.01, "dropped {dropped}");
        let mean = a.iter().map(|&m| m as f64).sum::<f64>() / a.len() as f64;
        assert!((mean - 1.0).abs() < 0.02, "mean {mean}");
        assert!(dropout_mask(s(3, 0), 0.0, 10, 100).iter().all(|&m| m == 1.0));
        // Rows 400.. of the step get the same mask whether or not they start a micro-batch.
        assert_eq!(dropout_mask(s(3, 400), 0.25, 600, 100), a[400 * 100..].to_vec());
    }

    #[test]
    fn fused_lora_matches_the_composition() -> Result<()> {
        for kind in 0..4 {
            for dropout in [0.0, 0.3] {
                check(kind, dropout)?;
            }
        }
        Ok(())
    }
}
