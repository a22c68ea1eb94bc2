//! The training run, top to bottom: open the model, attach adapters, build the data, then loop
//! (micro-batches with gradient accumulation, clipping, schedule, AdamW), evaluating and logging
//! as it goes, and finally write the adapter (or the full model) and a summary.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use serde::Serialize;
use serde_json::json;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::Instant;

use super::callback::{probe_for, Callback, Control, MemoryMonitor, MixSchedule, MixShape, StepReport};
use super::checkpoint::{self, RunState};
use super::memory;
use super::recipe::group_of;
use super::recipe::Recipe;
use crate::adapter::{merge, peft};
use crate::data::mix::{self, Mixer};
use crate::data::{self, Sequences};
use crate::engine::optim::AdamW;
use crate::engine::step::{forward_backward_with, Batch, ExtraTerm, GradAcc, Recompute};
use crate::eval::{eval_sequences, TextMetrics};
use crate::model::{self, BaseDtype, Fwd, LoadSpec, Model};
use crate::ops::lm_head::IGNORE;
use crate::retain::{contrastive, Ewc};
use crate::rng::mix;
use crate::util::{current_rss, device_peak, human_bytes, peak_rss, reset_device_peak};

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

/// Loads the recipe's sequences (`paths` in the recipe's format).
pub fn load_sequences(recipe: &Recipe, tok: &model::tokenizer::Tok, paths: &[PathBuf]) -> Result<Sequences> {
    match recipe.data.format.as_str() {
        "chat" => data::chat::load_chat(paths, tok, recipe.data.seq_len),
        _ => data::pack(tok, &data::load_documents(paths)?, recipe.data.seq_len),
    }
}

fn fmt_secs(s: f64) -> String {
    let s = s.max(0.0) as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, s % 3600 / 60)
    } else {
        format!("{}m{:02}s", s / 60, s % 60)
    }
}

fn report(when: &str, m: &TextMetrics, general: Option<&TextMetrics>) {
    eprintln!(
        "held-out {when}: loss {:.4}, perplexity {:.2}, accuracy {:.2}%{}",
        m.loss,
        m.perplexity,
        100.0 * m.accuracy,
        general.map_or(String::new(), |g| format!(
            "; general: loss {:.4}, perplexity {:.2}",
            g.loss, g.perplexity
        ))
    );
}

/// How a run starts beyond its recipe.
#[derive(Default)]
pub struct RunOptions {
    /// Continue from this checkpoint (a checkpoint, `checkpoints/` or run directory).
    pub resume: Option<PathBuf>,
    /// Callbacks added after the built-in ones.
    pub callbacks: Vec<Box<dyn Callback>>,
    /// Run the ops a GPU runs (composed candle ops, NF4 in its device form) on the CPU
    /// backend: how `bench gpu --device cpu` and the tests hold the GPU path without a GPU.
    pub device_ops: bool,
}

/// Whether an error is an allocation failure (a CUDA out-of-memory, an allocator refusing).
fn is_oom(e: &anyhow::Error) -> bool {
    let s = format!("{e:#}").to_lowercase();
    s.contains("out of memory") || s.contains("out_of_memory") || s.contains("memory allocation")
}

/// Runs `f(micro_batch)`; when it fails for lack of memory, halves the micro-batch (keeping the
/// effective batch) and runs the step again, down to one row.
pub fn with_oom_retry<T>(ctl: &mut Control, mut f: impl FnMut(usize) -> Result<T>) -> Result<T> {
    loop {
        match f(ctl.micro_batch) {
            Err(e) if is_oom(&e) && ctl.micro_batch > 1 => {
                let m = ctl.micro_batch;
                ctl.set_micro_batch(m / 2);
                eprintln!(
                    "out of memory at micro-batch {m}; retrying the step at {}",
                    ctl.micro_batch
                );
            }
            r => return r,
        }
    }
}

