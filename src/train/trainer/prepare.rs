//! Phase one: everything a run holds before its first step, in the order it is built. Data comes
//! first (the memory plan measures the process with it loaded), then the Fisher (estimating it
//! loads the model once more, and done first that copy is gone before the training model
//! arrives), the plan, the model, its adapters, EWC anchored on them, and the starting state.

use anyhow::{bail, Context, Result};
use candle_core::Device;
use serde_json::json;
use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::time::Instant;

use super::super::callback::{probe_for, Callback, Control, MemoryMonitor, MixSchedule};
use super::super::checkpoint::{self, RunState};
use super::super::memory;
use super::super::recipe::{Group, LogSink, Recipe, RetainSection};
use super::super::schedule::Schedule;
use super::RunOptions;
use crate::adapter::{peft, LoraPlan};
use crate::data::mix::Mixer;
use crate::data::Sequences;
use crate::dist::{self, Comm};
use crate::engine::{AdamW, GradAcc, Recompute};
use crate::eval::TextMetrics;
use crate::model::{self, Fwd, LoadSpec, Model, ModelSource, Proj};
use crate::retain::{Ewc, Fisher};
use crate::util::{current_rss, human_bytes, reset_device_peak};

/// One source of the training mix, packed.
pub(super) struct SourceRows {
    pub name: String,
    pub rows: Sequences,
    /// Whether the retention terms read its rows.
    pub general: bool,
}

/// The rows a run reads: the training mix's sources, and the held-out sets.
pub(super) struct RunData {
    /// The mix's sources in recipe order (the domain/general pair: domain first).
    pub sources: Vec<SourceRows>,
    /// Held-out domain rows.
    pub held: Sequences,
    /// Held-out general rows (`data.general_eval`).
    pub held_general: Option<Sequences>,
}

/// A run in progress: what [`Run::prepare`] built and the loop changes.
pub(super) struct Run<'r> {
    pub recipe: &'r Recipe,
    pub retain: RetainSection,
    pub dev: Device,
    pub src: ModelSource,
    pub data: RunData,
    pub model: Model,
    /// The frozen base the retention terms compare with under full fine-tuning
    /// ([`Recipe::keeps_base_copy`]).
    pub teacher: Option<Model>,
    /// The adapters' plan (`None`: full fine-tuning).
    pub plan: Option<LoraPlan>,
    /// Trainable parameters by name, and each one's group, in the same order.
    pub params: Vec<(String, candle_core::Var)>,
    pub groups: Vec<Group>,
    pub n_params: usize,
    pub ewc: Option<Ewc>,
    pub recompute: Recompute,
    pub predicted: Option<memory::Prediction>,
    /// Every forward of the run starts from this one (dropout and adapters set per use).
    pub eval_fwd: Fwd,
    /// Optimizer steps planned, and rows a step.
    pub steps: usize,
    pub per_step: usize,
    pub scheds: std::collections::BTreeMap<Group, Schedule>,
    pub callbacks: Vec<Box<dyn Callback>>,
    pub opt: AdamW,
    pub acc: GradAcc,
    /// The checkpointed state, and the control the callbacks steer.
    pub st: RunState,
    pub ctl: Control,
    pub log: MetricsLog,
    pub clock: Clock,
    /// The training bar (or its plain lines), started by `begin`.
    pub progress: crate::progress::Progress,
    /// The job this run is a rank of (rank 0 writes the outputs).
    pub comm: Comm,
    /// Bytes this rank sent into the last step's gradient sum and the seconds it took, for
    /// the step's metrics line (data-parallel jobs only).
    pub reduced: Option<(usize, f64)>,
}

/// Where the loop's timing starts (a resumed run continues its predecessor's figures).
pub(super) struct Clock {
    pub start: Instant,
    pub elapsed0: f64,
    pub tokens0: usize,
}

impl Clock {
    /// Starts now.
    fn now() -> Self {
        Clock {
            start: Instant::now(),
            elapsed0: 0.0,
            tokens0: 0,
        }
    }
}

