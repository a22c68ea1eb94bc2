//! `strata experiment EXPERIMENT.toml [--quick]`: runs a set of recipes on the same token
//! budget, each training and each evaluation in its own process (so every peak memory is that
//! run's alone), evaluates the base once and every run after, and writes the comparison table
//! (`table.md`), the numbers (`results.json`) and an HTML report with the loss curves and a
//! learning-vs-forgetting scatter.

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use crate::data::chat::Conversation;
use crate::eval::compare::{paired, paired_ratio, Paired};
use crate::eval::mc::McResult;
use crate::eval::perplexity::{RowLoss, RESAMPLES};
use crate::eval::report::{line_chart, page, scatter_chart, Series};
use crate::train::recipe::Recipe;

/// Arguments of `strata experiment`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The experiment file (see recipes/forgetting.toml).
    pub experiment: PathBuf,
    /// The short variant: the `[quick]` budget and sample sizes.
    #[arg(long)]
    pub quick: bool,
    /// Keep what an earlier sitting finished (the base's answers and evaluation, each run's
    /// training and evaluation) when its recipe, budget, arguments and evaluation sets are
    /// unchanged, and do only the rest. The training data files are trusted to be unchanged.
    #[arg(long)]
    pub reuse: bool,
    /// Run nothing: report what earlier sittings finished (as `--reuse` would keep it) and
    /// list the runs not finished yet. For reading a long experiment between sittings.
    #[arg(long)]
    pub finished_only: bool,
}

/// What the steps of this sitting may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sitting {
    /// Run every step.
    Fresh,
    /// Keep what an earlier sitting finished; run the rest.
    Reuse,
    /// Keep what an earlier sitting finished; run nothing.
    FinishedOnly,
}

/// An experiment file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Experiment {
    /// Title of the report.
    pub name: String,
    /// Output directory.
    pub out: PathBuf,
    /// Training tokens per run (steps = tokens / (batch * grad_accum * seq_len), rounded up).
    pub tokens: usize,
    /// Evaluation sets.
    pub eval: EvalSection,
    /// Overrides for `--quick`.
    pub quick: Option<QuickSection>,
    /// Files the runs read that the base model makes (self-generated replay text), each made
    /// once, before the runs, and kept while it exists.
    #[serde(default, rename = "prepare")]
    pub prepares: Vec<Prepare>,
    /// The runs.
    #[serde(rename = "run")]
    pub runs: Vec<RunEntry>,
}

impl Experiment {
    /// Reads an experiment file, checking that every run's recipe parses.
    pub fn load(path: &Path) -> Result<Self> {
        let text = crate::fsio::read_text(path, crate::fsio::CONFIG_CAP, "experiment file")?;
        let ex: Experiment =
            toml::from_str(&text).with_context(|| format!("{}: invalid experiment", path.display()))?;
        for r in &ex.runs {
            Recipe::load(&r.recipe, &r.set).with_context(|| format!("{}: run `{}`", path.display(), r.name))?;
        }
        Ok(ex)
    }
}

/// One file or a list of files.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Files {
    /// A single file.
    One(PathBuf),
    /// Several files.
    Many(Vec<PathBuf>),
}

impl Files {
    /// The files.
    pub fn list(&self) -> Vec<PathBuf> {
        match self {
            Files::One(p) => vec![p.clone()],
            Files::Many(v) => v.clone(),
        }
    }
}

/// `[eval]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalSection {
    /// General multiple-choice jsonl files (forgetting); the first is the headline one.
    pub general_mc: Files,
    /// Domain multiple-choice jsonl files (learning); the first is the headline one.
    pub domain_mc: Files,
    /// Score the first this many items of each set (0: all).
    #[serde(default)]
    pub mc_items: usize,
    /// Held-out text files (perplexity).
    #[serde(default)]
    pub text: Vec<PathBuf>,
    /// Rows scored per text file, evenly spaced (0: all).
    #[serde(default)]
    pub text_rows: usize,
    /// Tokens per scored text row.
    #[serde(default = "default_eval_seq")]
    pub seq_len: usize,
    /// General chat prompts (`{"messages"}` jsonl): the base model answers them greedily once,
    /// and every run is scored on those answers (chat retention). Needs a chat template.
    pub chat_prompts: Option<PathBuf>,
    /// Prompts used (0: all).
    #[serde(default)]
    pub chat_items: usize,
    /// Tokens per base answer at most.
    #[serde(default = "default_chat_tokens")]
    pub chat_tokens: usize,
    /// Prompts whose answers every run also generates, shown side by side in the report.
    #[serde(default = "default_side_by_side")]
    pub side_by_side: usize,
}

fn default_chat_tokens() -> usize {
    96
}

fn default_side_by_side() -> usize {
    4
}

fn default_eval_seq() -> usize {
    256
}

