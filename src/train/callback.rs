//! The trainer's callback API and the built-in callbacks: the data-mix schedule and the memory
//! monitor. A callback sees the run's [`Control`] at the begin and end of the run, of each
//! epoch (one pass over the domain rows) and of each step, and may change the data mix, the
//! learning rates of the step about to run, the micro-batch, or stop the run. Its state goes
//! into checkpoints, so a resumed run continues exactly.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;

/// What callbacks read and may change.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Control {
    /// Optimizer steps completed.
    pub step: usize,
    /// Optimizer steps planned.
    pub total_steps: usize,
    /// Relative weight of each data source for the next step's rows (`[share, 1 - share]`
    /// for the domain/general pair; one entry for a single source).
    #[serde(default)]
    pub weights: Vec<f64>,
    /// Earlier versions' checkpoints kept the pair's domain share here; read into `weights`.
    #[serde(default, rename = "domain_share", skip_serializing)]
    pub legacy_domain_share: Option<f64>,
    /// Rows per forward/backward; always divides `effective_batch`.
    pub micro_batch: usize,
    /// Rows per optimizer step (fixed for the run: the loss curve depends on it).
    pub effective_batch: usize,
    /// Learning rate per parameter group for the step about to run (set from the schedules
    /// just before `on_step_begin`; a callback may scale or replace them).
    pub lr: BTreeMap<crate::train::recipe::Group, f64>,
    /// Set to end the run after this step (a checkpoint and the outputs are still written).
    pub stop: bool,
}

impl Control {
    /// Fraction of the run done, in [0, 1].
    pub fn progress(&self) -> f64 {
        self.step as f64 / self.total_steps.max(1) as f64
    }

    /// Sets the micro-batch to the largest divisor of the effective batch that is at most `m`
    /// (at least 1), so gradient accumulation keeps the effective batch.
    pub fn set_micro_batch(&mut self, m: usize) {
        let m = m.clamp(1, self.effective_batch);
        self.micro_batch = (1..=m)
            .rev()
            .find(|d| self.effective_batch.is_multiple_of(*d))
            .unwrap_or(1);
    }
}

/// What a finished step reports to `on_step_end`.
#[derive(Clone, Debug, Default)]
pub struct StepReport {
    /// Mean loss over the step's target tokens (NaN or inf when the step was skipped).
    pub loss: f64,
    /// Whether the update was skipped (non-finite loss or gradient).
    pub skipped: bool,
    /// Extra fields a callback wants in this step's metrics line.
    pub log: serde_json::Map<String, Value>,
}

/// A trainer callback; every hook defaults to doing nothing.
pub trait Callback {
    /// A short name (metrics and checkpoints key its state by it).
    fn name(&self) -> &str;
    /// Before the first step (also on resume, after its state is restored).
    fn on_run_begin(&mut self, _c: &mut Control) -> Result<()> {
        Ok(())
    }
    /// When a pass over the domain rows begins.
    fn on_epoch_begin(&mut self, _c: &mut Control, _epoch: u64) -> Result<()> {
        Ok(())
    }
    /// When a pass over the domain rows ends.
    fn on_epoch_end(&mut self, _c: &mut Control, _epoch: u64) -> Result<()> {
        Ok(())
    }
    /// Before a step draws its rows.
    fn on_step_begin(&mut self, _c: &mut Control) -> Result<()> {
        Ok(())
    }
    /// After a step (updated or skipped); may add fields to its metrics line.
    fn on_step_end(&mut self, _c: &mut Control, _r: &mut StepReport) -> Result<()> {
        Ok(())
    }
    /// After the last step.
    fn on_run_end(&mut self, _c: &mut Control) -> Result<()> {
        Ok(())
    }
    /// State to keep in checkpoints.
    fn state(&self) -> Value {
        Value::Null
    }
    /// Restores [`Callback::state`].
    fn restore(&mut self, _state: &Value) -> Result<()> {
        Ok(())
    }
}

/// How the mix's weights move from their start to their end over the run.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum MixShape {
    /// Straight line.
    Linear,
    /// Half a cosine: slow at both ends.
    Cosine,
    /// `start` for the first half of the run, `end` after.
    Step,
}

crate::parsed_from_str!(MixShape);

impl MixShape {
    /// Parses `linear`, `cosine` or `step`.
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "linear" => Self::Linear,
            "cosine" => Self::Cosine,
            "step" => Self::Step,
            _ => bail!("mix schedule `{s}`: expected linear, cosine or step"),
        })
    }
}