impl<'r> Run<'r> {
    /// Builds the run: outputs directory, data, Fisher, memory plan, model, adapters, EWC,
    /// schedules, callbacks, and the state it starts from.
    pub fn prepare(recipe: &'r Recipe, recipe_text: &str, opts: RunOptions) -> Result<Self> {
        let t = &recipe.train;
        let dev = crate::util::device(&dist::rank_device(&t.device, opts.comm.as_ref()))?;
        let comm = dist::for_device(opts.comm.clone(), &dev)?;
        reset_device_peak(&dev);
        dist::on_rank0(comm.as_ref(), || start_outputs(recipe, recipe_text))?;
        let src = model::open(&recipe.model.path)?;
        let context = src.config.context();
        if recipe.data.seq_len > context {
            bail!(
                "data.seq_len = {} is longer than the model's context ({context} positions: max_position_embeddings and its RoPE scaling); lower data.seq_len",
                recipe.data.seq_len
            );
        }
        let data = RunData::load(recipe, &src, t.device == "cpu" && !opts.device_ops)?;
        // The process as the model will find it (the plan counts the Fisher apart).
        let runtime = current_rss();
        let retain = recipe.retain.clone().unwrap_or_default();
        let (fisher, estimated) = fisher_first(recipe, &retain, &dev, comm.as_ref())?;
        let (recompute, predicted) = plan_memory(recipe, &src, &dev, runtime, estimated)?;
        // Kept products round, so every rank must run rank 0's choice.
        let mut recompute = Recompute::parse(&dist::from_rank0(comm.as_ref(), recompute.name())?)?;
        let eval_fwd = Fwd {
            composed: opts.device_ops,
            ..Fwd::eval()
        };
        let (mut model, plan) = load_model(recipe, &src, &dev, opts.device_ops)?;
        let params = model.trainable();
        let groups = params.iter().map(|(n, _)| Group::of(n)).collect();
        let n_params: usize = params.iter().map(|(_, v)| v.as_tensor().elem_count()).sum();
        if n_params == 0 {
            bail!("nothing to train: the plan targets no module");
        }
        // EWC is anchored here, before any resume restores trained values: the anchor is the
        // adapter (or weights) the stage started from, which the seed and recipe reproduce.
        let ewc = fisher.map(|f| anchor_ewc(&model, &f, retain.ewc_lambda)).transpose()?;
        let (steps, per_step) = step_count(recipe, &data);
        if per_step < comm.size() {
            bail!(
                "a step of {per_step} rows (train.batch x train.grad_accum) cannot be divided among {} ranks; raise train.grad_accum or start fewer ranks",
                comm.size()
            );
        }
        announce(recipe, &src, &data, n_params, steps, per_step, comm.size());
        let mut callbacks = builtin_callbacks(recipe, &dev);
        callbacks.extend(opts.callbacks);
        let mut opt = t.optimizer.build(t.weight_decay);
        let st = match &opts.resume {
            Some(path) => {
                let mut into = Resumed {
                    params: &params,
                    opt: &mut opt,
                    callbacks: &mut callbacks,
                    recompute: &mut recompute,
                };
                let r = into.resume(recipe, path, &dev, &data, (steps, per_step));
                dist::agree(comm.as_ref(), r)?
            }
            None => {
                let before = super::evaluate::score(&model, &data, t.batch.max(1), eval_fwd, comm.as_ref())?;
                fresh_state(recipe, &data, before, recompute, steps, per_step)?
            }
        };
        // The bf16 working copies are made from the weights as the run starts them: after any
        // resume has restored its values.
        let mixed = t.precision.bf16_on(&dev)? && !opts.device_ops;
        if mixed {
            let bytes = model.mixed_precision()?;
            if bytes > 0 {
                eprintln!(
                    "precision: bf16 mixed (f32 masters, bf16 kernel copies {})",
                    human_bytes(bytes as u64)
                );
            }
        }
        let teacher = match recipe.keeps_base_copy() {
            true => Some(load_base_copy(recipe, &src, &dev, opts.device_ops, mixed)?),
            false => None,
        };
        let log = dist::on_rank0(comm.as_ref(), || {
            // What the run will be, for whoever watches it (`strata board`) before
            // summary.json.
            let mut plan_json = json!({"steps": steps, "rows_per_step": per_step, "seq_len": recipe.data.seq_len,
                    "trainable_parameters": n_params, "recompute": recompute.name(),
                    "predicted_memory": predicted.as_ref().map(|p| p.to_json())});
            if comm.size() > 1 {
                plan_json["ranks"] = comm.size().into();
            }
            crate::util::write_atomic(&t.out.join("plan.json"), plan_json.to_string().as_bytes())?;
            MetricsLog::create(&t.out, &t.log)
        })?
        .unwrap_or_else(MetricsLog::silent);
        Ok(Run {
            recipe,
            retain,
            dev,
            src,
            data,
            model,
            teacher,
            plan,
            params,
            groups,
            n_params,
            ewc,
            recompute,
            predicted,
            eval_fwd,
            steps,
            per_step,
            scheds: recipe.schedules(steps),
            callbacks,
            opt,
            acc: GradAcc::default(),
            ctl: st.control.clone(),
            st,
            log,
            clock: Clock::now(),
            progress: crate::progress::Progress::hidden(),
            comm,
            reduced: None,
        })
    }

