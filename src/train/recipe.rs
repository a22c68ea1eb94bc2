//! Recipes: the TOML file that says what a run does. Every field is documented in
//! `recipes/README.md`; unknown keys are errors, so a typo never silently falls back to a default.
//! A recipe is typed as it is read: every choice (mode, data format, base precision, schedule,
//! mix shape, Fisher estimator and format, recompute, parameter group) is an enum, checked once
//! here, so nothing downstream compares recipe strings.

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::path::{Path, PathBuf};

use crate::adapter::{LoraPlan, PlanRule};
use crate::data::formats::ChatFormat;
use crate::engine::Recompute;
use crate::model::{BaseDtype, PerProj, Proj, MODULES, SAVABLE};
use crate::retain::{Estimator, FisherFormat};
use crate::train::callback::MixShape;
use crate::train::schedule::{Decay, Schedule};

/// `train.mode`: what is trained.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Adapters on a frozen base (the `[lora]` section), with any `modules_to_save`.
    Lora,
    /// Every weight (f32 masters; GEMMs in bf16 or f32 as `train.precision` says).
    Full,
}

impl Mode {
    /// Parses `lora` or `full`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "lora" => Ok(Mode::Lora),
            "full" => Ok(Mode::Full),
            o => bail!("train.mode `{o}` must be `lora` or `full`"),
        }
    }

    /// The name [`Mode::parse`] reads.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Lora => "lora",
            Mode::Full => "full",
        }
    }
}

/// `data.format`: how training files are read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataFormat {
    /// Raw text, tokenized, EOS-separated and packed.
    Text,
    /// Conversations (`chat` = `messages`, `alpaca`, `sharegpt` or `prompt_completion` rows)
    /// rendered with the chat template, loss on assistant turns.
    Chat(ChatFormat),
}

impl DataFormat {
    /// Parses `text`, `chat` (or `messages`), `alpaca`, `sharegpt` or `prompt_completion`.
    pub fn parse(s: &str) -> Result<Self> {
        if s == "text" {
            return Ok(DataFormat::Text);
        }
        match ChatFormat::parse(s) {
            Some(f) => Ok(DataFormat::Chat(f)),
            None => bail!(
                "data.format `{s}` must be `text`, `chat` (messages), `alpaca`, `sharegpt` or `prompt_completion`"
            ),
        }
    }
}

/// `train.log`: where metrics go besides `metrics.jsonl`, which is always written (strata's
/// reports, `strata board` and experiments read it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogSink {
    /// `metrics.jsonl` (always on; naming it changes nothing).
    Jsonl,
    /// TensorBoard event files in the run directory.
    TensorBoard,
}

impl LogSink {
    /// Parses `jsonl` or `tensorboard`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "jsonl" => Ok(LogSink::Jsonl),
            "tensorboard" => Ok(LogSink::TensorBoard),
            o => bail!("train.log `{o}` must be `jsonl` or `tensorboard`"),
        }
    }
}

/// `train.precision`: how trained dense weights (full fine-tuning, `modules_to_save`) compute.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    /// bf16 where the CPU has AVX512-BF16, f32 elsewhere (the default).
    Auto,
    /// Mixed precision: f32 master weights and AdamW state, bf16 copies for the GEMMs (forward,
    /// input and weight gradients, f32 accumulation), refreshed after each update.
    Bf16,
    /// Every GEMM in f32.
    F32,
}

impl Precision {
    /// Parses `auto`, `bf16` or `f32`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Precision::Auto),
            "bf16" => Ok(Precision::Bf16),
            "f32" => Ok(Precision::F32),
            o => bail!("train.precision `{o}` must be `auto`, `bf16` or `f32`"),
        }
    }

    /// Whether this run computes its trained weights' GEMMs in bf16 on `dev`: `auto` where the
    /// kernel runs, and `bf16` must (a CPU without AVX512-BF16, or a GPU, is refused by name).
    pub fn bf16_on(self, dev: &candle_core::Device) -> Result<bool> {
        let kernel = dev.is_cpu() && crate::ops::bf16_gemm::available();
        match self {
            Precision::Auto => Ok(kernel),
            Precision::F32 => Ok(false),
            Precision::Bf16 if kernel => Ok(true),
            Precision::Bf16 => bail!(
                "train.precision = \"bf16\" runs trained weights through the CPU's AVX512-BF16 kernel, which this device lacks; use \"auto\" or \"f32\""
            ),
        }
    }

    /// [`Precision::bf16_on`] the CPU, `false` where `bf16` would be refused (the run then
    /// says why): what the memory plan and the thread choice assume before a run starts.
    pub fn bf16_on_cpu(self) -> bool {
        self.bf16_on(&candle_core::Device::Cpu).unwrap_or(false)
    }

    /// The name [`Precision::parse`] reads.
    pub fn name(self) -> &'static str {
        match self {
            Precision::Auto => "auto",
            Precision::Bf16 => "bf16",
            Precision::F32 => "f32",
        }
    }
}

/// `train.optimizer`: how AdamW keeps its moments.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Optimizer {
    /// f32 moments (8 bytes a trained value).
    AdamW,
    /// Block-quantized 8-bit moments, as bitsandbytes' `AdamW8bit` (2 bytes a value, plus an
    /// f32 maximum per block of 2048; tensors under 4096 values keep f32 moments).
    AdamW8bit,
}

impl Optimizer {
    /// Parses `adamw` or `adamw8bit`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "adamw" => Ok(Optimizer::AdamW),
            "adamw8bit" | "adamw_8bit" => Ok(Optimizer::AdamW8bit),
            o => bail!("train.optimizer `{o}` must be `adamw` or `adamw8bit`"),
        }
    }

    /// The name [`Optimizer::parse`] reads.
    pub fn name(self) -> &'static str {
        match self {
            Optimizer::AdamW => "adamw",
            Optimizer::AdamW8bit => "adamw8bit",
        }
    }

    /// A fresh optimizer of this kind.
    pub fn build(self, weight_decay: f64) -> crate::engine::AdamW {
        match self {
            Optimizer::AdamW => crate::engine::AdamW::new(weight_decay),
            Optimizer::AdamW8bit => crate::engine::AdamW::eight_bit(weight_decay),
        }
    }
}

crate::parsed_from_str!(Mode, DataFormat, LogSink, Precision, Optimizer);

