//! Learning-rate schedules: linear warmup, then cosine, linear or constant decay to a floor.

use anyhow::{bail, Result};

/// Shape of the decay after warmup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decay {
    /// Half a cosine from the peak to the floor.
    Cosine,
    /// Straight line from the peak to the floor.
    Linear,
    /// Stay at the peak.
    Constant,
}

crate::parsed_from_str!(Decay);

impl Decay {
    /// Parses `cosine` / `linear` / `constant`.
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "cosine" => Self::Cosine,
            "linear" => Self::Linear,
            "constant" => Self::Constant,
            o => bail!("schedule `{o}` is unknown; choose cosine, linear or constant"),
        })
    }
}

/// A full schedule over `total` optimizer steps.
#[derive(Clone, Copy, Debug)]
pub struct Schedule {
    /// Peak learning rate.
    pub peak: f64,
    /// Steps of linear warmup from 0.
    pub warmup: usize,
    /// Total optimizer steps.
    pub total: usize,
    /// Decay shape.
    pub decay: Decay,
    /// Final rate as a fraction of the peak.
    pub floor: f64,
}

impl Schedule {
    /// Learning rate for optimizer step `step` (0-based).
    pub fn lr(&self, step: usize) -> f64 {
        if step < self.warmup {
            return self.peak * (step + 1) as f64 / self.warmup as f64;
        }
        let span = self.total.saturating_sub(self.warmup).max(1) as f64;
        let p = ((step - self.warmup) as f64 / span).min(1.0);
        let floor = self.peak * self.floor;
        match self.decay {
            Decay::Constant => self.peak,
            Decay::Linear => self.peak + (floor - self.peak) * p,
            Decay::Cosine => floor + (self.peak - floor) * 0.5 * (1.0 + (std::f64::consts::PI * p).cos()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_decay_to_floor() {
        let s = Schedule {
            peak: 1e-3,
            warmup: 10,
            total: 110,
            decay: Decay::Cosine,
            floor: 0.1,
        };
        assert!((s.lr(0) - 1e-4).abs() < 1e-12);
        assert!((s.lr(9) - 1e-3).abs() < 1e-12);
        assert!((s.lr(60) - 0.55e-3).abs() < 1e-9);
        assert!((s.lr(110) - 1e-4).abs() < 1e-12);
        // Unlike a per-step 0.9 decay, the rate is still alive half way.
        assert!(s.lr(50) > 0.5e-3);
        let l = Schedule {
            decay: Decay::Linear,
            ..s
        };
        assert!((l.lr(60) - 0.55e-3).abs() < 1e-9);
        let c = Schedule {
            decay: Decay::Constant,
            ..s
        };
        assert_eq!(c.lr(100), 1e-3);
    }
}
