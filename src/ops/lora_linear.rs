//! A frozen projection with its LoRA adapter as one op: `y = x W^T + s * (d(x) A^T) B^T`, where
//! `d` is the adapter's input dropout, with a hand-written backward returning dx, dA and dB.
//!
//! Composed from candle ops, each adapted projection is five graph nodes (frozen matmul, two
//! small matmuls, a scale, an add) with their backward bookkeeping; on a 2-core CPU that costs
//! more than the rank-16 arithmetic. Here it is one node; the small products run through the
//! `gemm` crate on slices. The dropout mask is regenerated from its seed in the backward, so
//! nothing but the inputs is kept.
//!
//! Selective recomputation ([`KeptProducts`]): the first forward of a micro-batch keeps the
//! frozen product `x W^T` (bf16, or f32 under an f32 base) and the recomputed forward reads it
//! back instead of running the GEMM again, so recomputing a block costs only its adapters, norms
//! and attention. The kept product is rounded to bf16 in the first forward's output too, so both
//! forwards give the same bits and the backward differentiates the loss that was computed.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::bf16_gemm::{self, LinearPack};
use super::dequant_linear::{g_w, use_kernel, x_wt, Compact};
use super::{cpu_f32, f32_view, sgemm};
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

/// Frozen products kept from a micro-batch's forward for its recomputed forward, by site (a
/// projection's place in the model). Each is taken when read back, so the store empties as the
/// backward walks down the blocks.
#[derive(Default)]
pub struct KeptProducts {
    map: Mutex<HashMap<u64, Kept>>,
}

enum Kept {
    Bf16(Vec<u16>),
    F32(Vec<f32>),
}

impl KeptProducts {
    /// Bytes held now.
    pub fn bytes(&self) -> usize {
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.values()
            .map(|k| match k {
                Kept::Bf16(v) => 2 * v.len(),
                Kept::F32(v) => 4 * v.len(),
            })
            .sum()
    }

    /// Products held now.
    pub fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// True when nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keeps `y` for `site`, rounding it to bf16 in place first when `round`.
    pub(crate) fn keep(&self, site: u64, y: &mut [f32], round: bool) {
        let kept = if round {
            let mut bits = vec![0u16; y.len()];
            bf16_gemm::f32_to_bf16_bits(y, &mut bits);
            widen_bf16(&bits, y);
            Kept::Bf16(bits)
        } else {
            Kept::F32(y.to_vec())
        };
        self.map.lock().unwrap_or_else(|e| e.into_inner()).insert(site, kept);
    }

    /// Writes the product kept for `site` into `y` and forgets it; false when none is kept.
    pub(crate) fn take(&self, site: u64, y: &mut [f32]) -> Result<bool> {
        let Some(kept) = self.map.lock().unwrap_or_else(|e| e.into_inner()).remove(&site) else {
            return Ok(false);
        };
        let len = match &kept {
            Kept::Bf16(v) => v.len(),
            Kept::F32(v) => v.len(),
        };
        if len != y.len() {
            candle_core::bail!(
                "kept products: the product kept for site {site:#x} has {len} values, this forward needs {}; \
                 a store of kept products serves one micro-batch",
                y.len()
            );
        }
        match kept {
            Kept::Bf16(v) => widen_bf16(&v, y),
            Kept::F32(v) => y.copy_from_slice(&v),
        }
        Ok(true)
    }
}