    /// Rows a held-out batch scores.
    pub fn eval_batch(&self) -> usize {
        self.recipe.train.batch.max(1)
    }

    /// Writes a metrics line to `metrics.jsonl` (and TensorBoard) and keeps it for the
    /// checkpoint.
    pub fn emit(&mut self, v: serde_json::Value) -> Result<()> {
        let line = v.to_string();
        self.log.write(&line, &v)?;
        self.st.metrics.push(line);
        Ok(())
    }
}

/// Where a run's metrics lines go: `metrics.jsonl`, and event files when `train.log` asks (on
/// rank 0 of a data-parallel job; the other ranks write nothing).
pub struct MetricsLog {
    jsonl: Option<File>,
    tensorboard: Option<crate::train::tensorboard::EventWriter>,
}

impl MetricsLog {
    fn create(out: &Path, sinks: &[LogSink]) -> Result<Self> {
        Ok(Self {
            jsonl: Some(File::create(out.join("metrics.jsonl")).context("cannot create metrics.jsonl")?),
            tensorboard: match sinks.contains(&LogSink::TensorBoard) {
                true => Some(crate::train::tensorboard::EventWriter::create(out)?),
                false => None,
            },
        })
    }

    /// A log that writes nothing (a rank other than 0).
    fn silent() -> Self {
        Self {
            jsonl: None,
            tensorboard: None,
        }
    }

    /// Appends one line, `v` printed as `line`, to every output.
    pub fn write(&mut self, line: &str, v: &serde_json::Value) -> Result<()> {
        if let Some(f) = self.jsonl.as_mut() {
            writeln!(f, "{line}").context("cannot write metrics.jsonl")?;
        }
        if let Some(tb) = self.tensorboard.as_mut() {
            tb.write_line(v)?;
        }
        Ok(())
    }

    /// Appends a line a checkpoint kept as text: `metrics.jsonl` gets the text unchanged, so a
    /// resumed run's file is byte for byte the uninterrupted one's (a float printed, parsed and
    /// printed again can move in its last digit); only TensorBoard needs it parsed.
    pub fn replay(&mut self, line: &str) -> Result<()> {
        if let Some(f) = self.jsonl.as_mut() {
            writeln!(f, "{line}").context("cannot write metrics.jsonl")?;
        }
        if let Some(tb) = self.tensorboard.as_mut() {
            let v: serde_json::Value = serde_json::from_str(line).context("a checkpoint's metrics line is not JSON")?;
            tb.write_line(&v)?;
        }
        Ok(())
    }
}

