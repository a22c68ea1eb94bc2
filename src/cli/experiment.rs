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

use crate::eval::compare::{paired, Paired};
use crate::eval::mc::McResult;
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
    /// The runs.
    #[serde(rename = "run")]
    pub runs: Vec<RunEntry>,
}

impl Experiment {
    /// Reads an experiment file, checking that every run's recipe parses.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        let ex: Experiment =
            toml::from_str(&text).with_context(|| format!("{}: invalid experiment", path.display()))?;
        for r in &ex.runs {
            Recipe::load(&r.recipe, &[]).with_context(|| format!("{}: run `{}`", path.display(), r.name))?;
        }
        Ok(ex)
    }
}

/// `[eval]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalSection {
    /// General multiple-choice jsonl (forgetting).
    pub general_mc: PathBuf,
    /// Domain multiple-choice jsonl (learning).
    pub domain_mc: PathBuf,
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
    /// Output directory.
    pub out: PathBuf,
}

/// `[[run]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunEntry {
    /// Name in the table.
    pub name: String,
    /// Its recipe.
    pub recipe: PathBuf,
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

/// acc_norm outcomes of the set evaluated with `role` in a `strata eval --out` file.
fn mc_outcomes(v: &Value, role: &str) -> Result<Vec<bool>> {
    let e = v["mc"]
        .as_array()
        .and_then(|a| a.iter().find(|e| e["role"] == role))
        .with_context(|| format!("no {role} multiple-choice result"))?;
    let r: McResult = serde_json::from_value(e["result"].clone())?;
    Ok(r.scores.iter().map(|s| s.correct_norm).collect())
}

fn text_ppl(v: &Value, file: &Path) -> f64 {
    v["text"]
        .as_array()
        .and_then(|a| a.iter().find(|e| e["file"] == json!(file)))
        .and_then(|e| e["metrics"]["perplexity"].as_f64())
        .unwrap_or(f64::NAN)
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
    steps: usize,
    tokens: usize,
    peak: u64,
    train_s: f64,
    general: Paired,
    domain: Paired,
    ppl: Vec<f64>,
    ce: Series,
}