/// `y[i] = f32(bits[i])`: bf16 is the top half of an f32, so widening is exact.
fn widen_bf16(bits: &[u16], y: &mut [f32]) {
    y.par_chunks_mut(1 << 14)
        .zip(bits.par_chunks(1 << 14))
        .for_each(|(o, b)| {
            o.iter_mut()
                .zip(b)
                .for_each(|(o, b)| *o = f32::from_bits((*b as u32) << 16))
        });
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
    /// Where this micro-batch's frozen products are kept, and this projection's site in it
    /// (selective recomputation); `None` computes the product every time.
    pub keep: Option<(Arc<KeptProducts>, u64)>,
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
        match &self.keep {
            Some((kept, site)) => {
                if !kept.take(*site, &mut y)? {
                    self.base_fwd(x, m, k, &mut y)?;
                    // An f32 base keeps its product exact; the others compute in bf16 already.
                    kept.keep(*site, &mut y, !matches!(self.base, LoraBase::F32(_)));
                }
            }
            None => self.base_fwd(x, m, k, &mut y)?,
        }
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
        let views = (f32_view(x)?, f32_view(a)?, f32_view(b)?, f32_view(g)?);
        let (xs, av, bv, gv) = (views.0.get(), views.1.get(), views.2.get(), views.3.get());
        let mask = match self.seed {
            Some(seed) if self.dropout > 0.0 => Some(dropout_mask(seed, self.dropout, m, k)),
            _ => None,
        };
        let dropped: Option<Vec<f32>> = mask.as_ref().map(|mk| xs.iter().zip(mk).map(|(p, q)| p * q).collect());
        let xd = dropped.as_deref().unwrap_or(xs);
        let mut u = vec![0f32; m * r];
        sgemm(m, r, k, (xd, k, 1), (av, 1, k), &mut u, false, 1.0, true);
        // dB = s g^T u; du = s g B; dA = du^T d(x); dx = g W + d(du A).
        let mut db = vec![0f32; n * r];
        sgemm(n, r, m, (gv, 1, n), (&u, r, 1), &mut db, false, self.scale, true);
        let mut du = vec![0f32; m * r];
        sgemm(m, r, n, (gv, n, 1), (bv, r, 1), &mut du, false, self.scale, true);
        let mut da = vec![0f32; r * k];
        sgemm(r, k, m, (&du, 1, r), (xd, k, 1), &mut da, false, 1.0, true);
        let mut dx = vec![0f32; m * k];
        match &mask {
            Some(mk) => {
                let mut dxl = vec![0f32; m * k];
                sgemm(m, k, r, (&du, r, 1), (av, k, 1), &mut dxl, false, 1.0, true);
                self.base_bwd(gv, m, n, &mut dx)?;
                for ((o, l), q) in dx.iter_mut().zip(&dxl).zip(mk) {
                    *o += l * q;
                }
            }
            None => {
                self.base_bwd(gv, m, n, &mut dx)?;
                sgemm(m, k, r, (&du, r, 1), (av, k, 1), &mut dx, true, 1.0, true);
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
    use crate::model::Lora;
    use crate::model::ModuleLora;
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
            keep: None,
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

    #[test]
    fn kept_products_are_read_back_once_and_rounded_under_bf16() -> Result<()> {
        let dev = Device::Cpu;
        let (m, k, n, r) = (20, 16, 12, 4);
        let x = Tensor::randn(0f32, 1., (m, k), &dev)?;
        let a = Tensor::randn(0f32, 0.1, (r, k), &dev)?;
        let b = Tensor::randn(0f32, 0.1, (n, r), &dev)?;
        let w = Tensor::randn(0f32, 0.3, (n, k), &dev)?;
        let op = |base: LoraBase, keep: Option<(Arc<KeptProducts>, u64)>| LoraLinear {
            base,
            scale: 2.0,
            dropout: 0.0,
            seed: None,
            keep,
        };
        let bits = |t: &Tensor| -> Result<Vec<u32>> {
            Ok(t.flatten_all()?.to_vec1::<f32>()?.iter().map(|v| v.to_bits()).collect())
        };

        // f32 base: the kept product is exact, so the first forward is the plain op's.
        let plain = x.apply_op3(&a, &b, op(LoraBase::F32(w.clone()), None))?;
        let kept = Arc::new(KeptProducts::default());
        let first = x.apply_op3(&a, &b, op(LoraBase::F32(w.clone()), Some((kept.clone(), 7))))?;
        assert_eq!(bits(&first)?, bits(&plain)?);
        assert_eq!((kept.len(), kept.bytes()), (1, 4 * m * n));
        // The second forward reads the product back (another weight would give other values)
        // and forgets it.
        let other = (&w * 3.0)?;
        let again = x.apply_op3(&a, &b, op(LoraBase::F32(other.clone()), Some((kept.clone(), 7))))?;
        assert_eq!(bits(&again)?, bits(&first)?);
        assert!(kept.is_empty());
        let third = x.apply_op3(&a, &b, op(LoraBase::F32(other), Some((kept.clone(), 7))))?;
        assert_ne!(
            bits(&third)?,
            bits(&first)?,
            "a new micro-batch computes its product again"
        );

        // bf16 base: the product is kept (and used) rounded to bf16, in half the bytes.
        let kept = Arc::new(KeptProducts::default());
        let wb = w.to_dtype(DType::BF16)?;
        let zero_b = Tensor::zeros((n, r), DType::F32, &dev)?;
        let base = || LoraBase::Compact(Compact::Bf16(wb.clone()));
        let unrounded = x.apply_op3(&a, &zero_b, op(base(), None))?;
        let rounded = x.apply_op3(&a, &zero_b, op(base(), Some((kept.clone(), 1))))?;
        assert_eq!(kept.bytes(), 2 * m * n);
        assert!(
            bits(&rounded)?.iter().all(|v| v & 0xffff == 0),
            "kept product is not bf16"
        );
        let d = (&rounded - &unrounded)?.abs()?.max_all()?.to_scalar::<f32>()?;
        let top = unrounded.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(d > 0.0 && d <= top / 128.0, "rounding error {d} of {top}");
        let replay = x.apply_op3(&a, &zero_b, op(base(), Some((kept.clone(), 1))))?;
        assert_eq!(bits(&replay)?, bits(&rounded)?);

        // A product kept for another shape is an error, not a silent wrong answer.
        let kept = Arc::new(KeptProducts::default());
        x.apply_op3(&a, &b, op(LoraBase::F32(w.clone()), Some((kept.clone(), 3))))?;
        let short = x.narrow(0, 0, 5)?;
        let err = short
            .apply_op3(&a, &b, op(LoraBase::F32(w), Some((kept, 3))))
            .expect_err("a product of another micro-batch must not be read back");
        assert!(err.to_string().contains("one micro-batch"), "{err}");
        Ok(())
    }
}