/// The run's recomputation (`auto` resolved) and its memory plan, printed, for a process of
/// `runtime` resident bytes before the model loads. The plan models the
/// CPU path (its kernel packs, fused ops and process); on a GPU the run reports the device
/// pool's measured peak instead of a prediction it cannot back, and `auto` and the selective
/// modes recompute per block.
fn plan_memory(
    recipe: &Recipe,
    src: &model::ModelSource,
    dev: &candle_core::Device,
    runtime: u64,
) -> Result<(Recompute, Option<memory::Prediction>)> {
    let t = &recipe.train;
    let (recompute, predicted) = match dev.is_cpu() {
        true => {
            let (r, p, budget) = memory::resolve_recompute(recipe, src, runtime)?;
            if let Some(b) = budget {
                eprintln!(
                    "recompute = auto: {} (predicted {} against a budget of {}{})",
                    r.name(),
                    human_bytes(p.total()),
                    human_bytes(b),
                    if p.total() > b {
                        "; nothing fits it, so the least memory"
                    } else {
                        ""
                    }
                );
            }
            (r, Some(p))
        }
        // Kept products are the CPU adapter op's; a device re-runs whole blocks.
        false if matches!(t.recompute, Recompute::Selective | Recompute::Partial(_)) => {
            eprintln!(
                "recompute = {}: frozen products are kept on the CPU path only; on {} blocks are re-run whole",
                t.recompute.name(),
                t.device
            );
            (Recompute::Blocks, None)
        }
        false if t.recompute == Recompute::Auto => (Recompute::Blocks, None),
        false => (t.recompute, None),
    };
    match &predicted {
        Some(p) => eprintln!(
            "memory plan (micro-batch {}, recompute = {}):\n{}",
            t.batch,
            recompute.name(),
            p.table()
        ),
        None => eprintln!(
            "training on {} (recompute = {}): the memory plan models the CPU only; the run reports the device's measured peak",
            t.device,
            recompute.name()
        ),
    }
    Ok((recompute, predicted))
}

/// Runs a recipe to completion. `recipe_text` is saved beside the outputs.
pub fn run(recipe: &Recipe, recipe_text: &str) -> Result<RunSummary> {
    run_with(recipe, recipe_text, RunOptions::default())
}