/// `[quick]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuickSection {
    /// Training tokens per run.
    pub tokens: usize,
    /// Items per multiple-choice set.
    pub mc_items: usize,
    /// Rows per text file.
    pub text_rows: usize,
    /// Chat prompts used.
    #[serde(default)]
    pub chat_items: Option<usize>,
    /// The runs of the short variant, by name (all when absent).
    #[serde(default)]
    pub runs: Option<Vec<String>>,
    /// Output directory.
    pub out: PathBuf,
}

/// `[[prepare]]`: `strata ARGS --model MODEL --out OUT`, run when `out` does not exist.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Prepare {
    /// What it makes (for the log).
    pub name: String,
    /// The file it writes, which the runs' recipes read.
    pub out: PathBuf,
    /// The strata subcommand and its arguments (`["generate", "--samples", "160", ...]`).
    pub args: Vec<String>,
}

/// Makes every `[[prepare]]` file that is missing, with the experiment's model.
fn prepare_files(ex: &Experiment, model: &Path, sitting: Sitting) -> Result<()> {
    for p in &ex.prepares {
        if p.out.exists() {
            eprintln!("experiment: {} present: {}", p.name, p.out.display());
            continue;
        }
        if sitting == Sitting::FinishedOnly {
            bail!(
                "{} ({}) was never made: nothing of this experiment is finished",
                p.name,
                p.out.display()
            );
        }
        if let Some(dir) = p.out.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        }
        eprintln!("experiment: making {} ({})", p.name, p.out.display());
        let mut args = p.args.clone();
        args.extend([
            "--model".into(),
            model.display().to_string(),
            "--out".into(),
            p.out.display().to_string(),
        ]);
        strata(&args, &ex.out.join(format!("prepare-{}.log", slug(&p.name))))?;
    }
    Ok(())
}

/// `[[run]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunEntry {
    /// Name in the table.
    pub name: String,
    /// Its recipe.
    pub recipe: PathBuf,
    /// Recipe overrides, as `strata train --set` takes them (`"retain.distill_lambda=0.3"`):
    /// a sweep is one recipe with several `set`s.
    #[serde(default)]
    pub set: Vec<String>,
    /// The method this run is a point of: runs sharing one are drawn joined in the report's
    /// learning-vs-forgetting chart (a sweep's frontier).
    pub method: Option<String>,
    /// This run's training tokens, where not the experiment's: a run that adds replay rows to
    /// every batch on top of the domain rows the others see (a bigger batch) keeps their domain
    /// data and their steps only with a budget of its own. `--quick` scales it by the same
    /// factor as the experiment's.
    pub tokens: Option<usize>,
}

fn slug(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect::<String>()
        .split('-')
        .filter(|p| !p.is_empty())
        .collect::<Vec<_>>()
        .join("-")
}

fn strata(args: &[String], log: &Path) -> Result<()> {
    let exe = std::env::current_exe().context("cannot find the strata executable")?;
    let out = std::fs::File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
    let status = Command::new(exe)
        .args(args)
        .stdout(out.try_clone()?)
        .stderr(out)
        .status()
        .context("cannot start strata")?;
    if !status.success() {
        let tail: String = std::fs::read_to_string(log)
            .unwrap_or_default()
            .lines()
            .rev()
            .take(5)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n");
        bail!(
            "`strata {}` failed ({status}); log {}:\n{tail}",
            args.join(" "),
            log.display()
        );
    }
    Ok(())
}

fn read_json(p: &Path) -> Result<Value> {
    serde_json::from_str(&std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?)
        .with_context(|| format!("{} is not JSON", p.display()))
}

/// acc_norm outcomes of multiple-choice file `file` in a `strata eval --out` result.
/// What one step of the experiment was made from: the strata version, the step's arguments,
/// and the contents (CRC-32C) of every input file among them (a run's recipe, the model, the
/// sets); the step's `outputs` are left out, since an earlier sitting has written them.
fn stamp(args: &[String], outputs: &[&Path]) -> Value {
    let files: Vec<Value> = args
        .iter()
        .map(Path::new)
        .filter(|p| p.is_file() && !outputs.contains(p))
        .map(|p| {
            let crc = std::fs::read(p).map(|b| crc32c::crc32c(&b)).unwrap_or(0);
            json!([p.display().to_string(), crc])
        })
        .collect();
    json!({"strata": env!("CARGO_PKG_VERSION"), "args": args, "files": files})
}

/// The seconds an earlier sitting took over a step, when `--reuse` may keep it: its stamp
/// file holds `stamp` and its outputs exist.
fn reusable(sitting: Sitting, stamp_file: &Path, stamp: &Value, outputs: &[&Path]) -> Option<f64> {
    if sitting == Sitting::Fresh || !outputs.iter().all(|p| p.exists()) {
        return None;
    }
    let kept: Value = serde_json::from_str(&std::fs::read_to_string(stamp_file).ok()?).ok()?;
    (kept["stamp"] == *stamp).then(|| kept["seconds"].as_f64()).flatten()
}

