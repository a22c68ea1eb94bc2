//! Raw text sources (`.txt` / `.md` files, directories of them, `.jsonl` with a `text` field),
//! tokenized, EOS-separated and packed into fixed-length sequences.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

use super::formats::RowOptions;
use crate::model::tokenizer::Tok;
use crate::ops::lm_head::IGNORE;

/// Files under `path` (itself if a file), sorted so runs are reproducible; a link back into a
/// directory already walked is walked once, and FIFOs or devices are refused.
pub fn list_files(path: &Path) -> Result<Vec<PathBuf>> {
    if !path.exists() {
        bail!("data path {} does not exist", path.display());
    }
    let out = crate::fsio::walk_files(path, &|p| {
        super::formats::is_row_file(p) || matches!(p.extension().and_then(|x| x.to_str()), Some("txt" | "md"))
    })?;
    if out.is_empty() {
        bail!(
            "{}: no .txt, .md, .jsonl, .json, .csv or .parquet files inside",
            path.display()
        );
    }
    Ok(out)
}

/// Documents of a text source: a `.txt`/`.md` file is one document; `.jsonl`, `.json` (an
/// array), `.csv` and `.parquet` files one a row (its `text` field). Each document is capped at
/// [`crate::fsio::DOCUMENT_CAP`] bytes.
pub fn load_documents(paths: &[PathBuf]) -> Result<Vec<String>> {
    load_documents_mapped(paths, &RowOptions::default())
}

/// [`load_documents`] with a recipe's column mapping (`data.columns`, e.g. `text = "content"`)
/// and bad-row policy (`data.bad_rows`).
pub fn load_documents_mapped(paths: &[PathBuf], rows: &RowOptions) -> Result<Vec<String>> {
    use crate::fsio::{read_text, DOCUMENT_CAP};
    let mut docs = Vec::new();
    for root in paths {
        for f in list_files(root)? {
            if super::formats::is_row_file(&f) {
                super::formats::for_each_row(&f, rows, |at, v| {
                    let t = v.get("text").and_then(|t| t.as_str()).with_context(|| {
                        format!(
                            "{}: no string field `text` (chat-like data needs data.format = \"chat\", \"alpaca\", ...; another column name needs data.columns)",
                            at()
                        )
                    })?;
                    if !t.trim().is_empty() {
                        docs.push(t.to_string());
                    }
                    Ok(())
                })?;
            } else {
                let text = read_text(&f, DOCUMENT_CAP, "text document")?;
                if !text.trim().is_empty() {
                    docs.push(text);
                }
            }
        }
    }
    if docs.is_empty() {
        bail!("no documents found in {paths:?}");
    }
    Ok(docs)
}

/// Packed training sequences: each row has `seq_len` inputs and `seq_len` targets.
#[derive(Clone, Debug, Default)]
pub struct Sequences {
    /// Sequence length.
    pub seq_len: usize,
    /// Inputs, one `Vec` of `seq_len` ids per row.
    pub inputs: Vec<Vec<u32>>,
    /// Targets (`IGNORE` where no loss is taken), aligned with inputs.
    pub targets: Vec<Vec<u32>>,
}

impl Sequences {
    /// Number of rows.
    pub fn len(&self) -> usize {
        self.inputs.len()
    }

    /// True when there are no rows.
    pub fn is_empty(&self) -> bool {
        self.inputs.is_empty()
    }

    /// Moves the last `fraction` of rows (at least one) into a second set.
    pub fn split_off(&mut self, fraction: f64) -> Sequences {
        let n = ((self.len() as f64 * fraction).ceil() as usize).clamp(1, self.len().saturating_sub(1).max(1));
        let at = self.len() - n;
        Sequences {
            seq_len: self.seq_len,
            inputs: self.inputs.split_off(at),
            targets: self.targets.split_off(at),
        }
    }

