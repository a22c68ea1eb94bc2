//! AdamW with decoupled weight decay over the trainable parameters.

use anyhow::Result;
use candle_core::{DType, Tensor, Var};
use rayon::prelude::*;
use std::collections::BTreeMap;

use super::adam8::{self, Q8Moments};
use super::step::GradAcc;

/// AdamW (Loshchilov & Hutter): `p -= lr * (m_hat / (sqrt(v_hat) + eps) + wd * p)`. Weight decay
/// applies to matrices only (not to biases and norm weights), as in the Hugging Face Trainer.
pub struct AdamW {
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Denominator epsilon.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// Updates taken so far.
    pub t: u64,
    /// First and second moments by parameter name (names make them checkpointable).
    pub moments: BTreeMap<String, (Tensor, Tensor)>,
    /// Keep the moments of tensors of [`adam8::MIN_8BIT`] values or more in 8 bits
    /// (`train.optimizer = "adamw8bit"`).
    pub eight_bit: bool,
    /// The 8-bit moments by parameter name (the others stay in `moments`).
    pub q8: BTreeMap<String, Q8Moments>,
}

impl AdamW {
    /// A fresh optimizer.
    pub fn new(weight_decay: f64) -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
            t: 0,
            moments: BTreeMap::new(),
            eight_bit: false,
            q8: BTreeMap::new(),
        }
    }

    /// A fresh optimizer with 8-bit moments (bitsandbytes' `AdamW8bit`).
    pub fn eight_bit(weight_decay: f64) -> Self {
        Self {
            eight_bit: true,
            ..Self::new(weight_decay)
        }
    }

    /// Whether the moments of `p` are kept in 8 bits.
    fn quantizes(&self, p: &Var) -> bool {
        let t = p.as_tensor();
        self.eight_bit
            && t.elem_count() >= adam8::MIN_8BIT
            && t.device().is_cpu()
            && t.dtype() == DType::F32
            && t.is_contiguous()
    }

    /// One update of every parameter in `params` that has a gradient, the `i`th at `lr(i)`.
    pub fn step(&mut self, params: &[(String, Var)], grads: &GradAcc, lr: impl Fn(usize) -> f64) -> Result<()> {
        self.t += 1;
        for (i, (name, p)) in params.iter().enumerate() {
            let Some(g) = grads.unscaled(p) else { continue };
            let mut h = self.hyper(lr(i), p.as_tensor().rank() >= 2);
            h.gscale = grads.factor();
            if self.quantizes(p) {
                let q = self
                    .q8
                    .entry(name.clone())
                    .or_insert_with(|| Q8Moments::zeros(p.as_tensor().elem_count()));
                update_8bit_in_place(p.as_tensor(), g, q, &h)?;
                continue;
            }
            let (m, v) = match self.moments.remove(name) {
                Some(mv) => mv,
                None => (g.zeros_like()?, g.zeros_like()?),
            };
            let w = p.as_tensor();
            let in_place = [w, g, &m, &v]
                .iter()
                .all(|t| t.device().is_cpu() && t.dtype() == DType::F32 && t.shape() == w.shape())
                && [w, &m, &v].iter().all(|t| t.is_contiguous());
            let (m, v) = if in_place {
                update_in_place(w, g, &m, &v, &h)?;
                (m, v)
            } else {
                let (w, m, v) = composed_update(w, g, &m, &v, &h)?;
                p.set(&w)?;
                (m, v)
            };
            self.moments.insert(name.clone(), (m, v));
        }
        Ok(())
    }

    /// This update's constants for a parameter at `lr` (decayed when `matrix`).
    fn hyper(&self, lr: f64, matrix: bool) -> Hyper {
        Hyper {
            beta1: self.beta1,
            beta2: self.beta2,
            bc1: 1.0 - self.beta1.powi(self.t as i32),
            bc2: 1.0 - self.beta2.powi(self.t as i32),
            eps: self.eps,
            lr,
            decay: if self.weight_decay > 0.0 && matrix {
                1.0 - lr * self.weight_decay
            } else {
                1.0
            },
            gscale: 1.0,
        }
    }

    /// The moments of the parameter called `name` (for tests).
    pub fn moments_of(&self, name: &str) -> Option<&(Tensor, Tensor)> {
        self.moments.get(name)
    }
}

/// One update's constants.
struct Hyper {
    beta1: f64,
    beta2: f64,
    /// Bias corrections `1 - beta^t`.
    bc1: f64,
    bc2: f64,
    eps: f64,
    lr: f64,
    /// `1 - lr * weight_decay` for matrices, 1 otherwise.
    decay: f64,
    /// The gradients' pending factor (clipping), applied as they are read.
    gscale: f64,
}

/// Values of a parameter the 8-bit update computes at once ([`update_8bit_in_place`]): its
/// working set (the new values of a slice of `w`) is 4 MiB whatever the parameter's size. A
/// multiple of the 8-bit moments' block.
pub const UPDATE_SLICE: usize = 1 << 20;
const _: () = assert!(UPDATE_SLICE.is_multiple_of(adam8::BLOCK));

/// AdamW written into `w`, `m` and `v` themselves in one parallel pass that reads each value
/// once: no new tensor, no copy back (a full fine-tuning step updates 134 M values, and
/// allocating, filling and copying three new sets of them cost more than the update). The
/// three must be contiguous f32 CPU tensors that nothing else reads during the step (the
/// parameter's `Var` and the optimizer's own moments).
fn update_in_place(w: &Tensor, g: &Tensor, m: &Tensor, v: &Tensor, h: &Hyper) -> Result<()> {
    use crate::ops::{f32_view, with_f32_mut};
    let gv = f32_view(g)?;
    let gs = gv.get();
    with_f32_mut(w, |ws| {
        with_f32_mut(m, |ms| {
            with_f32_mut(v, |vs| {
                if ws.len() != gs.len() || ms.len() != gs.len() || vs.len() != gs.len() {
                    candle_core::bail!(
                        "AdamW: a parameter of {} values has a gradient of {}",
                        ws.len(),
                        gs.len()
                    );
                }
                adam_slices(ws, gs, ms, vs, h);
                Ok(())
            })
        })
    })?;
    Ok(())
}