/// Runs `strata ARGS` for a step unless `--reuse` keeps it, returning the seconds the step
/// took (in this sitting or the one that made it).
fn step(
    sitting: Sitting,
    what: &str,
    stamp_file: &Path,
    args: &[Vec<String>],
    logs: &[PathBuf],
    outputs: &[&Path],
) -> Result<f64> {
    let st = stamp(&args.concat(), outputs);
    if let Some(secs) = reusable(sitting, stamp_file, &st, outputs) {
        eprintln!("experiment: {what}: kept from an earlier sitting");
        return Ok(secs);
    }
    if sitting == Sitting::FinishedOnly {
        bail!("not finished in an earlier sitting (--finished-only runs nothing)");
    }
    eprintln!("experiment: {what}");
    let _ = std::fs::remove_file(stamp_file);
    let t = Instant::now();
    for (a, log) in args.iter().zip(logs) {
        strata(a, log)?;
    }
    let secs = t.elapsed().as_secs_f64();
    crate::util::write_atomic(stamp_file, json!({"stamp": st, "seconds": secs}).to_string().as_bytes())?;
    Ok(secs)
}

fn mc_outcomes(v: &Value, file: &Path) -> Result<Vec<bool>> {
    let e = v["mc"]
        .as_array()
        .and_then(|a| a.iter().find(|e| e["file"] == json!(file)))
        .with_context(|| format!("no multiple-choice result for {}", file.display()))?;
    let r: McResult = serde_json::from_value(e["result"].clone())?;
    Ok(r.scores.iter().map(|s| s.correct_norm).collect())
}

/// Perplexity and per-row losses of text or chat file `file` (`part`: "text" or "chat").
fn text_rows(v: &Value, part: &str, file: &Path) -> Result<(f64, Vec<RowLoss>)> {
    let e = v[part]
        .as_array()
        .and_then(|a| a.iter().find(|e| e["file"] == json!(file)))
        .with_context(|| format!("no {part} result for {}", file.display()))?;
    Ok((
        e["metrics"]["perplexity"].as_f64().unwrap_or(f64::NAN),
        serde_json::from_value(e["rows"].clone())?,
    ))
}

/// A held-out text's perplexity after a run, and its ratio to the base's with a paired interval.
#[derive(Clone, Debug, serde::Serialize)]
struct TextChange {
    file: PathBuf,
    perplexity: f64,
    ratio: (f64, f64, f64),
}

fn text_change(base: &Value, after: &Value, part: &str, file: &Path) -> Result<TextChange> {
    let (_, b) = text_rows(base, part, file)?;
    let (perplexity, a) = text_rows(after, part, file)?;
    Ok(TextChange {
        file: file.to_path_buf(),
        perplexity,
        ratio: paired_ratio(&b, &a, RESAMPLES, 0)?,
    })
}

/// A multiple-choice set's before/after comparison.
#[derive(Clone, Debug, serde::Serialize)]
struct McChange {
    file: PathBuf,
    role: &'static str,
    paired: Paired,
}

fn head_lines(src: &Path, dst: &Path, n: usize) -> Result<()> {
    let text = std::fs::read_to_string(src)
        .with_context(|| format!("cannot read {} (run `strata data build`)", src.display()))?;
    let kept: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let kept = if n == 0 { &kept[..] } else { &kept[..n.min(kept.len())] };
    crate::util::write_atomic(dst, (kept.join("\n") + "\n").as_bytes())
}

struct Row {
    name: String,
    method: Option<String>,
    steps: usize,
    tokens: usize,
    peak: u64,
    train_s: f64,
    mc: Vec<McChange>,
    text: Vec<TextChange>,
    chat: Option<TextChange>,
    side_by_side: Vec<String>,
    ce: Series,
    /// Seconds its training, evaluation and generation took.
    seconds: f64,
}

impl Row {
    /// The headline general (first general set) and domain (first domain set) comparisons.
    fn headline(&self, role: &str) -> &Paired {
        &self
            .mc
            .iter()
            .find(|m| m.role == role)
            .expect("an experiment has both roles")
            .paired
    }
}

/// The last turn of each conversation of a chat file (a prompt, or the answer
/// `strata generate --prompts` appended).
fn last_turns(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let c: Conversation = serde_json::from_str(l).with_context(|| {
                format!(
                    "{}: a line is not a {{\"messages\": [...]}} conversation",
                    path.display()
                )
            })?;
            Ok(c.messages.last().map(|m| m.content.clone()).unwrap_or_default())
        })
        .collect()
}