/// A parameter group: its own learning rate and schedule (`[[train.groups]]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Group {
    /// Every trainable non-adapter weight (full fine-tuning, `modules_to_save`).
    Base,
    /// The adapters' A matrices.
    LoraA,
    /// The adapters' B matrices (LoRA+ scales their rate).
    LoraB,
}

impl Group {
    /// Every group.
    pub const ALL: [Group; 3] = [Group::Base, Group::LoraA, Group::LoraB];

    /// The group a trainable parameter belongs to, by its name.
    pub fn of(name: &str) -> Group {
        if name.ends_with("lora_A.weight") {
            Group::LoraA
        } else if name.ends_with("lora_B.weight") {
            Group::LoraB
        } else {
            Group::Base
        }
    }
}

/// A whole run.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    /// The base model.
    pub model: ModelSection,
    /// Adapters (required unless `train.mode = "full"`).
    #[serde(default)]
    pub lora: Option<LoraSection>,
    /// Training and evaluation data.
    pub data: DataSection,
    /// The optimisation loop.
    #[serde(default)]
    pub train: TrainSection,
    /// Forgetting suppression (EWC, contrastive retention).
    #[serde(default)]
    pub retain: Option<RetainSection>,
}

/// `[retain]`: forgetting suppression.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetainSection {
    /// The Fisher file EWC uses; estimated from `fisher_data` and written here when absent.
    #[serde(default)]
    pub fisher: Option<PathBuf>,
    /// General data the Fisher is estimated on.
    #[serde(default)]
    pub fisher_data: Vec<PathBuf>,
    /// Rows (examples) the Fisher averages, evenly spaced through the data.
    #[serde(default = "default_fisher_rows")]
    pub fisher_rows: usize,
    /// `empirical` (the data's labels) or `sampled` (the model's own predictions).
    #[serde(default = "default_estimator")]
    pub fisher_estimator: Estimator,
    /// `full` (bf16 entries) or `factored` (row and column sums).
    #[serde(default = "default_fisher_format")]
    pub fisher_format: FisherFormat,
    /// EWC strength (0: off).
    #[serde(default)]
    pub ewc_lambda: f64,
    /// Contrastive retention weight (0: off).
    #[serde(default)]
    pub contrastive_lambda: f64,
    /// InfoNCE temperature.
    #[serde(default = "default_tau")]
    pub temperature: f64,
    /// Tokens per contrastive sample (a segment of a general row).
    #[serde(default = "default_segment")]
    pub segment: usize,
    /// Distillation to the frozen base: the weight of the mean KL divergence from the base
    /// model's next-token distribution to the adapted model's on the general (replay) rows'
    /// target tokens (0: off). Under LoRA the base is the same model with its adapters off;
    /// under full fine-tuning a frozen copy of the base is kept beside the trained weights.
    #[serde(default)]
    pub distill_lambda: f64,
}

impl Default for RetainSection {
    /// An empty `[retain]`: the serde defaults, so there is one place that states them.
    fn default() -> Self {
        toml::from_str("").expect("every [retain] field has a default")
    }
}

fn default_fisher_rows() -> usize {
    64
}
fn default_estimator() -> Estimator {
    Estimator::Empirical
}
fn default_fisher_format() -> FisherFormat {
    FisherFormat::Full
}
fn default_tau() -> f64 {
    0.07
}
fn default_segment() -> usize {
    64
}

/// `[model]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// A `.gguf` file or a Hugging Face directory.
    pub path: PathBuf,
    /// Storage of the frozen projections: `f32`, `bf16`, `nf4`, `nf4-dq` or `as-stored`.
    #[serde(default = "default_base")]
    pub base_dtype: BaseDtype,
    /// An existing PEFT adapter directory to start from.
    #[serde(default)]
    pub adapter: Option<PathBuf>,
    /// Pack frozen bf16 weights for the AVX512-BF16 kernel (faster; 6 bytes a bf16 parameter
    /// instead of 2). Turn off when memory matters more than speed.
    #[serde(default = "yes")]
    pub pack_bf16: bool,
}

fn yes() -> bool {
    true
}

fn default_base() -> BaseDtype {
    BaseDtype::F32
}

/// `[lora]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraSection {
    /// Default rank.
    #[serde(default = "default_r")]
    pub r: usize,
    /// Default alpha (twice the rank when absent).
    #[serde(default)]
    pub alpha: Option<f64>,
    /// Modules to adapt.
    #[serde(default = "all_modules")]
    pub targets: Vec<String>,
    /// Input dropout.
    #[serde(default)]
    pub dropout: f32,
    /// rsLoRA scaling `alpha / sqrt(r)`.
    #[serde(default)]
    pub rslora: bool,
    /// Per-layer-range overrides (the layered plan).
    #[serde(default)]
    pub layers: Vec<PlanRule>,
    /// Layers left without adapters (frozen), as a range (`"0-9"`): PEFT's
    /// `layers_to_transform` is every other layer.
    #[serde(default)]
    pub frozen_layers: Option<String>,
    /// Base modules trained in full beside the adapters (PEFT `modules_to_save`): embed_tokens,
    /// lm_head, norm, input_layernorm, post_attention_layernorm.
    #[serde(default)]
    pub modules_to_save: Vec<String>,
}

fn default_r() -> usize {
    16
}

fn all_modules() -> Vec<String> {
    MODULES.iter().map(|s| s.to_string()).collect()
}

