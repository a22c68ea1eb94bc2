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
    /// The model's Jinja chat template, when it has one.
    pub chat_template: Option<String>,
    /// The `tokenizer.json` document (for exports).
    pub json: String,
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
        })
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
            let cut = chunk_end(rest, ENCODE_CHUNK);
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
        {
            return p;
        }
    }
    end
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
pub struct GgufVocab {
    /// `tokenizer.ggml.model` (only `gpt2`, byte-level BPE, is supported).
    pub model: String,
    /// `tokenizer.ggml.pre`.
    pub pre: String,
    /// Token strings, by id.
    pub tokens: Vec<String>,
    /// Token types (llama.cpp: 1 normal, 3 control, 4 user-defined ...), by id.
    pub types: Vec<i64>,
    /// Merges, `"a b"`.
    pub merges: Vec<String>,
}

/// Builds a `tokenizer.json` document from GGUF vocabulary pieces.
pub fn tokenizer_json_from_gguf(v: &GgufVocab, source: &str) -> Result<String> {
    if v.model != "gpt2" {
        bail!(
            "{source}: tokenizer model `{}` is not supported from GGUF metadata (only byte-level BPE, `gpt2`); \
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
        v.model = "llama".into();
        assert!(tokenizer_json_from_gguf(&v, "f.gguf")
            .unwrap_err()
            .to_string()
            .contains("not supported"));
    }
}
