//! `strata generate`: sampling with a KV cache (greedy, temperature, top-p), for one prompt
//! (streamed), for every conversation of a chat file (`--prompts`: the model's answers appended
//! as assistant turns), or as free samples (`--samples`: documents for self-generated replay).

use anyhow::{bail, Context, Result};
use serde_json::json;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::data::chat::{render, Conversation, Message};
use crate::model::generate::{generate, sample_many, Sampling};
use crate::model::tokenizer::Tok;
use crate::model::{Fwd, Model};
use crate::rng::{mix, Rng};

/// Arguments of `strata generate`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The model and optional adapter.
    #[command(flatten)]
    pub model: super::ModelArgs,
    /// The prompt (with `--samples`: the start of every sample).
    #[arg(long)]
    pub prompt: Option<String>,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// A chat jsonl file (`{"messages": [...]}` per line): answer each conversation's last turn
    /// and write the conversations with the answers to `--out`.
    #[arg(long, conflicts_with_all = ["prompt", "samples"])]
    pub prompts: Option<PathBuf>,
    /// Draw this many free samples (each from the start of a document, or from `--prompt`) and
    /// write them to `--out` as `{"text"}` documents.
    #[arg(long)]
    pub samples: Option<usize>,
    /// Samples drawn together (one batched forward per token) with `--samples`.
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// Output jsonl for `--prompts` and `--samples`.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Nucleus sampling mass.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    /// Sampling seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Where the model runs: cpu, cuda or cuda:N (a build with the `cuda` feature).
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

fn chat_template(tok: &Tok) -> Result<&str> {
    tok.chat_template.as_deref().context(
        "the model has no chat template (tokenizer_config.json `chat_template` or GGUF `tokenizer.chat_template`)",
    )
}

/// Answers every conversation of `path`, writing them with the answers appended.
fn answer_file(a: &Args, model: &Model, tok: &Tok, path: &Path, out: &Path, s: Sampling) -> Result<()> {
    let tpl = chat_template(tok)?;
    let text = crate::fsio::read_text(path, crate::fsio::DATA_CAP, "prompts file")?;
    let mut lines = String::new();
    for (ln, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let at = || format!("{}:{}", path.display(), ln + 1);
        let mut conv: Conversation = serde_json::from_str(line)
            .with_context(|| format!("{}: expected {{\"messages\": [{{\"role\", \"content\"}}]}}", at()))?;
        if conv.messages.last().is_none_or(|m| m.role == "assistant") {
            bail!(
                "{}: the conversation must end with a turn to answer (not an assistant turn)",
                at()
            );
        }
        let ids = tok.encode(&render(tpl, &conv.messages, true, tok).with_context(at)?)?;
        let mut rng = Rng::new(mix(&[a.seed, ln as u64]));
        let new = generate(model, &ids, s, tok.eos, Fwd::eval(), &mut rng, |_| Ok(())).with_context(at)?;
        conv.messages.push(Message {
            role: "assistant".into(),
            content: tok.decode(&new)?,
        });
        lines += &(serde_json::to_string(&conv)? + "\n");
        eprint!("\ranswered {}", ln + 1);
    }
    eprintln!();
    crate::util::write_atomic(out, lines.as_bytes())
}

/// Draws `n` free samples, `--batch` at a time, writing them as documents.
fn samples(a: &Args, model: &Model, tok: &Tok, n: usize, out: &Path, s: Sampling) -> Result<()> {
    let prefix = a.prompt.clone().unwrap_or_default();
    let mut start: Vec<u32> = tok.bos.or(tok.eos).into_iter().collect();
    start.extend(tok.encode(&prefix)?);
    let mut lines = String::new();
    let mut drawn = 0;
    while drawn < n {
        let m = a.batch.max(1).min(n - drawn);
        let mut rngs: Vec<Rng> = (drawn..drawn + m).map(|k| Rng::new(mix(&[a.seed, k as u64]))).collect();
        for new in sample_many(model, &start, s, tok.eos, Fwd::eval(), &mut rngs)? {
            let text = format!("{prefix}{}", tok.decode(&new)?);
            if !text.trim().is_empty() {
                lines += &(serde_json::to_string(&json!({ "text": text, "source": "self-generated" }))? + "\n");
            }
        }
        drawn += m;
        eprint!("\rsampled {drawn}/{n}");
    }
    eprintln!();
    crate::util::write_atomic(out, lines.as_bytes())
}

/// Runs `strata generate`.
pub fn run(a: Args) -> Result<()> {
    let (src, model) = a.model.load("auto", &crate::util::device(&a.device)?, true)?;
    let tok = &src.tokenizer;
    let s = Sampling {
        max_tokens: a.max_tokens,
        temperature: a.temperature,
        top_p: a.top_p,
    };
    if !(a.temperature >= 0.0 && a.temperature.is_finite() && a.top_p > 0.0 && a.top_p <= 1.0) {
        bail!("--temperature must be finite and >= 0 and --top-p in (0, 1]");
    }
    let out = || {
        a.out
            .as_ref()
            .context("--prompts and --samples write to --out FILE.jsonl")
    };
    if let Some(p) = &a.prompts {
        return answer_file(&a, &model, tok, p, out()?, s);
    }
    if let Some(n) = a.samples {
        return samples(&a, &model, tok, n, out()?, s);
    }
    let prompt = a
        .prompt
        .clone()
        .context("give --prompt TEXT, --prompts FILE or --samples N")?;
    let text = if a.chat {
        let m = [Message {
            role: "user".into(),
            content: prompt.clone(),
        }];
        render(chat_template(tok)?, &m, true, tok)?
    } else {
        prompt.clone()
    };
    let ids = tok.encode(&text)?;
    let mut rng = Rng::new(a.seed);
    let mut printed = 0;
    print!("{}", if a.chat { "" } else { prompt.as_str() });
    generate(&model, &ids, s, tok.eos, Fwd::eval(), &mut rng, |out| {
        let s = tok.decode(out)?;
        if s.len() > printed && !s.ends_with('\u{fffd}') {
            print!("{}", &s[printed..]);
            printed = s.len();
            std::io::stdout().flush().ok();
        }
        Ok(())
    })?;
    println!();
    Ok(())
}
