//! What an experiment writes: the markdown table and the HTML report.

use anyhow::Result;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

use super::runs::{mc_outcomes, text_rows, Row, Sets, TextChange};
use super::steps::last_turns;
use super::Experiment;
use crate::eval::compare::Paired;
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
    let md = table(ex, sets, rows, base, failed, how.quick, how.total_seconds)?;
    crate::util::write_atomic(&out.join("table.md"), md.as_bytes())?;
    let results = json!({
        "experiment": ex.name, "quick": how.quick, "tokens_per_run": ex.tokens, "seconds": how.total_seconds,
        "this_sitting_seconds": how.sitting_seconds,
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

pub(super) fn table(
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
