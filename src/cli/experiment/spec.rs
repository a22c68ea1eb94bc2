//! The experiment file: its runs, evaluation sets and quick variant.

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::path::{Path, PathBuf};

use crate::train::recipe::Recipe;

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
    /// The run the others' learning is read against (plain fine-tuning): the table gives every
    /// run's domain gains and the first text file's perplexity reduction as shares of this
    /// run's, with intervals.
    pub reference: Option<String>,
    /// Training seeds of every run that names none of its own (default: the recipe's one).
    pub seeds: Option<Vec<u64>>,
    /// Recipe overrides for every run, applied before each run's own `set` (which may
    /// override them): one experiment's change to several recipes (its training data) is
    /// written once.
    #[serde(default)]
    pub set: Vec<String>,
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
        let mut ex: Experiment =
            toml::from_str(&text).with_context(|| format!("{}: invalid experiment", path.display()))?;
        for r in &mut ex.runs {
            r.set.splice(0..0, ex.set.iter().cloned());
        }
        for r in &ex.runs {
            Recipe::load(&r.recipe, &r.set).with_context(|| format!("{}: run `{}`", path.display(), r.name))?;
        }
        if let Some(n) = &ex.reference {
            ex.check_names(std::slice::from_ref(n), "reference", path)?;
        }
        for r in &ex.runs {
            if let Some(n) = &r.reference {
                ex.check_names(std::slice::from_ref(n), &format!("run `{}`'s reference", r.name), path)?;
            }
        }
        let lists =
            std::iter::once(("the experiment", &ex.seeds)).chain(ex.runs.iter().map(|r| (r.name.as_str(), &r.seeds)));
        for (who, s) in lists.filter_map(|(who, s)| Some((who, s.as_ref()?))) {
            let mut sorted = s.clone();
            sorted.sort_unstable();
            sorted.dedup();
            if s.is_empty() || sorted.len() != s.len() {
                bail!(
                    "{}: seeds of {who} must be a non-empty list of different seeds, got {s:?}",
                    path.display()
                );
            }
        }
        Ok(ex)
    }

    /// Every run's recipe (overrides applied) and the one model they all train.
    pub fn recipes(&self, path: &Path) -> Result<(Vec<Recipe>, PathBuf)> {
        if self.runs.is_empty() {
            bail!("{}: no [[run]] entries", path.display());
        }
        let recipes: Vec<Recipe> = self
            .runs
            .iter()
            .map(|r| Recipe::load(&r.recipe, &r.set))
            .collect::<Result<_>>()?;
        let model = recipes[0].model.path.clone();
        if let Some((r, _)) = self.runs.iter().zip(&recipes).find(|(_, rc)| rc.model.path != model) {
            bail!(
                "run `{}` uses another model than the first run; an experiment compares recipes on one model",
                r.name
            );
        }
        Ok((recipes, model))
    }

    /// Turns this experiment into its short variant: the `[quick]` budget (each run's own
    /// budget scaled by the same factor), sample sizes, runs and output directory, and each
    /// run at its first seed only.
    pub fn use_quick_variant(&mut self, path: &Path) -> Result<()> {
        let q = self
            .quick
            .take()
            .with_context(|| format!("{} has no [quick] section", path.display()))?;
        for r in &mut self.runs {
            r.tokens = r
                .tokens
                .map(|t| (t as u128 * q.tokens as u128 / self.tokens.max(1) as u128) as usize);
        }
        // One seed per run: several belong to the full experiment's time.
        let lists = std::iter::once(&mut self.seeds).chain(self.runs.iter_mut().map(|r| &mut r.seeds));
        for s in lists.flatten() {
            s.truncate(1);
        }
        self.tokens = q.tokens;
        self.eval.mc_items = q.mc_items;
        self.eval.text_rows = q.text_rows;
        self.eval.chat_items = q.chat_items.unwrap_or(self.eval.chat_items);
        self.out = q.out;
        if let Some(names) = &q.runs {
            self.keep_runs(names, "[quick] runs", path)?;
        }
        Ok(())
    }

    /// Keeps only the runs `names` names (`what` says where the names come from).
    pub fn keep_runs(&mut self, names: &[String], what: &str, path: &Path) -> Result<()> {
        self.check_names(names, what, path)?;
        self.runs.retain(|r| names.contains(&r.name));
        Ok(())
    }

    fn check_names(&self, names: &[String], what: &str, path: &Path) -> Result<()> {
        if let Some(n) = names.iter().find(|n| !self.runs.iter().any(|r| r.name == **n)) {
            let known: Vec<&str> = self.runs.iter().map(|r| r.name.as_str()).collect();
            bail!(
                "{}: {what} names `{n}`, which no [[run]] is (runs: {})",
                path.display(),
                known.join("; ")
            );
        }
        Ok(())
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
    /// Training seeds (default: the experiment's `seeds`, else the recipe's one): the run is
    /// trained and evaluated at each, and the tables read the mean over its seeds of every
    /// item and row, with intervals that resample the items (rows). The recipe's own seed runs
    /// under the run's name; another seed S as `NAME, seed S`, with `train.seed=S` set.
    pub seeds: Option<Vec<u64>>,
    /// The run this one's learning is read as a share of, by name (default: the experiment's
    /// `reference`): a run at another budget against the plain run at that budget.
    pub reference: Option<String>,
}
