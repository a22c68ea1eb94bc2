//! The chat-like data formats users bring from other trainers, each turned into the
//! `messages` conversation strata trains on (loss on the assistant turns, as for `messages`):
//!
//! | format | a row | from |
//! |---|---|---|
//! | `chat` | `{"messages": [{"role", "content"}, ...]}` | OpenAI, TRL conversational |
//! | `alpaca` | `{"instruction", "input"?, "output", "system"?, "history"?: [[q, a], ...]}` | Alpaca, LLaMA-Factory |
//! | `sharegpt` | `{"conversations": [{"from", "value"}, ...], "system"?}` | ShareGPT, axolotl, LLaMA-Factory |
//! | `prompt_completion` | `{"prompt", "completion"}`: strings, or lists of messages | TRL |
//!
//! Rows are read from JSON lines (`.jsonl`) or a JSON array (`.json`).

use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::path::Path;

use super::chat::{Conversation, Message};

/// How each row of a chat-like file is laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChatFormat {
    /// OpenAI `messages`.
    Messages,
    /// Alpaca instruction / input / output.
    Alpaca,
    /// ShareGPT `conversations` of `from` / `value`.
    ShareGpt,
    /// TRL prompt / completion.
    PromptCompletion,
}

fn text<'a>(v: &'a Value, key: &str) -> Result<&'a str> {
    v.get(key)
        .and_then(|x| x.as_str())
        .with_context(|| format!("field `{key}` is missing or not a string"))
}

fn msg(role: &str, content: &str) -> Message {
    Message {
        role: role.into(),
        content: content.into(),
    }
}

/// ShareGPT's speaker names, as LLaMA-Factory and axolotl map them.
fn sharegpt_role(from: &str) -> Option<&'static str> {
    Some(match from {
        "human" | "user" => "user",
        "gpt" | "assistant" | "chatgpt" | "bing" | "bard" | "model" => "assistant",
        "system" => "system",
        _ => return None,
    })
}

impl ChatFormat {
    /// The row layout a recipe's `data.format` names (`text` is not chat-like: `None`).
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "chat" | "messages" => ChatFormat::Messages,
            "alpaca" => ChatFormat::Alpaca,
            "sharegpt" => ChatFormat::ShareGpt,
            "prompt_completion" => ChatFormat::PromptCompletion,
            _ => return None,
        })
    }

    /// The conversation a row holds; an error names the field that is wrong.
    pub fn conversation(self, v: &Value) -> Result<Conversation> {
        if !v.is_object() {
            bail!("a row must be a JSON object");
        }
        let messages = match self {
            ChatFormat::Messages => {
                serde_json::from_value::<Conversation>(v.clone())
                    .context("expected {\"messages\": [{\"role\", \"content\"}]}")?
                    .messages
            }
            ChatFormat::Alpaca => {
                let mut m = Vec::new();
                if let Some(s) = v.get("system").and_then(|s| s.as_str()).filter(|s| !s.is_empty()) {
                    m.push(msg("system", s));
                }
                if let Some(h) = v.get("history").filter(|h| !h.is_null()) {
                    let turns = h
                        .as_array()
                        .context("field `history` must be a list of [question, answer] pairs")?;
                    for (i, t) in turns.iter().enumerate() {
                        let pair = t
                            .as_array()
                            .filter(|p| p.len() == 2)
                            .and_then(|p| Some((p[0].as_str()?, p[1].as_str()?)));
                        let (q, a) = pair
                            .with_context(|| format!("`history[{i}]` must be a [question, answer] pair of strings"))?;
                        m.push(msg("user", q));
                        m.push(msg("assistant", a));
                    }
                }
                // LLaMA-Factory's join of an instruction and its input.
                let instruction = text(v, "instruction")?;
                let prompt = match v.get("input").and_then(|i| i.as_str()).filter(|i| !i.is_empty()) {
                    Some(input) => format!("{instruction}\n{input}"),
                    None => instruction.to_string(),
                };
                m.push(msg("user", &prompt));
                m.push(msg("assistant", text(v, "output")?));
                m
            }
            ChatFormat::ShareGpt => {
                let turns = v
                    .get("conversations")
                    .and_then(|c| c.as_array())
                    .context("field `conversations` is missing or not a list")?;
                let mut m = Vec::new();
                if let Some(s) = v.get("system").and_then(|s| s.as_str()).filter(|s| !s.is_empty()) {
                    m.push(msg("system", s));
                }
                for (i, t) in turns.iter().enumerate() {
                    let from = t
                        .get("from")
                        .and_then(|f| f.as_str())
                        .with_context(|| format!("`conversations[{i}].from` is missing or not a string"))?;
                    let role = sharegpt_role(from).with_context(|| {
                        format!(
                            "`conversations[{i}].from` is `{from}`; strata maps human/user, gpt/assistant and system"
                        )
                    })?;
                    let value = t
                        .get("value")
                        .and_then(|x| x.as_str())
                        .with_context(|| format!("`conversations[{i}].value` is missing or not a string"))?;
                    m.push(msg(role, value));
                }
                m
            }
            ChatFormat::PromptCompletion => {
                let part = |key: &str, role: &str| -> Result<Vec<Message>> {
                    match v.get(key) {
                        Some(Value::String(s)) => Ok(vec![msg(role, s)]),
                        Some(x @ Value::Array(_)) => serde_json::from_value(x.clone()).with_context(|| {
                            format!("field `{key}` must be a string or a list of {{\"role\", \"content\"}}")
                        }),
                        _ => bail!("field `{key}` is missing (a string or a list of messages)"),
                    }
                };
                let mut m = part("prompt", "user")?;
                m.extend(part("completion", "assistant")?);
                m
            }
        };
        Ok(Conversation { messages })
    }
}

