//! Phase two, once per optimizer step: the rows it draws, the objective over its micro-batches
//! (the mean cross-entropy over every target token of the step, the contrastive term and the
//! distillation to the base on its general rows, EWC on the weights), the clipped AdamW update,
//! and what it logs.

use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use serde_json::json;
use std::cell::Cell;

use super::super::callback::StepReport;
use super::prepare::{Clock, Run, RunData};
use super::with_oom_retry;
use crate::data::mix;
use crate::dist;
use crate::engine::{forward_backward_with, Batch, Extra, ExtraTerm, GradAcc, Recompute};
use crate::model::decoder::TreeRows;
use crate::model::{Fwd, Model};
use crate::ops::lm_head::{chunk_rows, kl_head, KlSide, IGNORE};
use crate::retain::contrastive;
use crate::rng::mix as mix_seed;
use crate::train::recipe::{Group, RetainSection};
use crate::util::{device_peak, human_bytes, peak_rss};

/// What one optimizer step measured.
pub(super) struct StepOut {
    /// `ce + ewc + contrastive_lambda * contrastive + distill_lambda * distill` (NaN when the
    /// step had no target token).
    pub loss: f64,
    pub grad_norm: f64,
    pub ce: f64,
    pub ewc: f64,
    pub contrastive: f64,
    /// Mean KL from the base's next-token distribution on the general rows' target tokens.
    pub distill: f64,
    /// The loss or gradient was not finite: no update was made.
    pub skipped: bool,
}

/// The step's objective over its rows: everything the micro-batches read.
struct Objective<'a> {
    model: &'a Model,
    /// The frozen base the retention terms compare with, under full fine-tuning (under LoRA
    /// the model itself with its adapters off).
    teacher: Option<&'a Model>,
    data: &'a RunData,
    retain: &'a RetainSection,
    fwd: Fwd,
    recompute: Recompute,
    /// This step's dropout seed.
    seed: u64,
    /// Target tokens of the whole step: the loss is their mean.
    tokens: usize,
    /// Contrastive samples of the whole step: each micro-batch's term is weighted by its share.
    segments: usize,
    /// Target tokens of the step's general rows: the distillation term is their mean.
    general_tokens: usize,
}

/// The distillation term of one micro-batch: the base's final hidden states at its general
/// rows' target positions.
struct Distill<'a> {
    model: &'a Model,
    /// The model whose head turns `teacher` into the base's distribution.
    base: &'a Model,
    keep: Tensor,
    teacher: Tensor,
    /// `distill_lambda / general tokens of the step`.
    scale: f64,
    /// The micro-batch's summed KL, once the term has run.
    kl: Cell<f64>,
}

/// The contrastive term of one micro-batch: its general rows' base-model hidden states.
struct Contrastive<'a> {
    base_hidden: Vec<f32>,
    segments: Vec<(usize, usize)>,
    weight: f64,
    retain: &'a RetainSection,
}

impl<'r> Run<'r> {
    /// Before the first step: metrics so far, the scores before, the callbacks' start.
    pub fn begin(&mut self) -> Result<()> {
        for line in &self.st.metrics {
            self.log.replay(line)?;
        }
        super::evaluate::report("before", &self.st.eval_before, self.st.general_before.as_ref());
        for cb in self.callbacks.iter_mut() {
            cb.on_run_begin(&mut self.ctl)?;
        }
        self.clock = Clock {
            start: std::time::Instant::now(),
            elapsed0: self.st.elapsed_s,
            tokens0: self.st.trained_tokens,
        };
        self.progress = crate::progress::Progress::new("training", self.steps as u64, "steps").eager();
        self.progress.resume_at(self.st.step as u64);
        if self.st.step == 0 {
            for cb in self.callbacks.iter_mut() {
                cb.on_epoch_begin(&mut self.ctl, 0)?;
            }
        }
        Ok(())
    }

