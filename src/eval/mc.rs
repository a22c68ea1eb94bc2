//! Multiple-choice scoring by log-likelihood: `{"context": ..., "choices": [...], "answer": i}`.
//!
//! Each choice is scored by the summed log-probability of its tokens given the context. Two
//! accuracies are reported: `acc` picks the highest sum; `acc_norm` divides each sum by the
//! choice's length in bytes first (lm-evaluation-harness's convention), which removes the bias
//! toward short choices. Context and choice are tokenized separately (a trailing space of the
//! context moves to the choice), exactly as a generation would continue the context.

use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::model::tokenizer::Tok;
use crate::model::{Fwd, Model};
use crate::ops::lm_head::IGNORE;

use crate::data::mc::McItem;

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

fn argmax(v: impl Iterator<Item = f64>) -> usize {
    v.enumerate()
        .fold((0, f64::NEG_INFINITY), |b, (i, x)| if x > b.1 { (i, x) } else { b })
        .0
}

/// Token positions per scoring batch: rows of similar length are grouped up to this budget.
const BATCH_TOKENS: usize = 4096;

/// One choice as a scoring row: inputs, and the targets that count (the choice's tokens).
struct Row {
    item: usize,
    inputs: Vec<u32>,
    targets: Vec<u32>,
}

/// Tokenizes an item into one row per choice.
fn item_rows(tok: &Tok, k: usize, item: &McItem) -> Result<Vec<Row>> {
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
    item.choices
        .iter()
        .map(|choice| {
            let ids = tok.encode(&format!("{lead}{choice}"))?;
            if ids.is_empty() {
                bail!("choice `{choice}` encodes to no tokens");
            }
            let all: Vec<u32> = ctx_ids.iter().chain(&ids).copied().collect();
            let n = all.len() - 1;
            let mut targets = vec![IGNORE; n];
            targets[ctx_ids.len() - 1..].copy_from_slice(&all[ctx_ids.len()..]);
            Ok(Row {
                item: k,
                inputs: all[..n].to_vec(),
                targets,
            })
        })
        .collect()
}

/// Scores one item (adapters and switches per `fwd`).
pub fn score_item(model: &Model, tok: &Tok, item: &McItem, fwd: Fwd) -> Result<McScore> {
    Ok(score_items(model, tok, std::slice::from_ref(item), fwd)?
        .scores
        .remove(0))
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

/// Scores every item. Each choice is one row `context + choice`; rows are sorted by length and
/// run in batches (right-padded: causal attention keeps padding from reaching earlier positions),
/// so a set of thousands of items costs a few hundred forward passes, not one per choice.
pub fn score_items(model: &Model, tok: &Tok, items: &[McItem], fwd: Fwd) -> Result<McResult> {
    let mut rows = Vec::new();
    for (k, it) in items.iter().enumerate() {
        rows.extend(item_rows(tok, k, it).with_context(|| format!("item {}", k + 1))?);
    }
    let mut order: Vec<usize> = (0..rows.len()).collect();
    order.sort_by_key(|&r| rows[r].inputs.len());
    let pad = tok.eos.unwrap_or(0);
    let mut logprob = vec![0f64; rows.len()];
    let mut at = 0;
    while at < order.len() {
        // Sorted ascending, so the last row of a group is its longest.
        let mut end = at + 1;
        while end < order.len() && (end + 1 - at) * rows[order[end]].inputs.len() <= BATCH_TOKENS {
            end += 1;
        }
        let len = rows[order[end - 1]].inputs.len();
        let (mut ids, mut tg) = (Vec::new(), Vec::new());
        for &r in &order[at..end] {
            let row = &rows[r];
            ids.extend(
                row.inputs
                    .iter()
                    .copied()
                    .chain(std::iter::repeat_n(pad, len - row.inputs.len())),
            );
            tg.extend(
                row.targets
                    .iter()
                    .copied()
                    .chain(std::iter::repeat_n(IGNORE, len - row.inputs.len())),
            );
        }
        let ids = Tensor::from_vec(ids, (end - at, len), &model.device)?;
        // Only the choice positions go through the head (a fifth of the model's FLOPs here).
        let keep: Vec<u32> = (0..tg.len() as u32).filter(|&i| tg[i as usize] != IGNORE).collect();
        let h = model
            .hidden(&ids, fwd, None)?
            .index_select(&Tensor::new(keep.as_slice(), &model.device)?, 0)?;
        let kept: Vec<u32> = keep.iter().map(|&i| tg[i as usize]).collect();
        let per = model
            .head_loss(&h, &kept, true)?
            .per_token
            .context("per-token losses")?;
        for (&i, &nll) in keep.iter().zip(&per) {
            logprob[order[at + i as usize / len]] -= nll as f64;
        }
        at = end;
    }
    let mut scores = Vec::with_capacity(items.len());
    let mut r = 0;
    for (k, item) in items.iter().enumerate() {
        let n = item.choices.len();
        debug_assert!(rows[r..r + n].iter().all(|row| row.item == k));
        let logprobs = logprob[r..r + n].to_vec();
        r += n;
        let lead = usize::from(item.context.ends_with(' '));
        let best = argmax(logprobs.iter().copied());
        let best_norm = argmax(
            logprobs
                .iter()
                .zip(&item.choices)
                .map(|(lp, c)| lp / (lead + c.len()) as f64),
        );
        scores.push(McScore {
            correct: best == item.answer,
            correct_norm: best_norm == item.answer,
            logprobs,
        });
    }
    let n = scores.len().max(1) as f64;
    Ok(McResult {
        items: scores.len(),
        acc: scores.iter().filter(|s| s.correct).count() as f64 / n,
        acc_norm: scores.iter().filter(|s| s.correct_norm).count() as f64 / n,
        scores,
    })
}