/// The evaluation sets of an experiment, as cut for this run of it (first `mc_items` items of
/// each set copied into the output directory).
struct Sets {
    mc: Vec<(PathBuf, &'static str)>,
    text: Vec<PathBuf>,
    chat: Option<PathBuf>,
    side_by_side: Option<PathBuf>,
    /// Seconds the base model took over the chat answers.
    seconds: f64,
}

/// Copies the first items of every set into `out`, and has the base model answer the chat
/// prompts (once; kept for every run).
fn prepare_sets(ex: &Experiment, out: &Path, model: &Path, sitting: Sitting) -> Result<Sets> {
    let mut mc = Vec::new();
    for (files, role) in [(&ex.eval.general_mc, "general"), (&ex.eval.domain_mc, "domain")] {
        for (k, f) in files.list().iter().enumerate() {
            let stem = f.file_stem().unwrap_or_default().to_string_lossy();
            let dst = out.join(format!("mc/{role}-{k}-{stem}.jsonl"));
            head_lines(f, &dst, ex.eval.mc_items)?;
            mc.push((dst, role));
        }
    }
    let (mut chat, mut side_by_side, mut seconds) = (None, None, 0.0);
    if let Some(prompts) = &ex.eval.chat_prompts {
        std::fs::create_dir_all(out.join("chat"))?;
        let (p, answers) = (out.join("chat/prompts.jsonl"), out.join("chat/base_answers.jsonl"));
        head_lines(prompts, &p, ex.eval.chat_items)?;
        let args: Vec<String> = vec![
            "generate".into(),
            "--model".into(),
            model.display().to_string(),
            "--prompts".into(),
            p.display().to_string(),
            "--out".into(),
            answers.display().to_string(),
            "--max-tokens".into(),
            ex.eval.chat_tokens.to_string(),
        ];
        seconds += step(
            sitting,
            "the base model answers the chat prompts",
            &out.join("chat/base_answers.stamp.json"),
            &[args],
            &[out.join("chat/base_answers.log")],
            &[&answers],
        )?;
        if ex.eval.side_by_side > 0 {
            let sbs = out.join("chat/side_by_side.jsonl");
            head_lines(&p, &sbs, ex.eval.side_by_side)?;
            side_by_side = Some(sbs);
        }
        chat = Some(answers);
    }
    Ok(Sets {
        seconds,
        mc,
        text: ex.eval.text.clone(),
        chat,
        side_by_side,
    })
}

impl Sets {
    /// `strata eval` arguments for every set.
    fn eval_args(&self, ex: &Experiment) -> Vec<String> {
        let mut v: Vec<String> = vec![
            "--base-dtype".into(),
            "bf16".into(),
            "--max-rows".into(),
            ex.eval.text_rows.to_string(),
            "--seq-len".into(),
            ex.eval.seq_len.to_string(),
        ];
        for (f, role) in &self.mc {
            v.extend([format!("--{role}-mc"), f.display().to_string()]);
        }
        if !self.text.is_empty() {
            v.push("--text".into());
            v.extend(self.text.iter().map(|p| p.display().to_string()));
        }
        if let Some(c) = &self.chat {
            v.extend(["--chat".into(), c.display().to_string()]);
        }
        v
    }