/// AdamW with 8-bit moments: the new values of a slice of `w` computed (the
/// slice's blocks of codes updated in place), then written back.
fn update_8bit_in_place(w: &Tensor, g: &Tensor, q: &mut Q8Moments, h: &Hyper) -> Result<()> {
    use crate::ops::f32_view;
    let n = w.elem_count();
    if q.len() != n || g.elem_count() != n {
        anyhow::bail!("8-bit AdamW: moments for {} values, the parameter has {n}", q.len());
    }
    let (wf, gf) = (w.flatten_all()?, g.flatten_all()?);
    let consts = (
        (h.beta1 as f32, h.beta2 as f32, h.eps as f32),
        ((1.0 / h.bc1) as f32, (1.0 / h.bc2) as f32),
        (h.lr as f32, h.decay as f32, h.gscale as f32),
    );
    let mut out = vec![0f32; UPDATE_SLICE.min(n)];
    let mut at = 0;
    while at < n {
        let len = UPDATE_SLICE.min(n - at);
        {
            let (wp, gp) = (wf.narrow(0, at, len)?, gf.narrow(0, at, len)?);
            let (wv, gv) = (f32_view(&wp)?, f32_view(&gp)?);
            adam8::update_slice(wv.get(), gv.get(), q, at, &mut out[..len], consts.0, consts.1, consts.2);
        }
        wf.slice_set(&Tensor::from_slice(&out[..len], len, w.device())?, 0, at)?;
        at += len;
    }
    Ok(())
}

/// The update over borrowed values, in parallel chunks: `m`, `v` and `w` rewritten in place.
fn adam_slices(ws: &mut [f32], gs: &[f32], ms: &mut [f32], vs: &mut [f32], h: &Hyper) {
    let (b1, b2, eps) = (h.beta1 as f32, h.beta2 as f32, h.eps as f32);
    let (ib1, ib2) = ((1.0 / h.bc1) as f32, (1.0 / h.bc2) as f32);
    let (lr, decay, gscale) = (h.lr as f32, h.decay as f32, h.gscale as f32);
    const CHUNK: usize = 1 << 14;
    ws.par_chunks_mut(CHUNK)
        .zip(ms.par_chunks_mut(CHUNK))
        .zip(vs.par_chunks_mut(CHUNK))
        .zip(gs.par_chunks(CHUNK))
        .for_each(|(((wc, mc), vc), gc)| {
            for i in 0..wc.len() {
                let gi = gc[i] * gscale;
                let mi = b1 * mc[i] + (1.0 - b1) * gi;
                let vi = b2 * vc[i] + (1.0 - b2) * gi * gi;
                let upd = (mi * ib1) / ((vi * ib2).sqrt() + eps);
                wc[i] = wc[i] * decay - lr * upd;
                mc[i] = mi;
                vc[i] = vi;
            }
        });
}

/// The same update in tensor ops, for parameters off the CPU or not in f32.
fn composed_update(w: &Tensor, g: &Tensor, m: &Tensor, v: &Tensor, h: &Hyper) -> Result<(Tensor, Tensor, Tensor)> {
    let g = &(g * h.gscale)?;
    let m = ((m * h.beta1)? + (g * (1.0 - h.beta1))?)?;
    let v = ((v * h.beta2)? + (g.sqr()? * (1.0 - h.beta2))?)?;
    let upd = ((&m / h.bc1)? / ((&v / h.bc2)?.sqrt()? + h.eps)?)?;
    let w = ((w * h.decay)? - (upd * h.lr)?)?;
    Ok((w, m, v))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The in-place pass and the tensor-op update agree over several steps, for a matrix
    /// (decayed) and a vector (not decayed), and the pass writes into the parameter and moments
    /// themselves (and so into every handle on them, the `Var`'s included).
    #[test]
    fn in_place_update_matches_the_tensor_ops() -> Result<()> {
        let dev = Device::Cpu;
        for shape in [vec![37, 53], vec![1000]] {
            let (wf, mf, vf) = (
                Tensor::randn(0f32, 1.0, shape.as_slice(), &dev)?,
                Tensor::zeros(shape.as_slice(), DType::F32, &dev)?,
                Tensor::zeros(shape.as_slice(), DType::F32, &dev)?,
            );
            let (mut wc, mut mc, mut vc) = (wf.copy()?, mf.copy()?, vf.copy()?);
            let w0 = wf.copy()?;
            let handle = wf.clone();
            let mut opt = AdamW::new(0.1);
            for t in 1..=5 {
                opt.t = t;
                let g = Tensor::randn(0f32, 0.5, shape.as_slice(), &dev)?;
                let h = opt.hyper(1e-2, shape.len() >= 2);
                update_in_place(&wf, &g, &mf, &vf, &h)?;
                (wc, mc, vc) = composed_update(&wc, &g, &mc, &vc, &h)?;
            }
            for (a, b) in [(&wf, &wc), (&mf, &mc), (&vf, &vc)] {
                let d = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
                let s = b.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(d <= 1e-4 * s, "{shape:?}: differs by {d} (scale {s})");
            }
            let moved = (&handle - &w0)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(moved > 1e-3, "{shape:?}: the update did not move the weights");
        }
        Ok(())
    }
}
