//! `strata eval`: perplexity and next-token accuracy on text, accuracy on multiple-choice sets,
//! and `--compare BEFORE.json AFTER.json` for forgetting rate and domain gain.

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::path::PathBuf;

use crate::data;
use crate::data::mc::load_items;
use crate::eval::compare::{paired, scores};
use crate::eval::mc::{score_items, McResult};
use crate::eval::perplexity::eval_rows;
use crate::model::Fwd;

/// Arguments of `strata eval`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The model and optional adapter (not needed with `--compare`).
    #[command(flatten)]
    pub model: OptModel,
    /// Text files or directories (`.txt`, `.md`, `.jsonl` with `text`): perplexity and accuracy.
    #[arg(long, num_args = 1..)]
    pub text: Vec<PathBuf>,
    /// Chat jsonl files (`{"messages"}`): loss on the assistant turns only, in the model's chat
    /// template (chat retention: the base model's own answers, scored by the adapted model).
    #[arg(long, num_args = 1..)]
    pub chat: Vec<PathBuf>,
    /// Multiple-choice jsonl files (`{"context", "choices", "answer"}`) measuring general knowledge.
    #[arg(long = "general-mc", num_args = 1..)]
    pub general_mc: Vec<PathBuf>,
    /// Multiple-choice jsonl files measuring the target domain.
    #[arg(long = "domain-mc", num_args = 1..)]
    pub domain_mc: Vec<PathBuf>,
    /// Tokens per scored text row.
    #[arg(long, default_value_t = 256)]
    pub seq_len: usize,
    /// Score at most this many text rows per file, evenly spaced through it (0: all).
    #[arg(long, default_value_t = 0)]
    pub max_rows: usize,
    /// Text rows per forward.
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    /// Frozen base precision: f32, bf16, nf4, nf4-dq, as-stored, or auto (the precision the
    /// adapter was trained against, from its strata_base.json; f32 without one).
    #[arg(long, default_value = "auto")]
    pub base_dtype: String,
    /// Where the model runs: cpu, cuda or cuda:N (a build with the `cuda` feature).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Write the results as JSON here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Compare two result files written by `--out` (before, after) instead of evaluating.
    #[arg(long, num_args = 2, value_names = ["BEFORE", "AFTER"])]
    pub compare: Vec<PathBuf>,
}

/// `--model` is optional here because `--compare` needs no model.
#[derive(clap::Args, Debug)]
pub struct OptModel {
    /// A `.gguf` file or a Hugging Face directory.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// A PEFT adapter directory to apply.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
}

/// Runs `strata eval`.
pub fn run(a: Args) -> Result<()> {
    if !a.compare.is_empty() {
        return compare(&a.compare[0], &a.compare[1]);
    }
    let path = a
        .model
        .model
        .as_ref()
        .context("--model is required (or use --compare BEFORE AFTER)")?;
    if a.text.is_empty() && a.chat.is_empty() && a.general_mc.is_empty() && a.domain_mc.is_empty() {
        bail!("nothing to evaluate: give --text, --chat, --general-mc or --domain-mc files");
    }
    let (src, model) = crate::adapter::open_adapted(
        path,
        a.model.adapter.as_deref(),
        super::base_choice(&a.base_dtype)?,
        &crate::util::device(&a.device)?,
        true,
    )?;
    let mut text_results = Vec::new();
    let mut chat_results = Vec::new();
    if !a.text.is_empty() || !a.chat.is_empty() {
        println!(
            "{:<44} {:>9} {:>9} {:>11} {:>17} {:>9}",
            "text", "tokens", "loss", "perplexity", "[95%]", "accuracy"
        );
    }
    let sets = a
        .text
        .iter()
        .map(|p| (p, false))
        .chain(a.chat.iter().map(|p| (p, true)));
    for (p, chat) in sets {
        let one = std::slice::from_ref(p);
        let mut seqs = if chat {
            data::chat::load_chat(
                one,
                &src.tokenizer,
                a.seq_len,
                data::formats::ChatFormat::Messages,
                &Default::default(),
            )?
        } else {
            data::pack(&src.tokenizer, &data::load_documents(one)?, a.seq_len, false)?
        };
        seqs.subsample(a.max_rows);
        let (m, rows) = eval_rows(&model, &seqs, a.batch, Fwd::eval())?;
        println!(
            "{:<44} {:>9} {:>9.4} {:>11.2} [{:>7.2}, {:>7.2}] {:>8.2}%",
            p.display().to_string(),
            m.tokens,
            m.loss,
            m.perplexity,
            m.perplexity_ci.0,
            m.perplexity_ci.1,
            100.0 * m.accuracy
        );
        let entry = json!({"file": p, "metrics": m, "rows": rows});
        if chat {
            chat_results.push(entry);
        } else {
            text_results.push(entry);
        }
    }
    let mut mc_results = Vec::new();
    let sets = a
        .general_mc
        .iter()
        .map(|p| (p, "general"))
        .chain(a.domain_mc.iter().map(|p| (p, "domain")));
    let mut header = false;
    for (p, role) in sets {
        if !header {
            println!(
                "{:<44} {:>8} {:>7} {:>9} {:>9} {:>9}",
                "multiple choice", "role", "items", "acc", "acc_norm", "items/s"
            );
            header = true;
        }
        let items = load_items(p)?;
        let t0 = std::time::Instant::now();
        let r = score_items(&model, &src.tokenizer, &items, Fwd::eval()).with_context(|| p.display().to_string())?;
        let secs = t0.elapsed().as_secs_f64();
        println!(
            "{:<44} {:>8} {:>7} {:>8.2}% {:>8.2}% {:>9.1}",
            p.display().to_string(),
            role,
            r.items,
            100.0 * r.acc,
            100.0 * r.acc_norm,
            r.items as f64 / secs.max(1e-9)
        );
        mc_results.push(json!({"file": p, "role": role, "result": r, "seconds": secs}));
    }
    if let Some(out) = &a.out {
        let doc = json!({
            "model": path, "adapter": a.model.adapter, "seq_len": a.seq_len, "base_dtype": a.base_dtype,
            "text": text_results, "chat": chat_results, "mc": mc_results,
            "scoring": "acc: highest summed log-likelihood of the choice tokens given the context; acc_norm: the same divided by the choice's length in bytes",
        });
        crate::util::write_atomic(out, serde_json::to_string_pretty(&doc)?.as_bytes())?;
        eprintln!("wrote {}", out.display());
    }
    Ok(())
}