/// `[data]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// Training files or directories (or name several sources in `[[data.sources]]`).
    #[serde(default)]
    pub train: Vec<PathBuf>,
    /// Named data sources mixed by weight, in place of `train` / `general` / `domain_share`.
    #[serde(default)]
    pub sources: Vec<SourceSection>,
    /// `text` (raw text, packed) or `chat` (messages jsonl, loss on assistant turns).
    #[serde(default = "default_format")]
    pub format: DataFormat,
    /// Held-out files; when absent, `eval_fraction` of the packed training rows is held out.
    #[serde(default)]
    pub eval: Vec<PathBuf>,
    /// Fraction of rows held out when `eval` is empty.
    #[serde(default = "default_eval_fraction")]
    pub eval_fraction: f64,
    /// Tokens per row.
    #[serde(default = "default_seq")]
    pub seq_len: usize,
    /// General (replay) training files, mixed into every batch at `1 - domain_share`.
    #[serde(default)]
    pub general: Vec<PathBuf>,
    /// Share of each batch's rows drawn from `train` when `general` is given.
    #[serde(default)]
    pub domain_share: Option<f64>,
    /// General held-out files, scored before and after training (forgetting in perplexity).
    #[serde(default)]
    pub general_eval: Vec<PathBuf>,
    /// Domain share at the end of the run (the share moves from `domain_share` to this).
    #[serde(default)]
    pub domain_share_end: Option<f64>,
    /// Path of the share from `domain_share` to `domain_share_end`: linear, cosine or step.
    #[serde(default = "default_mix_schedule")]
    pub mix_schedule: MixShape,
    /// The files' column names for the fields strata reads (`instruction = "question"`,
    /// `text = "content"` ...), for every data file of the recipe.
    #[serde(default)]
    pub columns: crate::data::formats::Columns,
    /// A row that cannot be read: `error` (stop, naming the file, row and field: the default)
    /// or `skip` (leave it out, count it, say the first per file).
    #[serde(default)]
    pub bad_rows: BadRows,
    /// How raw text is packed into rows: `documents` (attention stays inside each document,
    /// RoPE restarts at each, and no target is predicted across a boundary), `stream`
    /// (documents joined by EOS, every row attended whole), or `auto` (the default: documents
    /// on the CPU, stream on a GPU, whose attention has no document masks yet).
    #[serde(default)]
    pub packing: Packing,
}

/// `data.packing`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Packing {
    /// Documents apart where the fused CPU attention runs, stream elsewhere.
    #[default]
    Auto,
    /// Documents joined by EOS, each row attended whole.
    Stream,
    /// Block-diagonal causal attention over the documents of a row.
    Documents,
}

impl Packing {
    /// Parses `auto`, `stream` or `documents`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Packing::Auto),
            "stream" => Ok(Packing::Stream),
            "documents" => Ok(Packing::Documents),
            o => bail!("data.packing `{o}` must be `auto`, `stream` or `documents`"),
        }
    }

    /// Whether rows keep their documents apart, for a run whose attention is (`fused_cpu`) or
    /// is not the fused CPU op (a GPU, or the composed ops a GPU runs).
    pub fn by_documents(self, fused_cpu: bool) -> bool {
        match self {
            Packing::Auto => fused_cpu,
            Packing::Stream => false,
            Packing::Documents => true,
        }
    }
}

crate::parsed_from_str!(Packing);

/// `[[data.sources]]`: one named source of the training mix.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SourceSection {
    /// The source's name (in logs and metrics).
    pub name: String,
    /// Its files or directories.
    pub train: Vec<PathBuf>,
    /// Its relative weight: the share of each batch's rows is `weight / sum of weights`.
    pub weight: f64,
    /// Its weight at the end of the run (moved along `data.mix_schedule`).
    #[serde(default)]
    pub weight_end: Option<f64>,
    /// How its files are read (`data.format` when absent).
    #[serde(default)]
    pub format: Option<DataFormat>,
    /// General (replay) rows: the retention terms (distillation, contrastive) read these.
    #[serde(default)]
    pub general: bool,
}

/// A source of the training mix as the trainer sees it: `[[data.sources]]`, or the
/// domain/general pair of `data.train` / `data.general` at `data.domain_share`.
#[derive(Clone, Debug, PartialEq)]
pub struct MixSource {
    /// Name.
    pub name: String,
    /// Files or directories.
    pub files: Vec<PathBuf>,
    /// Relative weight at the start.
    pub weight: f64,
    /// Relative weight at the end (the start's when it does not move).
    pub weight_end: f64,
    /// How the files are read.
    pub format: DataFormat,
    /// Whether the retention terms read its rows.
    pub general: bool,
}

/// `data.bad_rows`: what a row that cannot be read does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BadRows {
    /// Stop with the row's error.
    #[default]
    Error,
    /// Skip and count it.
    Skip,
}

impl BadRows {
    /// Parses `error` or `skip`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "error" => Ok(BadRows::Error),
            "skip" => Ok(BadRows::Skip),
            o => bail!("data.bad_rows `{o}` must be `error` or `skip`"),
        }
    }
}

crate::parsed_from_str!(BadRows);

impl DataSection {
    /// The sources of the training mix, in order: the first is the one `data.eval_fraction`
    /// holds rows out of and `train.epochs` counts passes over.
    pub fn mix(&self) -> Vec<MixSource> {
        if !self.sources.is_empty() {
            return self
                .sources
                .iter()
                .map(|s| MixSource {
                    name: s.name.clone(),
                    files: s.train.clone(),
                    weight: s.weight,
                    weight_end: s.weight_end.unwrap_or(s.weight),
                    format: s.format.unwrap_or(self.format),
                    general: s.general,
                })
                .collect();
        }
        let share = self.domain_share.unwrap_or(1.0);
        let end = self.domain_share_end.unwrap_or(share);
        let mut v = vec![MixSource {
            name: "domain".into(),
            files: self.train.clone(),
            weight: share,
            weight_end: end,
            format: self.format,
            general: false,
        }];
        if !self.general.is_empty() {
            v.push(MixSource {
                name: "general".into(),
                files: self.general.clone(),
                weight: 1.0 - share,
                weight_end: 1.0 - end,
                format: self.format,
                general: true,
            });
        }
        v
    }

    /// Whether some source of the mix is general (replay) data.
    pub fn has_general(&self) -> bool {
        self.mix().iter().any(|s| s.general)
    }

    /// How the data files' rows are read.
    pub fn row_options(&self) -> crate::data::formats::RowOptions {
        crate::data::formats::RowOptions {
            columns: self.columns.clone(),
            skip_bad: self.bad_rows == BadRows::Skip,
        }
    }
}