impl RunData {
    /// Reads and packs every data set the recipe names; the held-out rows are `data.eval`, or
    /// split off the training rows when it is empty.
    fn load(recipe: &Recipe, src: &ModelSource, fused_cpu: bool) -> Result<Self> {
        let (d, t) = (&recipe.data, &recipe.train);
        let tok = &src.tokenizer;
        let mix = d.mix();
        let mut sources = Vec::with_capacity(mix.len());
        for m in &mix {
            let rows = super::load_sequences_as(recipe, tok, &m.files, m.format, fused_cpu)
                .with_context(|| format!("data source `{}`", m.name))?;
            if !sources.is_empty() && rows.is_empty() {
                bail!(
                    "data source `{}` packs into no rows; give it more data or leave it out",
                    m.name
                );
            }
            sources.push(SourceRows {
                name: m.name.clone(),
                rows,
                general: m.general,
            });
        }
        let train = &mut sources[0].rows;
        let mut held = if d.eval.is_empty() {
            if train.len() < 2 {
                bail!(
                    "the training data packs into {} row(s); give more text or a separate data.eval",
                    train.len()
                );
            }
            train.split_off(d.eval_fraction)
        } else {
            super::load_sequences_as(recipe, tok, &d.eval, d.format, fused_cpu)?
        };
        held.subsample(t.eval_rows);
        let mut held_general = match d.general_eval.is_empty() {
            true => None,
            false => Some(super::load_sequences_as(
                recipe,
                tok,
                &d.general_eval,
                d.format,
                fused_cpu,
            )?),
        };
        if let Some(h) = held_general.as_mut() {
            h.subsample(t.eval_rows);
        }
        Ok(Self {
            sources,
            held,
            held_general,
        })
    }

    /// Packed rows of each source, in order.
    pub fn rows(&self) -> Vec<usize> {
        self.sources.iter().map(|s| s.rows.len()).collect()
    }

    /// Whether a drawn row is general (replay) data, which the retention terms read.
    pub fn is_general(&self, (source, _): (usize, usize)) -> bool {
        self.sources[source].general
    }

    /// Tokens per training row.
    pub fn seq_len(&self) -> usize {
        self.sources[0].rows.seq_len
    }
}

/// The outputs directory, with the recipe as the run read it, and what an interrupted run left
/// there removed.
fn start_outputs(recipe: &Recipe, recipe_text: &str) -> Result<()> {
    let out = &recipe.train.out;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create output directory {}", out.display()))?;
    crate::util::write_atomic(&out.join("recipe.toml"), recipe_text.as_bytes())?;
    let mut left = checkpoint::clean_debris(&out.join("checkpoints"))?;
    for d in [out.clone(), out.join("adapter"), out.join("model")] {
        left.extend(crate::util::remove_stale_temps(&d)?);
    }
    for p in left {
        eprintln!("removed {} (left by an interrupted run)", p.display());
    }
    Ok(())
}

/// Optimizer steps (`train.steps`, or `train.epochs` passes over the training rows) and rows a
/// step.
fn step_count(recipe: &Recipe, data: &RunData) -> (usize, usize) {
    let t = &recipe.train;
    let per_step = t.batch * t.grad_accum;
    let steps = match t.steps > 0 {
        true => t.steps,
        false => ((data.sources[0].rows.len() as f64 * t.epochs) / per_step as f64)
            .ceil()
            .max(1.0) as usize,
    };
    (steps, per_step)
}

/// EWC anchored at the model as it is now.
fn anchor_ewc(model: &Model, fisher: &Fisher, lambda: f64) -> Result<Ewc> {
    let e = Ewc::new(model, fisher, lambda)?;
    eprintln!("ewc: lambda {lambda} over {} weights", e.len());
    Ok(e)
}

/// The Fisher EWC needs, read or estimated before the model loads; whether it was estimated.
fn fisher_first(
    recipe: &Recipe,
    retain: &RetainSection,
    dev: &Device,
    comm: &dyn dist::Collective,
) -> Result<(Option<Fisher>, bool)> {
    match (&retain.fisher, retain.ewc_lambda > 0.0) {
        (Some(path), true) => {
            let estimated = !path.exists();
            Ok((
                Some(super::super::fisher::load_or_estimate(recipe, path, dev, comm)?),
                estimated,
            ))
        }
        _ => Ok((None, false)),
    }
}

