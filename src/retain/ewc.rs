//! EWC on the weights that move: `lambda / 2 * sum F * delta^2`.
//!
//! Under LoRA the frozen base never moves; what moves is the effective weight, by
//! `delta = s (B A - B* A*)` where `B* A*` is the adapter at the start of the stage (zero for a
//! fresh adapter, the previous stage's for continual pretraining). Under full fine-tuning
//! `delta = theta - theta*`. The penalty and its gradient are computed one module at a time, so
//! at most one `delta` (and one dense Fisher, when stored factored) exists at once:
//! `G = lambda F * delta`, `dB = s G A^T`, `dA = s B^T G`, `dtheta = G`.

use anyhow::{Context, Result};
use candle_core::{Tensor, Var};

use super::fisher::{Fisher, FisherTensor};
use crate::engine::step::GradAcc;
use crate::model::Model;

enum Target {
    /// The anchor is kept as its factors `(B* [out, r], A* [r, in])` (the adapter's size), not
    /// as the dense `B* A*`, which is as large as the weight itself; `None` when it is zero (a
    /// fresh adapter, or anchored at the base).
    Lora {
        a: Var,
        b: Var,
        anchor: Option<(Tensor, Tensor)>,
        scale: f64,
    },
    Full {
        w: Var,
        w0: Tensor,
    },
}

/// The EWC term of a run, anchored at the weights the run started from.
pub struct Ewc {
    /// Strength.
    pub lambda: f64,
    terms: Vec<(String, FisherTensor, Target)>,
}

impl Ewc {
    /// Anchors EWC at the model's current state: every adapted module (LoRA) or every trained
    /// weight (full) that the Fisher covers. Errors when the Fisher covers none of them.
    pub fn new(model: &Model, fisher: &Fisher, lambda: f64) -> Result<Self> {
        Self::build(model, fisher, lambda, false)
    }

    /// EWC anchored at the base itself (`B* A* = 0`): the penalty a trained adapter would pay,
    /// for calibrating `lambda` from a run without EWC.
    pub fn from_base(model: &Model, fisher: &Fisher, lambda: f64) -> Result<Self> {
        Self::build(model, fisher, lambda, true)
    }

    fn build(model: &Model, fisher: &Fisher, lambda: f64, from_base: bool) -> Result<Self> {
        let mut terms = Vec::new();
        let fits = |name: &str, f: &crate::retain::FisherTensor, want: &[usize]| -> Result<()> {
            if f.shape() != want {
                anyhow::bail!(
                    "the Fisher of `{name}` has shape {:?} but the weight has {want:?}; the Fisher file was estimated for another model",
                    f.shape()
                );
            }
            Ok(())
        };
        for (module, l) in model.loras() {
            let name = format!("{module}.weight");
            if let Some(f) = fisher.tensors.get(&name) {
                let (o, i) = (l.b.as_tensor().dim(0)?, l.a.as_tensor().dim(1)?);
                fits(&name, f, &[o, i])?;
                let zero = from_base || l.b.as_tensor().abs()?.max_all()?.to_scalar::<f32>()? == 0.0;
                // Copies: the variables' storage is updated in place as training runs.
                let anchor = match zero {
                    true => None,
                    false => Some((l.b.as_tensor().copy()?.detach(), l.a.as_tensor().copy()?.detach())),
                };
                terms.push((
                    name,
                    f.clone(),
                    Target::Lora {
                        a: l.a.clone(),
                        b: l.b.clone(),
                        anchor,
                        scale: l.scale,
                    },
                ));
            }
        }
        for (name, w) in model.trainable() {
            if name.contains(".lora_") {
                continue;
            }
            if let Some(f) = fisher.tensors.get(&name) {
                fits(&name, f, w.dims())?;
                let w0 = w.as_tensor().copy()?.detach();
                terms.push((name, f.clone(), Target::Full { w, w0 }));
            }
        }
        if terms.is_empty() {
            anyhow::bail!(
                "the Fisher file covers none of the weights this run trains (it has e.g. `{}`); estimate it for this model and plan",
                fisher.tensors.keys().next().map(String::as_str).unwrap_or("nothing")
            );
        }
        Ok(Self { lambda, terms })
    }

    /// Weights covered.
    pub fn len(&self) -> usize {
        self.terms.len()
    }

    /// True when no weight is covered.
    pub fn is_empty(&self) -> bool {
        self.terms.is_empty()
    }

    /// The penalty; when `acc` is given, adds `grad_scale` times its gradient to it.
    pub fn penalty(&self, mut acc: Option<&mut GradAcc>, grad_scale: f64) -> Result<f64> {
        let mut total = 0.0;
        for (name, f, target) in &self.terms {
            let f = f.dense().with_context(|| name.clone())?;
            // Detached: the gradient is written out here, and a tensor built from `Var`s would
            // carry its graph into the optimizer's moments and keep every step's alive.
            let delta = match target {
                Target::Lora { a, b, anchor, scale } => {
                    let ba = b.as_tensor().detach().matmul(&a.as_tensor().detach())?;
                    let moved = match anchor {
                        Some((b0, a0)) => (ba - b0.matmul(a0)?)?,
                        None => ba,
                    };
                    (moved * *scale)?
                }
                Target::Full { w, w0 } => (w.as_tensor().detach() - w0)?,
            };
            let fd = (&f * &delta)?;
            total += 0.5
                * self.lambda
                * (&fd * &delta)?
                    .sum_all()?
                    .to_dtype(candle_core::DType::F64)?
                    .to_scalar::<f64>()?;
            if let Some(acc) = acc.as_deref_mut() {
                let g = (fd * (self.lambda * grad_scale))?;
                match target {
                    Target::Lora { a, b, scale, .. } => {
                        acc.add(b, &(g.matmul(&a.as_tensor().detach().t()?)? * *scale)?)?;
                        acc.add(a, &(b.as_tensor().detach().t()?.matmul(&g)? * *scale)?)?;
                    }
                    Target::Full { w, .. } => acc.add(w, &g)?,
                }
            }
        }
        Ok(total)
    }
}