/// `[[data.sources]]`: named, with files, weights that can be normalised, and nothing of the
/// domain/general pair beside them.
fn check_sources(d: &DataSection) -> Result<()> {
    if !d.train.is_empty() || !d.general.is_empty() || d.domain_share.is_some() || d.domain_share_end.is_some() {
        bail!("[[data.sources]] replaces data.train, data.general and data.domain_share(_end): give one or the other");
    }
    let mut names = std::collections::HashSet::new();
    for s in &d.sources {
        if s.name.trim().is_empty() {
            bail!("a [[data.sources]] entry has an empty name");
        }
        if !names.insert(s.name.as_str()) {
            bail!("[[data.sources]]: the name `{}` is used twice", s.name);
        }
        if s.train.is_empty() {
            bail!("data source `{}` lists no files (train = [...])", s.name);
        }
        for (what, w) in [("weight", Some(s.weight)), ("weight_end", s.weight_end)] {
            if let Some(w) = w.filter(|w| !(w.is_finite() && *w >= 0.0)) {
                bail!(
                    "data source `{}`: {what} {w} must be a finite number of at least 0",
                    s.name
                );
            }
        }
    }
    let total = |f: &dyn Fn(&SourceSection) -> f64| d.sources.iter().map(f).sum::<f64>();
    if total(&|s| s.weight) <= 0.0 || total(&|s| s.weight_end.unwrap_or(s.weight)) <= 0.0 {
        bail!("[[data.sources]]: the weights sum to 0 (at the start or the end); give some source a positive weight");
    }
    Ok(())
}

fn default_mix_schedule() -> MixShape {
    MixShape::Linear
}

/// `[[train.groups]]`: a parameter group's own learning rate and schedule (fields left out
/// inherit from `[train]`).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GroupSection {
    /// `lora_a`, `lora_b` or `base` (every trainable non-adapter weight).
    pub name: Group,
    /// Peak learning rate.
    #[serde(default)]
    pub lr: Option<f64>,
    /// Warmup steps.
    #[serde(default)]
    pub warmup: Option<usize>,
    /// `cosine`, `linear` or `constant`.
    #[serde(default)]
    pub schedule: Option<Decay>,
    /// Final learning rate as a fraction of the peak.
    #[serde(default)]
    pub min_lr_ratio: Option<f64>,
}

fn default_format() -> DataFormat {
    DataFormat::Text
}
fn default_eval_fraction() -> f64 {
    0.05
}
fn default_seq() -> usize {
    256
}

/// `[train]`; every field has a default.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSection {
    /// `lora` or `full`.
    pub mode: Mode,
    /// Rows per micro-batch.
    pub batch: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Optimizer steps (0: derive from `epochs`).
    pub steps: usize,
    /// Passes over the training rows when `steps` is 0.
    pub epochs: f64,
    /// Peak learning rate.
    pub lr: f64,
    /// AdamW decoupled weight decay.
    pub weight_decay: f64,
    /// Warmup steps.
    pub warmup: usize,
    /// `cosine`, `linear` or `constant`.
    pub schedule: Decay,
    /// Final learning rate as a fraction of the peak.
    pub min_lr_ratio: f64,
    /// Global gradient-norm clip (0 disables).
    pub clip: f64,
    /// Seed of initialisation, dropout and data order.
    pub seed: u64,
    /// Where the model trains: `cpu` (the default), `cuda` or `cuda:N` (a build with the
    /// `cuda` feature).
    pub device: String,
    /// What the backward recomputes: `blocks` (gradient checkpointing, the default), `selective`
    /// (blocks, keeping the frozen products), `selective:K` (in K layers), `off`, or `auto` (the
    /// fastest whose predicted peak fits `memory_budget_gb`); `true` / `false` mean blocks / off.
    pub recompute: Recompute,
    /// Evaluate every this many steps (0: only at the start and end).
    pub eval_every: usize,
    /// At most this many held-out rows per evaluation (0: all).
    pub eval_rows: usize,
    /// Output directory (adapter, metrics, summary).
    pub out: PathBuf,
    /// LoRA+: the `lora_b` group's learning rate is this multiple of `lr` (unless a group sets it).
    pub loraplus_ratio: f64,
    /// Per-group learning rates and schedules.
    pub groups: Vec<GroupSection>,
    /// Watch memory and halve/grow the micro-batch (`batch`) to stay within the budget.
    pub memory_monitor: bool,
    /// Memory budget in GB for the monitor and for `recompute = "auto"` (0: this process plus
    /// what the machine has free at start, auto aiming under 85% of it; on a GPU, the device
    /// memory the run holds plus what the device has free).
    pub memory_budget_gb: f64,
    /// Write a checkpoint every this many steps (0: only at the end).
    pub checkpoint_every: usize,
    /// Checkpoints kept (the oldest are removed).
    pub keep_checkpoints: usize,
    /// Non-finite steps in a row (each skipped) after which the run stops.
    pub max_bad_steps: usize,
    /// Metrics outputs: `jsonl` (always written) and `tensorboard` (event files beside it).
    pub log: Vec<LogSink>,
    /// Trained dense weights (full fine-tuning, `modules_to_save`): `auto` (bf16 mixed
    /// precision where the CPU has AVX512-BF16), `bf16` or `f32`.
    pub precision: Precision,
    /// `adamw` (f32 moments) or `adamw8bit` (block-quantized 8-bit moments).
    pub optimizer: Optimizer,
}

impl Default for TrainSection {
    fn default() -> Self {
        Self {
            mode: Mode::Lora,
            batch: 4,
            grad_accum: 1,
            steps: 0,
            epochs: 1.0,
            lr: 2e-4,
            weight_decay: 0.0,
            warmup: 0,
            schedule: Decay::Cosine,
            min_lr_ratio: 0.1,
            clip: 1.0,
            seed: 0,
            device: "cpu".into(),
            recompute: Recompute::Blocks,
            eval_every: 0,
            eval_rows: 0,
            out: PathBuf::from("runs/latest"),
            loraplus_ratio: 1.0,
            groups: Vec::new(),
            memory_monitor: false,
            memory_budget_gb: 0.0,
            checkpoint_every: 0,
            keep_checkpoints: 2,
            max_bad_steps: 3,
            log: vec![LogSink::Jsonl],
            precision: Precision::Auto,
            optimizer: Optimizer::AdamW,
        }
    }
}