fn read(path: &std::path::Path) -> Result<Value> {
    let text = crate::fsio::read_text(path, crate::fsio::DATA_CAP, "eval result")?;
    serde_json::from_str(&text).with_context(|| format!("{} is not a `strata eval --out` result", path.display()))
}

/// Prints forgetting rate (general sets) and domain gain (domain sets), paired by file.
fn compare(before: &std::path::Path, after: &std::path::Path) -> Result<()> {
    let (b, a) = (read(before)?, read(after)?);
    let empty = vec![];
    let mcs = |v: &Value| -> Result<Vec<(String, String, McResult)>> {
        v.get("mc")
            .and_then(|m| m.as_array())
            .unwrap_or(&empty)
            .iter()
            .map(|e| {
                Ok((
                    e["file"].as_str().unwrap_or("").to_string(),
                    e["role"].as_str().unwrap_or("").to_string(),
                    serde_json::from_value(e["result"].clone())?,
                ))
            })
            .collect()
    };
    let (mb, ma) = (mcs(&b)?, mcs(&a)?);
    println!(
        "{:<40} {:>8} {:>6} {:>8} {:>8}  {:<34}",
        "set", "role", "items", "before", "after", "metric [95% paired bootstrap]"
    );
    let mut any = false;
    for (file, role, rb) in &mb {
        let Some((_, _, ra)) = ma.iter().find(|(f, _, _)| f == file) else {
            continue;
        };
        let cb: Vec<bool> = rb.scores.iter().map(|s| s.correct_norm).collect();
        let ca: Vec<bool> = ra.scores.iter().map(|s| s.correct_norm).collect();
        let (cb, ca) = (scores(&cb), scores(&ca));
        let p = paired(&cb, &[ca], 2000, 0).with_context(|| file.clone())?;
        let metric = if role == "general" {
            format!(
                "forgetting {:+.2}% [{:+.2}, {:+.2}]",
                100.0 * p.forgetting.0,
                100.0 * p.forgetting.1,
                100.0 * p.forgetting.2
            )
        } else {
            format!(
                "gain {:+.2} pts [{:+.2}, {:+.2}]",
                100.0 * p.gain.0,
                100.0 * p.gain.1,
                100.0 * p.gain.2
            )
        };
        println!(
            "{file:<40} {role:>8} {:>6} {:>7.2}% {:>7.2}%  {metric}",
            p.items,
            100.0 * p.before,
            100.0 * p.after
        );
        any = true;
    }
    let texts = |v: &Value| {
        let part = |k: &str| v.get(k).and_then(|t| t.as_array()).cloned().unwrap_or_default();
        let mut all = part("text");
        all.extend(part("chat"));
        all
    };
    for tb in texts(&b) {
        if let Some(ta) = texts(&a).into_iter().find(|t| t["file"] == tb["file"]) {
            println!(
                "{:<40} {:>8} {:>6} {:>8.2} {:>8.2}  perplexity",
                tb["file"].as_str().unwrap_or(""),
                "text",
                tb["metrics"]["tokens"],
                tb["metrics"]["perplexity"].as_f64().unwrap_or(f64::NAN),
                ta["metrics"]["perplexity"].as_f64().unwrap_or(f64::NAN)
            );
            any = true;
        }
    }
    if !any {
        bail!("{} and {} share no evaluated file", before.display(), after.display());
    }
    println!("(accuracy is acc_norm; forgetting = (before - after) / before on general sets; gain = after - before on domain sets)");
    Ok(())
}