    /// The step's learning rates, the callbacks' say, and its rows: drawn at once, so the
    /// micro-batch only decides how they are split. Every rank of a data-parallel job draws
    /// the same rows (the mixer is seeded and checkpointed alike everywhere), and the ranks
    /// agree on the smallest micro-batch any one's memory monitor allows.
    pub fn begin_step(&mut self) -> Result<Vec<(usize, usize)>> {
        let step = self.st.step;
        self.ctl.step = step;
        self.ctl.lr = self.scheds.iter().map(|(g, s)| (*g, s.lr(step))).collect();
        for cb in self.callbacks.iter_mut() {
            cb.on_step_begin(&mut self.ctl)?;
        }
        let micro = dist::min_usize(self.comm.as_ref(), self.ctl.micro_batch)?;
        if micro != self.ctl.micro_batch {
            self.ctl.set_micro_batch(micro);
        }
        Ok(self.st.mixer.next_rows(self.per_step, &self.ctl.weights))
    }

    /// Forward and backward over the step's rows, then the clipped update. In a data-parallel
    /// job each rank takes its contiguous share of the rows; the gradients and loss sums are
    /// then summed over the ranks (the loss is the mean over the whole step's target tokens,
    /// so this is the one-process step), and EWC, clipping and AdamW run alike on every rank.
    pub fn step(&mut self, rows: &[(usize, usize)]) -> Result<StepOut> {
        let d = &self.data;
        let tokens: usize = rows
            .iter()
            .map(|&(s, r)| d.sources[s].rows.targets[r].iter().filter(|&&x| x != IGNORE).count())
            .sum();
        let (mut ce, mut ewc, mut con, mut kl, mut loss, mut grad_norm) = (f64::NAN, 0.0, 0.0, 0.0, f64::NAN, f64::NAN);
        if tokens > 0 {
            let general: Vec<usize> = (0..rows.len()).filter(|&i| d.is_general(rows[i])).collect();
            let general_tokens = general
                .iter()
                .map(|&i| {
                    let (s, r) = rows[i];
                    d.sources[s].rows.targets[r].iter().filter(|&&x| x != IGNORE).count()
                })
                .sum();
            let objective = Objective {
                model: &self.model,
                teacher: self.teacher.as_ref(),
                data: &self.data,
                retain: &self.retain,
                fwd: self.eval_fwd,
                recompute: self.recompute,
                seed: mix_seed(&[self.recipe.train.seed, self.st.step as u64]),
                tokens,
                segments: contrastive::segments(&general, d.seq_len(), self.retain.segment).len(),
                general_tokens,
            };
            let acc = &mut self.acc;
            let comm = self.comm.as_ref();
            let mine = dist::shard(rows.len(), comm.rank(), comm.size());
            let sums = with_oom_retry(&mut self.ctl, |micro| {
                objective.micro_batches(acc, &rows[mine.clone()], mine.start, micro)
            });
            let (nll, c, k) = self.reduce(dist::agree(comm, sums)?)?;
            ce = nll / tokens as f64;
            con = c;
            kl = if general_tokens > 0 {
                k / general_tokens as f64
            } else {
                0.0
            };
            ewc = match &self.ewc {
                Some(e) => e.penalty(Some(&mut self.acc), 1.0)?,
                None => 0.0,
            };
            loss = ce + ewc + self.retain.contrastive_lambda * con + self.retain.distill_lambda * kl;
            grad_norm = self.acc.norm()?;
        }
        let skipped = !loss.is_finite() || !grad_norm.is_finite();
        self.st.step += 1;
        self.ctl.step = self.st.step;
        if skipped {
            self.st.bad_in_a_row += 1;
        } else {
            self.st.bad_in_a_row = 0;
            self.update(grad_norm)?;
            self.st.trained_tokens += tokens;
        }
        Ok(StepOut {
            loss,
            grad_norm,
            ce,
            ewc,
            contrastive: con,
            distill: kl,
            skipped,
        })
    }

    /// Sums this rank's gradients and loss terms with the other ranks' (nothing to do in a job
    /// of one), timing the exchange for the metrics.
    fn reduce(&mut self, (nll, con, kl): (f64, f64, f64)) -> Result<(f64, f64, f64)> {
        let comm = self.comm.as_ref();
        if comm.size() == 1 {
            return Ok((nll, con, kl));
        }
        let start = std::time::Instant::now();
        let mut sums = [nll, con, kl];
        comm.sum_f64(&mut sums)?;
        let bytes = self.acc.sum_over(comm, &self.params)?;
        self.reduced = Some((bytes, start.elapsed().as_secs_f64()));
        Ok((sums[0], sums[1], sums[2]))
    }