/// Applies `key=value` overrides (dotted keys, TOML values; bare words are strings).
pub fn apply_sets(doc: &mut toml::Table, sets: &[String]) -> Result<()> {
    for s in sets {
        let (key, val) = s
            .split_once('=')
            .with_context(|| format!("--set `{s}`: expected key=value"))?;
        let parsed: toml::Value = match format!("v = {val}").parse::<toml::Table>() {
            Ok(mut t) => t.remove("v").expect("just parsed"),
            Err(_) => toml::Value::String(val.to_string()),
        };
        let parts: Vec<&str> = key.trim().split('.').collect();
        let mut cur = &mut *doc;
        for p in &parts[..parts.len() - 1] {
            cur = cur
                .entry(p.to_string())
                .or_insert_with(|| toml::Value::Table(Default::default()))
                .as_table_mut()
                .with_context(|| format!("--set `{s}`: `{p}` is not a section"))?;
        }
        cur.insert(parts[parts.len() - 1].to_string(), parsed);
    }
    Ok(())
}

impl Recipe {
    /// Parses a recipe from TOML text (`origin` names it in errors; relative paths resolve
    /// against the current directory, as a user typing them expects).
    pub fn parse(text: &str, origin: &str, sets: &[String]) -> Result<Self> {
        let mut doc: toml::Table = text.parse().with_context(|| format!("{origin}: not valid TOML"))?;
        apply_sets(&mut doc, sets)?;
        let r: Recipe = toml::Value::Table(doc)
            .try_into()
            .with_context(|| format!("{origin}: invalid recipe"))?;
        r.check().with_context(|| format!("{origin}: invalid recipe"))?;
        Ok(r)
    }

    /// The data files and directories a run of this recipe reads (training, held-out, replay
    /// and Fisher data), as written: what an experiment's `--reuse` checks for change.
    pub fn data_paths(&self) -> Vec<PathBuf> {
        let d = &self.data;
        let mut v: Vec<PathBuf> = [&d.train, &d.eval, &d.general, &d.general_eval]
            .into_iter()
            .flatten()
            .cloned()
            .collect();
        v.extend(d.sources.iter().flat_map(|s| s.train.iter().cloned()));
        if let Some(r) = &self.retain {
            v.extend(r.fisher_data.iter().cloned());
        }
        v
    }

    /// Reads a recipe file.
    pub fn load(path: &Path, sets: &[String]) -> Result<Self> {
        let text = crate::fsio::read_text(path, crate::fsio::CONFIG_CAP, "recipe")
            .with_context(|| format!("cannot read recipe {}", path.display()))?;
        Self::parse(&text, &path.display().to_string(), sets)
    }

    fn check(&self) -> Result<()> {
        // Ranges first: the checks after it rely on every number being finite and in range.
        self.check_ranges()?;
        self.check_train()?;
        self.check_data()?;
        if let Some(r) = &self.retain {
            self.check_retain(r)?;
        }
        self.check_bases()
    }

    /// Every number a recipe holds, finite and in its range: a NaN, an infinity or a value no
    /// run can use (a sequence of 10^11 tokens, a dropout of 2) is refused naming the field.
    fn check_ranges(&self) -> Result<()> {
        let t = &self.train;
        let d = &self.data;
        let mut reals: Vec<(String, f64, std::ops::RangeInclusive<f64>, bool)> = vec![
            // (field, value, range, whether the lower bound itself is excluded)
            ("train.lr".into(), t.lr, 0.0..=1.0, true),
            ("train.epochs".into(), t.epochs, 0.0..=1e6, true),
            ("train.weight_decay".into(), t.weight_decay, 0.0..=10.0, false),
            ("train.min_lr_ratio".into(), t.min_lr_ratio, 0.0..=1.0, false),
            ("train.clip".into(), t.clip, 0.0..=1e12, false),
            ("train.loraplus_ratio".into(), t.loraplus_ratio, 0.0..=1e6, true),
            ("train.memory_budget_gb".into(), t.memory_budget_gb, 0.0..=1e9, false),
            ("data.eval_fraction".into(), d.eval_fraction, 0.0..=0.99, false),
        ];
        for (i, g) in t.groups.iter().enumerate() {
            if let Some(lr) = g.lr {
                reals.push((format!("train.groups[{i}].lr"), lr, 0.0..=1.0, true));
            }
            if let Some(m) = g.min_lr_ratio {
                reals.push((format!("train.groups[{i}].min_lr_ratio"), m, 0.0..=1.0, false));
            }
        }
        if let Some(l) = &self.lora {
            reals.push(("lora.dropout".into(), l.dropout as f64, 0.0..=0.99, false));
            if let Some(a) = l.alpha {
                reals.push(("lora.alpha".into(), a, 0.0..=1e9, true));
            }
            for (i, rule) in l.layers.iter().enumerate() {
                if let Some(a) = rule.alpha {
                    reals.push((format!("lora.layers[{i}].alpha"), a, 0.0..=1e9, true));
                }
            }
        }
        if let Some(r) = &self.retain {
            reals.push(("retain.ewc_lambda".into(), r.ewc_lambda, 0.0..=1e30, false));
            reals.push((
                "retain.contrastive_lambda".into(),
                r.contrastive_lambda,
                0.0..=1e6,
                false,
            ));
            reals.push(("retain.temperature".into(), r.temperature, 0.0..=1e3, true));
            reals.push(("retain.distill_lambda".into(), r.distill_lambda, 0.0..=1e6, false));
        }
        for (field, v, range, open_low) in reals {
            if !v.is_finite() || !range.contains(&v) || (open_low && v == *range.start()) {
                let (lo, hi) = (range.start(), range.end());
                let low = if open_low { "(" } else { "[" };
                bail!("{field} = {v} is out of range: it must be a finite number in {low}{lo}, {hi}]");
            }
        }
        let mut ints: Vec<(String, usize, std::ops::RangeInclusive<usize>)> = vec![
            ("train.batch".into(), t.batch, 1..=1 << 16),
            ("train.grad_accum".into(), t.grad_accum, 1..=1 << 20),
            ("train.steps".into(), t.steps, 0..=1 << 30),
            ("train.warmup".into(), t.warmup, 0..=1 << 30),
            ("train.keep_checkpoints".into(), t.keep_checkpoints, 1..=1 << 16),
            ("train.max_bad_steps".into(), t.max_bad_steps, 1..=1 << 20),
            ("data.seq_len".into(), d.seq_len, 2..=1 << 20),
        ];
        if let Some(l) = &self.lora {
            ints.push(("lora.r".into(), l.r, 1..=1 << 14));
            for (i, rule) in l.layers.iter().enumerate() {
                ints.push((format!("lora.layers[{i}].r"), rule.r, 1..=1 << 14));
            }
        }
        if let Some(r) = &self.retain {
            ints.push(("retain.fisher_rows".into(), r.fisher_rows, 1..=1 << 24));
            ints.push(("retain.segment".into(), r.segment, 1..=1 << 20));
        }
        for (field, v, range) in ints {
            if !range.contains(&v) {
                bail!(
                    "{field} = {v} is out of range: it must be an integer from {} to {}",
                    range.start(),
                    range.end()
                );
            }
        }
        Ok(())
    }