/// [`run`] with a resume point and extra callbacks.
pub fn run_with(recipe: &Recipe, recipe_text: &str, opts: RunOptions) -> Result<RunSummary> {
    let t = &recipe.train;
    let dev = crate::util::device(&t.device)?;
    reset_device_peak(&dev);
    std::fs::create_dir_all(&t.out).with_context(|| format!("cannot create output directory {}", t.out.display()))?;
    crate::util::write_atomic(&t.out.join("recipe.toml"), recipe_text.as_bytes())?;

    let src = model::open(&recipe.model.path)?;
    // Data first: the memory plan measures the process with the data and tokenizer loaded.
    let mut train = load_sequences(recipe, &src.tokenizer, &recipe.data.train)?;
    let mut held = if recipe.data.eval.is_empty() {
        if train.len() < 2 {
            bail!(
                "the training data packs into {} row(s); give more text or a separate data.eval",
                train.len()
            );
        }
        train.split_off(recipe.data.eval_fraction)
    } else {
        load_sequences(recipe, &src.tokenizer, &recipe.data.eval)?
    };
    held.subsample(t.eval_rows);
    let general = match recipe.data.general.is_empty() {
        true => Sequences::default(),
        false => load_sequences(recipe, &src.tokenizer, &recipe.data.general)?,
    };
    let mut held_general = match recipe.data.general_eval.is_empty() {
        true => None,
        false => Some(load_sequences(recipe, &src.tokenizer, &recipe.data.general_eval)?),
    };
    if let Some(h) = held_general.as_mut() {
        h.subsample(t.eval_rows);
    }
    let full = t.mode == "full";
    let base = BaseDtype::parse(&recipe.model.base_dtype)?;
    let recipe_plan = recipe.plan(src.config.num_layers)?;
    let bases = recipe.base_table(src.config.num_layers)?;
    // The process as the model will find it (the plan counts the Fisher apart).
    let runtime = current_rss();
    // The Fisher before the model: estimating it loads the model once more in f32, and done
    // here that copy is gone before the training model arrives, each with its own peak.
    let retain = recipe.retain.clone().unwrap_or_default();
    let (fisher, estimated) = match (&retain.fisher, retain.ewc_lambda > 0.0) {
        (Some(path), true) => {
            let estimated = !path.exists();
            (Some(super::fisher::load_or_estimate(recipe, path, &dev)?), estimated)
        }
        _ => (None, false),
    };
    let (mut recompute, predicted) = plan_memory(recipe, &src, &dev, runtime)?;
    if estimated {
        eprintln!(
            "(the Fisher estimate above ran first, with a peak of its own that this plan leaves out; \
             `strata fisher` beforehand keeps it out of the run)"
        );
    }
    let per = |l: usize, m: crate::model::Proj| bases[l][m];
    // Every forward of the run starts from this one (dropout and adapters set per use).
    let eval_fwd = Fwd {
        composed: opts.device_ops,
        ..Fwd::eval()
    };
    let mut model = Model::load_with(
        &src.config,
        src.weights.as_ref(),
        &LoadSpec {
            base,
            per: &per,
            full,
            pack: recipe.model.pack_bf16,
            device_nf4: opts.device_ops,
        },
        &dev,
    )?;
    let plan = match (&recipe.model.adapter, recipe_plan) {
        (Some(dir), _) => Some(peft::load(&mut model, dir)?),
        (None, Some(plan)) => {
            plan.attach(&mut model, t.seed)?;
            Some(plan)
        }
        (None, None) => None,
    };
    if let Some(plan) = &plan {
        model.train_modules(&plan.modules_to_save)?;
    }
    let params = model.trainable();
    let n_params: usize = params.iter().map(|(_, v)| v.as_tensor().elem_count()).sum();
    if n_params == 0 {
        bail!("nothing to train: the plan targets no module");
    }

    // EWC is anchored here, before any resume restores trained values: the anchor is the
    // adapter (or weights) the stage started from, which the seed and recipe reproduce.
    let ewc = match fisher {
        Some(f) => {
            let e = Ewc::new(&model, &f, retain.ewc_lambda)?;
            eprintln!("ewc: lambda {} over {} weights", retain.ewc_lambda, e.len());
            Some(e)
        }
        None => None,
    };

    let share = recipe.data.domain_share.unwrap_or(1.0);
    let per_step = t.batch * t.grad_accum;
    let steps = if t.steps > 0 {
        t.steps
    } else {
        ((train.len() as f64 * t.epochs) / per_step as f64).ceil().max(1.0) as usize
    };
    let scheds = recipe.schedules(steps)?;
    eprintln!(
        "strata train: {} ({} layers), {} trainable parameters, {} training rows x {} tokens{}, {} held-out rows, {steps} steps of {per_step} rows",
        recipe.model.path.display(),
        src.config.num_layers,
        n_params,
        train.len(),
        train.seq_len,
        match general.is_empty() {
            true => String::new(),
            false => format!(" + {} general rows at {:.0}% domain", general.len(), 100.0 * share),
        },
        held.len()
    );

    // Built-in behaviours are callbacks like the user's: the mix schedule, the memory monitor.
    let mut callbacks: Vec<Box<dyn Callback>> = Vec::new();
    if let Some(end) = recipe.data.domain_share_end {
        callbacks.push(Box::new(MixSchedule {
            start: share,
            end,
            shape: MixShape::parse(&recipe.data.mix_schedule)?,
        }));
    }
    if t.memory_monitor {
        callbacks.push(Box::new(MemoryMonitor::new(
            (t.memory_budget_gb * 1e9) as u64,
            probe_for(&dev),
        )));
    }
    callbacks.extend(opts.callbacks);

    let eval_batch = t.batch.max(1);
    let mut opt = AdamW::new(t.weight_decay);
    let mut st = match &opts.resume {
        Some(path) => {
            let ck = checkpoint::load(path, &dev)?;
            checkpoint::restore_params(&params, &ck.params, &ck.dir)?;
            opt.moments = ck.moments;
            opt.t = ck.state.adam_t;
            if ck.state.control.total_steps != steps || ck.state.control.effective_batch != per_step {
                bail!(
                    "{}: written by a run of {} steps of {} rows; this recipe plans {steps} steps of {per_step}. Resume with the recipe that wrote it",
                    ck.dir.display(),
                    ck.state.control.total_steps,
                    ck.state.control.effective_batch
                );
            }
            for cb in callbacks.iter_mut() {
                if let Some(v) = ck.state.callbacks.get(cb.name()) {
                    cb.restore(v)?;
                }
            }
            // `auto` chose against the memory free when the run began; the rest of the run
            // keeps that choice, since keeping products rounds them and so changes the numbers.
            if let (Recompute::Auto, Some(r)) = (t.recompute, &ck.state.recompute) {
                let began = Recompute::parse(r).with_context(|| format!("{}: recompute", ck.dir.display()))?;
                if began != recompute {
                    eprintln!(
                        "recompute = auto: {} as the run began (not {})",
                        began.name(),
                        recompute.name()
                    );
                    recompute = began;
                }
            }
            eprintln!("resuming from {} (step {})", ck.dir.display(), ck.state.step);
            ck.state
        }
        None => {
            let eval_before = eval_sequences(&model, &held, eval_batch, eval_fwd)?;
            let general_before = match &held_general {
                Some(h) => Some(eval_sequences(&model, h, eval_batch, eval_fwd)?),
                None => None,
            };
            RunState {
                step: 0,
                adam_t: 0,
                mixer: Mixer::new(train.len(), general.len(), t.seed)?,
                control: Control {
                    step: 0,
                    total_steps: steps,
                    domain_share: share,
                    micro_batch: t.batch,
                    effective_batch: per_step,
                    lr: Default::default(),
                    stop: false,
                },
                callbacks: Default::default(),
                bad_in_a_row: 0,
                recompute: Some(recompute.name()),
                trained_tokens: 0,
                elapsed_s: 0.0,
                epoch: 0,
                eval_before,
                general_before,
                metrics: vec![json!({"step": 0, "eval": eval_before, "eval_general": general_before}).to_string()],
            }
        }
    };
    let mut log = std::fs::File::create(t.out.join("metrics.jsonl")).context("cannot create metrics.jsonl")?;
    for line in &st.metrics {
        writeln!(log, "{line}")?;
    }
    report("before", &st.eval_before, st.general_before.as_ref());
    let mut emit = |st: &mut RunState, v: serde_json::Value| -> Result<()> {
        let line = v.to_string();
        writeln!(log, "{line}")?;
        st.metrics.push(line);
        Ok(())
    };

    let mut ctl = st.control.clone();
    for cb in callbacks.iter_mut() {
        cb.on_run_begin(&mut ctl)?;
    }
    let mut acc = GradAcc::default();
    let tty = std::io::stderr().is_terminal();
    let start = Instant::now();
    let elapsed0 = st.elapsed_s;
    let tokens0 = st.trained_tokens;
    let step0 = st.step;
    let ck_root = t.out.join("checkpoints");
    if st.step == 0 {
        for cb in callbacks.iter_mut() {
            cb.on_epoch_begin(&mut ctl, 0)?;
        }
    }
    while st.step < steps && !ctl.stop {
        let step = st.step;
        ctl.step = step;
        ctl.lr = scheds.iter().map(|(g, s)| (g.clone(), s.lr(step))).collect();
        for cb in callbacks.iter_mut() {
            cb.on_step_begin(&mut ctl)?;
        }
        // The step's rows are drawn at once, so the micro-batch only decides how they are split.
        let rows = st.mixer.next_rows(per_step, ctl.domain_share);
        let tokens: usize = rows
            .iter()
            .map(|&(s, r)| {
                [&train, &general][s].targets[r]
                    .iter()
                    .filter(|&&x| x != IGNORE)
                    .count()
            })
            .sum();
        let mut loss = f64::NAN;
        let mut gnorm = f64::NAN;
        let (mut ce, mut ewc_pen, mut contrastive_loss) = (f64::NAN, 0.0, 0.0);
        if tokens > 0 {
            let seed = mix(&[t.seed, step as u64]);
            let seq = train.seq_len;
            let step_segments = contrastive::segments(
                &(0..rows.len()).filter(|&i| rows[i].0 == 1).collect::<Vec<_>>(),
                seq,
                retain.segment,
            )
            .len();
            let (nll, con) = with_oom_retry(&mut ctl, |micro| {
                acc.clear();
                let (mut nll, mut con) = (0.0, 0.0);
                for (k, chunk) in rows.chunks(micro).enumerate() {
                    let (ids, targets) = mix::gather(&[&train, &general], chunk, &dev)?;
                    let fwd = Fwd {
                        dropout_seed: Some(seed),
                        first_token: (k * micro * seq) as u64,
                        ..eval_fwd
                    };
                    // The contrastive samples are this micro-batch's general rows; each
                    // micro-batch's term is weighted by its share of the step's samples.
                    let gen_rows: Vec<usize> = (0..chunk.len()).filter(|&i| chunk[i].0 == 1).collect();
                    let segs = contrastive::segments(&gen_rows, seq, retain.segment);
                    let extra = if retain.contrastive_lambda > 0.0 && segs.len() >= 2 {
                        let hb: Vec<f32> = model
                            .hidden(
                                &ids,
                                Fwd {
                                    adapters: false,
                                    ..eval_fwd
                                },
                                None,
                            )?
                            .flatten_all()?
                            .to_vec1()?;
                        let w = retain.contrastive_lambda * segs.len() as f64 / step_segments.max(1) as f64;
                        Some((hb, segs, w))
                    } else {
                        None
                    };
                    let term = |h: &Tensor| -> Result<(f64, Tensor)> {
                        let (hb, segs, w) = extra.as_ref().expect("only passed with a term");
                        let d = h.dim(1)?;
                        let hv: Vec<f32> = h.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
                        let (l, dh) = contrastive::info_nce(&hv, hb, d, segs, retain.temperature);
                        let dh = (Tensor::from_vec(dh, h.shape(), h.device())? * *w)?;
                        Ok((l * w / retain.contrastive_lambda, dh))
                    };
                    // The loss is the mean over every target token of the step, so splitting it
                    // into micro-batches changes nothing but memory.
                    let b = Batch { ids, targets };
                    let hook: Option<ExtraTerm<'_>> = extra.as_ref().map(|_| &term as ExtraTerm<'_>);
                    let out = forward_backward_with(&model, &b, 1.0 / tokens as f64, recompute, fwd, &mut acc, hook)?;
                    nll += out.nll_sum;
                    con += out.extra;
                }
                Ok((nll, con))
            })?;
            ce = nll / tokens as f64;
            contrastive_loss = con;
            ewc_pen = match &ewc {
                Some(e) => e.penalty(Some(&mut acc), 1.0)?,
                None => 0.0,
            };
            loss = ce + ewc_pen + retain.contrastive_lambda * con;
            gnorm = acc.norm()?;
        }
        st.step += 1;
        ctl.step = st.step;
        let skipped = !loss.is_finite() || !gnorm.is_finite();
        let mut rep = StepReport {
            loss,
            skipped,
            log: Default::default(),
        };
        if skipped {
            st.bad_in_a_row += 1;
        } else {
            st.bad_in_a_row = 0;
            if t.clip > 0.0 && gnorm > t.clip {
                acc.scale(t.clip / gnorm)?;
            }
            opt.step(&params, &acc, |name| ctl.lr[group_of(name)])?;
            st.trained_tokens += tokens;
        }
        let micro_used = ctl.micro_batch;
        for cb in callbacks.iter_mut() {
            cb.on_step_end(&mut ctl, &mut rep)?;
        }
        let elapsed = elapsed0 + start.elapsed().as_secs_f64();
        let tps = (st.trained_tokens - tokens0) as f64 / start.elapsed().as_secs_f64().max(1e-9);
        let peak = peak_rss();
        let peak_dev = device_peak(&dev);
        let mut line = json!({
            "step": st.step, "loss": if skipped { json!(loss.to_string()) } else { json!(loss) },
            "grad_norm": if gnorm.is_finite() { json!(gnorm) } else { json!(gnorm.to_string()) },
            "skipped": skipped, "ce": ce, "ewc": ewc_pen, "contrastive": contrastive_loss, "lr": ctl.lr, "micro_batch": micro_used, "grad_accum": per_step / micro_used,
            "domain_share": ctl.domain_share, "domain_share_realised": st.mixer.realised_share(),
            "tokens": st.trained_tokens, "tok_per_s": tps, "peak_rss": peak, "peak_device": peak_dev, "elapsed_s": elapsed,
        });
        line.as_object_mut().expect("object").extend(rep.log);
        emit(&mut st, line)?;
        if skipped {
            eprintln!(
                "step {}: loss {loss} / gradient norm {gnorm} not finite; update skipped",
                st.step
            );
            if st.bad_in_a_row >= t.max_bad_steps {
                bail!(
                    "loss or gradient was not finite for {} steps in a row (step {}); stopping with the last good checkpoint in {}. Lower train.lr or check the data",
                    st.bad_in_a_row,
                    st.step,
                    ck_root.display()
                );
            }
        }
        let lr_main = ctl.lr.get("lora_a").copied().unwrap_or(t.lr);
        let status = format!(
            "step {}/{steps}  loss {loss:.4}  lr {lr_main:.2e}  {tps:.0} tok/s  ETA {}  peak {}",
            st.step,
            fmt_secs(start.elapsed().as_secs_f64() / (st.step - step0) as f64 * (steps - st.step) as f64),
            match peak_dev {
                Some(d) => format!("{} on {}", human_bytes(d), t.device),
                None => human_bytes(peak),
            }
        );
        if tty {
            eprint!("\r{status}\x1b[K");
        } else if st.step % 10 == 0 || st.step == steps || st.step == 1 {
            eprintln!("{status}");
        }
        let passes = st.mixer.domain_passes();
        if passes > st.epoch {
            for cb in callbacks.iter_mut() {
                cb.on_epoch_end(&mut ctl, st.epoch)?;
                cb.on_epoch_begin(&mut ctl, passes)?;
            }
            st.epoch = passes;
        }
        if t.eval_every > 0 && st.step % t.eval_every == 0 && st.step < steps {
            let m = eval_sequences(&model, &held, eval_batch, eval_fwd)?;
            let line = json!({"step": st.step, "eval": m});
            emit(&mut st, line)?;
            if tty {
                eprintln!();
            }
            eprintln!(
                "held-out at step {}: loss {:.4}, perplexity {:.2}",
                st.step, m.loss, m.perplexity
            );
        }
        let due = t.checkpoint_every > 0 && st.step % t.checkpoint_every == 0;
        // A skipped step writes no checkpoint: the last one stays the last good state.
        if (due || st.step == steps || ctl.stop) && !skipped {
            st.adam_t = opt.t;
            st.control = ctl.clone();
            st.elapsed_s = elapsed;
            st.callbacks = callbacks.iter().map(|c| (c.name().to_string(), c.state())).collect();
            checkpoint::save(&ck_root, &st, &params, &opt, t.keep_checkpoints)?;
        }
    }
    for cb in callbacks.iter_mut() {
        cb.on_run_end(&mut ctl)?;
    }
    if tty {
        eprintln!();
    }
    let train_seconds = start.elapsed().as_secs_f64();
    let eval_after = eval_sequences(&model, &held, eval_batch, eval_fwd)?;
    let general_after = match &held_general {
        Some(h) => Some(eval_sequences(&model, h, eval_batch, eval_fwd)?),
        None => None,
    };
    let line = json!({"step": st.step, "eval": eval_after, "eval_general": general_after});
    emit(&mut st, line)?;
    report("after", &eval_after, general_after.as_ref());
    let eval_before = st.eval_before;
    let general_before = st.general_before;
    let trained_tokens = st.trained_tokens;

    let output = match &plan {
        Some(plan) => {
            let dir = t.out.join("adapter");
            peft::save(&model, plan, &dir, &recipe.model.path.display().to_string())?;
            dir
        }
        None => {
            let dir = t.out.join("model");
            merge::write_hf_dir(&model, &src.tokenizer, &dir, false, merge::Store::Float(DType::F32))?;
            dir
        }
    };
    let summary = RunSummary {
        steps: st.step,
        tokens: trained_tokens,
        eval_before,
        eval_after,
        general_before,
        general_after,
        domain_share: st.mixer.realised_share(),
        tokens_per_second: (trained_tokens - tokens0) as f64 / train_seconds.max(1e-9),
        device: t.device.clone(),
        recompute: recompute.name(),
        peak_rss_bytes: peak_rss(),
        peak_device_bytes: device_peak(&dev),
        predicted_memory: predicted.as_ref().map_or(serde_json::Value::Null, |p| p.to_json()),
        train_seconds,
        trainable_params: n_params,
        output: output.clone(),
    };
    crate::eval::report::write_run_report(&t.out)?;
    crate::util::write_atomic(
        &t.out.join("summary.json"),
        serde_json::to_string_pretty(&summary)?.as_bytes(),
    )?;
    let memory = match (&predicted, summary.peak_device_bytes) {
        (Some(p), _) => format!(
            "peak RSS {} measured, {} predicted: {:+.0}%",
            human_bytes(summary.peak_rss_bytes),
            human_bytes(p.total()),
            100.0 * (p.total() as f64 / summary.peak_rss_bytes.max(1) as f64 - 1.0)
        ),
        (None, Some(d)) => format!(
            "peak {} on {} (candle's pool), host RSS {}",
            human_bytes(d),
            t.device,
            human_bytes(summary.peak_rss_bytes)
        ),
        (None, None) => format!("host RSS {}", human_bytes(summary.peak_rss_bytes)),
    };
    eprintln!(
        "wrote {} ({} steps, {:.0} tok/s, {memory})",
        output.display(),
        steps,
        summary.tokens_per_second,
    );
    Ok(summary)
}
