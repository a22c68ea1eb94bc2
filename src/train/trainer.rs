//! The training run, top to bottom: open the model, attach adapters, build the data, then loop
//! (micro-batches with gradient accumulation, clipping, schedule, AdamW), evaluating and logging
//! as it goes, and finally write the adapter (or the full model) and a summary.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use serde::Serialize;
use serde_json::json;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::Instant;

use super::optim::AdamW;
use super::recipe::Recipe;
use super::schedule::{Decay, Schedule};
use super::step::{forward_backward, Batch, GradAcc};
use crate::adapter::{merge, peft};
use crate::data::mix::{self, Mixer};
use crate::data::{self, Sequences};
use crate::eval::{eval_sequences, TextMetrics};
use crate::model::{self, BaseDtype, Fwd, Model};
use crate::ops::lm_head::IGNORE;
use crate::rng::mix;
use crate::util::{human_bytes, peak_rss};

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
    /// Peak resident set of the process, bytes.
    pub peak_rss_bytes: u64,
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

/// Runs a recipe to completion. `recipe_text` is saved beside the outputs.
pub fn run(recipe: &Recipe, recipe_text: &str) -> Result<RunSummary> {
    let t = &recipe.train;
    let dev = Device::Cpu;
    std::fs::create_dir_all(&t.out).with_context(|| format!("cannot create output directory {}", t.out.display()))?;
    crate::util::write_atomic(&t.out.join("recipe.toml"), recipe_text.as_bytes())?;

    let src = model::open(&recipe.model.path)?;
    let full = t.mode == "full";
    let mut model = Model::load(
        &src.config,
        src.weights.as_ref(),
        BaseDtype::parse(&recipe.model.base_dtype)?,
        full,
        &dev,
    )?;
    let plan = match (&recipe.model.adapter, recipe.plan(src.config.num_layers)?) {
        (Some(dir), _) => Some(peft::load(&mut model, dir)?),
        (None, Some(plan)) => {
            model.add_lora(&plan, t.seed)?;
            Some(plan)
        }
        (None, None) => None,
    };
    let params = model.trainable();
    let n_params: usize = params.iter().map(|(_, v)| v.as_tensor().elem_count()).sum();
    if n_params == 0 {
        bail!("nothing to train: the plan targets no module");
    }

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
    let share = recipe.data.domain_share.unwrap_or(1.0);
    let per_step = t.batch * t.grad_accum;
    let steps = if t.steps > 0 {
        t.steps
    } else {
        ((train.len() as f64 * t.epochs) / per_step as f64).ceil().max(1.0) as usize
    };
    let sched = Schedule {
        peak: t.lr,
        warmup: t.warmup,
        total: steps,
        decay: Decay::parse(&t.schedule)?,
        floor: t.min_lr_ratio,
    };
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

    let mut log = std::fs::File::create(t.out.join("metrics.jsonl")).context("cannot create metrics.jsonl")?;
    let eval_batch = t.batch.max(1);
    let eval_before = eval_sequences(&model, &held, eval_batch, Fwd::eval())?;
    let general_before = match &held_general {
        Some(h) => Some(eval_sequences(&model, h, eval_batch, Fwd::eval())?),
        None => None,
    };
    writeln!(
        log,
        "{}",
        json!({"step": 0, "eval": eval_before, "eval_general": general_before})
    )?;
    report("before", &eval_before, general_before.as_ref());

    let mut opt = AdamW::new(t.weight_decay);
    let mut mixer = Mixer::new(train.len(), general.len(), t.seed)?;
    let mut acc = GradAcc::default();
    let tty = std::io::stderr().is_terminal();
    let start = Instant::now();
    let mut trained_tokens = 0usize;
    let mut bad_in_a_row = 0;
    let mut eval_after = eval_before;
    for step in 0..steps {
        let mut micro = Vec::with_capacity(t.grad_accum);
        for _ in 0..t.grad_accum {
            let rows = mixer.next_rows(t.batch, share);
            let (ids, targets) = mix::gather(&[&train, &general], &rows, &dev)?;
            micro.push(Batch { ids, targets });
        }
        // The loss is the mean over every target token of the effective batch, so splitting it
        // into micro-batches changes nothing but memory.
        let tokens: usize = micro
            .iter()
            .map(|b| b.targets.iter().filter(|&&x| x != IGNORE).count())
            .sum();
        if tokens == 0 {
            continue;
        }
        acc.clear();
        let mut nll = 0.0;
        for (mi, b) in micro.iter().enumerate() {
            let fwd = Fwd {
                dropout_seed: Some(mix(&[t.seed, step as u64, mi as u64])),
                ..Fwd::eval()
            };
            nll += forward_backward(&model, b, 1.0 / tokens as f64, t.recompute, fwd, &mut acc)?.nll_sum;
        }
        let loss = nll / tokens as f64;
        let gnorm = acc.norm()?;
        if !loss.is_finite() || !gnorm.is_finite() {
            bad_in_a_row += 1;
            writeln!(
                log,
                "{}",
                json!({"step": step + 1, "skipped": true, "loss": loss.to_string(), "grad_norm": gnorm.to_string()})
            )?;
            if bad_in_a_row >= 3 {
                bail!(
                    "loss or gradient was not finite for 3 steps in a row (step {}); lower train.lr",
                    step + 1
                );
            }
            continue;
        }
        bad_in_a_row = 0;
        if t.clip > 0.0 && gnorm > t.clip {
            acc.scale(t.clip / gnorm)?;
        }
        let lr = sched.lr(step);
        opt.step(&params, &acc, lr)?;
        trained_tokens += tokens;
        let elapsed = start.elapsed().as_secs_f64();
        let tps = trained_tokens as f64 / elapsed;
        let peak = peak_rss();
        writeln!(
            log,
            "{}",
            json!({"step": step + 1, "loss": loss, "lr": lr, "grad_norm": gnorm, "tokens": trained_tokens, "tok_per_s": tps, "peak_rss": peak, "elapsed_s": elapsed, "domain_share": share, "domain_share_realised": mixer.realised_share()})
        )?;
        let line = format!(
            "step {}/{steps}  loss {loss:.4}  lr {lr:.2e}  {tps:.0} tok/s  ETA {}  peak {}",
            step + 1,
            fmt_secs(elapsed / (step + 1) as f64 * (steps - step - 1) as f64),
            human_bytes(peak)
        );
        if tty {
            eprint!("\r{line}\x1b[K");
        } else if (step + 1) % 10 == 0 || step + 1 == steps || step == 0 {
            eprintln!("{line}");
        }
        if t.eval_every > 0 && (step + 1) % t.eval_every == 0 && step + 1 < steps {
            let m = eval_sequences(&model, &held, eval_batch, Fwd::eval())?;
            writeln!(log, "{}", json!({"step": step + 1, "eval": m}))?;
            if tty {
                eprintln!();
            }
            eprintln!(
                "held-out at step {}: loss {:.4}, perplexity {:.2}",
                step + 1,
                m.loss,
                m.perplexity
            );
        }
    }
    if tty {
        eprintln!();
    }
    let train_seconds = start.elapsed().as_secs_f64();
    let mut general_after = general_before;
    if steps > 0 {
        eval_after = eval_sequences(&model, &held, eval_batch, Fwd::eval())?;
        if let Some(h) = &held_general {
            general_after = Some(eval_sequences(&model, h, eval_batch, Fwd::eval())?);
        }
        writeln!(
            log,
            "{}",
            json!({"step": steps, "eval": eval_after, "eval_general": general_after})
        )?;
    }
    report("after", &eval_after, general_after.as_ref());

    let output = match &plan {
        Some(plan) => {
            let dir = t.out.join("adapter");
            peft::save(&model, plan, &dir, &recipe.model.path.display().to_string())?;
            dir
        }
        None => {
            let dir = t.out.join("model");
            merge::write_hf_dir(&model, &src.tokenizer, &dir, false, DType::F32)?;
            dir
        }
    };
    let summary = RunSummary {
        steps,
        tokens: trained_tokens,
        eval_before,
        eval_after,
        general_before,
        general_after,
        domain_share: mixer.realised_share(),
        tokens_per_second: trained_tokens as f64 / train_seconds.max(1e-9),
        peak_rss_bytes: peak_rss(),
        train_seconds,
        trainable_params: n_params,
        output: output.clone(),
    };
    crate::util::write_atomic(
        &t.out.join("summary.json"),
        serde_json::to_string_pretty(&summary)?.as_bytes(),
    )?;
    eprintln!(
        "wrote {} ({} steps, {:.0} tok/s, peak RSS {})",
        output.display(),
        steps,
        summary.tokens_per_second,
        human_bytes(summary.peak_rss_bytes)
    );
    Ok(summary)
}
