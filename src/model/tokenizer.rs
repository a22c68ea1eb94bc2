//! Tokenizers: Hugging Face `tokenizer.json`, or byte-level BPE rebuilt from GGUF metadata.
//!
//! A GGUF tokenizer is turned into an ordinary `tokenizer.json` document (vocab, merges, the
//! pre-tokenizer llama.cpp names in `tokenizer.ggml.pre`, special tokens), so one code path
//! encodes both and `strata merge` can write the same file for other tools.

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::path::Path;
use std::str::FromStr;
use tokenizers::Tokenizer;

/// A tokenizer with the special tokens strata needs.
#[derive(Clone)]
pub struct Tok {
    /// The underlying Hugging Face tokenizer.
    pub inner: Tokenizer,
    /// End-of-sequence / end-of-document token.
    pub eos: Option<u32>,
    /// Beginning-of-sequence token.
    pub bos: Option<u32>,
    /// Whether the model expects [`Tok::bos`] before each document (Gemma, Llama; llama.cpp's
    /// `add_bos_token`, Hugging Face's `add_bos_token` or a BOS in the post-processor).
    pub add_bos: bool,
    /// The model's Jinja chat template, when it has one.
    pub chat_template: Option<String>,
    /// The `tokenizer.json` document (for exports).
    pub json: String,
    /// Texts a long input is never cut inside for encoding in pieces (SentencePiece pieces that
    /// hold a space; see [`chunk_end_avoiding`]).
    pub unbroken: Vec<String>,
}

impl Tok {
    /// Parses a `tokenizer.json` document.
    pub fn from_json(json: String, eos: Option<u32>, bos: Option<u32>, chat_template: Option<String>) -> Result<Self> {
        // The tokenizers crate panics (`expect("Helper")`) on a syntax error inside a
        // `decoder` value (found by fuzzing, tests/fixtures/fuzz/hf_dir/): the document's
        // syntax is checked first, so it can only return errors.
        serde_json::from_str::<serde::de::IgnoredAny>(&json)
            .map_err(|e| anyhow::anyhow!("invalid tokenizer.json: {e}"))?;
        let inner = Tokenizer::from_str(&json).map_err(|e| anyhow::anyhow!("invalid tokenizer.json: {e}"))?;
        Ok(Self {
            inner,
            eos,
            bos,
            chat_template,
            json,
            unbroken: Vec::new(),
            add_bos: false,
        })
    }

    /// The ids a document is scored or trained as: [`Tok::encode`], after BOS when the model
    /// expects one.
    pub fn encode_document(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids: Vec<u32> = self.bos.filter(|_| self.add_bos).into_iter().collect();
        ids.extend(self.encode(text)?);
        Ok(ids)
    }

