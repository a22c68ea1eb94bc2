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
//! Rows are read from JSON lines (`.jsonl`), a JSON array (`.json`), CSV with a header row
//! (`.csv`; a cell holding a JSON list, as `datasets` exports nested columns, is read as one) or
//! Parquet (`.parquet`, the files Hugging Face `datasets` publish: nested lists and structs read
//! as JSON lists and objects; snappy, zstd, gzip and lz4 pages).
//! A recipe's `data.columns` renames a file's columns to these field names first.

use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::path::Path;

use super::chat::{Conversation, Message};

/// A recipe's column mapping (`data.columns`): the field name strata reads -> the file's own
/// column name, e.g. `instruction = "question"`.
#[derive(Clone, Debug, Default, PartialEq, serde::Deserialize)]
#[serde(transparent)]
pub struct Columns(pub std::collections::BTreeMap<String, String>);

impl Columns {
    /// Renames the file's columns of `row` to strata's field names.
    pub fn apply(&self, row: &mut Value) {
        let Some(obj) = row.as_object_mut() else { return };
        for (field, column) in &self.0 {
            if let Some(v) = obj.remove(column) {
                obj.insert(field.clone(), v);
            }
        }
    }
}

/// Fields that hold lists; in a CSV cell they arrive as JSON text.
const LIST_FIELDS: [&str; 5] = ["messages", "conversations", "history", "prompt", "completion"];

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

/// Whether `path` is a file of rows [`for_each_row`] reads (`.jsonl`, `.json`, `.csv`,
/// `.parquet`), as against a text document.
pub fn is_row_file(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|x| x.to_str()),
        Some("jsonl" | "json" | "csv" | "parquet")
    )
}

/// A data file opened after checking it is a plain file within [`crate::fsio::DATA_CAP`]
/// (`what` names the format in the error).
fn open_data_file(path: &Path, what: &str) -> Result<std::fs::File> {
    let size = crate::fsio::check_regular_file(path)?;
    if size > crate::fsio::DATA_CAP {
        bail!(
            "{}: {size} bytes is more than a {what} data file may hold ({} MB)",
            path.display(),
            crate::fsio::DATA_CAP >> 20
        );
    }
    std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))
}

/// How rows are read: the recipe's column mapping, and what a bad row does (`data.bad_rows`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RowOptions {
    /// File column -> strata field renames.
    pub columns: Columns,
    /// Skip and count rows that cannot be read (bad JSON, a missing or mistyped field, a
    /// conversation the template cannot render) instead of stopping at the first.
    pub skip_bad: bool,
}

/// Calls `row(where, value)` for each row of `path` (columns renamed as `opts` says): a JSON
/// array (`.json`), CSV with a header (`.csv`), Parquet (`.parquet`) or one JSON value a line;
/// `where` is `file:line`, `file[index]` or `file row N` for errors. A row that fails (its JSON,
/// or `row` itself) stops the read with that error, or with `opts.skip_bad` is counted and
/// left out; the count is returned and said once per file with the first such error.
pub fn for_each_row(
    path: &Path,
    opts: &RowOptions,
    mut row: impl FnMut(&dyn Fn() -> String, &Value) -> Result<()>,
) -> Result<usize> {
    let (mut skipped, mut first) = (0usize, None::<String>);
    // Rows arrive owned, so renaming their columns copies nothing.
    let mut row = |at: &dyn Fn() -> String, v: Result<Value>| -> Result<()> {
        let r = v.and_then(|mut v| {
            opts.columns.apply(&mut v);
            row(at, &v)
        });
        match r {
            Err(e) if opts.skip_bad => {
                skipped += 1;
                first.get_or_insert_with(|| format!("{e:#}"));
                Ok(())
            }
            r => r,
        }
    };
    read_rows(path, &mut row)?;
    if skipped > 0 {
        eprintln!(
            "{}: skipped {skipped} bad row(s) (data.bad_rows = \"skip\"); the first: {}",
            path.display(),
            first.unwrap_or_default()
        );
    }
    Ok(skipped)
}