/// The data-mix schedule: each source's weight as a function of progress (the brief's domain
/// share 0.9 -> 0.7 is the pair's weights [0.9, 0.1] -> [0.7, 0.3]).
pub struct MixSchedule {
    /// Weights at the start.
    pub start: Vec<f64>,
    /// Weights at the end.
    pub end: Vec<f64>,
    /// Path between them.
    pub shape: MixShape,
}

impl MixSchedule {
    /// The weights at progress `p` in [0, 1].
    pub fn weights(&self, p: f64) -> Vec<f64> {
        let p = p.clamp(0.0, 1.0);
        let f = match self.shape {
            MixShape::Linear => p,
            MixShape::Cosine => 0.5 * (1.0 - (std::f64::consts::PI * p).cos()),
            MixShape::Step => f64::from(u8::from(p >= 0.5)),
        };
        self.start.iter().zip(&self.end).map(|(s, e)| s + (e - s) * f).collect()
    }
}

impl Callback for MixSchedule {
    fn name(&self) -> &str {
        "mix_schedule"
    }
    fn on_step_begin(&mut self, c: &mut Control) -> Result<()> {
        c.weights = self.weights(c.progress());
        Ok(())
    }
}

/// Memory in use and memory still available where the model lives.
pub trait MemoryProbe {
    /// (bytes this run holds now, bytes that could still be given to it), or `None` when the
    /// source cannot be read (the monitor then leaves the micro-batch alone).
    fn read(&self) -> Option<(u64, u64)>;
    /// The metrics key the bytes in use are logged under.
    fn key(&self) -> &'static str {
        "rss"
    }
}

/// Linux `/proc`: current RSS from `/proc/self/statm`, `MemAvailable` from `/proc/meminfo`.
pub struct ProcMemory;

impl MemoryProbe for ProcMemory {
    fn read(&self) -> Option<(u64, u64)> {
        Some((crate::util::current_rss(), crate::util::mem_available()))
    }
}

/// A CUDA device: what candle's pool holds now and what the device has free (the brief's
/// monitor reads device memory).
pub struct DeviceMemory(pub candle_core::Device);

impl MemoryProbe for DeviceMemory {
    fn read(&self) -> Option<(u64, u64)> {
        crate::util::device_memory(&self.0)
    }
    fn key(&self) -> &'static str {
        "device_used"
    }
}

/// The probe for memory where `dev` holds the model: the process on the CPU, the pool on a GPU.
pub fn probe_for(dev: &candle_core::Device) -> Box<dyn MemoryProbe> {
    match dev.is_cpu() {
        true => Box::new(ProcMemory),
        false => Box::new(DeviceMemory(dev.clone())),
    }
}

/// Halves the micro-batch when memory passes the high-water mark, doubles it back when it falls
/// under the low mark (after a quiet spell, so it does not oscillate), within
/// [1, effective batch]. Gradient accumulation keeps the effective batch, so the loss curve does
/// not change.
pub struct MemoryMonitor {
    /// Bytes the run may use (0: what it holds plus what is still available at start: the
    /// process and the machine on the CPU, candle's pool and the device on a GPU).
    pub budget: u64,
    /// Shrink above this fraction of the budget.
    pub high: f64,
    /// Grow below this fraction of the budget.
    pub low: f64,
    /// Steps to wait after a change before growing again.
    pub patience: usize,
    /// The memory source.
    pub probe: Box<dyn MemoryProbe>,
    quiet: usize,
}

impl MemoryMonitor {
    /// A monitor with the defaults of the issue (85% / 60% of the budget).
    pub fn new(budget: u64, probe: Box<dyn MemoryProbe>) -> Self {
        Self {
            budget,
            high: 0.85,
            low: 0.60,
            patience: 5,
            probe,
            quiet: 0,
        }
    }
}

