//! `y = x W^T` for a trained f32 weight under bf16 mixed precision.
//!
//! The weight stays an f32 `Var` (the master copy AdamW updates); the GEMMs read a bf16 copy
//! packed for the AVX512-BF16 kernel ([`TrainPack`]), which the optimizer refreshes after each
//! update. Forward `x W^T`, input gradient `g W` and weight gradient `g^T x` all run through
//! [`bf16_gemm`] with f32 accumulation: operands rounded to bf16, sums in f32, as PyTorch's bf16
//! autocast does on CPUs with AMX/AVX512-BF16. Norms, softmax, the loss and every reduction
//! outside the GEMMs stay f32.
//!
//! The weight's gradient does not travel through candle's graph: the weight-gradient GEMM adds
//! it into the pack's own f32 buffer ([`TrainPack::take_grad`]), summed over every backward
//! until it is taken. candle's backward would instead zero a fresh buffer for each weight and
//! add the gradient into it, on the main thread while the kernels' threads wait, every block of
//! every step. `engine::step::forward_backward` takes these gradients with the graph's.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use std::sync::{Arc, Mutex, RwLock};

use super::bf16_gemm::{self, LinearPack};
use super::frozen_linear::packed_product;
use super::lora_linear::KeptProducts;

/// A trained weight's bf16 working copy, both kernel layouts, refreshed in place from the f32
/// master by [`TrainPack::refresh`].
#[derive(Debug)]
pub struct TrainPack {
    pack: RwLock<LinearPack>,
    /// The weight's gradient `[n, k]` summed by the backwards since it was last taken.
    grad: Mutex<Option<Vec<f32>>>,
}

impl TrainPack {
    /// Packs the current value of `w [n, k]` (f32, CPU); `None` where the kernel cannot run it.
    pub fn new(w: &Tensor) -> Result<Option<Arc<Self>>> {
        if !(bf16_gemm::available() && w.device().is_cpu() && w.rank() == 2) {
            return Ok(None);
        }
        let (n, k) = w.dims2()?;
        let v = super::f32_view(w)?;
        Ok(Some(Arc::new(Self {
            pack: RwLock::new(LinearPack::from_f32(v.get(), n, k)),
            grad: Mutex::new(None),
        })))
    }

    /// The weight's gradient `[n, k]` summed by the backwards through this pack since the last
    /// call (`None` if none ran), leaving nothing behind.
    pub fn take_grad(&self) -> Result<Option<Tensor>> {
        let (n, k) = self.dims()?;
        let g = self.grad_slot()?.take();
        g.map(|g| Tensor::from_vec(g, (n, k), &candle_core::Device::Cpu))
            .transpose()
    }

    /// Adds `g^T x` (`g [m, n]`, `x [m, k]`) into the summed weight gradient.
    fn add_grad(&self, g: &[f32], x: &[f32], m: usize) -> Result<()> {
        let (n, k) = self.dims()?;
        let mut slot = self.grad_slot()?;
        match slot.as_mut() {
            Some(dw) => bf16_gemm::weight_grad(g, x, m, n, k, dw, true),
            None => {
                let mut dw = vec![0f32; n * k];
                bf16_gemm::weight_grad(g, x, m, n, k, &mut dw, false);
                *slot = Some(dw);
            }
        }
        Ok(())
    }

    /// The weight's shape `[n, k]`.
    fn dims(&self) -> Result<(usize, usize)> {
        let p = self.read()?;
        Ok((p.fwd.n, p.bwd.n))
    }

    fn grad_slot(&self) -> Result<std::sync::MutexGuard<'_, Option<Vec<f32>>>> {
        self.grad
            .lock()
            .map_err(|_| candle_core::Error::Msg("train pack gradient poisoned".into()))
    }

    /// Repacks from the master weight's current value (after an optimizer step or a restore).
    pub fn refresh(&self, w: &Tensor) -> Result<()> {
        let v = super::f32_view(w)?;
        let mut p = self
            .pack
            .write()
            .map_err(|_| candle_core::Error::Msg("train pack poisoned".into()))?;
        if v.get().len() != p.fwd.n * p.bwd.n {
            candle_core::bail!(
                "train pack: the weight has {} values, the pack {}",
                v.get().len(),
                p.fwd.n * p.bwd.n
            );
        }
        p.refresh_f32(v.get());
        Ok(())
    }

    /// Bytes held by both layouts.
    pub fn bytes(&self) -> usize {
        self.pack.read().map(|p| p.bytes()).unwrap_or(0)
    }

    /// The packed copy, for reading (the trained head's logits and gradients).
    pub fn read(&self) -> Result<std::sync::RwLockReadGuard<'_, LinearPack>> {
        self.pack
            .read()
            .map_err(|_| candle_core::Error::Msg("train pack poisoned".into()))
    }
}