/// Every row of `path` in its format, each handed to `row` (a row that does not parse arrives
/// as its error).
fn read_rows(path: &Path, row: &mut RowSink) -> Result<()> {
    let p = path.display();
    if path.extension().is_some_and(|x| x == "csv") {
        let f = open_data_file(path, "CSV")?;
        let mut r = csv::ReaderBuilder::new().from_reader(std::io::BufReader::new(f));
        let header = r.headers().with_context(|| format!("{p}: no CSV header row"))?.clone();
        for rec in r.records() {
            let rec = match rec {
                Ok(rec) => rec,
                Err(e) => {
                    let line = e.position().map_or(0, |q| q.line());
                    row(
                        &|| format!("{p}:{line}"),
                        Err(anyhow::Error::new(e).context(format!("{p}:{line}: malformed CSV"))),
                    )?;
                    continue;
                }
            };
            let line = rec.position().map_or(0, |q| q.line());
            let obj: serde_json::Map<String, Value> = header
                .iter()
                .zip(rec.iter())
                .map(|(h, cell)| {
                    let list = LIST_FIELDS.contains(&h) && cell.trim_start().starts_with('[');
                    let v = match list {
                        true => serde_json::from_str(cell).unwrap_or_else(|_| Value::String(cell.into())),
                        false => Value::String(cell.into()),
                    };
                    (h.to_string(), v)
                })
                .collect();
            row(&|| format!("{p}:{line}"), Ok(Value::Object(obj)))?;
        }
        return Ok(());
    }
    if path.extension().is_some_and(|x| x == "parquet") {
        return for_each_parquet_row(path, row);
    }
    if path.extension().is_some_and(|x| x == "json") {
        let text = crate::fsio::read_text(path, crate::fsio::DATA_CAP, "JSON data file")?;
        let v: Value = serde_json::from_str(&text).with_context(|| format!("{p}: not valid JSON"))?;
        let Value::Array(rows) = v else {
            bail!("{p}: a .json data file must hold an array of rows");
        };
        for (i, r) in rows.into_iter().enumerate() {
            row(&|| format!("{p}[{i}]"), Ok(r))?;
        }
        return Ok(());
    }
    crate::fsio::for_each_line(path, crate::fsio::DOCUMENT_CAP, |n, line| {
        if line.trim().is_empty() {
            return Ok(());
        }
        let v = serde_json::from_str(line).with_context(|| format!("{p}:{n}: not valid JSON"));
        row(&|| format!("{p}:{n}"), v)
    })
}

/// A row's consumer: where the row is (for errors), and the row.
type RowSink<'a> = dyn FnMut(&dyn Fn() -> String, Result<Value>) -> Result<()> + 'a;

