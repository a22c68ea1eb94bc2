//! One run of an experiment (train, evaluate, generate, at each of its seeds) and its
//! comparison with the base.

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

use super::steps::{head_lines, last_turns, read_json, slug, step};
use super::{Experiment, RunEntry, Sitting};
use crate::eval::compare::{gain_share, paired, paired_ratio, reduction_share, scores, Paired, Share};
use crate::eval::mc::McResult;
use crate::eval::perplexity::{RowLoss, RESAMPLES};
use crate::eval::report::Series;
use crate::train::recipe::Recipe;

/// acc_norm outcomes of multiple-choice file `file` in a `strata eval --out` result.
pub(super) fn mc_outcomes(v: &Value, file: &Path) -> Result<Vec<bool>> {
    let e = v["mc"]
        .as_array()
        .and_then(|a| a.iter().find(|e| e["file"] == json!(file)))
        .with_context(|| format!("no multiple-choice result for {}", file.display()))?;
    let r: McResult = serde_json::from_value(e["result"].clone())?;
    Ok(r.scores.iter().map(|s| s.correct_norm).collect())
}

/// Per-item acc_norm scores of multiple-choice file `file`, one list per seed of a run.
pub(super) fn mc_scores(evals: &[Value], file: &Path) -> Result<Vec<Vec<f64>>> {
    evals.iter().map(|v| Ok(scores(&mc_outcomes(v, file)?))).collect()
}

/// Perplexity and per-row losses of text or chat file `file` (`part`: "text" or "chat").
pub(super) fn text_rows(v: &Value, part: &str, file: &Path) -> Result<(f64, Vec<RowLoss>)> {
    let e = v[part]
        .as_array()
        .and_then(|a| a.iter().find(|e| e["file"] == json!(file)))
        .with_context(|| format!("no {part} result for {}", file.display()))?;
    Ok((
        e["metrics"]["perplexity"].as_f64().unwrap_or(f64::NAN),
        serde_json::from_value(e["rows"].clone())?,
    ))
}

/// [`text_rows`] over a run's seeds' results: the rows' losses at each seed, and the
/// perplexity of the seeds' mean loss per row (the geometric mean of theirs).
pub(super) fn seed_text_rows(evals: &[Value], part: &str, file: &Path) -> Result<(f64, Vec<Vec<RowLoss>>)> {
    let mut log_ppl = 0.0;
    let mut rows = Vec::new();
    for v in evals {
        let (p, r) = text_rows(v, part, file)?;
        log_ppl += p.ln();
        rows.push(r);
    }
    if rows.is_empty() {
        bail!("no results for {}", file.display());
    }
    Ok(((log_ppl / rows.len() as f64).exp(), rows))
}

/// A held-out text's perplexity after a run, and its ratio to the base's with a paired interval.
#[derive(Clone, Debug, serde::Serialize)]
pub(super) struct TextChange {
    pub(super) file: PathBuf,
    pub(super) perplexity: f64,
    pub(super) ratio: (f64, f64, f64),
}

pub(super) fn text_change(base: &Value, after: &[Value], part: &str, file: &Path) -> Result<TextChange> {
    let (_, b) = text_rows(base, part, file)?;
    let (perplexity, a) = seed_text_rows(after, part, file)?;
    Ok(TextChange {
        file: file.to_path_buf(),
        perplexity,
        ratio: paired_ratio(&b, &a, RESAMPLES, 0)?,
    })
}

/// A multiple-choice set's before/after comparison.
#[derive(Clone, Debug, serde::Serialize)]
pub(super) struct McChange {
    pub(super) file: PathBuf,
    pub(super) role: &'static str,
    pub(super) paired: Paired,
}

