//! Phase five: the scores after training, the adapter (or the whole model) written, the run's
//! report and summary.

use anyhow::Result;
use candle_core::DType;
use serde::Serialize;
use serde_json::json;
use std::path::PathBuf;

use super::evaluate::report;
use super::prepare::Run;
use crate::adapter::{merge, peft};
use crate::eval::TextMetrics;
use crate::util::{device_peak, human_bytes, peak_rss};

/// What a finished run reports (also written as `summary.json`).
#[derive(Debug, Serialize)]
pub struct RunSummary {
    /// Optimizer steps taken.
    pub steps: usize,
    /// Tokens trained on (with a target).
    pub tokens: usize,
    /// Held-out metrics before training.
    pub eval_before: TextMetrics,
    /// Held-out metrics after training.
    pub eval_after: TextMetrics,
    /// General held-out metrics before and after (`data.general_eval`).
    pub general_before: Option<TextMetrics>,
    /// See `general_before`.
    pub general_after: Option<TextMetrics>,
    /// Fraction of trained rows that were domain rows.
    pub domain_share: f64,
    /// Trained tokens per second over the loop.
    pub tokens_per_second: f64,
    /// Where the model trained (`train.device`).
    pub device: String,
    /// The recomputation it trained with (`auto` resolved).
    pub recompute: String,
    /// Peak resident set of the process, bytes.
    pub peak_rss_bytes: u64,
    /// Peak device memory (candle's CUDA pool) of a run on a GPU, bytes.
    pub peak_device_bytes: Option<u64>,
    /// The peak predicted before the run, by part (`train::memory`), with its total; null on
    /// a GPU, which the plan does not model.
    pub predicted_memory: serde_json::Value,
    /// Wall time of the loop, seconds.
    pub train_seconds: f64,
    /// Trainable parameters.
    pub trainable_params: usize,
    /// Where the adapter or model was written.
    pub output: PathBuf,
}

impl Run<'_> {
    /// Ends the run: callbacks, the scores after, the outputs, the report and the summary.
    pub fn finish(mut self) -> Result<RunSummary> {
        for cb in self.callbacks.iter_mut() {
            cb.on_run_end(&mut self.ctl)?;
        }
        self.progress.finish();
        let train_seconds = self.clock.start.elapsed().as_secs_f64();
        let (eval_after, general_after) = self.evaluate()?;
        self.emit(json!({"step": self.st.step, "eval": eval_after, "eval_general": general_after}))?;
        report("after", &eval_after, general_after.as_ref());
        let t = &self.recipe.train;
        // Rank 0 of a data-parallel job writes the outputs; every rank returns the summary.
        let comm = self.comm.as_ref();
        let output = crate::dist::on_rank0(comm, || self.write_output())?.unwrap_or_else(|| self.output_dir());
        let trained = self.st.trained_tokens;
        let summary = RunSummary {
            steps: self.st.step,
            tokens: trained,
            eval_before: self.st.eval_before,
            eval_after,
            general_before: self.st.general_before,
            general_after,
            domain_share: self.st.mixer.realised_shares()[0],
            tokens_per_second: (trained - self.clock.tokens0) as f64 / train_seconds.max(1e-9),
            device: t.device.clone(),
            recompute: self.recompute.name(),
            peak_rss_bytes: peak_rss(),
            peak_device_bytes: device_peak(&self.dev),
            predicted_memory: self.predicted.as_ref().map_or(serde_json::Value::Null, |p| p.to_json()),
            train_seconds,
            trainable_params: self.n_params,
            output,
        };
        crate::dist::on_rank0(comm, || {
            crate::eval::report::write_run_report(&t.out)?;
            crate::util::write_atomic(
                &t.out.join("summary.json"),
                serde_json::to_string_pretty(&summary)?.as_bytes(),
            )
        })?;
        eprintln!(
            "wrote {} ({} steps, {:.0} tok/s, {})",
            summary.output.display(),
            self.steps,
            summary.tokens_per_second,
            self.memory_line(&summary)
        );
        Ok(summary)
    }

    /// Where the adapter (or, full fine-tuning, the whole model) goes.
    fn output_dir(&self) -> PathBuf {
        let out = &self.recipe.train.out;
        match &self.plan {
            Some(_) => out.join("adapter"),
            None => out.join("model"),
        }
    }

    /// The PEFT adapter directory, or the whole model (full fine-tuning) as safetensors.
    fn write_output(&self) -> Result<PathBuf> {
        let dir = self.output_dir();
        match &self.plan {
            Some(plan) => peft::save(&self.model, plan, &dir, &self.recipe.model.path.display().to_string())?,
            None => {
                let store = merge::Store::Float(DType::F32);
                merge::write_hf_dir(&self.model, &self.src.tokenizer, &dir, false, store)?;
            }
        }
        Ok(dir)
    }

    /// The measured peak beside the plan's prediction (or the device's peak on a GPU).
    fn memory_line(&self, s: &RunSummary) -> String {
        match (&self.predicted, s.peak_device_bytes) {
            (Some(p), _) => format!(
                "peak RSS {} measured, {} predicted: {:+.0}%",
                human_bytes(s.peak_rss_bytes),
                human_bytes(p.total()),
                100.0 * (p.total() as f64 / s.peak_rss_bytes.max(1) as f64 - 1.0)
            ),
            (None, Some(d)) => format!(
                "peak {} on {} (candle's pool), host RSS {}",
                human_bytes(d),
                self.recipe.train.device,
                human_bytes(s.peak_rss_bytes)
            ),
            (None, None) => format!("host RSS {}", human_bytes(s.peak_rss_bytes)),
        }
    }
}