    fn check_train(&self) -> Result<()> {
        let t = &self.train;
        if t.mode == Mode::Lora && self.lora.is_none() {
            bail!("train.mode = \"lora\" needs a [lora] section");
        }
        if !(t.lr > 0.0 && t.lr < 1.0) {
            bail!("train.lr {} is outside (0, 1)", t.lr);
        }
        crate::util::device_ordinal(&t.device).context("train.device")?;
        if t.mode == Mode::Full
            && matches!(t.recompute, Recompute::Selective | Recompute::Partial(_))
            && !t.precision.bf16_on_cpu()
        {
            bail!("train.recompute = \"selective\" under full fine-tuning keeps the bf16 products of mixed precision, and this run computes in f32 (train.precision, or a CPU without AVX512-BF16): use \"blocks\" or \"off\"");
        }
        Ok(())
    }

    fn check_data(&self) -> Result<()> {
        let d = &self.data;
        if !d.sources.is_empty() {
            return check_sources(d);
        }
        if d.train.is_empty() {
            bail!("data.train lists no files (or name the data in [[data.sources]])");
        }
        match (d.general.is_empty(), d.domain_share) {
            (false, None) => bail!(
                "data.general is given: set data.domain_share (e.g. 0.8) to say how much of each batch is domain data"
            ),
            (true, Some(_)) => bail!("data.domain_share needs data.general (the general files to mix in)"),
            (_, Some(s)) if !(0.0..=1.0).contains(&s) => bail!("data.domain_share {s} is outside [0, 1]"),
            _ => {}
        }
        if let Some(e) = d.domain_share_end {
            if d.general.is_empty() || !(0.0..=1.0).contains(&e) {
                bail!("data.domain_share_end needs data.general and must lie in [0, 1] (got {e})");
            }
        }
        Ok(())
    }

    fn check_retain(&self, r: &RetainSection) -> Result<()> {
        if r.ewc_lambda > 0.0 && r.fisher.is_none() {
            bail!(
                "retain.ewc_lambda needs retain.fisher (a Fisher file, estimated from retain.fisher_data when absent)"
            );
        }
        if r.contrastive_lambda > 0.0 && !self.data.has_general() {
            bail!("retain.contrastive_lambda needs data.general (or a source with general = true): it is computed on the general rows of each batch");
        }
        if r.distill_lambda > 0.0 {
            if !self.data.has_general() {
                bail!("retain.distill_lambda needs data.general (or a source with general = true): the KL to the base is taken on the general rows of each batch");
            }
            let saved = self.lora.iter().flat_map(|l| &l.modules_to_save);
            if let Some(m) = saved
                .into_iter()
                .find(|m| m.as_str() == "lm_head" || m.as_str() == "embed_tokens")
            {
                bail!("retain.distill_lambda needs a frozen head, but lora.modules_to_save trains `{m}`: the base's distribution would move with it");
            }
        }
        Ok(())
    }

    /// Whether the run keeps a frozen copy of the base beside the trained weights: full
    /// fine-tuning with a retention term that compares with the base (distillation,
    /// contrastive), where no adapters can be switched off to recover it.
    pub fn keeps_base_copy(&self) -> bool {
        self.full()
            && self
                .retain
                .as_ref()
                .is_some_and(|r| r.distill_lambda > 0.0 || r.contrastive_lambda > 0.0)
    }

    fn check_bases(&self) -> Result<()> {
        let layer_bases = self.lora.iter().flat_map(|l| &l.layers).any(|r| r.base.is_some());
        if self.train.mode == Mode::Full && (self.model.base_dtype != BaseDtype::F32 || layer_bases) {
            bail!("train.mode = \"full\" trains every weight in f32: leave model.base_dtype at f32 and drop per-layer `base` (quantized and 16-bit bases are for frozen weights under LoRA)");
        }
        Ok(())
    }

    /// Whether every weight is trained (`train.mode = "full"`).
    pub fn full(&self) -> bool {
        self.train.mode == Mode::Full
    }

    /// Each parameter group's schedule over `total` steps: `[train]`'s, with LoRA+ for `lora_b`,
    /// then whatever `[[train.groups]]` sets.
    pub fn schedules(&self, total: usize) -> std::collections::BTreeMap<Group, Schedule> {
        let t = &self.train;
        Group::ALL
            .into_iter()
            .map(|name| {
                let g = t.groups.iter().find(|g| g.name == name);
                let ratio = if name == Group::LoraB { t.loraplus_ratio } else { 1.0 };
                let schedule = Schedule {
                    peak: g.and_then(|g| g.lr).unwrap_or(t.lr * ratio),
                    warmup: g.and_then(|g| g.warmup).unwrap_or(t.warmup),
                    total,
                    decay: g.and_then(|g| g.schedule).unwrap_or(t.schedule),
                    floor: g.and_then(|g| g.min_lr_ratio).unwrap_or(t.min_lr_ratio),
                };
                (name, schedule)
            })
            .collect()
    }

    /// Base precision of every projection, by layer: `model.base_dtype`, then whatever
    /// `[[lora.layers]]` rules say.
    pub fn base_table(&self, num_layers: usize) -> Result<Vec<PerProj<BaseDtype>>> {
        let base = self.model.base_dtype;
        match self.plan(num_layers)? {
            Some(p) => p.base_table(num_layers, base),
            None => Ok(vec![PerProj([base; Proj::COUNT]); num_layers]),
        }
    }

