//! The multiple-choice data format: jsonl items `{"context", "choices", "answer"}`, read and
//! checked here, scored by `eval::mc`, built from WordNet by `data::wordnet`.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// One item.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct McItem {
    /// The question or prompt the choices continue.
    pub context: String,
    /// Candidate continuations.
    pub choices: Vec<String>,
    /// Index of the right choice.
    pub answer: usize,
}

/// Reads a jsonl file of items, checking each.
pub fn load_items(path: &Path) -> Result<Vec<McItem>> {
    let text = crate::fsio::read_text(path, crate::fsio::DATA_CAP, "multiple-choice file")?;
    let mut items = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{}:{}", path.display(), i + 1);
        let item: McItem = serde_json::from_str(line).with_context(|| {
            format!(
                "{}: expected {{\"context\": str, \"choices\": [str], \"answer\": int}}",
                at()
            )
        })?;
        if item.choices.len() < 2 || item.answer >= item.choices.len() {
            bail!(
                "{}: needs at least two choices and an answer index below {}",
                at(),
                item.choices.len()
            );
        }
        if item.choices.iter().any(|c| c.trim().is_empty()) {
            bail!("{}: a choice is empty", at());
        }
        items.push(item);
    }
    if items.is_empty() {
        bail!("{}: no items", path.display());
    }
    Ok(items)
}