    /// Every comparison of a run's evaluation against the base's.
    fn compare(&self, base: &Value, after: &Value) -> Result<(Vec<McChange>, Vec<TextChange>, Option<TextChange>)> {
        let mc = self
            .mc
            .iter()
            .map(|(f, role)| {
                Ok(McChange {
                    file: f.clone(),
                    role,
                    paired: paired(&mc_outcomes(base, f)?, &mc_outcomes(after, f)?, 2000, 0)?,
                })
            })
            .collect::<Result<_>>()?;
        let text = self
            .text
            .iter()
            .map(|f| text_change(base, after, "text", f))
            .collect::<Result<_>>()?;
        let chat = self
            .chat
            .as_ref()
            .map(|f| text_change(base, after, "chat", f))
            .transpose()?;
        Ok((mc, text, chat))
    }
}

/// `strata` arguments naming the model a run produced (its merged model, or base + adapter).
fn trained_model(recipe: &Recipe, dir: &Path, model: &Path) -> Vec<String> {
    if recipe.full() {
        vec!["--model".into(), dir.join("model").display().to_string()]
    } else {
        vec![
            "--model".into(),
            model.display().to_string(),
            "--adapter".into(),
            dir.join("adapter").display().to_string(),
        ]
    }
}

/// Trains one run, evaluates it and compares it with the base.
fn one_run(
    ex: &Experiment,
    sets: &Sets,
    base: &Value,
    entry: &RunEntry,
    recipe: &Recipe,
    model: &Path,
    sitting: Sitting,
) -> Result<Row> {
    let out = &ex.out;
    let dir = out.join(slug(&entry.name));
    let per_step = recipe.train.batch * recipe.train.grad_accum * recipe.data.seq_len;
    let steps = entry.tokens.unwrap_or(ex.tokens).div_ceil(per_step).max(1);
    let mut train_args: Vec<String> = vec!["train".into(), entry.recipe.display().to_string()];
    for s in &entry.set {
        train_args.extend(["--set".into(), s.clone()]);
    }
    // The experiment's own settings come last: they win over the run's.
    train_args.extend([
        "--set".into(),
        format!("train.steps={steps}"),
        "--set".into(),
        format!("train.out=\"{}\"", dir.display()),
        "--set".into(),
        "train.eval_every=0".into(),
    ]);
    let after_json = dir.join("eval.json");
    let mut eval_args = vec!["eval".to_string(), "--out".into(), after_json.display().to_string()];
    eval_args.extend(trained_model(recipe, &dir, model));
    eval_args.extend(sets.eval_args(ex));
    let gen = dir.join("side_by_side.jsonl");
    let gen_args = sets.side_by_side.as_ref().map(|p| {
        let mut args = vec!["generate".to_string()];
        args.extend(trained_model(recipe, &dir, model));
        args.extend([
            "--prompts".into(),
            p.display().to_string(),
            "--out".into(),
            gen.display().to_string(),
            "--max-tokens".into(),
            ex.eval.chat_tokens.to_string(),
        ]);
        args
    });
    let outputs = [dir.join("summary.json"), after_json.clone(), dir.join("metrics.jsonl")];
    let outputs: Vec<&Path> = outputs
        .iter()
        .map(PathBuf::as_path)
        .chain(gen_args.as_ref().map(|_| gen.as_path()))
        .collect();
    let log = |what: &str| out.join(format!("{}.{what}.log", slug(&entry.name)));
    let seconds = step(
        sitting,
        &format!("{} ({steps} steps)", entry.name),
        &dir.join("experiment-stamp.json"),
        &[Some(train_args), Some(eval_args), gen_args.clone()]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>(),
        &[log("train"), log("eval"), log("generate")],
        &outputs,
    )?;
    let summary = read_json(&dir.join("summary.json"))?;
    let after = read_json(&after_json)?;
    let (mc, text, chat) = sets.compare(base, &after)?;
    let side_by_side = match gen_args {
        Some(_) => last_turns(&gen)?,
        None => Vec::new(),
    };
    let metrics = std::fs::read_to_string(dir.join("metrics.jsonl"))?;
    let ce = metrics
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| Some((v["step"].as_f64()?, v.get("ce")?.as_f64()?)))
        .collect();
    Ok(Row {
        name: entry.name.clone(),
        method: entry.method.clone(),
        steps,
        tokens: summary["tokens"].as_u64().unwrap_or(0) as usize,
        peak: summary["peak_rss_bytes"].as_u64().unwrap_or(0),
        train_s: summary["train_seconds"].as_f64().unwrap_or(f64::NAN),
        mc,
        text,
        chat,
        side_by_side,
        ce: (entry.name.clone(), ce),
        seconds,
    })
}

