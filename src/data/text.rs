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
    /// Where documents begin in each row (packing with document boundaries: attention stays
    /// inside a document and RoPE restarts at each); empty when rows are attended whole.
    pub starts: Vec<Vec<u32>>,
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
            starts: if self.starts.is_empty() {
                Vec::new()
            } else {
                self.starts.split_off(at)
            },
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
        if !self.starts.is_empty() {
            self.starts = keep.iter().map(|&i| std::mem::take(&mut self.starts[i])).collect();
        }
    }

    /// Each position's document (1, 2, ... within its row) and its position inside that
    /// document, for `rows` of this set: what the fused attention needs to keep documents apart.
    /// `None` when the set carries no boundaries.
    pub fn documents(&self, rows: &[usize]) -> Option<(Vec<u32>, Vec<usize>)> {
        if self.starts.is_empty() {
            return None;
        }
        let mut branch = Vec::with_capacity(rows.len() * self.seq_len);
        let mut positions = Vec::with_capacity(rows.len() * self.seq_len);
        for &r in rows {
            let starts = &self.starts[r];
            let mut doc = 0;
            let mut begin = 0;
            for p in 0..self.seq_len {
                if starts.get(doc).is_some_and(|&s| s as usize == p) {
                    doc += 1;
                    begin = p;
                }
                branch.push(doc.max(1) as u32);
                positions.push(p - begin);
            }
        }
        Some((branch, positions))
    }

    /// Tokens with a target.
    pub fn target_tokens(&self) -> usize {
        self.targets
            .iter()
            .map(|t| t.iter().filter(|&&x| x != IGNORE).count())
            .sum()
    }
}

/// Tokenizes documents (each after BOS where the model expects one), joins them with EOS and
/// cuts the stream into rows of `seq_len + 1` tokens that overlap by one (inputs are the first
/// `seq_len`, targets the last `seq_len`; a BOS-first model's rows start with BOS).
/// A short tail is kept as a padded row so that small corpora are not lost. With `documents`,
/// each row records where its documents begin (a document cut by a row's end continues, as a
/// document of its own, at the start of the next row) and the target that would predict a
/// document's first token from the one before it (the EOS that ends the earlier document) is
/// not trained on.
pub fn pack(tok: &Tok, docs: &[String], seq_len: usize, documents: bool) -> Result<Sequences> {
    if seq_len < 2 {
        bail!("seq_len must be at least 2");
    }
    let eos = tok
        .eos
        .context("the tokenizer has no end-of-sequence token to separate documents")?;
    let mut stream = Vec::new();
    // Whether a stream position begins a document.
    let mut begins = Vec::new();
    for d in docs {
        let ids = tok.encode_document(d)?;
        begins.push(true);
        begins.resize(stream.len() + ids.len() + 1, false);
        stream.extend(ids);
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
        // A model that expects BOS first (Gemma: without it the first positions' losses run
        // to 20+ nats and the whole row suffers) sees one at the start of every row, as
        // llama.cpp's perplexity puts it. Rows overlap by one, so the token it stands in for is
        // the previous row's last target: no target is lost.
        if let Some(b) = tok.bos.filter(|_| tok.add_bos) {
            inp[0] = b;
        }
        if inp.len() < seq_len {
            if !seqs.is_empty() && inp.len() < seq_len / 4 {
                break;
            }
            tgt.resize(seq_len, IGNORE);
            inp.resize(seq_len, eos);
        }
        if documents {
            let real = block.len() - 1;
            let mut starts = vec![0u32];
            for p in 1..real {
                if begins[start + p] {
                    starts.push(p as u32);
                    tgt[p - 1] = IGNORE;
                }
            }
            // The next row's first token may begin a document: not predicted across.
            if end < stream.len() && begins[end - 1] && real > 0 {
                tgt[real - 1] = IGNORE;
            }
            seqs.starts.push(starts);
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
        let seqs = pack(&tok, &docs, 4, false)?;
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

    /// A model that expects BOS: every document begins with it, every row's first input is it,
    /// and the targets are still the whole stream once (BOS-first documents included).
    #[test]
    fn bos_first_models_get_bos_on_every_row_and_document() -> Result<()> {
        let mut tok = Tok::from_json(tokenizer_json_from_gguf(&tiny_vocab(), "t")?, Some(0), Some(1), None)?;
        tok.add_bos = true;
        let docs = vec!["the cat the cat the".to_string(), "a dog the".to_string()];
        let seqs = pack(&tok, &docs, 4, false)?;
        let stream: Vec<u32> = docs
            .iter()
            .flat_map(|d| [1].into_iter().chain(tok.encode(d).unwrap()).chain([0]))
            .collect();
        let targets: Vec<u32> = seqs
            .targets
            .iter()
            .flatten()
            .copied()
            .filter(|&t| t != IGNORE)
            .collect();
        assert_eq!(targets, stream[1..].to_vec());
        assert!(seqs.inputs.len() > 2 && seqs.inputs.iter().all(|r| r[0] == 1));
        Ok(())
    }

    /// With document boundaries every row says where its documents begin, no target crosses
    /// a boundary (the EOS ending a document does not predict the next one's first token), and
    /// every other next token is still trained on exactly once.
    #[test]
    fn packing_by_documents_keeps_them_apart() -> Result<()> {
        let tok = Tok::from_json(tokenizer_json_from_gguf(&tiny_vocab(), "t")?, Some(0), None, None)?;
        let docs: Vec<String> = ["the cat sat", "a dog", "the mat the cat"]
            .iter()
            .map(|d| d.to_string())
            .collect();
        let enc: Vec<Vec<u32>> = docs.iter().map(|d| tok.encode(d).unwrap()).collect();
        let seqs = pack(&tok, &docs, 6, true)?;
        assert_eq!(seqs.starts.len(), seqs.len());
        // The stream's next-token pairs that stay inside a document (its EOS included).
        let mut want = Vec::new();
        for e in &enc {
            want.extend(e[1..].iter().copied().chain([0]));
        }
        let got: Vec<u32> = seqs
            .targets
            .iter()
            .flatten()
            .copied()
            .filter(|&t| t != IGNORE)
            .collect();
        assert_eq!(got, want);
        for (r, (inp, starts)) in seqs.inputs.iter().zip(&seqs.starts).enumerate() {
            assert_eq!(starts[0], 0, "row {r}");
            for &s in &starts[1..] {
                // A document begins right after an EOS, and the EOS's target is not trained.
                assert_eq!(inp[s as usize - 1], 0, "row {r}");
                assert_eq!(seqs.targets[r][s as usize - 1], IGNORE, "row {r}");
            }
        }
        let (branch, positions) = seqs.documents(&[0]).expect("boundaries");
        assert_eq!(branch.len(), 6);
        let second = seqs.starts[0].get(1).map_or(6, |&s| s as usize);
        assert!(branch[..second].iter().all(|&b| b == 1) && positions[..second] == (0..second).collect::<Vec<_>>()[..]);
        if second < 6 {
            assert_eq!((branch[second], positions[second]), (2, 0));
        }
        assert!(pack(&tok, &docs, 6, false)?.documents(&[0]).is_none());
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
