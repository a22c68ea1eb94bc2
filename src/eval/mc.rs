//! Multiple-choice scoring by log-likelihood: `{"context": ..., "choices": [...], "answer": i}`.
//!
//! Each choice is scored by the summed log-probability of its tokens given the context. Two
//! accuracies are reported: `acc` picks the highest sum; `acc_norm` divides each sum by the
//! choice's length in bytes first (lm-evaluation-harness's convention), which removes the bias
//! toward short choices. Context and choice are tokenized separately (a trailing space of the
//! context moves to the choice), so the context is run once, its KV cache is kept, and every
//! choice continues from a copy of it.

use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use std::path::Path;

use crate::model::tokenizer::Tok;
use crate::model::{Fwd, Model};

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
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
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

/// Per-item outcome.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct McScore {
    /// Summed log-probability of each choice.
    pub logprobs: Vec<f64>,
    /// Whether the highest sum is the answer.
    pub correct: bool,
    /// Whether the highest per-byte score is the answer.
    pub correct_norm: bool,
}

fn log_softmax_at(row: &[f32], t: usize) -> f64 {
    let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let z: f64 = row.iter().map(|&x| (x as f64 - m).exp()).sum();
    row[t] as f64 - m - z.ln()
}

fn argmax(v: impl Iterator<Item = f64>) -> usize {
    v.enumerate()
        .fold((0, f64::NEG_INFINITY), |b, (i, x)| if x > b.1 { (i, x) } else { b })
        .0
}

/// Scores one item (adapters and switches per `fwd`).
pub fn score_item(model: &Model, tok: &Tok, item: &McItem, fwd: Fwd) -> Result<McScore> {
    let (ctx, lead) = match item.context.strip_suffix(' ') {
        Some(c) => (c, " "),
        None => (item.context.as_str(), ""),
    };
    let mut ctx_ids = tok.encode(ctx)?;
    if ctx_ids.is_empty() {
        ctx_ids = tok.eos.into_iter().collect();
    }
    if ctx_ids.is_empty() {
        bail!("the context encodes to no tokens and the tokenizer has no EOS to stand in");
    }
    let dev = &model.device;
    let mut caches = model.new_caches();
    let ctx_t = Tensor::from_vec(ctx_ids.clone(), (1, ctx_ids.len()), dev)?;
    let ctx_logits = model.logits(&ctx_t, fwd, Some(&mut caches))?;
    let last: Vec<f32> = ctx_logits.get(ctx_ids.len() - 1)?.to_vec1()?;
    let mut logprobs = Vec::with_capacity(item.choices.len());
    for choice in &item.choices {
        let ids = tok.encode(&format!("{lead}{choice}"))?;
        if ids.is_empty() {
            bail!("choice `{choice}` encodes to no tokens");
        }
        let mut lp = log_softmax_at(&last, ids[0] as usize);
        if ids.len() > 1 {
            let mut c = caches.clone();
            let t = Tensor::from_vec(ids[..ids.len() - 1].to_vec(), (1, ids.len() - 1), dev)?;
            let rows = model.logits(&t, fwd, Some(&mut c))?.to_vec2::<f32>()?;
            for (row, &next) in rows.iter().zip(&ids[1..]) {
                lp += log_softmax_at(row, next as usize);
            }
        }
        logprobs.push(lp);
    }
    let best = argmax(logprobs.iter().copied());
    let best_norm = argmax(
        logprobs
            .iter()
            .zip(&item.choices)
            .map(|(lp, c)| lp / (lead.len() + c.len()) as f64),
    );
    Ok(McScore {
        correct: best == item.answer,
        correct_norm: best_norm == item.answer,
        logprobs,
    })
}

/// Accuracy summary of a set.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct McResult {
    /// Items scored.
    pub items: usize,
    /// Accuracy by summed log-likelihood.
    pub acc: f64,
    /// Accuracy by per-byte log-likelihood.
    pub acc_norm: f64,
    /// Per-item outcomes (for paired comparisons).
    pub scores: Vec<McScore>,
}

/// Scores every item.
pub fn score_items(model: &Model, tok: &Tok, items: &[McItem], fwd: Fwd) -> Result<McResult> {
    let scores = items
        .iter()
        .map(|it| score_item(model, tok, it, fwd))
        .collect::<Result<Vec<_>>>()?;
    let n = scores.len().max(1) as f64;
    Ok(McResult {
        items: scores.len(),
        acc: scores.iter().filter(|s| s.correct).count() as f64 / n,
        acc_norm: scores.iter().filter(|s| s.correct_norm).count() as f64 / n,
        scores,
    })
}