/// Runs `strata experiment`.
pub fn run(a: Args) -> Result<()> {
    let mut ex = Experiment::load(&a.experiment)?;
    let sitting = match (a.finished_only, a.reuse) {
        (true, _) => Sitting::FinishedOnly,
        (false, true) => Sitting::Reuse,
        (false, false) => Sitting::Fresh,
    };

    if a.quick {
        let q = ex
            .quick
            .take()
            .with_context(|| format!("{} has no [quick] section", a.experiment.display()))?;
        for r in &mut ex.runs {
            r.tokens = r
                .tokens
                .map(|t| (t as u128 * q.tokens as u128 / ex.tokens.max(1) as u128) as usize);
        }
        ex.tokens = q.tokens;
        ex.eval.mc_items = q.mc_items;
        ex.eval.text_rows = q.text_rows;
        ex.eval.chat_items = q.chat_items.unwrap_or(ex.eval.chat_items);
        ex.out = q.out;
        if let Some(names) = &q.runs {
            if let Some(n) = names.iter().find(|n| !ex.runs.iter().any(|r| r.name == **n)) {
                bail!(
                    "{}: [quick] runs names `{n}`, which no [[run]] is",
                    a.experiment.display()
                );
            }
            ex.runs.retain(|r| names.contains(&r.name));
        }
    }
    if ex.runs.is_empty() {
        bail!("{}: no [[run]] entries", a.experiment.display());
    }
    let recipes: Vec<Recipe> = ex
        .runs
        .iter()
        .map(|r| Recipe::load(&r.recipe, &r.set))
        .collect::<Result<_>>()?;
    let model = recipes[0].model.path.clone();
    if let Some((r, _)) = ex.runs.iter().zip(&recipes).find(|(_, rc)| rc.model.path != model) {
        bail!(
            "run `{}` uses another model than the first run; an experiment compares recipes on one model",
            r.name
        );
    }
    let out = ex.out.clone();
    std::fs::create_dir_all(out.join("mc")).with_context(|| format!("cannot create {}", out.display()))?;
    let start = Instant::now();
    eprintln!(
        "experiment: {} runs of {} tokens each{}, into {}",
        ex.runs.len(),
        ex.tokens,
        if ex.runs.iter().any(|r| r.tokens.is_some()) {
            " (some with their own)"
        } else {
            ""
        },
        out.display()
    );
    prepare_files(&ex, &model, sitting)?;
    // Steps an earlier sitting made count with the time they took then, so the total is the
    // experiment's, however many sittings it took.
    let prepare_secs = start.elapsed().as_secs_f64();
    let sets = prepare_sets(&ex, &out, &model, sitting)?;
    let base_json = out.join("base.json");
    let mut args = vec![
        "eval".into(),
        "--model".into(),
        model.display().to_string(),
        "--out".into(),
        base_json.display().to_string(),
    ];
    args.extend(sets.eval_args(&ex));
    let base_secs = step(
        sitting,
        "evaluating the base model",
        &out.join("base.stamp.json"),
        &[args],
        &[out.join("base.log")],
        &[&base_json],
    )?;
    let base = read_json(&base_json)?;

    let mut rows = Vec::new();
    let mut failed = Vec::new();
    for (entry, recipe) in ex.runs.iter().zip(&recipes) {
        match one_run(&ex, &sets, &base, entry, recipe, &model, sitting) {
            Ok(row) => rows.push(row),
            Err(_) if sitting == Sitting::FinishedOnly => {
                eprintln!("experiment: run `{}` is not finished yet", entry.name);
                failed.push((entry.name.clone(), "not finished yet".to_string()));
            }
            Err(e) => {
                eprintln!("experiment: run `{}` failed: {e:#}", entry.name);
                failed.push((entry.name.clone(), format!("failed: {e:#}")));
            }
        }
    }
    let base_answers = match &sets.side_by_side {
        Some(_) => last_turns(sets.chat.as_ref().expect("side by side needs the chat set"))?,
        None => Vec::new(),
    };
    let total = prepare_secs + sets.seconds + base_secs + rows.iter().map(|r| r.seconds).sum::<f64>();
    let md = table(&ex, &sets, &rows, &base, &failed, a.quick, total)?;
    crate::util::write_atomic(&out.join("table.md"), md.as_bytes())?;
    let results = json!({
        "experiment": ex.name, "quick": a.quick, "tokens_per_run": ex.tokens, "seconds": total, "this_sitting_seconds": start.elapsed().as_secs_f64(),
        "runs": rows.iter().map(|r| json!({"name": r.name, "steps": r.steps, "tokens": r.tokens, "peak_rss_bytes": r.peak,
            "train_seconds": r.train_s, "seconds": r.seconds, "general": r.headline("general"), "domain": r.headline("domain"),
            "mc": r.mc, "text": r.text, "chat": r.chat, "side_by_side": r.side_by_side})).collect::<Vec<_>>(),
        "base_side_by_side": base_answers,
        "failed": failed,
    });
    crate::util::write_atomic(
        &out.join("results.json"),
        serde_json::to_string_pretty(&results)?.as_bytes(),
    )?;
    let prompts = match &sets.side_by_side {
        Some(p) => last_turns(p)?,
        None => Vec::new(),
    };
    let html = report_html(&ex, &rows, &md, &prompts, &base_answers);
    crate::util::write_atomic(&out.join("report.html"), html.as_bytes())?;
    println!("{md}");
    eprintln!(
        "wrote {}, {} and {}",
        out.join("table.md").display(),
        out.join("results.json").display(),
        out.join("report.html").display()
    );
    if !failed.is_empty() && sitting != Sitting::FinishedOnly {
        bail!("{} of {} runs failed (see the table)", failed.len(), ex.runs.len());
    }
    Ok(())
}

fn pct(x: f64) -> String {
    format!("{:.1}%", 100.0 * x)
}

/// A short name for a set file: its directory and stem (`finance/heldout`).
fn label(p: &Path) -> String {
    let stem = p.file_stem().unwrap_or_default().to_string_lossy();
    match p.parent().and_then(|d| d.file_name()) {
        Some(d) => format!("{}/{stem}", d.to_string_lossy()),
        None => stem.to_string(),
    }
}

fn ratio_cell(c: &TextChange) -> String {
    format!(
        " {:.2} ({:+.1}% [{:+.1}, {:+.1}]) |",
        c.perplexity,
        100.0 * (c.ratio.0 - 1.0),
        100.0 * (c.ratio.1 - 1.0),
        100.0 * (c.ratio.2 - 1.0)
    )
}