/// Runs `strata experiment`.
pub fn run(a: Args) -> Result<()> {
    let mut ex = Experiment::load(&a.experiment)?;
    if a.quick {
        let q = ex
            .quick
            .take()
            .with_context(|| format!("{} has no [quick] section", a.experiment.display()))?;
        ex.tokens = q.tokens;
        ex.eval.mc_items = q.mc_items;
        ex.eval.text_rows = q.text_rows;
        ex.out = q.out;
    }
    if ex.runs.is_empty() {
        bail!("{}: no [[run]] entries", a.experiment.display());
    }
    let recipes: Vec<Recipe> = ex
        .runs
        .iter()
        .map(|r| Recipe::load(&r.recipe, &[]))
        .collect::<Result<_>>()?;
    let model = &recipes[0].model.path;
    if let Some((r, _)) = ex.runs.iter().zip(&recipes).find(|(_, rc)| &rc.model.path != model) {
        bail!(
            "run `{}` uses another model than the first run; an experiment compares recipes on one model",
            r.name
        );
    }
    let out = &ex.out;
    std::fs::create_dir_all(out.join("mc")).with_context(|| format!("cannot create {}", out.display()))?;
    let start = Instant::now();
    let (gmc, dmc) = (out.join("mc/general.jsonl"), out.join("mc/domain.jsonl"));
    head_lines(&ex.eval.general_mc, &gmc, ex.eval.mc_items)?;
    head_lines(&ex.eval.domain_mc, &dmc, ex.eval.mc_items)?;
    let mut eval_args: Vec<String> = vec![
        "--general-mc".into(),
        gmc.display().to_string(),
        "--domain-mc".into(),
        dmc.display().to_string(),
        "--base-dtype".into(),
        "bf16".into(),
        "--max-rows".into(),
        ex.eval.text_rows.to_string(),
        "--seq-len".into(),
        ex.eval.seq_len.to_string(),
    ];
    if !ex.eval.text.is_empty() {
        eval_args.push("--text".into());
        eval_args.extend(ex.eval.text.iter().map(|p| p.display().to_string()));
    }
    eprintln!(
        "experiment: {} runs of {} tokens each, into {}",
        ex.runs.len(),
        ex.tokens,
        out.display()
    );
    eprintln!("experiment: evaluating the base model");
    let base_json = out.join("base.json");
    let mut args = vec![
        "eval".into(),
        "--model".into(),
        model.display().to_string(),
        "--out".into(),
        base_json.display().to_string(),
    ];
    args.extend(eval_args.iter().cloned());
    strata(&args, &out.join("base.log"))?;
    let base = read_json(&base_json)?;

    let mut rows = Vec::new();
    let mut failed = Vec::new();
    for (entry, recipe) in ex.runs.iter().zip(&recipes) {
        let dir = out.join(slug(&entry.name));
        let per_step = recipe.train.batch * recipe.train.grad_accum * recipe.data.seq_len;
        let steps = ex.tokens.div_ceil(per_step).max(1);
        eprintln!("experiment: {} ({steps} steps)", entry.name);
        let r = (|| -> Result<Row> {
            strata(
                &[
                    "train".into(),
                    entry.recipe.display().to_string(),
                    "--set".into(),
                    format!("train.steps={steps}"),
                    "--set".into(),
                    format!("train.out=\"{}\"", dir.display()),
                    "--set".into(),
                    "train.eval_every=0".into(),
                ],
                &out.join(format!("{}.train.log", slug(&entry.name))),
            )?;
            let summary = read_json(&dir.join("summary.json"))?;
            let after_json = dir.join("eval.json");
            let mut args = vec!["eval".to_string(), "--out".into(), after_json.display().to_string()];
            if recipe.full() {
                args.extend(["--model".into(), dir.join("model").display().to_string()]);
            } else {
                args.extend([
                    "--model".into(),
                    model.display().to_string(),
                    "--adapter".into(),
                    dir.join("adapter").display().to_string(),
                ]);
            }
            args.extend(eval_args.iter().cloned());
            strata(&args, &out.join(format!("{}.eval.log", slug(&entry.name))))?;
            let after = read_json(&after_json)?;
            let general = paired(
                &mc_outcomes(&base, "general")?,
                &mc_outcomes(&after, "general")?,
                2000,
                0,
            )?;
            let domain = paired(&mc_outcomes(&base, "domain")?, &mc_outcomes(&after, "domain")?, 2000, 0)?;
            let metrics = std::fs::read_to_string(dir.join("metrics.jsonl"))?;
            let ce = metrics
                .lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .filter_map(|v| Some((v["step"].as_f64()?, v.get("ce")?.as_f64()?)))
                .collect();
            Ok(Row {
                name: entry.name.clone(),
                steps,
                tokens: summary["tokens"].as_u64().unwrap_or(0) as usize,
                peak: summary["peak_rss_bytes"].as_u64().unwrap_or(0),
                train_s: summary["train_seconds"].as_f64().unwrap_or(f64::NAN),
                general,
                domain,
                ppl: ex.eval.text.iter().map(|f| text_ppl(&after, f)).collect(),
                ce: (entry.name.clone(), ce),
            })
        })();
        match r {
            Ok(row) => rows.push(row),
            Err(e) => {
                eprintln!("experiment: run `{}` failed: {e:#}", entry.name);
                failed.push((entry.name.clone(), format!("{e:#}")));
            }
        }
    }
    let base_ppl: Vec<f64> = ex.eval.text.iter().map(|f| text_ppl(&base, f)).collect();
    let md = table(
        &ex,
        &rows,
        &base,
        &base_ppl,
        &failed,
        a.quick,
        start.elapsed().as_secs_f64(),
    )?;
    crate::util::write_atomic(&out.join("table.md"), md.as_bytes())?;
    let results = json!({
        "experiment": ex.name, "quick": a.quick, "tokens_per_run": ex.tokens, "wall_seconds": start.elapsed().as_secs_f64(),
        "runs": rows.iter().map(|r| json!({"name": r.name, "steps": r.steps, "tokens": r.tokens, "peak_rss_bytes": r.peak,
            "train_seconds": r.train_s, "general": r.general, "domain": r.domain, "perplexity": r.ppl})).collect::<Vec<_>>(),
        "failed": failed,
    });
    crate::util::write_atomic(
        &out.join("results.json"),
        serde_json::to_string_pretty(&results)?.as_bytes(),
    )?;
    let html = report_html(&ex, &rows, &md);
    crate::util::write_atomic(&out.join("report.html"), html.as_bytes())?;
    println!("{md}");
    eprintln!(
        "wrote {}, {} and {}",
        out.join("table.md").display(),
        out.join("results.json").display(),
        out.join("report.html").display()
    );
    if !failed.is_empty() {
        bail!("{} of {} runs failed (see the table)", failed.len(), ex.runs.len());
    }
    Ok(())
}

fn pct(x: f64) -> String {
    format!("{:.1}%", 100.0 * x)
}

