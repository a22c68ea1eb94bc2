//! AdamW with decoupled weight decay over the trainable parameters.

use anyhow::Result;
use candle_core::{Tensor, Var};
use std::collections::BTreeMap;

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
        }
    }

    /// One update of every parameter in `params` that has a gradient, each at `lr(name)`.
    pub fn step(&mut self, params: &[(String, Var)], grads: &GradAcc, lr: impl Fn(&str) -> f64) -> Result<()> {
        self.t += 1;
        let bc1 = 1.0 - self.beta1.powi(self.t as i32);
        let bc2 = 1.0 - self.beta2.powi(self.t as i32);
        for (name, p) in params {
            let Some(g) = grads.get(p) else { continue };
            let lr = lr(name);
            let (m, v) = match self.moments.remove(name) {
                Some(mv) => mv,
                None => (g.zeros_like()?, g.zeros_like()?),
            };
            let m = ((m * self.beta1)? + (g * (1.0 - self.beta1))?)?;
            let v = ((v * self.beta2)? + (g.sqr()? * (1.0 - self.beta2))?)?;
            let upd = ((&m / bc1)? / ((&v / bc2)?.sqrt()? + self.eps)?)?;
            let mut w = p.as_tensor().clone();
            if self.weight_decay > 0.0 && w.rank() >= 2 {
                w = (w * (1.0 - lr * self.weight_decay))?;
            }
            p.set(&(w - (upd * lr)?)?)?;
            self.moments.insert(name.clone(), (m, v));
        }
        Ok(())
    }

    /// The moments of the parameter called `name` (for tests).
    pub fn moments_of(&self, name: &str) -> Option<&(Tensor, Tensor)> {
        self.moments.get(name)
    }
}