/// A run, over its seeds: its figures are the seeds' means (per item, per row).
pub(super) struct Row {
    pub(super) name: String,
    /// Its training seeds (one unless the experiment asks for several).
    pub(super) seeds: Vec<u64>,
    /// With several seeds, each seed's own headline general and domain comparisons.
    pub(super) per_seed: Vec<(u64, Paired, Paired)>,
    pub(super) method: Option<String>,
    pub(super) steps: usize,
    pub(super) tokens: usize,
    /// The highest peak of its seeds.
    pub(super) peak: u64,
    /// Mean training seconds of its seeds.
    pub(super) train_s: f64,
    pub(super) mc: Vec<McChange>,
    pub(super) text: Vec<TextChange>,
    pub(super) chat: Option<TextChange>,
    /// The first seed's answers to the side-by-side prompts.
    pub(super) side_by_side: Vec<String>,
    /// The first seed's training loss.
    pub(super) ce: Series,
    /// Seconds its training, evaluation and generation took, all seeds.
    pub(super) seconds: f64,
    /// Its seeds' `strata eval` results (per item and per row).
    pub(super) evals: Vec<Value>,
}

/// One figure of a run's learning as a share of the reference run's.
#[derive(Clone, Debug, serde::Serialize)]
pub(super) struct ShareOf {
    /// The set: a domain multiple-choice file or the domain's held-out text.
    pub(super) file: PathBuf,
    /// `gain` (accuracy points) or `perplexity reduction`.
    pub(super) what: &'static str,
    pub(super) share: Share,
}

impl Row {
    /// The headline general (first general set) and domain (first domain set) comparisons.
    pub(super) fn headline(&self, role: &str) -> &Paired {
        &self
            .mc
            .iter()
            .find(|m| m.role == role)
            .expect("an experiment has both roles")
            .paired
    }

    /// Its name in the tables: with its seeds where it has several.
    pub(super) fn label(&self) -> String {
        match self.seeds.as_slice() {
            [_] => self.name.clone(),
            seeds => format!(
                "{} (mean of seeds {})",
                self.name,
                seeds.iter().map(u64::to_string).collect::<Vec<_>>().join(", ")
            ),
        }
    }
}