/// `x [m, k] @ w [n, k]^T` for a trained f32 `w` through its bf16 pack (`w` is the pack's
/// master; only its shape is read). The backward gives `dx` to the graph and adds `dw` into the
/// pack ([`TrainPack::take_grad`]), not to `w`'s `Var`. With `keep` (selective recomputation),
/// the first forward of a micro-batch keeps its product (rounded to bf16, in its own output
/// too, so both forwards agree bit for bit) and the recomputed forward reads it back instead of
/// running the GEMM again.
pub fn trained_linear(
    x: &Tensor,
    w: &Tensor,
    pack: &Arc<TrainPack>,
    keep: Option<(Arc<KeptProducts>, u64)>,
) -> Result<Tensor> {
    let x = if x.is_contiguous() { x.clone() } else { x.contiguous()? };
    // `w` stays an input so that candle records the op whenever the weight is trained (its
    // input may come from frozen layers); its gradient is the pack's, not the graph's.
    x.apply_op2(
        w,
        TrainedMatmul {
            pack: pack.clone(),
            keep,
        },
    )
}

struct TrainedMatmul {
    pack: Arc<TrainPack>,
    keep: Option<(Arc<KeptProducts>, u64)>,
}

impl CustomOp2 for TrainedMatmul {
    fn name(&self) -> &'static str {
        "trained-bf16-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout, _w: &CpuStorage, wl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (m, k) = l.shape().dims2()?;
        let p = self.pack.read()?;
        if wl.shape().dims2()? != (p.fwd.n, k) || k.div_ceil(2) != p.fwd.kp {
            candle_core::bail!(
                "trained linear: input has {k} features, the weight is {:?} and its pack [{}, {}]",
                wl.shape().dims(),
                p.fwd.n,
                2 * p.fwd.kp
            );
        }
        let x = super::cpu_f32(s, l, "trained linear")?;
        let mut y = vec![0f32; m * p.fwd.n];
        let kept = match &self.keep {
            Some((kept, site)) => kept.take(*site, &mut y)?,
            None => false,
        };
        if !kept {
            bf16_gemm::gemm(&bf16_gemm::pack_a(x, m, k), m, &p.fwd, &mut y);
            if let Some((kept, site)) = &self.keep {
                kept.keep(*site, &mut y, true);
            }
        }
        Ok((CpuStorage::F32(y), Shape::from((m, p.fwd.n))))
    }

    fn bwd(&self, x: &Tensor, _w: &Tensor, _y: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = if g.is_contiguous() { g.clone() } else { g.contiguous()? };
        let dx = g.apply_op1_no_bwd(&InputGrad {
            pack: self.pack.clone(),
        })?;
        let (m, _) = x.dims2()?;
        let (gv, xv) = (super::f32_view(&g)?, super::f32_view(x)?);
        self.pack.add_grad(gv.get(), xv.get(), m)?;
        Ok((Some(dx), None))
    }
}

/// `g [m, n] @ W [n, k]` through the pack's backward layout.
struct InputGrad {
    pack: Arc<TrainPack>,
}

impl CustomOp1 for InputGrad {
    fn name(&self) -> &'static str {
        "trained-bf16-linear-dx"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        packed_product(s, l, &self.pack.read()?.bwd, "trained linear backward")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    fn max_rel(a: &Tensor, b: &Tensor) -> Result<f32> {
        let d = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
        Ok(d / b.abs()?.max_all()?.to_scalar::<f32>()?.max(1e-12))
    }

