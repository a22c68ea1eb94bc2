//! `strata eval`: perplexity and next-token accuracy on text files.

use anyhow::Result;
use serde_json::json;
use std::path::PathBuf;

use crate::data;
use crate::eval::eval_sequences;
use crate::model::Fwd;

/// Arguments of `strata eval`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The model and optional adapter.
    #[command(flatten)]
    pub model: super::ModelArgs,
    /// Text files or directories (`.txt`, `.md`, `.jsonl` with `text`).
    #[arg(long, required = true, num_args = 1..)]
    pub text: Vec<PathBuf>,
    /// Tokens per scored row.
    #[arg(long, default_value_t = 256)]
    pub seq_len: usize,
    /// Rows per forward.
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    /// Frozen base precision (f32 or bf16).
    #[arg(long, default_value = "f32")]
    pub base_dtype: String,
    /// Write the results as JSON here.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Runs `strata eval`.
pub fn run(a: Args) -> Result<()> {
    let (src, model) = a.model.load(&a.base_dtype)?;
    let mut results = Vec::new();
    println!(
        "{:<40} {:>9} {:>9} {:>11} {:>9}",
        "file", "tokens", "loss", "perplexity", "accuracy"
    );
    for p in &a.text {
        let seqs = data::pack(
            &src.tokenizer,
            &data::load_documents(std::slice::from_ref(p))?,
            a.seq_len,
        )?;
        let m = eval_sequences(&model, &seqs, a.batch, Fwd::eval())?;
        println!(
            "{:<40} {:>9} {:>9.4} {:>11.2} {:>8.2}%",
            p.display().to_string(),
            m.tokens,
            m.loss,
            m.perplexity,
            100.0 * m.accuracy
        );
        results.push(json!({"file": p, "metrics": m}));
    }
    if let Some(out) = &a.out {
        let doc = json!({"model": a.model.model, "adapter": a.model.adapter, "seq_len": a.seq_len, "results": results});
        crate::util::write_atomic(out, serde_json::to_string_pretty(&doc)?.as_bytes())?;
        eprintln!("wrote {}", out.display());
    }
    Ok(())
}