impl Callback for MemoryMonitor {
    fn name(&self) -> &str {
        "memory_monitor"
    }
    fn on_run_begin(&mut self, _c: &mut Control) -> Result<()> {
        if self.budget == 0 {
            match self.probe.read() {
                Some((used, avail)) => self.budget = used + avail,
                None => eprintln!("memory monitor: memory cannot be read here; the micro-batch stays as set"),
            }
        }
        Ok(())
    }
    fn on_step_end(&mut self, c: &mut Control, r: &mut StepReport) -> Result<()> {
        let Some((rss, avail)) = self.probe.read() else {
            return Ok(());
        };
        let frac = rss as f64 / self.budget.max(1) as f64;
        let before = c.micro_batch;
        self.quiet += 1;
        if frac > self.high || avail < self.budget / 20 {
            c.set_micro_batch(c.micro_batch / 2);
        } else if frac < self.low && self.quiet > self.patience && c.micro_batch < c.effective_batch {
            c.set_micro_batch(c.micro_batch * 2);
        }
        if c.micro_batch != before {
            self.quiet = 0;
        }
        r.log.insert(self.probe.key().into(), rss.into());
        r.log.insert("mem_available".into(), avail.into());
        r.log.insert("memory_budget".into(), self.budget.into());
        Ok(())
    }
    fn state(&self) -> Value {
        serde_json::json!({"budget": self.budget, "quiet": self.quiet})
    }
    fn restore(&mut self, s: &Value) -> Result<()> {
        self.budget = s["budget"].as_u64().unwrap_or(self.budget);
        self.quiet = s["quiet"].as_u64().unwrap_or(0) as usize;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    fn control() -> Control {
        Control {
            step: 0,
            total_steps: 10,
            weights: vec![1.0],
            legacy_domain_share: None,
            micro_batch: 8,
            effective_batch: 8,
            lr: BTreeMap::new(),
            stop: false,
        }
    }

    #[test]
    fn mix_shapes_run_from_start_to_end() -> Result<()> {
        for shape in ["linear", "cosine", "step"] {
            let m = MixSchedule {
                start: vec![0.9, 0.1, 2.0],
                end: vec![0.7, 0.3, 2.0],
                shape: MixShape::parse(shape)?,
            };
            let (a, b, mid) = (m.weights(0.0), m.weights(1.0), m.weights(0.3));
            assert!((a[0] - 0.9).abs() < 1e-12 && (b[0] - 0.7).abs() < 1e-12 && (b[1] - 0.3).abs() < 1e-12);
            assert!(mid[0] <= 0.9 && mid[0] >= 0.7 && mid[2] == 2.0);
        }
        let lin = MixSchedule {
            start: vec![0.9, 0.1],
            end: vec![0.7, 0.3],
            shape: MixShape::Linear,
        };
        assert!((lin.weights(0.5)[0] - 0.8).abs() < 1e-12);
        assert!(MixShape::parse("wavy").is_err());
        Ok(())
    }

    struct Fake(Arc<Mutex<(u64, u64)>>);
    impl MemoryProbe for Fake {
        fn read(&self) -> Option<(u64, u64)> {
            Some(*self.0.lock().unwrap())
        }
    }

    struct Unreadable;
    impl MemoryProbe for Unreadable {
        fn read(&self) -> Option<(u64, u64)> {
            None
        }
    }

    /// Where memory cannot be read (a device whose driver does not say), the monitor changes
    /// nothing and logs nothing, rather than acting on a made-up reading.
    #[test]
    fn memory_monitor_without_readings_leaves_the_batch_alone() -> Result<()> {
        let mut m = MemoryMonitor::new(0, Box::new(Unreadable));
        let mut c = control();
        let mut r = StepReport::default();
        m.on_run_begin(&mut c)?;
        for _ in 0..10 {
            m.on_step_end(&mut c, &mut r)?;
        }
        assert_eq!(c.micro_batch, control().micro_batch);
        assert!(r.log.is_empty(), "{:?}", r.log);
        Ok(())
    }

    #[test]
    fn memory_monitor_halves_and_regrows_within_divisors() -> Result<()> {
        let mem = Arc::new(Mutex::new((90, 10)));
        let mut m = MemoryMonitor::new(100, Box::new(Fake(mem.clone())));
        let mut c = control();
        let mut r = StepReport::default();
        m.on_run_begin(&mut c)?;
        m.on_step_end(&mut c, &mut r)?;
        assert_eq!(c.micro_batch, 4);
        m.on_step_end(&mut c, &mut r)?;
        assert_eq!(c.micro_batch, 2);
        *mem.lock().unwrap() = (50, 50);
        for _ in 0..5 {
            m.on_step_end(&mut c, &mut r)?;
            assert_eq!(c.micro_batch, 2, "waits out its patience");
        }
        m.on_step_end(&mut c, &mut r)?;
        assert_eq!(c.micro_batch, 4);
        assert_eq!(r.log["rss"], 50);
        // Micro-batches always divide the effective batch.
        let mut c6 = Control {
            effective_batch: 6,
            micro_batch: 6,
            ..control()
        };
        c6.set_micro_batch(4);
        assert_eq!(c6.micro_batch, 3);
        c6.set_micro_batch(0);
        assert_eq!(c6.micro_batch, 1);
        Ok(())
    }
}