    /// Clips the accumulated gradient to `train.clip` and takes AdamW's step, each parameter
    /// at its group's rate.
    fn update(&mut self, grad_norm: f64) -> Result<()> {
        let clip = self.recipe.train.clip;
        if clip > 0.0 && grad_norm > clip {
            self.acc.scale(clip / grad_norm)?;
        }
        let (lr, groups) = (&self.ctl.lr, &self.groups);
        self.opt.step(&self.params, &self.acc, |i| lr[&groups[i]])?;
        self.model.refresh_packs()
    }

    /// After the update: the callbacks, the metrics line, the progress line, epochs.
    pub fn end_step(&mut self, out: &StepOut) -> Result<()> {
        let mut rep = StepReport {
            loss: out.loss,
            skipped: out.skipped,
            log: Default::default(),
        };
        let micro_used = self.ctl.micro_batch;
        for cb in self.callbacks.iter_mut() {
            cb.on_step_end(&mut self.ctl, &mut rep)?;
        }
        // A callback on one rank may stop the run (its own memory, a user's rule): all stop.
        self.ctl.stop = dist::any(self.comm.as_ref(), self.ctl.stop)?;
        let (loss, gnorm) = (out.loss, out.grad_norm);
        let elapsed = self.elapsed();
        let tps = self.tokens_per_second();
        let (peak, peak_dev) = (peak_rss(), device_peak(&self.dev));
        let mut line = json!({
            "step": self.st.step, "loss": if out.skipped { json!(loss.to_string()) } else { json!(loss) },
            "grad_norm": if gnorm.is_finite() { json!(gnorm) } else { json!(gnorm.to_string()) },
            "skipped": out.skipped, "ce": out.ce, "ewc": out.ewc, "contrastive": out.contrastive, "distill": out.distill, "lr": self.ctl.lr,
            "micro_batch": micro_used, "grad_accum": self.per_step / micro_used,
            "domain_share": self.ctl.weights[0] / self.ctl.weights.iter().sum::<f64>(),
            "domain_share_realised": self.st.mixer.realised_shares()[0],
            "tokens": self.st.trained_tokens, "tok_per_s": tps, "peak_rss": peak, "peak_device": peak_dev, "elapsed_s": elapsed,
        });
        if self.data.sources.len() > 2 {
            // Every source's scheduled and realised share, by name (the pair's are the two
            // domain_share fields).
            let total: f64 = self.ctl.weights.iter().sum();
            let (shares, realised): (serde_json::Map<_, _>, serde_json::Map<_, _>) = self
                .data
                .sources
                .iter()
                .zip(&self.ctl.weights)
                .zip(self.st.mixer.realised_shares())
                .map(|((s, w), r)| ((s.name.clone(), json!(w / total)), (s.name.clone(), json!(r))))
                .unzip();
            line["shares"] = shares.into();
            line["shares_realised"] = realised.into();
        }
        if let Some((bytes, seconds)) = self.reduced.take() {
            line["ranks"] = self.comm.size().into();
            line["reduce_bytes"] = bytes.into();
            line["reduce_s"] = seconds.into();
        }
        line.as_object_mut().expect("object").extend(rep.log);
        self.emit(line)?;
        if out.skipped {
            self.note_skipped(loss, gnorm)?;
        }
        self.print_progress(loss, tps, peak, peak_dev);
        let passes = self.st.mixer.domain_passes();
        if passes > self.st.epoch {
            for cb in self.callbacks.iter_mut() {
                cb.on_epoch_end(&mut self.ctl, self.st.epoch)?;
                cb.on_epoch_begin(&mut self.ctl, passes)?;
            }
            self.st.epoch = passes;
        }
        Ok(())
    }

    /// Says a step was skipped, and stops the run after `train.max_bad_steps` in a row.
    fn note_skipped(&self, loss: f64, gnorm: f64) -> Result<()> {
        self.progress.println(&format!(
            "step {}: loss {loss} / gradient norm {gnorm} not finite; update skipped",
            self.st.step
        ));
        if self.st.bad_in_a_row >= self.recipe.train.max_bad_steps {
            bail!(
                "loss or gradient was not finite for {} steps in a row (step {}); stopping with the last good checkpoint in {}. Lower train.lr or check the data",
                self.st.bad_in_a_row,
                self.st.step,
                self.recipe.train.out.join("checkpoints").display()
            );
        }
        Ok(())
    }