/// The evaluation sets of an experiment, as cut for this run of it (first `mc_items` items of
/// each set copied into the output directory).
pub(super) struct Sets {
    pub(super) mc: Vec<(PathBuf, &'static str)>,
    pub(super) text: Vec<PathBuf>,
    pub(super) chat: Option<PathBuf>,
    pub(super) side_by_side: Option<PathBuf>,
    /// Seconds the base model took over the chat answers.
    pub(super) seconds: f64,
}

/// Copies the first items of every set into `out`, and has the base model answer the chat
/// prompts (once; kept for every run).
pub(super) fn prepare_sets(ex: &Experiment, out: &Path, model: &Path, sitting: Sitting) -> Result<Sets> {
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
        let base = vec!["--model".into(), model.display().to_string()];
        let args = generate_args(base, &p, &answers, ex.eval.chat_tokens);
        seconds += step(
            sitting,
            "the base model answers the chat prompts",
            &out.join("chat/base_answers.stamp.json"),
            &[args],
            &[],
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
    /// `run`'s learning as shares of `reference`'s: the gain on every domain multiple-choice
    /// set and the perplexity reduction on the first text file (the domain's held-out text),
    /// each where the reference learned clearly (its interval clear of zero), since a share of
    /// a loss or of noise says nothing.
    pub(super) fn shares(&self, base: &Value, reference: &Row, run: &Row) -> Result<Vec<ShareOf>> {
        let mut v = Vec::new();
        for ((f, role), m) in self.mc.iter().zip(&reference.mc) {
            if *role == "domain" && m.paired.gain.1 > 0.0 {
                let share = gain_share(
                    &scores(&mc_outcomes(base, f)?),
                    &mc_scores(&reference.evals, f)?,
                    &mc_scores(&run.evals, f)?,
                    2000,
                    0,
                )?;
                v.push(ShareOf {
                    file: f.clone(),
                    what: "gain",
                    share,
                });
            }
        }
        if let (Some(f), Some(c)) = (self.text.first(), reference.text.first()) {
            if c.ratio.2 < 1.0 {
                let rows = |e: &[Value]| seed_text_rows(e, "text", f).map(|r| r.1);
                let base = text_rows(base, "text", f)?.1;
                let share = reduction_share(&base, &rows(&reference.evals)?, &rows(&run.evals)?, RESAMPLES, 0)?;
                v.push(ShareOf {
                    file: f.clone(),
                    what: "perplexity reduction",
                    share,
                });
            }
        }
        Ok(v)
    }

    /// `strata eval` arguments for every set.
    pub(super) fn eval_args(&self, ex: &Experiment) -> Vec<String> {
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
    pub(super) fn compare(
        &self,
        base: &Value,
        after: &[Value],
    ) -> Result<(Vec<McChange>, Vec<TextChange>, Option<TextChange>)> {
        let mc = self
            .mc
            .iter()
            .map(|(f, role)| {
                Ok(McChange {
                    file: f.clone(),
                    role,
                    paired: paired(&scores(&mc_outcomes(base, f)?), &mc_scores(after, f)?, 2000, 0)?,
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

/// Evaluates the base model on every set (once; `--reuse` keeps it), returning its results
/// and the seconds it took.
pub(super) fn evaluate_base(ex: &Experiment, sets: &Sets, model: &Path, sitting: Sitting) -> Result<(Value, f64)> {
    let base_json = ex.out.join("base.json");
    let mut args = vec![
        "eval".into(),
        "--model".into(),
        model.display().to_string(),
        "--out".into(),
        base_json.display().to_string(),
    ];
    args.extend(sets.eval_args(ex));
    let seconds = step(
        sitting,
        "evaluating the base model",
        &ex.out.join("base.stamp.json"),
        &[args],
        &[],
        &[ex.out.join("base.log")],
        &[&base_json],
    )?;
    Ok((read_json(&base_json)?, seconds))
}

/// `strata generate` arguments: greedy answers of the model `model` names (its `--model` and
/// any `--adapter`) to the prompts file, appended to each conversation in `out`.
fn generate_args(model: Vec<String>, prompts: &Path, out: &Path, max_tokens: usize) -> Vec<String> {
    let mut args = vec!["generate".to_string()];
    args.extend(model);
    args.extend([
        "--prompts".into(),
        prompts.display().to_string(),
        "--out".into(),
        out.display().to_string(),
        "--max-tokens".into(),
        max_tokens.to_string(),
    ]);
    args
}

/// `strata` arguments naming the model a run produced (its merged model, or base + adapter).
pub(super) fn trained_model(recipe: &Recipe, dir: &Path, model: &Path) -> Vec<String> {
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

/// A run at one seed: where it trained and what it measured.
struct SeedRun {
    steps: usize,
    tokens: usize,
    peak: u64,
    train_s: f64,
    seconds: f64,
    eval: Value,
    side_by_side: Vec<String>,
    ce: Vec<(f64, f64)>,
}

/// The seeds a run trains at (its own, the experiment's, or its recipe's one), each with the
/// name it runs under and the recipe overrides that give it. The recipe's own seed runs under
/// the run's name, as a run without seeds does, so that adding seeds keeps what it made.
pub(super) fn seed_runs(ex: &Experiment, entry: &RunEntry, recipe: &Recipe) -> Vec<(u64, String, Vec<String>)> {
    let own = recipe.train.seed;
    let seeds = match (&entry.seeds, &ex.seeds) {
        (Some(s), _) | (None, Some(s)) if !s.is_empty() => s.clone(),
        _ => vec![own],
    };
    seeds
        .into_iter()
        .map(|seed| {
            if seed == own {
                (seed, entry.name.clone(), entry.set.clone())
            } else {
                let mut set = entry.set.clone();
                set.push(format!("train.seed={seed}"));
                (seed, format!("{}, seed {seed}", entry.name), set)
            }
        })
        .collect()
}

/// Trains one run at each of its seeds, evaluates every seed and compares their mean with the
/// base.
pub(super) fn one_run(
    ex: &Experiment,
    sets: &Sets,
    base: &Value,
    entry: &RunEntry,
    recipe: &Recipe,
    model: &Path,
    sitting: Sitting,
) -> Result<Row> {
    let mut seeds = Vec::new();
    let mut runs = Vec::new();
    for (seed, name, set) in seed_runs(ex, entry, recipe) {
        let recipe = Recipe::load(&entry.recipe, &set)?;
        runs.push(one_seed(ex, sets, entry, &name, &set, &recipe, model, sitting)?);
        seeds.push(seed);
    }
    let evals: Vec<Value> = runs.iter().map(|r| r.eval.clone()).collect();
    let (mc, text, chat) = sets.compare(base, &evals)?;
    let per_seed = if seeds.len() > 1 {
        seeds
            .iter()
            .zip(&evals)
            .map(|(&seed, e)| {
                let (m, _, _) = sets.compare(base, std::slice::from_ref(e))?;
                let head = |role| m.iter().find(|c| c.role == role).map(|c| c.paired.clone());
                Ok((
                    seed,
                    head("general").context("no general set")?,
                    head("domain").context("no domain set")?,
                ))
            })
            .collect::<Result<_>>()?
    } else {
        Vec::new()
    };
    let first = runs.swap_remove(0);
    let n = (runs.len() + 1) as f64;
    Ok(Row {
        name: entry.name.clone(),
        seeds,
        per_seed,
        method: entry.method.clone(),
        steps: first.steps,
        tokens: first.tokens,
        peak: runs.iter().map(|r| r.peak).fold(first.peak, u64::max),
        train_s: (first.train_s + runs.iter().map(|r| r.train_s).sum::<f64>()) / n,
        mc,
        text,
        chat,
        side_by_side: first.side_by_side,
        ce: (entry.name.clone(), first.ce),
        seconds: first.seconds + runs.iter().map(|r| r.seconds).sum::<f64>(),
        evals,
    })
}

/// Trains, evaluates and (for the side-by-side prompts) generates one seed of a run, named
/// `name`, with the overrides `set`.
#[allow(clippy::too_many_arguments)]
fn one_seed(
    ex: &Experiment,
    sets: &Sets,
    entry: &RunEntry,
    name: &str,
    set: &[String],
    recipe: &Recipe,
    model: &Path,
    sitting: Sitting,
) -> Result<SeedRun> {
    let out = &ex.out;
    let dir = out.join(slug(name));
    let per_step = recipe.train.batch * recipe.train.grad_accum * recipe.data.seq_len;
    let steps = entry.tokens.unwrap_or(ex.tokens).div_ceil(per_step).max(1);
    let mut train_args: Vec<String> = vec!["train".into(), entry.recipe.display().to_string()];
    for s in set {
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
    let gen_args = sets
        .side_by_side
        .as_ref()
        .map(|p| generate_args(trained_model(recipe, &dir, model), p, &gen, ex.eval.chat_tokens));
    let outputs = [dir.join("summary.json"), after_json.clone(), dir.join("metrics.jsonl")];
    let outputs: Vec<&Path> = outputs
        .iter()
        .map(PathBuf::as_path)
        .chain(gen_args.as_ref().map(|_| gen.as_path()))
        .collect();
    let log = |what: &str| out.join(format!("{}.{what}.log", slug(name)));
    let seconds = step(
        sitting,
        &format!("{name} ({steps} steps)"),
        &dir.join("experiment-stamp.json"),
        &[Some(train_args), Some(eval_args), gen_args.clone()]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>(),
        &recipe.data_paths(),
        &[log("train"), log("eval"), log("generate")],
        &outputs,
    )?;
    let summary = read_json(&dir.join("summary.json"))?;
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
    Ok(SeedRun {
        steps,
        tokens: summary["tokens"].as_u64().unwrap_or(0) as usize,
        peak: summary["peak_rss_bytes"].as_u64().unwrap_or(0),
        train_s: summary["train_seconds"].as_f64().unwrap_or(f64::NAN),
        seconds,
        eval: read_json(&after_json)?,
        side_by_side,
        ce,
    })
}
