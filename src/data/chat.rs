//! Chat data (`{"messages": [{"role": ..., "content": ...}, ...]}` per line), rendered with the
//! model's own Jinja chat template; loss is taken on assistant tokens only.
//!
//! The assistant spans are found by rendering: the text of message `i` in the full rendering is
//! the part between the rendering of messages `..i` with a generation prompt and the rendering of
//! messages `..=i`. Tokens whose character span falls inside an assistant span get targets.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

use super::formats::{for_each_row, ChatFormat, RowOptions};
use super::text::Sequences;
use crate::model::tokenizer::Tok;
use crate::ops::lm_head::IGNORE;

/// One chat message.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

/// One line of a chat jsonl file.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct Conversation {
    /// The turns, in order.
    pub messages: Vec<Message>,
}

/// The most the rendering of one conversation may hold: a template adds a system prompt and
/// markers around the messages, never more than a few times their size.
fn render_cap(messages: &[Message]) -> usize {
    let content: usize = messages.iter().map(|m| m.content.len() + m.role.len()).sum();
    content.saturating_mul(4).saturating_add(1 << 20)
}

/// A writer that refuses to grow past its cap (a crafted template could print forever).
struct Capped {
    out: Vec<u8>,
    cap: usize,
    over: bool,
}

impl std::io::Write for Capped {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if self.out.len() + b.len() > self.cap {
            self.over = true;
            return Err(std::io::Error::other("chat template output over its cap"));
        }
        self.out.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Renders `messages` with `template` (Hugging Face conventions: `messages`, `add_generation_prompt`,
/// `bos_token`, `eos_token`). The template runs on a budget of minijinja fuel (instructions)
/// and its output is capped (see `render_cap`), so a template with runaway loops or prints
/// fails with an error instead of hanging or filling memory.
pub fn render(template: &str, messages: &[Message], add_generation_prompt: bool, tok: &Tok) -> Result<String> {
    let mut env = minijinja::Environment::new();
    let fuel = 200_000 + 2_000 * messages.len() as u64;
    env.set_fuel(Some(fuel));
    env.add_function("raise_exception", |msg: String| -> Result<String, minijinja::Error> {
        Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
    });
    env.add_template("chat", template)
        .context("the chat template is not valid Jinja")?;
    let name = |id: Option<u32>| id.and_then(|i| tok.inner.id_to_token(i)).unwrap_or_default();
    let ctx = minijinja::context! {
        messages => messages,
        add_generation_prompt => add_generation_prompt,
        bos_token => name(tok.bos),
        eos_token => name(tok.eos),
    };
    let mut w = Capped {
        out: Vec::new(),
        cap: render_cap(messages),
        over: false,
    };
    let t = env.get_template("chat")?;
    let done = t.render_captured_to(ctx, &mut w).map(drop);
    if w.over {
        bail!(
            "the chat template printed more than {} bytes for {} messages; it is not a chat template strata can use",
            w.cap,
            messages.len()
        );
    }
    if let Err(e) = done {
        if e.kind() == minijinja::ErrorKind::OutOfFuel {
            bail!("the chat template ran more than {fuel} instructions for {} messages (a loop that does not end?); it is not a chat template strata can use", messages.len());
        }
        return Err(anyhow::Error::new(e).context("rendering the chat template failed"));
    }
    String::from_utf8(w.out).context("the chat template printed invalid UTF-8")
}

/// Loads chat-like files (`.jsonl`, `.json` arrays, `.csv`, `.parquet`; rows laid out as `format` says) and turns
/// each conversation into one row of `seq_len` (longer ones are truncated, shorter ones padded
/// with ignored targets).
pub fn load_chat(
    paths: &[PathBuf],
    tok: &Tok,
    seq_len: usize,
    format: ChatFormat,
    rows: &RowOptions,
) -> Result<Sequences> {
    let template = tok.chat_template.as_deref().context(
        "the model has no chat template (tokenizer_config.json `chat_template` or GGUF `tokenizer.chat_template`)",
    )?;
    let pad = tok.eos.unwrap_or(0);
    let mut seqs = Sequences {
        seq_len,
        ..Default::default()
    };
    for root in paths {
        let files = crate::fsio::walk_files(root, &|p| super::formats::is_row_file(p))?;
        if files.is_empty() {
            bail!("{}: no .jsonl, .json, .csv or .parquet files inside", root.display());
        }
        for f in files {
            for_each_row(&f, rows, |at, row| {
                let conv = format.conversation(row).with_context(at)?;
                if !conv.messages.iter().any(|m| m.role == "assistant") {
                    bail!("{}: the conversation has no assistant message to learn from", at());
                }
                let full = render(template, &conv.messages, false, tok).with_context(at)?;
                let mut spans = Vec::new();
                for (i, m) in conv.messages.iter().enumerate() {
                    if m.role == "assistant" {
                        let before = render(template, &conv.messages[..i], true, tok).with_context(at)?;
                        let upto = render(template, &conv.messages[..=i], false, tok).with_context(at)?;
                        if !full.starts_with(&upto) || !upto.starts_with(&before) {
                            bail!("{}: the chat template does not render conversations prefix by prefix; cannot locate assistant turns", at());
                        }
                        spans.push((before.len(), upto.len()));
                    }
                }
                // Only the first seq_len + 1 tokens are kept: the rest of a long conversation
                // is cut before encoding, at a place the pre-tokenizer never joins across, far
                // (256 bytes a token) beyond what is kept.
                let keep = crate::model::tokenizer::chunk_end(&full, (seq_len + 1).saturating_mul(256));
                let enc = tok
                    .inner
                    .encode(&full[..keep], false)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", at()))?;
                let ids = enc.get_ids();
                let offs = enc.get_offsets();
                let n = ids.len().min(seq_len + 1);
                let mut inp: Vec<u32> = ids[..n.saturating_sub(1)].to_vec();
                let mut tgt: Vec<u32> = (1..n)
                    .map(|j| {
                        let (s, e) = offs[j];
                        if spans.iter().any(|&(a, b)| s >= a && e <= b) {
                            ids[j]
                        } else {
                            IGNORE
                        }
                    })
                    .collect();
                if tgt.iter().all(|&t| t == IGNORE) {
                    bail!(
                        "{}: no assistant token falls within data.seq_len = {seq_len} tokens (what comes before the answer is longer); raise seq_len, shorten the row, or set data.bad_rows = \"skip\"",
                        at()
                    );
                }
                inp.resize(seq_len, pad);
                tgt.resize(seq_len, IGNORE);
                seqs.inputs.push(inp);
                seqs.targets.push(tgt);
                Ok(())
            })?;
        }
    }
    if seqs.is_empty() {
        bail!("no conversations found in {paths:?}");
    }
    Ok(seqs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tokenizer::{tiny_vocab, tokenizer_json_from_gguf};

    const CHATML: &str = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

    #[test]
    fn only_assistant_tokens_have_targets() -> Result<()> {
        let tok = Tok::from_json(
            tokenizer_json_from_gguf(&tiny_vocab(), "t")?,
            Some(2),
            None,
            Some(CHATML.into()),
        )?;
        let dir = std::env::temp_dir().join(format!("strata-chat-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let f = dir.join("c.jsonl");
        std::fs::write(
            &f,
            r#"{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "the"}]}"#,
        )?;
        let s = load_chat(&[f], &tok, 64, ChatFormat::Messages, &RowOptions::default())?;
        let tgt: Vec<u32> = s.targets[0].iter().copied().filter(|&t| t != IGNORE).collect();
        let text = tok.decode(&tgt)?;
        assert_eq!(text, "the<|im_end|>\n");
        // The same conversation as alpaca rows in a JSON array and as sharegpt lines: the
        // same rows, the same targets; a bad row names its file, row and field.
        let a = dir.join("a.json");
        std::fs::write(&a, r#"[{"instruction": "a", "output": "the"}]"#)?;
        let g = dir.join("g.jsonl");
        std::fs::write(
            &g,
            "{\"conversations\": [{\"from\": \"human\", \"value\": \"a\"}, {\"from\": \"gpt\", \"value\": \"the\"}]}\n",
        )?;
        for (p, f) in [(&a, ChatFormat::Alpaca), (&g, ChatFormat::ShareGpt)] {
            let t = load_chat(std::slice::from_ref(p), &tok, 64, f, &RowOptions::default())?;
            assert_eq!((&t.inputs, &t.targets), (&s.inputs, &s.targets), "{f:?}");
        }
        std::fs::write(&a, r#"[{"instruction": "a", "output": "the"}, {"instruction": "b"}]"#)?;
        let e = format!(
            "{:#}",
            load_chat(&[a], &tok, 64, ChatFormat::Alpaca, &RowOptions::default()).unwrap_err()
        );
        assert!(e.contains("a.json[1]") && e.contains("`output`"), "{e}");
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