    /// The progress bar on a terminal; plain lines now and then otherwise.
    fn print_progress(&mut self, loss: f64, tps: f64, peak: u64, peak_dev: Option<u64>) {
        let t = &self.recipe.train;
        let lr_main = self.ctl.lr.get(&Group::LoraA).copied().unwrap_or(t.lr);
        let msg = format!(
            "loss {loss:.4}  lr {lr_main:.2e}  {tps:.0} tok/s  peak {}",
            match peak_dev {
                Some(d) => format!("{} on {}", human_bytes(d), t.device),
                None => human_bytes(peak),
            }
        );
        self.progress.set(self.st.step as u64, &msg);
    }

    /// Seconds in the loop, a resumed run's earlier ones included.
    pub fn elapsed(&self) -> f64 {
        self.clock.elapsed0 + self.clock.start.elapsed().as_secs_f64()
    }

    /// Tokens a second trained since this process began the loop.
    pub fn tokens_per_second(&self) -> f64 {
        (self.st.trained_tokens - self.clock.tokens0) as f64 / self.clock.start.elapsed().as_secs_f64().max(1e-9)
    }
}

impl Objective<'_> {
    /// Every micro-batch of `micro` rows, forward and backward into `acc`: the step's summed
    /// token NLL, contrastive loss and distillation KL. The loss is the mean over every target
    /// token of the step, so splitting it into micro-batches changes nothing but memory.
    /// `rows` start at row `first` of the step (a data-parallel rank's share), which places
    /// their dropout masks where the one-process step has them.
    fn micro_batches(
        &self,
        acc: &mut GradAcc,
        rows: &[(usize, usize)],
        first: usize,
        micro: usize,
    ) -> Result<(f64, f64, f64)> {
        acc.clear();
        let (mut nll, mut con, mut kl) = (0.0, 0.0, 0.0);
        let seq = self.data.seq_len();
        for (k, chunk) in rows.chunks(micro).enumerate() {
            let sources: Vec<&crate::data::Sequences> = self.data.sources.iter().map(|s| &s.rows).collect();
            let (ids, targets) = mix::gather(&sources, chunk, &self.model.device)?;
            let documents = mix::documents(&sources, chunk).map(|(b, p)| TreeRows::new(b, p));
            let fwd = Fwd {
                dropout_seed: Some(self.seed),
                first_token: ((first + k * micro) * seq) as u64,
                ..self.fwd
            };
            let base_hidden = self.base_hidden(&ids, chunk, documents.as_ref())?;
            let contrastive = self.contrastive(base_hidden.as_ref(), chunk)?;
            let distill = self.distill(base_hidden.as_ref(), chunk, &targets)?;
            let hook = |h: &Tensor| -> Result<Extra> {
                let mut total = Extra {
                    loss: 0.0,
                    dh: Tensor::zeros_like(h)?,
                    dw_head: None,
                };
                if let Some(c) = &contrastive {
                    let (l, d) = c.term(h)?;
                    total.loss = l;
                    total.dh = (total.dh + d)?;
                }
                if let Some(d) = &distill {
                    let (dh, dw) = d.term(h)?;
                    total.dh = (total.dh + dh)?;
                    total.dw_head = dw;
                }
                Ok(total)
            };
            let any = contrastive.is_some() || distill.is_some();
            let extra: Option<ExtraTerm<'_>> = any.then_some(&hook as ExtraTerm<'_>);
            let batch = Batch {
                ids,
                targets,
                documents,
            };
            let out = forward_backward_with(
                self.model,
                &batch,
                1.0 / self.tokens as f64,
                self.recompute,
                fwd,
                acc,
                extra,
            )?;
            nll += out.nll_sum;
            con += out.extra;
            kl += distill.map_or(0.0, |d| d.kl.get());
        }
        Ok((nll, con, kl))
    }

    /// The base model's final hidden states of a micro-batch, `[rows * seq, hidden]`, when a
    /// term on its general rows needs them: the frozen copy's under full fine-tuning, the model's
    /// own with its adapters off under LoRA.
    fn base_hidden(
        &self,
        ids: &Tensor,
        chunk: &[(usize, usize)],
        documents: Option<&TreeRows>,
    ) -> Result<Option<Tensor>> {
        let r = self.retain;
        let general = chunk.iter().filter(|&&c| self.data.is_general(c)).count();
        let wanted = (r.contrastive_lambda > 0.0 && general >= 2) || (r.distill_lambda > 0.0 && general >= 1);
        if !wanted {
            return Ok(None);
        }
        let base = Fwd {
            adapters: false,
            ..self.fwd
        };
        let m = self.teacher.unwrap_or(self.model);
        Ok(Some(match documents {
            Some(d) => m.hidden_tree(ids, base, d)?,
            None => m.hidden(ids, base, None)?,
        }))
    }

    /// The distillation term of a micro-batch with general rows, when the recipe has one.
    fn distill(&self, base: Option<&Tensor>, chunk: &[(usize, usize)], targets: &[u32]) -> Result<Option<Distill<'_>>> {
        let lambda = self.retain.distill_lambda;
        let (Some(base), true) = (base, lambda > 0.0) else {
            return Ok(None);
        };
        let seq = self.data.seq_len();
        let keep: Vec<u32> = (0..chunk.len())
            .filter(|&i| self.data.is_general(chunk[i]))
            .flat_map(|i| (i * seq..(i + 1) * seq).filter(|&p| targets[p] != IGNORE))
            .map(|p| p as u32)
            .collect();
        if keep.is_empty() {
            return Ok(None);
        }
        let keep = Tensor::new(keep.as_slice(), &self.model.device)?;
        Ok(Some(Distill {
            model: self.model,
            base: self.teacher.unwrap_or(self.model),
            teacher: base.index_select(&keep, 0)?,
            keep,
            scale: lambda / self.general_tokens.max(1) as f64,
            kl: Cell::new(0.0),
        }))
    }

    /// The contrastive term of a micro-batch, when the recipe has one and the micro-batch has
    /// two or more general samples: their base-model (adapters off) hidden states.
    fn contrastive(&self, base: Option<&Tensor>, chunk: &[(usize, usize)]) -> Result<Option<Contrastive<'_>>> {
        let r = self.retain;
        let general: Vec<usize> = (0..chunk.len()).filter(|&i| self.data.is_general(chunk[i])).collect();
        let segments = contrastive::segments(&general, self.data.seq_len(), r.segment);
        let Some(base) = base.filter(|_| r.contrastive_lambda > 0.0 && segments.len() >= 2) else {
            return Ok(None);
        };
        let base_hidden: Vec<f32> = base.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let weight = r.contrastive_lambda * segments.len() as f64 / self.segments.max(1) as f64;
        Ok(Some(Contrastive {
            base_hidden,
            segments,
            weight,
            retain: r,
        }))
    }
}