fn table(
    ex: &Experiment,
    rows: &[Row],
    base: &Value,
    base_ppl: &[f64],
    failed: &[(String, String)],
    quick: bool,
    wall: f64,
) -> Result<String> {
    let g = mc_outcomes(base, "general")?;
    let d = mc_outcomes(base, "domain")?;
    let acc = |v: &[bool]| v.iter().filter(|&&x| x).count() as f64 / v.len().max(1) as f64;
    let names: Vec<String> = ex
        .eval
        .text
        .iter()
        .map(|p| {
            format!(
                "{} ppl",
                p.parent()
                    .and_then(|d| d.file_name())
                    .unwrap_or_default()
                    .to_string_lossy()
            )
        })
        .collect();
    let mut s = format!(
        "| run | peak memory | train time | domain acc | domain gain [95%] | general acc | forgetting [95%] |{}\n|---|---|---|---|---|---|---|{}\n",
        names.iter().map(|n| format!(" {n} |")).collect::<String>(),
        "---|".repeat(names.len())
    );
    s += &format!(
        "| base model | | | {} | | {} | |{}\n",
        pct(acc(&d)),
        pct(acc(&g)),
        base_ppl.iter().map(|p| format!(" {p:.2} |")).collect::<String>()
    );
    for r in rows {
        s += &format!(
            "| {} | {:.2} GB | {:.0} s | {} | {:+.1} pts [{:+.1}, {:+.1}] | {} | {:+.1}% [{:+.1}, {:+.1}] |{}\n",
            r.name,
            r.peak as f64 / 1e9,
            r.train_s,
            pct(r.domain.after),
            100.0 * r.domain.gain.0,
            100.0 * r.domain.gain.1,
            100.0 * r.domain.gain.2,
            pct(r.general.after),
            100.0 * r.general.forgetting.0,
            100.0 * r.general.forgetting.1,
            100.0 * r.general.forgetting.2,
            r.ppl.iter().map(|p| format!(" {p:.2} |")).collect::<String>()
        );
    }
    for (n, e) in failed {
        s += &format!("| {n} | failed: {} |\n", e.lines().next().unwrap_or(""));
    }
    s += &format!(
        "\n{}{} runs of {} training tokens each ({} steps of the recipe's batch); {} general and {} domain \
         multiple-choice items (acc_norm; forgetting = (before - after) / before, gain = after - before, \
         95% paired-bootstrap intervals); perplexity on {} evenly spaced held-out rows per file; every \
         training and evaluation in its own process; {:.0} min in all.\n",
        if quick { "Quick variant: " } else { "" },
        rows.len(),
        ex.tokens,
        rows.first().map_or(0, |r| r.steps),
        g.len(),
        d.len(),
        ex.eval.text_rows,
        wall / 60.0
    );
    Ok(s)
}

fn report_html(ex: &Experiment, rows: &[Row], md: &str) -> String {
    let curves: Vec<Series> = rows.iter().map(|r| r.ce.clone()).collect();
    let pts: Vec<_> = rows
        .iter()
        .map(|r| {
            (
                r.name.clone(),
                100.0 * r.general.forgetting.0,
                (100.0 * r.general.forgetting.1, 100.0 * r.general.forgetting.2),
                100.0 * r.domain.gain.0,
                (100.0 * r.domain.gain.1, 100.0 * r.domain.gain.2),
            )
        })
        .collect();
    let table_html: String = md
        .lines()
        .filter(|l| l.starts_with('|') && !l.starts_with("|---"))
        .enumerate()
        .map(|(i, l)| {
            let tag = if i == 0 { "th" } else { "td" };
            let cells: String = l
                .trim_matches('|')
                .split('|')
                .map(|c| format!("<{tag}>{}</{tag}>", c.trim().replace('<', "&lt;")))
                .collect();
            format!("<tr>{cells}</tr>")
        })
        .collect();
    let note: String = md
        .lines()
        .filter(|l| !l.starts_with('|') && !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    page(
        &ex.name,
        &[
            (
                "Results".into(),
                format!("<table>{table_html}</table><p>{}</p>", note.replace('<', "&lt;")),
            ),
            (
                "Curves".into(),
                format!(
                    "<div class='plots'>{}{}</div>",
                    line_chart("training cross-entropy per run", "step", &curves),
                    scatter_chart(
                        "learning vs forgetting (95% intervals)",
                        "forgetting rate on general MC (%)",
                        "domain gain (points)",
                        &pts
                    )
                ),
            ),
        ],
    )
}