    /// Keeps at most `max` rows (0: all), evenly spaced so that every part of the source is
    /// represented (a held-out set sorted by document stays a sample of all documents).
    pub fn subsample(&mut self, max: usize) {
        if max == 0 || self.len() <= max {
            return;
        }
        let keep: Vec<usize> = (0..max).map(|i| i * self.len() / max).collect();
        self.inputs = keep.iter().map(|&i| std::mem::take(&mut self.inputs[i])).collect();
        self.targets = keep.iter().map(|&i| std::mem::take(&mut self.targets[i])).collect();
    }

    /// Tokens with a target.
    pub fn target_tokens(&self) -> usize {
        self.targets
            .iter()
            .map(|t| t.iter().filter(|&&x| x != IGNORE).count())
            .sum()
    }
}

/// Tokenizes documents, joins them with EOS and cuts the stream into rows of `seq_len + 1`
/// tokens that overlap by one (inputs are the first `seq_len`, targets the last `seq_len`).
/// A short tail is kept as a padded row so that small corpora are not lost.
pub fn pack(tok: &Tok, docs: &[String], seq_len: usize) -> Result<Sequences> {
    if seq_len < 2 {
        bail!("seq_len must be at least 2");
    }
    let eos = tok
        .eos
        .context("the tokenizer has no end-of-sequence token to separate documents")?;
    let mut stream = Vec::new();
    for d in docs {
        stream.extend(tok.encode(d)?);
        stream.push(eos);
    }
    let mut seqs = Sequences {
        seq_len,
        ..Default::default()
    };
    let mut start = 0;
    while start + 1 < stream.len() {
        let end = (start + seq_len + 1).min(stream.len());
        let block = &stream[start..end];
        let mut inp = block[..block.len() - 1].to_vec();
        let mut tgt = block[1..].to_vec();
        if inp.len() < seq_len {
            if !seqs.is_empty() && inp.len() < seq_len / 4 {
                break;
            }
            tgt.resize(seq_len, IGNORE);
            inp.resize(seq_len, eos);
        }
        seqs.inputs.push(inp);
        seqs.targets.push(tgt);
        start = end - 1;
    }
    Ok(seqs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tokenizer::{tiny_vocab, tokenizer_json_from_gguf};

    #[test]
    fn packing_keeps_every_token_once_as_target() -> Result<()> {
        let tok = Tok::from_json(tokenizer_json_from_gguf(&tiny_vocab(), "t")?, Some(0), None, None)?;
        let docs = vec!["the cat".to_string(), "a dog the".to_string()];
        let seqs = pack(&tok, &docs, 4)?;
        let stream: Vec<u32> = docs
            .iter()
            .flat_map(|d| tok.encode(d).unwrap().into_iter().chain([0]))
            .collect();
        let targets: Vec<u32> = seqs
            .targets
            .iter()
            .flatten()
            .copied()
            .filter(|&t| t != IGNORE)
            .collect();
        assert_eq!(targets, stream[1..].to_vec());
        for (i, t) in seqs.inputs.iter().zip(&seqs.targets) {
            assert_eq!(i.len(), 4);
            assert_eq!(t.len(), 4);
            assert_eq!(
                &i[1..],
                &t[..3]
                    .iter()
                    .map(|&x| if x == IGNORE { 0 } else { x })
                    .collect::<Vec<_>>()[..]
            );
        }
        Ok(())
    }

    #[test]
    fn jsonl_needs_a_text_field() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("strata-jsonl-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let f = dir.join("a.jsonl");
        std::fs::write(&f, "{\"text\": \"hello\"}\n{\"body\": 1}\n")?;
        let e = load_documents(std::slice::from_ref(&f)).unwrap_err();
        assert!(e.to_string().contains("a.jsonl:2"), "{e}");
        std::fs::write(&f, "{\"text\": \"hello\"}\n\n{\"text\": \"world\"}\n")?;
        assert_eq!(load_documents(std::slice::from_ref(&dir))?, vec!["hello", "world"]);
        assert!(load_documents(&[dir.join("missing")])
            .unwrap_err()
            .to_string()
            .contains("does not exist"));
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