/// The rows of a Parquet file as JSON objects, in file order.
fn for_each_parquet_row(path: &Path, row: &mut RowSink) -> Result<()> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let p = path.display();
    let f = open_data_file(path, "Parquet")?;
    // The parquet crate is not hardened against crafted files everywhere; a panic inside it is
    // this file's error, not strata's crash.
    fn guarded<T>(p: &dyn std::fmt::Display, what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|_| {
            bail!("{p}: the Parquet reader failed on this file ({what}); is it a whole Parquet file?")
        })
    }
    let reader = guarded(&p, "footer", || {
        SerializedFileReader::new(f).with_context(|| format!("{p}: not a readable Parquet file"))
    })?;
    let rows = reader.metadata().file_metadata().num_rows();
    let mut i = 0i64;
    guarded(&p, "rows", || {
        for r in reader {
            let r = r.with_context(|| format!("{p} row {}: cannot decode", i + 1))?;
            i += 1;
            let n = i;
            row(&|| format!("{p} row {n}"), Ok(r.to_json_value()))?;
        }
        Ok(())
    })?;
    if i != rows {
        bail!("{p}: the footer declares {rows} rows, the pages held {i}");
    }
    Ok(())
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

    /// CSV rows with renamed columns and a JSON list in a cell read like JSON rows.
    #[test]
    fn csv_rows_and_column_maps_read_like_json() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("strata-formats-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let f = dir.join("d.csv");
        std::fs::write(
            &f,
            "question,answer,conversations\n\"Add, please\",5,\"[{\"\"from\"\": \"\"human\"\", \"\"value\"\": \"\"q\"\"}]\"\n",
        )?;
        let cols = Columns(
            [
                ("instruction".to_string(), "question".to_string()),
                ("output".into(), "answer".into()),
            ]
            .into(),
        );
        let mut rows = Vec::new();
        for_each_row(
            &f,
            &RowOptions {
                columns: cols,
                skip_bad: false,
            },
            |at, v| {
                rows.push((at(), v.clone()));
                Ok(())
            },
        )?;
        assert_eq!(rows.len(), 1);
        assert!(rows[0].0.ends_with("d.csv:2"), "{}", rows[0].0);
        let c = ChatFormat::Alpaca.conversation(&rows[0].1)?;
        assert_eq!(c.messages[0].content, "Add, please");
        assert_eq!(c.messages[1].content, "5");
        let s = ChatFormat::ShareGpt.conversation(&rows[0].1)?;
        assert_eq!(s.messages[0].content, "q");
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }

    /// Parquet files as pyarrow writes them (`scripts/parquet_fixture.py`: nested list<struct>
    /// columns, four page compressions) read as the same rows as their JSON twins.
    #[test]
    fn parquet_rows_read_as_their_json_twins() -> Result<()> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parquet");
        for name in ["alpaca", "sharegpt", "text", "prompt_completion"] {
            let mut got = Vec::new();
            for_each_row(&dir.join(format!("{name}.parquet")), &RowOptions::default(), |at, v| {
                got.push((at(), v.clone()));
                Ok(())
            })?;
            let want: Vec<Value> = serde_json::from_str(&std::fs::read_to_string(dir.join(format!("{name}.json")))?)?;
            assert_eq!(got.len(), want.len(), "{name}");
            for (i, ((at, g), w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(g, w, "{name} row {i}");
                assert!(at.ends_with(&format!("{name}.parquet row {}", i + 1)), "{at}");
            }
        }
        let a = ChatFormat::Alpaca.conversation(
            &serde_json::from_str::<Vec<Value>>(&std::fs::read_to_string(dir.join("alpaca.json"))?)?[0],
        )?;
        assert_eq!(a.messages.len(), 5);
        // A file cut short is an error naming it, not a panic.
        let tmp = std::env::temp_dir().join(format!("strata-parquet-{}.parquet", std::process::id()));
        let bytes = std::fs::read(dir.join("sharegpt.parquet"))?;
        for cut in [0, 4, bytes.len() / 2, bytes.len() - 9] {
            std::fs::write(&tmp, &bytes[..cut])?;
            let e = for_each_row(&tmp, &RowOptions::default(), |_, _| Ok(())).unwrap_err();
            assert!(format!("{e:#}").contains("strata-parquet"), "{e:#}");
        }
        std::fs::remove_file(&tmp)?;
        Ok(())
    }

    /// `data.bad_rows = "skip"` leaves out and counts what `error` stops at, naming the row.
    #[test]
    fn bad_rows_stop_the_read_or_are_skipped_and_counted() -> Result<()> {
        let f = std::env::temp_dir().join(format!("strata-badrows-{}.jsonl", std::process::id()));
        std::fs::write(
            &f,
            "{\"instruction\": \"a\", \"output\": \"b\"}\n{not json\n{\"instruction\": \"c\"}\n{\"instruction\": \"d\", \"output\": \"e\"}\n",
        )?;
        let read = |skip_bad| {
            let mut got = Vec::new();
            let opts = RowOptions {
                skip_bad,
                ..Default::default()
            };
            let n = for_each_row(&f, &opts, |at, v| {
                got.push(ChatFormat::Alpaca.conversation(v).with_context(at)?);
                Ok(())
            });
            n.map(|n| (n, got.len()))
        };
        let e = format!("{:#}", read(false).unwrap_err());
        assert!(e.contains(".jsonl:2: not valid JSON"), "{e}");
        assert_eq!(read(true)?, (2, 2), "two skipped, two read");
        std::fs::remove_file(&f)?;
        Ok(())
    }
}