/// The model in the recipe's precisions, with its adapters (fresh, or the recipe's starting
/// adapter) and any base modules trained beside them; the plan is `None` for full fine-tuning.
fn load_model(recipe: &Recipe, src: &ModelSource, dev: &Device, device_ops: bool) -> Result<(Model, Option<LoraPlan>)> {
    let layers = src.config.num_layers;
    let recipe_plan = recipe.plan(layers)?;
    let bases = recipe.base_table(layers)?;
    let per = |l: usize, m: Proj| bases[l][m];
    let mut model = Model::load_with(
        &src.config,
        src.weights.as_ref(),
        &LoadSpec {
            base: recipe.model.base_dtype,
            per: &per,
            full: recipe.full(),
            pack: recipe.model.pack_bf16,
            device_nf4: device_ops,
        },
        dev,
    )?;
    let plan = match (&recipe.model.adapter, recipe_plan) {
        (Some(dir), _) => Some(peft::load(&mut model, dir)?),
        (None, Some(plan)) => {
            plan.attach(&mut model, recipe.train.seed)?;
            Some(plan)
        }
        (None, None) => None,
    };
    if let Some(plan) = &plan {
        model.train_modules(&plan.modules_to_save)?;
    }
    Ok((model, plan))
}

/// The frozen base a full fine-tuning run's retention terms compare with, read from the
/// model files (a resumed run's trained values never reach it), in the precision the trained
/// model's forward runs in: bf16 under mixed precision, f32 otherwise.
fn load_base_copy(recipe: &Recipe, src: &ModelSource, dev: &Device, device_ops: bool, bf16: bool) -> Result<Model> {
    let start = current_rss();
    let base = match bf16 {
        true => model::BaseDtype::Bf16,
        false => model::BaseDtype::F32,
    };
    let per = |_: usize, _: Proj| base;
    let copy = Model::load_with(
        &src.config,
        src.weights.as_ref(),
        &LoadSpec {
            base,
            per: &per,
            full: false,
            pack: recipe.model.pack_bf16,
            device_nf4: device_ops,
        },
        dev,
    )?;
    eprintln!(
        "retain: a frozen copy of the base ({}, {}) for the retention terms under full fine-tuning",
        base.name(),
        human_bytes(current_rss().saturating_sub(start))
    );
    Ok(copy)
}

/// The run's recomputation (`auto` resolved) and its memory plan, printed, for a process of
/// `runtime` resident bytes before the model loads (and a note when the Fisher was estimated
/// just before, outside the plan). The plan models the CPU path (its kernel
/// packs, fused ops and process); on a GPU the run reports the device pool's measured peak
/// instead of a prediction it cannot back, and `auto` and the selective modes recompute per
/// block.
fn plan_memory(
    recipe: &Recipe,
    src: &ModelSource,
    dev: &Device,
    runtime: u64,
    fisher_estimated: bool,
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
    if fisher_estimated {
        eprintln!(
            "(the Fisher estimate above ran first, with a peak of its own that this plan leaves out; \
             `strata fisher` beforehand keeps it out of the run)"
        );
    }
    Ok((recompute, predicted))
}

/// The line that says what the run will do.
fn announce(
    recipe: &Recipe,
    src: &ModelSource,
    data: &RunData,
    n_params: usize,
    steps: usize,
    per_step: usize,
    ranks: usize,
) {
    let mix = recipe.data.mix();
    let total: f64 = mix.iter().map(|m| m.weight).sum();
    let sources = match data.sources.as_slice() {
        [one] => format!("{} training rows", one.rows.len()),
        many => many
            .iter()
            .zip(&mix)
            .map(|(s, m)| format!("{} {} rows at {:.0}%", s.rows.len(), s.name, 100.0 * m.weight / total))
            .collect::<Vec<_>>()
            .join(" + "),
    };
    eprintln!(
        "strata train: {} ({} layers), {} trainable parameters, {sources} x {} tokens, {} held-out rows, {steps} steps of {per_step} rows{}",
        recipe.model.path.display(),
        src.config.num_layers,
        n_params,
        data.seq_len(),
        data.held.len(),
        match ranks {
            1 => String::new(),
            n => format!(", divided among {n} ranks"),
        }
    );
}