impl Contrastive<'_> {
    /// InfoNCE on the adapted hidden states `h`: the loss (per unit of lambda) and its
    /// gradient, weighted as it enters the step.
    fn term(&self, h: &Tensor) -> Result<(f64, Tensor)> {
        let d = h.dim(1)?;
        let hv: Vec<f32> = h.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let (l, dh) = contrastive::info_nce(&hv, &self.base_hidden, d, &self.segments, self.retain.temperature);
        let dh = (Tensor::from_vec(dh, h.shape(), h.device())? * self.weight)?;
        Ok((l * self.weight / self.retain.contrastive_lambda, dh))
    }
}

impl Distill<'_> {
    /// The KL from the base on the kept positions of the adapted hidden states `h`: its gradient
    /// with respect to `h` and, when the head is trained, with respect to the head, weighted as
    /// they enter the step (the KL itself is kept in `kl`).
    fn term(&self, h: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
        let (m, b) = (self.model, self.base);
        let student = h.index_select(&self.keep, 0)?;
        // A trained head is read through its bf16 working copy when it has one, as the
        // cross-entropy reads it.
        let working = m.train_head_pack()?;
        let out = kl_head(
            &student,
            &self.teacher,
            KlSide {
                w: m.head_weight(),
                pack: working.as_deref().or(m.head_pack.as_deref()),
            },
            KlSide {
                w: b.head_weight(),
                pack: b.head_pack.as_deref(),
            },
            chunk_rows(m.cfg.vocab_size),
            self.scale,
            m.head_trained(),
        )?;
        self.kl.set(out.kl);
        let dh = Tensor::zeros_like(h)?.index_add(&self.keep, &out.dh.to_dtype(h.dtype())?, 0)?;
        Ok((dh, out.dw))
    }
}
