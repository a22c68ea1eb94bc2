//! What an experiment writes: the markdown table and the HTML report.

use anyhow::Result;
use serde_json::{json, Value};
use std::path::Path;

use super::runs::{mc_outcomes, text_rows, Row, Sets, ShareOf, TextChange};
use super::steps::last_turns;
use super::Experiment;
use crate::eval::compare::{Paired, Share};
use crate::eval::report::{line_chart, page, scatter_chart, Series};

/// How the experiment ran, for the note and `results.json`.
pub(super) struct Outputs {
    /// The `[quick]` variant.
    pub(super) quick: bool,
    /// Seconds of every step, however many sittings made them.
    pub(super) total_seconds: f64,
    /// Seconds of this sitting.
    pub(super) sitting_seconds: f64,
}

/// Writes `table.md`, `results.json` and `report.html` into the experiment's directory, and
/// prints the table.
pub(super) fn write_outputs(
    ex: &Experiment,
    sets: &Sets,
    rows: &[Row],
    base: &Value,
    failed: &[(String, String)],
    how: &Outputs,
) -> Result<()> {
    let out = &ex.out;
    let base_answers = match &sets.side_by_side {
        Some(_) => last_turns(sets.chat.as_ref().expect("side by side needs the chat set"))?,
        None => Vec::new(),
    };
    // Bootstrapped once, for the table and the results both.
    let shares = reference_shares(ex, sets, rows, base)?;
    let md = table(ex, sets, rows, base, failed, &shares, how)?;
    let shares: Vec<Value> = shares
        .iter()
        .map(|(reference, v)| {
            json!({"reference": reference.name,
                "runs": v.iter().map(|(r, cells)| json!({"name": r.name, "shares": cells})).collect::<Vec<_>>()})
        })
        .collect();
    crate::util::write_atomic(&out.join("table.md"), md.as_bytes())?;
    let results = json!({
        "experiment": ex.name, "quick": how.quick, "tokens_per_run": ex.tokens, "seconds": how.total_seconds,
        "this_sitting_seconds": how.sitting_seconds,
        "runs": rows.iter().map(|r| json!({"name": r.name, "seeds": r.seeds,
            "per_seed": r.per_seed.iter().map(|(seed, g, d)| json!({"seed": seed, "general": g, "domain": d})).collect::<Vec<_>>(),
            "steps": r.steps, "tokens": r.tokens, "peak_rss_bytes": r.peak,
            "train_seconds": r.train_s, "seconds": r.seconds, "general": r.headline("general"), "domain": r.headline("domain"),
            "mc": r.mc, "text": r.text, "chat": r.chat, "side_by_side": r.side_by_side})).collect::<Vec<_>>(),
        "base_side_by_side": base_answers,
        "shares": shares,
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
    let html = report_html(ex, rows, &md, &prompts, &base_answers);
    crate::util::write_atomic(&out.join("report.html"), html.as_bytes())?;
    println!("{md}");
    eprintln!(
        "wrote {}, {} and {}",
        out.join("table.md").display(),
        out.join("results.json").display(),
        out.join("report.html").display()
    );
    Ok(())
}

pub(super) fn pct(x: f64) -> String {
    format!("{:.1}%", 100.0 * x)
}

/// A short name for a set file: its directory and stem (`finance/heldout`).
pub(super) fn label(p: &Path) -> String {
    let stem = p.file_stem().unwrap_or_default().to_string_lossy();
    match p.parent().and_then(|d| d.file_name()) {
        Some(d) => format!("{}/{stem}", d.to_string_lossy()),
        None => stem.to_string(),
    }
}

pub(super) fn ratio_cell(c: &TextChange) -> String {
    format!(
        " {:.2} ({:+.1}% [{:+.1}, {:+.1}]) |",
        c.perplexity,
        100.0 * (c.ratio.0 - 1.0),
        100.0 * (c.ratio.1 - 1.0),
        100.0 * (c.ratio.2 - 1.0)
    )
}

/// A reference run and every run read against it, with its learning as shares of the
/// reference's.
type Shares<'a> = (&'a Row, Vec<(&'a Row, Vec<ShareOf>)>);

/// Every run's learning as shares of its reference run's (its own `reference`, else the
/// experiment's), grouped by reference in the order of the runs; a run is not read against
/// itself, and a reference that did not finish leaves its runs out.
pub(super) fn reference_shares<'a>(
    ex: &Experiment,
    sets: &Sets,
    rows: &'a [Row],
    base: &Value,
) -> Result<Vec<Shares<'a>>> {
    let mut groups: Vec<Shares<'a>> = Vec::new();
    for r in rows {
        let own = ex
            .runs
            .iter()
            .find(|e| e.name == r.name)
            .and_then(|e| e.reference.as_ref());
        let Some(name) = own.or(ex.reference.as_ref()).filter(|n| **n != r.name) else {
            continue;
        };
        let Some(reference) = rows.iter().find(|x| x.name == *name) else {
            continue;
        };
        let cells = sets.shares(base, reference, r)?;
        match groups.iter_mut().find(|(g, _)| g.name == reference.name) {
            Some((_, runs)) => runs.push((r, cells)),
            None => groups.push((reference, vec![(r, cells)])),
        }
    }
    Ok(groups)
}

/// The markdown tables (accuracy, perplexity, shares of the reference's learning, from
/// [`reference_shares`]) and the note that says what every figure is.
pub(super) fn table(
    ex: &Experiment,
    sets: &Sets,
    rows: &[Row],
    base: &Value,
    failed: &[(String, String)],
    shares: &[Shares],
    how: &Outputs,
) -> Result<String> {
    let mut s = accuracy_table(ex, sets, rows, base, failed)?;
    s += &perplexity_table(sets, rows, base)?;
    for group in shares {
        s += &share_table(ex, sets, group);
    }
    let references: Vec<&str> = shares.iter().map(|(r, _)| r.name.as_str()).collect();
    s += &note(ex, sets, rows, base, &references, how)?;
    Ok(s)
}

/// Multiple-choice accuracy per run, with forgetting (general sets) and gain (domain sets).
fn accuracy_table(
    ex: &Experiment,
    sets: &Sets,
    rows: &[Row],
    base: &Value,
    failed: &[(String, String)],
) -> Result<String> {
    let acc = |v: &[bool]| v.iter().filter(|&&x| x).count() as f64 / v.len().max(1) as f64;
    let mut s = String::from("| run | peak memory | train time |");
    for ((_, role), n) in sets.mc.iter().zip(mc_names(ex)) {
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
        s += &format!("| {} | {:.2} GB | {:.0} s |", r.label(), r.peak as f64 / 1e9, r.train_s);
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
    Ok(s)
}

/// The names of the multiple-choice sets as the user's files are called (the scored copies are
/// renamed).
fn mc_names(ex: &Experiment) -> Vec<String> {
    let originals = ex.eval.general_mc.list().into_iter().chain(ex.eval.domain_mc.list());
    originals.map(|p| label(&p)).collect()
}

/// Held-out text and chat retention perplexities per run, as changes against the base.
fn perplexity_table(sets: &Sets, rows: &[Row], base: &Value) -> Result<String> {
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
        t += &format!("| {} |", r.label());
        for c in r.text.iter().chain(&r.chat) {
            t += &ratio_cell(c);
        }
        t += "\n";
    }
    Ok(t)
}

/// Every other run's learning as a share of the reference run's.
fn share_table(ex: &Experiment, sets: &Sets, (reference, shares): &Shares) -> String {
    let Some((_, first)) = shares.first() else {
        return String::new();
    };
    if first.is_empty() {
        return format!(
            "\n{} learned nothing clear on the domain sets: no shares of its learning.\n",
            reference.name
        );
    }
    // A scored multiple-choice copy is named as the user's file it was cut from.
    let names = mc_names(ex);
    let name = |f: &Path| match sets.mc.iter().position(|(m, _)| m == f) {
        Some(k) => names[k].clone(),
        None => label(f),
    };
    let mut t = String::from("\n| run |");
    for c in first {
        t += &format!(" {} {}: share of {}'s [95%] |", name(&c.file), c.what, reference.name);
    }
    t += &format!("\n|---|{}\n", "---|".repeat(first.len()));
    for (r, cells) in shares {
        t += &format!("| {} |", r.label());
        for c in cells {
            let Share { share, lo, hi } = c.share;
            t += &format!(" {} [{:.0}, {:.0}] |", pct0(share), 100.0 * lo, 100.0 * hi);
        }
        t += "\n";
    }
    t
}

fn pct0(x: f64) -> String {
    format!("{:.0}%", 100.0 * x)
}

/// What every figure of the tables is, the budgets and the time it all took.
fn note(
    ex: &Experiment,
    sets: &Sets,
    rows: &[Row],
    base: &Value,
    references: &[&str],
    how: &Outputs,
) -> Result<String> {
    let items: Vec<String> = sets
        .mc
        .iter()
        .zip(mc_names(ex))
        .map(|((f, _), n)| Ok(format!("{} {n}", mc_outcomes(base, f)?.len())))
        .collect::<Result<_>>()?;
    let shares = match references {
        [] => String::new(),
        [r] => format!(
            " Shares: a run's gain (or perplexity reduction) over {r}'s, each from the same base on \
             the same items (rows), with a 95% bootstrap interval that resamples them once for all \
             three; only where {r}'s own interval is clear of zero."
        ),
        many => format!(
            " Shares: a run's gain (or perplexity reduction) over its reference's ({}; each share \
             table names its own), each from the same base on the same items (rows), with a 95% \
             bootstrap interval that resamples them once for all three; only where the reference's \
             own interval is clear of zero.",
            many.join("; ")
        ),
    };
    Ok(format!(
        "\n{}{}.{} Multiple choice: {} items \
         (acc_norm; forgetting = (before - after) / before on general sets, gain = after - before on domain \
         sets; 95% paired-bootstrap intervals). Perplexity on {} evenly spaced held-out rows of {} tokens per \
         file, its change against the base with a 95% paired-bootstrap interval over rows; chat retention = \
         perplexity of the base model's own greedy answers to held-out general prompts.{shares} Every training \
         and evaluation in its own process; {:.0} min in all.\n",
        if how.quick { "Quick variant: " } else { "" },
        budgets(ex, rows),
        seeds_note(rows),
        items.join(", "),
        ex.eval.text_rows,
        ex.eval.seq_len,
        how.total_seconds / 60.0
    ))
}

/// What a run at several seeds measured at each: its figures in the tables are the seeds' mean
/// per item (row), and how far the seeds fall apart is told here.
fn seeds_note(rows: &[Row]) -> String {
    let several: Vec<String> = rows
        .iter()
        .filter(|r| !r.per_seed.is_empty())
        .map(|r| {
            let each: Vec<String> = r
                .per_seed
                .iter()
                .map(|(seed, g, d)| {
                    format!(
                        "seed {seed} forgetting {:+.1}%, gain {:+.1} pts",
                        100.0 * g.forgetting.0,
                        100.0 * d.gain.0
                    )
                })
                .collect();
            format!("{}: {}", r.name, each.join("; "))
        })
        .collect();
    if several.is_empty() {
        return String::new();
    }
    format!(
        " Runs at several training seeds: every figure is the mean over the seeds of each item \
         (row), its interval from a two-level bootstrap (the seeds drawn with replacement, then \
         the items or rows), so that how far the seeds fall apart widens it; the headline sets \
         seed by seed: {}.",
        several.join(". ")
    )
}

/// The training budget of every run: the experiment's, or a run's own.
fn budgets(ex: &Experiment, rows: &[Row]) -> String {
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
    match (on_usual, own.is_empty()) {
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
    }
}

pub(super) fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// The markdown tables of `md` as HTML tables (the first row of each is its header).
pub(super) fn tables_html(md: &str) -> String {
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
pub(super) fn chart_set(rows: &[Row], role: &str) -> Option<usize> {
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
pub(super) fn frontiers(rows: &[Row], k: usize) -> Vec<Vec<usize>> {
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

pub(super) fn report_html(
    ex: &Experiment,
    rows: &[Row],
    md: &str,
    prompts: &[String],
    base_answers: &[String],
) -> String {
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