fn table(
    ex: &Experiment,
    sets: &Sets,
    rows: &[Row],
    base: &Value,
    failed: &[(String, String)],
    quick: bool,
    wall: f64,
) -> Result<String> {
    let acc = |v: &[bool]| v.iter().filter(|&&x| x).count() as f64 / v.len().max(1) as f64;
    let originals: Vec<PathBuf> = ex
        .eval
        .general_mc
        .list()
        .into_iter()
        .chain(ex.eval.domain_mc.list())
        .collect();
    let mc_names: Vec<String> = originals.iter().map(|p| label(p)).collect();
    let mut s = String::from("| run | peak memory | train time |");
    for ((_, role), n) in sets.mc.iter().zip(&mc_names) {
        let what = if *role == "general" { "forgetting" } else { "gain" };
        s += &format!(" {n} acc | {what} [95%] |");
    }
    s += &format!(
        "\n|---|---|---|{}\n| base model | | |",
        "---|---|".repeat(sets.mc.len())
    );
    for (f, _) in &sets.mc {
        s += &format!(" {} | |", pct(acc(&mc_outcomes(base, f)?)));
    }
    s += "\n";
    for r in rows {
        s += &format!("| {} | {:.2} GB | {:.0} s |", r.name, r.peak as f64 / 1e9, r.train_s);
        for m in &r.mc {
            let p = &m.paired;
            let (v, unit) = if m.role == "general" {
                (p.forgetting, "%")
            } else {
                (p.gain, " pts")
            };
            s += &format!(
                " {} | {:+.1}{unit} [{:+.1}, {:+.1}] |",
                pct(p.after),
                100.0 * v.0,
                100.0 * v.1,
                100.0 * v.2
            );
        }
        s += "\n";
    }
    for (n, e) in failed {
        s += &format!("| {n} | {} |\n", e.lines().next().unwrap_or(""));
    }
    // Perplexities: held-out domain and general text, and chat retention.
    let mut t = String::from("\n| run |");
    for f in &sets.text {
        t += &format!(" {} ppl (change [95%]) |", label(f));
    }
    if sets.chat.is_some() {
        t += " chat retention ppl (change [95%]) |";
    }
    let cols = sets.text.len() + usize::from(sets.chat.is_some());
    t += &format!("\n|---|{}\n| base model |", "---|".repeat(cols));
    for f in &sets.text {
        t += &format!(" {:.2} |", text_rows(base, "text", f)?.0);
    }
    if let Some(c) = &sets.chat {
        t += &format!(" {:.2} |", text_rows(base, "chat", c)?.0);
    }
    t += "\n";
    for r in rows {
        t += &format!("| {} |", r.name);
        for c in r.text.iter().chain(&r.chat) {
            t += &ratio_cell(c);
        }
        t += "\n";
    }
    let items: Vec<String> = sets
        .mc
        .iter()
        .zip(&mc_names)
        .map(|((f, _), n)| Ok(format!("{} {n}", mc_outcomes(base, f)?.len())))
        .collect::<Result<_>>()?;
    s += &t;
    let own_budget = |r: &Row| ex.runs.iter().find(|e| e.name == r.name).and_then(|e| e.tokens);
    let usual = rows
        .iter()
        .find(|r| own_budget(r).is_none())
        .map_or(String::new(), |r| format!(" ({} steps of the recipe's batch)", r.steps));
    let own: Vec<String> = rows
        .iter()
        .filter_map(|r| own_budget(r).map(|t| format!("{}: {t} ({} steps)", r.name, r.steps)))
        .collect();
    // Say the usual budget only of the runs that trained on it.
    let on_usual = rows.len() - own.len();
    let budgets = match (on_usual, own.is_empty()) {
        (_, true) => format!("{} runs of {} training tokens each{usual}", rows.len(), ex.tokens),
        (0, false) => format!(
            "{} runs, each on its own budget of training tokens: {}",
            rows.len(),
            own.join("; ")
        ),
        (k, false) => format!(
            "{} runs: {k} of {} training tokens{}{usual}; {}",
            rows.len(),
            ex.tokens,
            if k > 1 { " each" } else { "" },
            own.join("; ")
        ),
    };
    s += &format!(
        "\n{}{budgets}. Multiple choice: {} items \
         (acc_norm; forgetting = (before - after) / before on general sets, gain = after - before on domain \
         sets; 95% paired-bootstrap intervals). Perplexity on {} evenly spaced held-out rows of {} tokens per \
         file, its change against the base with a 95% paired-bootstrap interval over rows; chat retention = \
         perplexity of the base model's own greedy answers to held-out general prompts. Every training and \
         evaluation in its own process; {:.0} min in all.\n",
        if quick { "Quick variant: " } else { "" },
        items.join(", "),
        ex.eval.text_rows,
        ex.eval.seq_len,
        wall / 60.0
    );
    Ok(s)
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// The markdown tables of `md` as HTML tables (the first row of each is its header).
fn tables_html(md: &str) -> String {
    let mut out = String::new();
    for block in md.split("\n\n") {
        let rows: Vec<&str> = block
            .lines()
            .filter(|l| l.starts_with('|') && !l.starts_with("|---"))
            .collect();
        if rows.is_empty() {
            continue;
        }
        out += "<table>";
        for (i, l) in rows.iter().enumerate() {
            let tag = if i == 0 { "th" } else { "td" };
            let cells: String = l
                .trim_matches('|')
                .split('|')
                .map(|c| format!("<{tag}>{}</{tag}>", esc(c.trim())))
                .collect();
            out += &format!("<tr>{cells}</tr>");
        }
        out += "</table>";
    }
    out
}

/// The set the learning-vs-forgetting chart plots for `role`: the first of that role whose
/// figure (forgetting for general sets, gain for domain sets) is defined for every run (a
/// forgetting rate is undefined where the base scored 0), else the first of that role. Every
/// row lists the same sets in the same order, so one index serves them all.
fn chart_set(rows: &[Row], role: &str) -> Option<usize> {
    let first = rows.first()?;
    let of_role: Vec<usize> = (0..first.mc.len()).filter(|&k| first.mc[k].role == role).collect();
    let value = |p: &Paired| if role == "general" { p.forgetting.0 } else { p.gain.0 };
    of_role
        .iter()
        .copied()
        .find(|&k| rows.iter().all(|r| value(&r.mc[k].paired).is_finite()))
        .or(of_role.first().copied())
}

/// The runs of each method with more than one run, by index, in order of forgetting on the
/// general set `k`.
fn frontiers(rows: &[Row], k: usize) -> Vec<Vec<usize>> {
    let mut methods: Vec<&str> = rows.iter().filter_map(|r| r.method.as_deref()).collect();
    methods.sort_unstable();
    methods.dedup();
    methods
        .into_iter()
        .map(|m| {
            let mut ix: Vec<usize> = (0..rows.len())
                .filter(|&i| rows[i].method.as_deref() == Some(m))
                .collect();
            ix.sort_by(|&a, &b| {
                let f = |i: usize| rows[i].mc[k].paired.forgetting.0;
                f(a).total_cmp(&f(b))
            });
            ix
        })
        .filter(|ix| ix.len() > 1)
        .collect()
}

fn report_html(ex: &Experiment, rows: &[Row], md: &str, prompts: &[String], base_answers: &[String]) -> String {
    let curves: Vec<Series> = rows.iter().map(|r| r.ce.clone()).collect();
    let (gk, dk) = (
        chart_set(rows, "general").unwrap_or(0),
        chart_set(rows, "domain").unwrap_or(0),
    );
    let set_name = |k: usize| {
        rows.first()
            .map(|r| r.mc[k].file.display().to_string())
            .unwrap_or_default()
    };
    let pts: Vec<_> = rows
        .iter()
        .map(|r| {
            let (g, d) = (&r.mc[gk].paired, &r.mc[dk].paired);
            (
                r.name.clone(),
                100.0 * g.forgetting.0,
                (100.0 * g.forgetting.1, 100.0 * g.forgetting.2),
                100.0 * d.gain.0,
                (100.0 * d.gain.1, 100.0 * d.gain.2),
            )
        })
        .collect();
    let note: String = md
        .lines()
        .filter(|l| !l.starts_with('|') && !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    let mut sections = vec![
        (
            "Results".to_string(),
            format!("{}<p>{}</p>", tables_html(md), esc(&note)),
        ),
        (
            "Curves".into(),
            format!(
                "<div class='plots'>{}{}</div>",
                line_chart("training cross-entropy per run", "step", &curves),
                scatter_chart(
                    "learning vs forgetting (95% intervals; a method's sweep joined)",
                    &format!("forgetting rate on {} (%)", set_name(gk)),
                    &format!("gain on {} (points)", set_name(dk)),
                    &pts,
                    &frontiers(rows, gk)
                )
            ),
        ),
    ];
    if !prompts.is_empty() {
        let mut h = String::from("<table><tr><th>prompt</th><th>base model</th>");
        for r in rows {
            h += &format!("<th>{}</th>", esc(&r.name));
        }
        h += "</tr>";
        for (k, p) in prompts.iter().enumerate() {
            h += &format!("<tr><td>{}</td>", esc(p));
            let cell = |v: &[String]| format!("<td>{}</td>", esc(v.get(k).map_or("", |s| s.as_str())));
            h += &cell(base_answers);
            for r in rows {
                h += &cell(&r.side_by_side);
            }
            h += "</tr>";
        }
        sections.push((
            "Side by side (greedy answers to held-out prompts)".into(),
            h + "</table>",
        ));
    }
    page(&ex.name, &sections)
}