    /// Forward, `dx` and `dw` against candle's f32 matmul and its autograd on the same values
    /// (bf16-exact inputs, so the only difference is the order of f32 sums), then against the
    /// f32 path on arbitrary values within bf16's rounding; and a refresh is seen by the next
    /// forward.
    #[test]
    fn forward_and_both_gradients_match_the_f32_autograd() -> Result<()> {
        if !bf16_gemm::available() {
            eprintln!("skipping: this CPU has no AVX512-BF16");
            return Ok(());
        }
        let dev = Device::Cpu;
        let round = |t: Tensor| -> Result<Tensor> { t.to_dtype(DType::BF16)?.to_dtype(DType::F32) };
        for exact in [true, false] {
            let (m, k, n) = (37, 29, 50);
            let mk = |s: (usize, usize)| -> Result<Tensor> {
                let t = Tensor::randn(0f32, 1., s, &dev)?;
                if exact {
                    round(t)
                } else {
                    Ok(t)
                }
            };
            let x = Var::from_tensor(&mk((m, k))?)?;
            let w = Var::from_tensor(&mk((n, k))?)?;
            let probe = mk((m, n))?;
            let pack = TrainPack::new(w.as_tensor())?.expect("kernel available");
            let y = trained_linear(x.as_tensor(), w.as_tensor(), &pack, None)?;
            let y_ref = x.as_tensor().matmul(&w.as_tensor().t()?)?;
            let g = (&y * &probe)?.sum_all()?.backward()?;
            let g_ref = (&y_ref * &probe)?.sum_all()?.backward()?;
            let tol = if exact { 1e-5 } else { 2e-2 };
            assert!(max_rel(&y, &y_ref)? < tol, "forward (exact {exact})");
            // The weight's gradient goes to the pack, not to the graph.
            assert!(g.get(w.as_tensor()).is_none());
            let dw = pack.take_grad()?.expect("a backward ran");
            assert!(pack.take_grad()?.is_none(), "taking the gradient leaves none behind");
            let pairs = [
                (g.get(x.as_tensor()).unwrap().clone(), g_ref.get(x.as_tensor()).unwrap()),
                (dw, g_ref.get(w.as_tensor()).unwrap()),
            ];
            for (a, b) in &pairs {
                assert!(max_rel(a, b)? < tol, "gradient (exact {exact}): {}", max_rel(a, b)?);
            }
            // Two backwards before a take are summed.
            for _ in 0..2 {
                let y = trained_linear(x.as_tensor(), w.as_tensor(), &pack, None)?;
                (&y * &probe)?.sum_all()?.backward()?;
            }
            let twice = pack.take_grad()?.unwrap();
            let want = (g_ref.get(w.as_tensor()).unwrap() * 2.0)?;
            assert!(max_rel(&twice, &want)? < tol, "summed gradient (exact {exact})");
        }
        // A refreshed pack is what the next forward reads.
        let x = Tensor::randn(0f32, 1., (4, 6), &dev)?;
        let w = Var::from_tensor(&Tensor::zeros((3, 6), DType::F32, &dev)?)?;
        let pack = TrainPack::new(w.as_tensor())?.unwrap();
        w.set(&round(Tensor::randn(0f32, 1., (3, 6), &dev)?)?)?;
        pack.refresh(w.as_tensor())?;
        let y = trained_linear(&round(x)?, w.as_tensor(), &pack, None)?;
        assert!(y.abs()?.max_all()?.to_scalar::<f32>()? > 0.0);
        Ok(())
    }

    /// The weight gradient against central finite differences of the op's own forward, in a
    /// direction the bf16 rounding cannot hide (f64 sums of bf16-exact values).
    #[test]
    fn weight_gradient_matches_finite_differences() -> Result<()> {
        if !bf16_gemm::available() {
            return Ok(());
        }
        let dev = Device::Cpu;
        let r = |s: (usize, usize)| -> Result<Tensor> {
            Tensor::randn(0f32, 1., s, &dev)?
                .to_dtype(DType::BF16)?
                .to_dtype(DType::F32)
        };
        let (x, w0, probe) = (r((9, 8))?, r((5, 8))?, r((9, 5))?);
        let w = Var::from_tensor(&w0)?;
        let pack = TrainPack::new(w.as_tensor())?.unwrap();
        (trained_linear(&x, w.as_tensor(), &pack, None)? * &probe)?
            .sum_all()?
            .backward()?;
        let dw: Vec<f32> = pack.take_grad()?.unwrap().flatten_all()?.to_vec1()?;
        let loss = |wv: &Tensor| -> Result<f64> {
            let p = TrainPack::new(wv)?.unwrap();
            (trained_linear(&x, wv, &p, None)? * &probe)?
                .sum_all()?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()
        };
        // The loss is linear in each entry: setting it to +1 and -1 (both bf16-exact) gives
        // the derivative exactly, up to f32 sums.
        for idx in [0usize, 7, 13, 39] {
            let mut v: Vec<f32> = w0.flatten_all()?.to_vec1()?;
            v[idx] = 1.0;
            let up = loss(&Tensor::from_vec(v.clone(), (5, 8), &dev)?)?;
            v[idx] = -1.0;
            let down = loss(&Tensor::from_vec(v, (5, 8), &dev)?)?;
            let fd = (up - down) / 2.0;
            assert!(
                (fd - dw[idx] as f64).abs() < 1e-3 * (1.0 + fd.abs()),
                "entry {idx}: {fd} vs {}",
                dw[idx]
            );
        }
        Ok(())
    }
}