/// Calls `row(where, value)` for each row of `path`: a JSON array (`.json`) or one JSON value a
/// line; `where` is `file:line` or `file[index]` for errors.
pub fn for_each_row(path: &Path, mut row: impl FnMut(&dyn Fn() -> String, &Value) -> Result<()>) -> Result<()> {
    let p = path.display();
    if path.extension().is_some_and(|x| x == "json") {
        let text = crate::fsio::read_text(path, crate::fsio::DATA_CAP, "JSON data file")?;
        let v: Value = serde_json::from_str(&text).with_context(|| format!("{p}: not valid JSON"))?;
        let rows = v
            .as_array()
            .with_context(|| format!("{p}: a .json data file must hold an array of rows"))?;
        for (i, r) in rows.iter().enumerate() {
            row(&|| format!("{p}[{i}]"), r)?;
        }
        return Ok(());
    }
    crate::fsio::for_each_line(path, crate::fsio::DOCUMENT_CAP, |n, line| {
        if line.trim().is_empty() {
            return Ok(());
        }
        let v: Value = serde_json::from_str(line).with_context(|| format!("{p}:{n}: not valid JSON"))?;
        row(&|| format!("{p}:{n}"), &v)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn roles(c: &Conversation) -> Vec<(String, String)> {
        c.messages.iter().map(|m| (m.role.clone(), m.content.clone())).collect()
    }

    #[test]
    fn each_format_becomes_the_same_kind_of_conversation() -> Result<()> {
        let pair = |r: &str, c: &str| (r.to_string(), c.to_string());
        let a = ChatFormat::Alpaca.conversation(&json!({"instruction": "Add", "input": "2 and 3", "output": "5",
            "system": "Be exact.", "history": [["hi", "hello"]]}))?;
        assert_eq!(
            roles(&a),
            vec![
                pair("system", "Be exact."),
                pair("user", "hi"),
                pair("assistant", "hello"),
                pair("user", "Add\n2 and 3"),
                pair("assistant", "5")
            ]
        );
        let a = ChatFormat::Alpaca.conversation(&json!({"instruction": "Say hi", "input": "", "output": "hi"}))?;
        assert_eq!(roles(&a), vec![pair("user", "Say hi"), pair("assistant", "hi")]);
        let s = ChatFormat::ShareGpt.conversation(
            &json!({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}),
        )?;
        assert_eq!(roles(&s), vec![pair("user", "q"), pair("assistant", "a")]);
        let p = ChatFormat::PromptCompletion.conversation(&json!({"prompt": "q", "completion": "a"}))?;
        assert_eq!(roles(&p), roles(&s));
        let p = ChatFormat::PromptCompletion.conversation(&json!({"prompt": [{"role": "user", "content": "q"}],
            "completion": [{"role": "assistant", "content": "a"}]}))?;
        assert_eq!(roles(&p), roles(&s));
        for (f, v, want) in [
            (ChatFormat::Alpaca, json!({"instruction": "x"}), "`output`"),
            (
                ChatFormat::Alpaca,
                json!({"instruction": "x", "output": "y", "history": [["a"]]}),
                "`history[0]`",
            ),
            (
                ChatFormat::ShareGpt,
                json!({"conversations": [{"from": "robot", "value": "x"}]}),
                "`conversations[0].from` is `robot`",
            ),
            (
                ChatFormat::ShareGpt,
                json!({"conversations": [{"from": "gpt"}]}),
                "`conversations[0].value`",
            ),
            (ChatFormat::PromptCompletion, json!({"prompt": "x"}), "`completion`"),
            (ChatFormat::Messages, json!([1]), "JSON object"),
        ] {
            let e = format!("{:#}", f.conversation(&v).unwrap_err());
            assert!(e.contains(want), "{want}: {e}");
        }
        Ok(())
    }
}