    /// The LoRA plan of this recipe for a model with `num_layers` blocks.
    pub fn plan(&self, num_layers: usize) -> Result<Option<LoraPlan>> {
        let Some(l) = &self.lora else { return Ok(None) };
        let targets: Vec<&str> = l.targets.iter().map(|s| s.as_str()).collect();
        let mut plan =
            LoraPlan::uniform(l.r, l.alpha.unwrap_or(2.0 * l.r as f64), &targets).with_rules(&l.layers, num_layers)?;
        plan.use_rslora = l.rslora;
        plan.dropout = l.dropout;
        if let Some(f) = &l.frozen_layers {
            let frozen = crate::adapter::plan::parse_range(f, num_layers).context("lora.frozen_layers")?;
            let kept: Vec<usize> = (0..num_layers).filter(|i| !frozen.contains(i)).collect();
            if kept.is_empty() {
                bail!("lora.frozen_layers = \"{f}\" freezes every layer: no adapter would train");
            }
            plan.layers = Some(kept);
        }
        for m in &l.modules_to_save {
            if !SAVABLE.contains(&m.as_str()) {
                bail!(
                    "lora.modules_to_save: `{m}` is not a base module strata trains beside adapters; choose from {:?}",
                    SAVABLE
                );
            }
        }
        plan.modules_to_save = l.modules_to_save.clone();
        Ok(Some(plan))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str =
        "[model]\npath = \"m.gguf\"\n[lora]\nr = 8\n[data]\ntrain = [\"d.txt\"]\n[train]\nmode = \"lora\"\n";

    /// `[[data.sources]]` reads as named weighted sources; the pair is its two-source case;
    /// names, files and weights are checked, and the pair's keys beside it are refused.
    #[test]
    fn named_sources_are_read_and_checked() -> Result<()> {
        let src = |extra: &str| {
            format!(
                "[model]\npath = \"m.gguf\"\n[lora]\nr = 8\n[data]\n{extra}\n[[data.sources]]\nname = \"a\"\ntrain = [\"a.txt\"]\nweight = 3\nweight_end = 1\n\
                 [[data.sources]]\nname = \"b\"\ntrain = [\"b.jsonl\"]\nweight = 1\nformat = \"alpaca\"\ngeneral = true\n"
            )
        };
        let r = Recipe::parse(&src(""), "r.toml", &[])?;
        let mix = r.data.mix();
        assert_eq!(mix.len(), 2);
        assert_eq!((mix[0].weight, mix[0].weight_end, mix[0].general), (3.0, 1.0, false));
        assert_eq!((mix[1].weight_end, mix[1].general), (1.0, true));
        assert_eq!(mix[1].format, DataFormat::parse("alpaca")?);
        assert!(r.data.has_general());
        let pair = Recipe::parse(
            BASE,
            "r.toml",
            &[
                "data.general=[\"g.txt\"]".into(),
                "data.domain_share=0.8".into(),
                "data.domain_share_end=0.6".into(),
            ],
        )?;
        let m = pair.data.mix();
        assert_eq!(
            (m[0].weight, m[0].weight_end, m[1].weight, m[1].general),
            (0.8, 0.6, 1.0 - 0.8, true)
        );
        for (extra, sets, want) in [
            ("train = [\"x.txt\"]", vec![], "replaces data.train"),
            ("", vec!["data.sources[1].name=\"a\"".to_string()], "used twice"),
        ] {
            let text = src(extra);
            let text = if sets.is_empty() {
                text
            } else {
                text.replace("name = \"b\"", "name = \"a\"")
            };
            let e = format!("{:#}", Recipe::parse(&text, "r.toml", &[]).unwrap_err());
            assert!(e.contains(want), "{want}: {e}");
        }
        let e = format!(
            "{:#}",
            Recipe::parse(&src("").replace("weight = 3", "weight = -1"), "r.toml", &[]).unwrap_err()
        );
        assert!(e.contains("weight -1"), "{e}");
        let zero = src("")
            .replace("weight = 3\nweight_end = 1", "weight = 0")
            .replace("weight = 1\n", "weight = 0\n");
        let e = format!("{:#}", Recipe::parse(&zero, "r.toml", &[]).unwrap_err());
        assert!(e.contains("sum to 0"), "{e}");
        let e = format!(
            "{:#}",
            Recipe::parse(&src("").replace("train = [\"a.txt\"]", "train = []"), "r.toml", &[]).unwrap_err()
        );
        assert!(e.contains("source `a` lists no files"), "{e}");
        Ok(())
    }

    #[test]
    fn frozen_layers_leave_those_layers_without_adapters() -> Result<()> {
        let r = Recipe::parse(
            &BASE.replace("r = 8\n", "r = 8\nfrozen_layers = \"0-2\"\n"),
            "r.toml",
            &[],
        )?;
        let plan = r.plan(5)?.expect("a LoRA plan");
        assert_eq!(plan.layers, Some(vec![3, 4]));
        assert!(plan.resolve(1, Proj::Q)?.is_none() && plan.resolve(3, Proj::Q)?.is_some());
        let all = Recipe::parse(
            &BASE.replace("r = 8\n", "r = 8\nfrozen_layers = \"0-\"\n"),
            "r.toml",
            &[],
        )?;
        assert!(format!("{:#}", all.plan(5).unwrap_err()).contains("freezes every layer"));
        Ok(())
    }

    #[test]
    fn unknown_keys_and_bad_values_are_rejected() {
        let e = Recipe::parse(&format!("{BASE}lrr = 1e-3\n"), "r.toml", &[]).unwrap_err();
        assert!(format!("{e:#}").contains("unknown field `lrr`"), "{e:#}");
        let e = Recipe::parse(BASE, "r.toml", &["train.schedule=\"wavy\"".into()]).unwrap_err();
        assert!(format!("{e:#}").contains("wavy"), "{e:#}");
        let e = Recipe::parse("[model]\npath = \"m\"\n[data]\ntrain = [\"d\"]\n", "r.toml", &[]).unwrap_err();
        assert!(format!("{e:#}").contains("[lora]"), "{e:#}");
        let e = Recipe::parse(BASE, "r.toml", &["train.device=\"gpu\"".into()]).unwrap_err();
        assert!(format!("{e:#}").contains("train.device: unknown device `gpu`"), "{e:#}");
        Recipe::parse(BASE, "r.toml", &["train.device=\"cuda:1\"".into()]).unwrap();
        let r = Recipe::parse(BASE, "r.toml", &["data.format=\"sharegpt\"".into()]).unwrap();
        assert_eq!(r.data.format, DataFormat::Chat(ChatFormat::ShareGpt));
        let e = Recipe::parse(BASE, "r.toml", &["data.format=\"parquet\"".into()]).unwrap_err();
        assert!(format!("{e:#}").contains("`alpaca`, `sharegpt`"), "{e:#}");
    }

    /// Numbers no run can use are refused naming the field, NaN and infinities included.
    #[test]
    fn numbers_out_of_range_are_refused_naming_the_field() {
        for (set, field) in [
            ("data.seq_len=100000000000", "data.seq_len"),
            ("lora.dropout=2", "lora.dropout"),
            ("lora.r=1000000000", "lora.r"),
            ("train.epochs=inf", "train.epochs"),
            ("train.epochs=nan", "train.epochs"),
            ("train.clip=-1", "train.clip"),
            ("train.min_lr_ratio=7", "train.min_lr_ratio"),
            ("train.lr=nan", "train.lr"),
            ("retain.fisher_rows=0", "retain.fisher_rows"),
            ("retain.temperature=-0.1", "retain.temperature"),
            ("retain.ewc_lambda=nan", "retain.ewc_lambda"),
            ("data.eval_fraction=1", "data.eval_fraction"),
            ("train.batch=0", "train.batch"),
        ] {
            let e = Recipe::parse(BASE, "r.toml", &[set.into()]).unwrap_err();
            let e = format!("{e:#}");
            assert!(
                e.contains(&format!("{field} = ")) && e.contains("out of range"),
                "{set}: {e}"
            );
        }
    }

    #[test]
    fn an_absent_retain_section_is_the_empty_one() {
        let d = RetainSection::default();
        assert_eq!((d.ewc_lambda, d.contrastive_lambda, d.temperature), (0.0, 0.0, 0.07));
        assert_eq!((d.fisher_rows, d.segment), (64, 64));
        assert_eq!(
            (d.fisher_estimator, d.fisher_format),
            (Estimator::Empirical, FisherFormat::Full)
        );
    }

    #[test]
    fn base_precisions_are_checked_and_resolved_per_layer() -> Result<()> {
        let e = Recipe::parse(BASE, "r.toml", &["model.base_dtype=\"nf8\"".into()]).unwrap_err();
        assert!(format!("{e:#}").contains("nf4-dq"), "{e:#}");
        let full = ["train.mode=\"full\"".into(), "model.base_dtype=\"nf4\"".into()];
        let e = Recipe::parse(BASE, "r.toml", &full).unwrap_err();
        assert!(format!("{e:#}").contains("frozen weights"), "{e:#}");
        let layered = format!("{BASE}[[lora.layers]]\nlayers = \"0-1\"\nr = 64\nbase = \"bf16\"\n");
        let r = Recipe::parse(&layered, "r.toml", &["model.base_dtype=\"nf4-dq\"".into()])?;
        let t = r.base_table(4)?;
        use crate::model::BaseDtype;
        assert_eq!((t[1][Proj::Q], t[2][Proj::Down]), (BaseDtype::Bf16, BaseDtype::Nf4Dq));
        let bad = layered.replace("base = \"bf16\"", "base = \"int3\"");
        let e = Recipe::parse(&bad, "r.toml", &[]).unwrap_err();
        assert!(format!("{e:#}").contains("int3"), "{e:#}");
        Ok(())
    }

    #[test]
    fn recompute_reads_names_and_the_older_booleans() -> Result<()> {
        use crate::engine::Recompute;
        for (v, want) in [
            ("true", Recompute::Blocks),
            ("false", Recompute::Off),
            ("\"blocks\"", Recompute::Blocks),
            ("\"selective\"", Recompute::Selective),
            ("\"off\"", Recompute::Off),
            ("\"auto\"", Recompute::Auto),
            ("\"selective:12\"", Recompute::Partial(12)),
        ] {
            let r = Recipe::parse(BASE, "r.toml", &[format!("train.recompute={v}")])?;
            assert_eq!(r.train.recompute, want, "{v}");
        }
        let e = Recipe::parse(BASE, "r.toml", &["train.recompute=\"sometimes\"".into()]).unwrap_err();
        assert!(
            format!("{e:#}").contains("off, blocks, selective, selective:K"),
            "{e:#}"
        );
        let e = Recipe::parse(BASE, "r.toml", &["train.recompute=3".into()]).unwrap_err();
        assert!(format!("{e:#}").contains("\"auto\" (or true / false)"), "{e:#}");
        let full = [
            "train.mode=\"full\"".into(),
            "train.recompute=\"selective\"".into(),
            "train.precision=\"f32\"".into(),
        ];
        let e = Recipe::parse(BASE, "r.toml", &full).unwrap_err();
        assert!(format!("{e:#}").contains("computes in f32"), "{e:#}");
        let full = [
            "train.mode=\"full\"".into(),
            "train.recompute=\"selective:3\"".into(),
            "train.precision=\"f32\"".into(),
        ];
        assert!(Recipe::parse(BASE, "r.toml", &full).is_err());
        Ok(())
    }

    #[test]
    fn mixing_needs_both_general_files_and_a_share() {
        let e = Recipe::parse(BASE, "r.toml", &["data.general=[\"g.txt\"]".into()]).unwrap_err();
        assert!(format!("{e:#}").contains("domain_share"), "{e:#}");
        let e = Recipe::parse(BASE, "r.toml", &["data.domain_share=0.8".into()]).unwrap_err();
        assert!(format!("{e:#}").contains("needs data.general"), "{e:#}");
        let sets = ["data.general=[\"g.txt\"]".into(), "data.domain_share=1.5".into()];
        assert!(format!("{:#}", Recipe::parse(BASE, "r.toml", &sets).unwrap_err()).contains("outside"));
    }

    #[test]
    fn sets_override_and_plans_resolve() -> Result<()> {
        let r = Recipe::parse(
            BASE,
            "r.toml",
            &["train.lr=1e-3".into(), "train.out=runs/x".into(), "lora.alpha=4".into()],
        )?;
        assert_eq!(r.train.lr, 1e-3);
        assert_eq!(r.train.out, PathBuf::from("runs/x"));
        let plan = r.plan(4)?.unwrap();
        assert_eq!(plan.resolve(0, crate::model::Proj::Q)?.unwrap().scale, 0.5);
        Ok(())
    }
}