    /// Reads `tokenizer.json` and, when present, `tokenizer_config.json` (special tokens, chat template).
    pub fn from_file(path: &Path, config: &Path) -> Result<Self> {
        if !path.exists() {
            bail!(
                "{}: missing (a Hugging Face model directory needs its tokenizer.json)",
                path.display()
            );
        }
        let json = crate::fsio::read_text(path, crate::fsio::TOKENIZER_CAP, "tokenizer.json")?;
        let cfg: Value = match config.exists() {
            true => {
                let t = crate::fsio::read_text(config, crate::fsio::TOKENIZER_CAP, "tokenizer_config.json")?;
                serde_json::from_str(&t).with_context(|| format!("{} is not valid JSON", config.display()))?
            }
            false => Value::Null,
        };
        let mut tok = Self::from_json(
            json,
            None,
            None,
            cfg.get("chat_template").and_then(|v| v.as_str()).map(String::from),
        )
        .with_context(|| path.display().to_string())?;
        let special = |k: &str| -> Option<u32> {
            let v = cfg.get(k)?;
            let s = v.as_str().or_else(|| v.get("content").and_then(|c| c.as_str()))?;
            tok.inner.token_to_id(s)
        };
        tok.eos = special("eos_token");
        tok.bos = special("bos_token");
        // `add_bos_token` when stated; otherwise a BOS in the post-processor's single template
        // (how Llama 3's tokenizer.json adds <|begin_of_text|>).
        tok.add_bos = match cfg.get("add_bos_token").and_then(|v| v.as_bool()) {
            Some(b) => b,
            None => {
                let post = serde_json::to_value(tok.inner.get_post_processor()).unwrap_or(Value::Null);
                let bos = tok.bos.and_then(|b| tok.inner.id_to_token(b));
                post["single"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .chain(
                        post["processors"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .flat_map(|p| p["single"].as_array().into_iter().flatten()),
                    )
                    .any(|piece| bos.is_some() && piece["SpecialToken"]["id"].as_str() == bos.as_deref())
            }
        };
        Ok(tok)
    }

    /// Token ids of `text` (no special tokens added). A long text is encoded in pieces of about
    /// [`ENCODE_CHUNK`] bytes, cut before a single space between two non-space characters, where
    /// the pre-tokenizers of byte-level BPE never join across: the ids are those of the whole
    /// text, and the tokenizer's working memory (tens of bytes per character) stays bounded.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            let cut = chunk_end_avoiding(rest, ENCODE_CHUNK, &self.unbroken);
            let enc = self
                .inner
                .encode(&rest[..cut], false)
                .map_err(|e| anyhow::anyhow!("tokenizer: {e}"))?;
            ids.extend_from_slice(enc.get_ids());
            rest = &rest[cut..];
        }
        Ok(ids)
    }

    /// Text of `ids`, keeping special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| anyhow::anyhow!("tokenizer: {e}"))
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

/// About how many bytes of text [`Tok::encode`] hands the tokenizer at once.
pub const ENCODE_CHUNK: usize = 64 << 10;

/// Where the first piece of `text` ends: all of it when short, else the last single space
/// between non-space characters in the second half of the first `max` bytes (any character
/// boundary when there is none, as in text without spaces).
pub fn chunk_end(text: &str, max: usize) -> usize {
    chunk_end_avoiding(text, max, &[])
}

/// [`chunk_end`], never cutting inside an occurrence of one of `unbroken`.
pub fn chunk_end_avoiding(text: &str, max: usize, unbroken: &[String]) -> usize {
    if text.len() <= max {
        return text.len();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let bytes = text.as_bytes();
    for p in (max / 2..end).rev() {
        if bytes[p] == b' '
            && text[..p].chars().next_back().is_some_and(|c| !c.is_whitespace())
            && text[p + 1..].chars().next().is_some_and(|c| !c.is_whitespace())
            && !unbroken.iter().any(|u| spans(text, p, u))
        {
            return p;
        }
    }
    end
}

/// Whether an occurrence of `piece` in `text` covers both sides of byte `p`.
fn spans(text: &str, p: usize, piece: &str) -> bool {
    let bytes = text.as_bytes();
    (1..piece.len()).any(|k| p >= k && bytes.get(p - k..p - k + piece.len()) == Some(piece.as_bytes()))
}

const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn byte_level(use_regex: bool) -> Value {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex})
}

fn split(pattern: &str) -> Value {
    json!({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false})
}

/// The pieces of a GGUF tokenizer, already read and checked.
#[derive(Default)]
pub struct GgufVocab {
    /// `tokenizer.ggml.model`: `gpt2` (byte-level BPE) or `llama` (SentencePiece pieces with
    /// scores and byte fallback).
    pub model: String,
    /// `tokenizer.ggml.pre`.
    pub pre: String,
    /// Token strings, by id.
    pub tokens: Vec<String>,
    /// Token types (llama.cpp: 1 normal, 3 control, 4 user-defined ...), by id.
    pub types: Vec<i64>,
    /// Merges, `"a b"` (byte-level BPE).
    pub merges: Vec<String>,
    /// Piece scores, by id (SentencePiece: a higher score merges first).
    pub scores: Vec<f32>,
    /// SentencePiece: whether a text gets a leading `▁` (llama.cpp's `add_space_prefix`,
    /// true unless the file says otherwise).
    pub add_space_prefix: bool,
}