/// Built-in behaviours are callbacks like the user's: the mix schedule, the memory monitor.
fn builtin_callbacks(recipe: &Recipe, dev: &Device) -> Vec<Box<dyn Callback>> {
    let (d, t) = (&recipe.data, &recipe.train);
    let mut callbacks: Vec<Box<dyn Callback>> = Vec::new();
    let mix = d.mix();
    if mix.iter().any(|m| m.weight_end != m.weight) {
        callbacks.push(Box::new(MixSchedule {
            start: mix.iter().map(|m| m.weight).collect(),
            end: mix.iter().map(|m| m.weight_end).collect(),
            shape: d.mix_schedule,
        }));
    }
    if t.memory_monitor {
        callbacks.push(Box::new(MemoryMonitor::new(
            (t.memory_budget_gb * 1e9) as u64,
            probe_for(dev),
        )));
    }
    callbacks
}

/// The state of a run that starts now, with its held-out scores before training: a fresh
/// sampler.
fn fresh_state(
    recipe: &Recipe,
    data: &RunData,
    (eval_before, general_before): (TextMetrics, Option<TextMetrics>),
    recompute: Recompute,
    steps: usize,
    per_step: usize,
) -> Result<RunState> {
    let t = &recipe.train;
    Ok(RunState {
        step: 0,
        adam_t: 0,
        mixer: Mixer::new(&data.rows(), t.seed)?,
        control: Control {
            step: 0,
            total_steps: steps,
            weights: recipe.data.mix().iter().map(|m| m.weight).collect(),
            legacy_domain_share: None,
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
    })
}

/// What a checkpoint restores into the run being prepared.
struct Resumed<'a> {
    params: &'a [(String, candle_core::Var)],
    opt: &'a mut AdamW,
    callbacks: &'a mut [Box<dyn Callback>],
    recompute: &'a mut Recompute,
}

impl Resumed<'_> {
    /// The state a checkpoint holds, its parameters, moments and callback states restored,
    /// checked against this recipe's plan of `steps` steps of `per_step` rows.
    fn resume(
        &mut self,
        recipe: &Recipe,
        path: &std::path::Path,
        dev: &Device,
        data: &RunData,
        (steps, per_step): (usize, usize),
    ) -> Result<RunState> {
        let mut ck = checkpoint::load(path, dev)?;
        ck.state.check(&data.rows(), steps, per_step, &ck.dir)?;
        checkpoint::restore_params(self.params, &ck.params, &ck.dir)?;
        checkpoint::check_moments(self.params, &ck.moments, &ck.q8, ck.state.adam_t, &ck.dir)?;
        if !self.opt.eight_bit && !ck.q8.is_empty() {
            bail!(
                "{}: the checkpoint's AdamW moments are 8-bit; resume with train.optimizer = \"adamw8bit\"",
                ck.dir.display()
            );
        }
        if self.opt.eight_bit
            && ck.q8.is_empty()
            && ck
                .moments
                .values()
                .any(|(m, _)| m.elem_count() >= crate::engine::adam8::MIN_8BIT)
        {
            bail!(
                "{}: the checkpoint's AdamW moments are f32; resume with train.optimizer = \"adamw\"",
                ck.dir.display()
            );
        }
        self.opt.moments = ck.moments;
        self.opt.q8 = ck.q8;
        self.opt.t = ck.state.adam_t;
        for cb in self.callbacks.iter_mut() {
            if let Some(v) = ck.state.callbacks.get(cb.name()) {
                cb.restore(v)?;
            }
        }
        // `auto` chose against the memory free when the run began; the rest of the run keeps
        // that choice, since keeping products rounds them and so changes the numbers.
        if let (Recompute::Auto, Some(r)) = (recipe.train.recompute, &ck.state.recompute) {
            let began = Recompute::parse(r).with_context(|| format!("{}: recompute", ck.dir.display()))?;
            if began != *self.recompute {
                eprintln!(
                    "recompute = auto: {} as the run began (not {})",
                    began.name(),
                    self.recompute.name()
                );
                *self.recompute = began;
            }
        }
        eprintln!("resuming from {} (step {})", ck.dir.display(), ck.state.step);
        Ok(ck.state)
    }
}