/// SentencePiece's whitespace symbol.
const SPM_SPACE: char = '\u{2581}';

/// Builds a `tokenizer.json` document for a SentencePiece vocabulary as llama.cpp runs it
/// (`tokenizer.ggml.model = llama`): spaces become `▁` (with a leading one when
/// `add_space_prefix`), then adjacent pieces merge, the highest-scoring result first and the
/// leftmost among equals, and what no piece covers falls back to `<0xXX>` byte tokens. Hugging
/// Face's BPE runs that exactly given merges ranked by their result's score, which is how its
/// own converter (`SentencePieceExtractor`) writes them: every split of a piece into two pieces.
/// Control tokens (type 3) and user-defined ones (type 4) are matched whole before any merge.
fn spm_tokenizer_json(v: &GgufVocab, source: &str) -> Result<String> {
    let n = v.tokens.len();
    if v.scores.len() != n || v.types.len() != n {
        bail!(
            "{source}: a SentencePiece vocabulary needs a score and a type for each of its {n} tokens (found {} and {})",
            v.scores.len(),
            v.types.len()
        );
    }
    if let Some(i) = v.scores.iter().position(|x| !x.is_finite()) {
        bail!("{source}: score of token {i} is not a finite number");
    }
    let mut ids = std::collections::HashMap::with_capacity(n);
    for (id, t) in v.tokens.iter().enumerate() {
        if ids.insert(t.as_str(), id).is_some() {
            bail!("{source}: token `{t}` appears twice in the vocabulary");
        }
    }
    let normal = |id: usize| v.types[id] == 1;
    // Every split of a normal piece into two normal pieces, ranked by the piece's score
    // (then, as Hugging Face's converter, by id and the parts' ids).
    let mut merges: Vec<(f32, usize, usize, usize)> = Vec::new();
    for (id, t) in v.tokens.iter().enumerate().filter(|(id, _)| normal(*id)) {
        for (cut, _) in t.char_indices().skip(1) {
            let (a, b) = (&t[..cut], &t[cut..]);
            if let (Some(&ia), Some(&ib)) = (ids.get(a), ids.get(b)) {
                if normal(ia) && normal(ib) {
                    merges.push((v.scores[id], id, ia, ib));
                }
            }
        }
    }
    merges.sort_by(|x, y| y.0.total_cmp(&x.0).then((x.1, x.2, x.3).cmp(&(y.1, y.2, y.3))));
    let merges: Vec<Value> = merges
        .iter()
        .map(|&(_, _, a, b)| json!([v.tokens[a], v.tokens[b]]))
        .collect();
    let mut vocab = serde_json::Map::with_capacity(n);
    let mut added = Vec::new();
    for (id, t) in v.tokens.iter().enumerate() {
        vocab.insert(t.clone(), json!(id));
        if matches!(v.types[id], 3 | 4) {
            added.push(
                json!({"id": id, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                "normalized": false, "special": v.types[id] == 3}),
            );
        }
    }
    for b in 0..=255u8 {
        let t = format!("<0x{b:02X}>");
        if !ids.contains_key(t.as_str()) {
            bail!("{source}: the SentencePiece vocabulary has no byte token `{t}` to fall back to");
        }
    }
    let space = json!({"type": "Replace", "pattern": {"String": " "}, "content": SPM_SPACE.to_string()});
    let normalizer = match v.add_space_prefix {
        true => {
            json!({"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": SPM_SPACE.to_string()}, space]})
        }
        false => space,
    };
    let mut decoders = vec![
        json!({"type": "Replace", "pattern": {"String": SPM_SPACE.to_string()}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    if v.add_space_prefix {
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    let unk = v.types.iter().position(|&t| t == 2).map(|i| v.tokens[i].clone());
    let doc = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": null,
        "post_processor": null,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {"type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
            "vocab": vocab, "merges": merges},
    });
    Ok(serde_json::to_string(&doc)?)
}

/// The texts of pieces that hold a space between other characters (SentencePiece pieces such
/// as `>▁</`): a long text is never cut for encoding inside one of them.
pub fn spanning_pieces(v: &GgufVocab) -> Vec<String> {
    v.tokens
        .iter()
        .filter(|t| {
            let inner: Vec<char> = t.chars().collect();
            inner.len() > 2 && inner[1..inner.len() - 1].contains(&SPM_SPACE)
        })
        .map(|t| t.replace(SPM_SPACE, " "))
        .collect()
}

/// Builds a `tokenizer.json` document from GGUF vocabulary pieces.
pub fn tokenizer_json_from_gguf(v: &GgufVocab, source: &str) -> Result<String> {
    if v.model == "llama" {
        return spm_tokenizer_json(v, source);
    }
    if v.model != "gpt2" {
        bail!(
            "{source}: tokenizer model `{}` is not supported from GGUF metadata (byte-level BPE, `gpt2`, and SentencePiece, `llama`); \
             use a Hugging Face directory with tokenizer.json instead",
            v.model
        );
    }
    let (normalizer, pre) = match v.pre.as_str() {
        "smollm" => (Value::Null, json!({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": true}, byte_level(true)]})),
        "" | "default" | "gpt2" => (Value::Null, byte_level(true)),
        "llama-bpe" | "llama3" | "smaug-bpe" => (Value::Null, json!({"type": "Sequence", "pretokenizers": [split(LLAMA3_SPLIT), byte_level(false)]})),
        "qwen2" => (json!({"type": "NFC"}), json!({"type": "Sequence", "pretokenizers": [split(QWEN2_SPLIT), byte_level(false)]})),
        other => bail!(
            "{source}: pre-tokenizer `{other}` is not supported from GGUF metadata (supported: smollm, gpt2, llama-bpe, qwen2); \
             use a Hugging Face directory with tokenizer.json instead"
        ),
    };
    if !v.types.is_empty() && v.types.len() != v.tokens.len() {
        bail!("{source}: {} token types for {} tokens", v.types.len(), v.tokens.len());
    }
    let mut vocab = serde_json::Map::with_capacity(v.tokens.len());
    let mut added = Vec::new();
    for (id, t) in v.tokens.iter().enumerate() {
        if vocab.insert(t.clone(), json!(id)).is_some() {
            bail!("{source}: token `{t}` appears twice in the vocabulary");
        }
        let ty = v.types.get(id).copied().unwrap_or(1);
        if ty == 3 || ty == 4 {
            added.push(
                json!({"id": id, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                "normalized": false, "special": ty == 3}),
            );
        }
    }
    for m in &v.merges {
        let mut parts = m.split(' ');
        let (Some(a), Some(b), None) = (parts.next(), parts.next(), parts.next()) else {
            bail!("{source}: merge `{m}` is not two tokens separated by one space");
        };
        if !vocab.contains_key(a) || !vocab.contains_key(b) {
            bail!("{source}: merge `{m}` names a token missing from the vocabulary");
        }
    }
    let doc = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": pre,
        "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": v.merges},
    });
    Ok(serde_json::to_string(&doc)?)
}

/// A tiny byte-level BPE vocabulary (all 256 byte symbols plus a few merges) for tests.
pub fn tiny_vocab() -> GgufVocab {
    let bl: Vec<String> = byte_level_alphabet();
    let mut tokens = vec![
        "<|endoftext|>".to_string(),
        "<|im_start|>".to_string(),
        "<|im_end|>".to_string(),
    ];
    tokens.extend(bl.iter().cloned());
    let merges = vec!["t h".to_string(), "th e".to_string(), "Ġ the".to_string()];
    tokens.extend(["th", "the", "Ġthe"].iter().map(|s| s.to_string()));
    let mut types = vec![3, 3, 3];
    types.extend(std::iter::repeat_n(1, tokens.len() - 3));
    GgufVocab {
        model: "gpt2".into(),
        pre: "smollm".into(),
        tokens,
        types,
        merges,
        ..Default::default()
    }
}

/// GPT-2's byte-to-unicode map, in byte order.
pub fn byte_level_alphabet() -> Vec<String> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut pairs: Vec<(u32, u32)> = bs.into_iter().zip(cs).collect();
    pairs.sort();
    pairs
        .into_iter()
        .map(|(_, c)| char::from_u32(c).expect("valid char").to_string())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gguf_vocab_builds_a_working_bpe() -> Result<()> {
        let v = tiny_vocab();
        let json = tokenizer_json_from_gguf(&v, "test")?;
        let tok = Tok::from_json(json, Some(0), None, None)?;
        let ids = tok.encode("the the 42<|im_end|>")?;
        let pieces: Vec<String> = ids.iter().map(|&i| v.tokens[i as usize].clone()).collect();
        assert_eq!(pieces, vec!["the", "Ġthe", "Ġ", "4", "2", "<|im_end|>"]);
        assert_eq!(tok.decode(&ids)?, "the the 42<|im_end|>");
        Ok(())
    }

    /// A long text encoded in pieces gives the ids of the whole text at once, for text with
    /// spaces, runs of whitespace, digits, punctuation and none of them.
    #[test]
    fn long_texts_encode_in_pieces_exactly() -> Result<()> {
        let tok = Tok::from_json(tokenizer_json_from_gguf(&tiny_vocab(), "test")?, Some(0), None, None)?;
        let mut text = String::new();
        for i in 0..30_000 {
            text.push_str(
                [
                    "the",
                    " cat",
                    "  sat",
                    "\n\n",
                    " 1234",
                    "!?",
                    " \u{e9}t\u{e9}",
                    "\t on",
                    "mat",
                ][i % 9],
            );
        }
        text.push_str(&"x".repeat(3 * ENCODE_CHUNK));
        assert!(text.len() > 4 * ENCODE_CHUNK);
        let whole = tok.inner.encode(text.as_str(), false).unwrap().get_ids().to_vec();
        assert_eq!(tok.encode(&text)?, whole);
        Ok(())
    }

    /// A small SentencePiece vocabulary: pieces over `a b c ▁ é` with scores, byte tokens,
    /// a control and a user-defined token, one piece holding an inner space.
    fn tiny_spm(add_space_prefix: bool) -> GgufVocab {
        let mut tokens: Vec<String> = vec!["<pad>".into(), "<eos>".into(), "<unk>".into(), "<ctl>".into()];
        let mut types = vec![3, 3, 2, 3];
        tokens.extend((0..=255u8).map(|b| format!("<0x{b:02X}>")));
        types.extend(std::iter::repeat_n(6, 256));
        let pieces = [
            "▁", "a", "b", "c", "é", "ab", "bc", "ba", "aa", "▁a", "▁b", "abc", "aba", "▁ab", "cab", "bcab", "c▁a",
            "▁é",
        ];
        tokens.extend(pieces.iter().map(|p| p.to_string()));
        types.extend(std::iter::repeat_n(1, pieces.len()));
        tokens.push("<u>".into());
        types.push(4);
        // Scores fall with the id, except a few raised to make later merges win.
        let mut scores: Vec<f32> = (0..tokens.len()).map(|i| -(i as f32)).collect();
        scores[4 + 256 + 11] = 5.0; // abc
        scores[4 + 256 + 7] = 3.0; // ba
        GgufVocab {
            model: "llama".into(),
            tokens,
            types,
            scores,
            add_space_prefix,
            ..Default::default()
        }
    }

    /// SentencePiece's merge as llama.cpp runs it, written plainly: repeatedly merge the adjacent
    /// pair whose concatenation is a piece with the highest score (the leftmost among equals),
    /// then spell what is left, falling back to bytes.
    fn naive_spm(v: &GgufVocab, text: &str) -> Vec<u32> {
        let id = |s: &str| v.tokens.iter().position(|t| t == s);
        let mut text = text.replace(' ', "\u{2581}");
        if v.add_space_prefix {
            text.insert(0, '\u{2581}');
        }
        let mut sym: Vec<String> = text.chars().map(String::from).collect();
        loop {
            let mut best: Option<(f32, usize)> = None;
            for i in 0..sym.len().saturating_sub(1) {
                if let Some(t) = id(&(sym[i].clone() + &sym[i + 1])).filter(|&t| v.types[t] == 1) {
                    if best.is_none_or(|(s, _)| v.scores[t] > s) {
                        best = Some((v.scores[t], i));
                    }
                }
            }
            let Some((_, i)) = best else { break };
            let right = sym.remove(i + 1);
            sym[i].push_str(&right);
        }
        sym.iter()
            .flat_map(|s| match id(s).filter(|&t| v.types[t] == 1) {
                Some(t) => vec![t as u32],
                None => s.bytes().map(|b| id(&format!("<0x{b:02X}>")).unwrap() as u32).collect(),
            })
            .collect()
    }

    /// The SentencePiece tokenizer built from GGUF pieces gives llama.cpp's merge order on every
    /// text of a random set (ties, byte fallback, both space conventions), matches control and
    /// user-defined tokens whole, decodes back to the text, and a long text cut in pieces for
    /// encoding is never cut inside a piece that holds a space.
    #[test]
    fn sentencepiece_vocab_merges_as_llama_cpp() -> Result<()> {
        for prefix in [false, true] {
            let v = tiny_spm(prefix);
            let tok = Tok::from_json(tokenizer_json_from_gguf(&v, "spm")?, Some(1), None, None)?;
            let mut rng = crate::rng::Rng::new(7);
            let alphabet = ['a', 'b', 'c', ' ', 'é', 'z', '€'];
            for _ in 0..400 {
                let n = 1 + (rng.next_f32() * 12.0) as usize;
                let text: String = (0..n)
                    .map(|_| alphabet[(rng.next_f32() * alphabet.len() as f32) as usize % alphabet.len()])
                    .collect();
                assert_eq!(tok.encode(&text)?, naive_spm(&v, &text), "{text:?} (prefix {prefix})");
                assert_eq!(tok.decode(&tok.encode(&text)?)?, text);
            }
            let ids = tok.encode("ab<ctl>ab<u>")?;
            assert!(
                ids.contains(&3) && ids.contains(&(v.tokens.len() as u32 - 1)),
                "{ids:?}"
            );
        }
        let v = tiny_spm(false);
        let mut tok = Tok::from_json(tokenizer_json_from_gguf(&v, "spm")?, Some(1), None, None)?;
        tok.unbroken = spanning_pieces(&v);
        assert_eq!(tok.unbroken, vec!["c a".to_string()]);
        let text = "bc abc a ".repeat(3 * ENCODE_CHUNK / 9);
        assert_eq!(
            tok.encode(&text)?,
            tok.inner.encode(text.as_str(), false).unwrap().get_ids()
        );
        Ok(())
    }

    #[test]
    fn unsupported_or_broken_vocab_is_explained() {
        let mut v = tiny_vocab();
        v.pre = "falcon".into();
        assert!(tokenizer_json_from_gguf(&v, "f.gguf")
            .unwrap_err()
            .to_string()
            .contains("pre-tokenizer `falcon`"));
        let mut v = tiny_vocab();
        v.merges.push("zz qq".into());
        assert!(tokenizer_json_from_gguf(&v, "f.gguf")
            .unwrap_err()
            .to_string()
            .contains("missing from the vocabulary"));
        let mut v = tiny_vocab();
        v.model = "bert".into();
        assert!(tokenizer_json_from_gguf(&v, "f.gguf")
            .unwrap_err()
            .to_string()
            .contains("not supported"));
        let mut v = tiny_spm(false);
        v.scores.pop();
        assert!(tokenizer_json_from_gguf(&v, "f.gguf")
            .unwrap_err()
            .to_string()
            .contains("a score and a type"));
    }
}
