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

use crate::model::decoder::TreeRows;
use crate::model::tokenizer::Tok;
use crate::model::{Fwd, Model};

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

/// Branch id of padding positions: they see the trunk and themselves, and nothing scores them.
const PAD_BRANCH: u32 = u32::MAX;

/// One scoring row: its tokens, their branches and RoPE positions, and the predictions that
/// count: `(position in the row, target token, choice slot)`.
struct Row {
    ids: Vec<u32>,
    branch: Vec<u32>,
    positions: Vec<usize>,
    scored: Vec<(usize, u32, usize)>,
}

/// An item's context and choices as token ids (a trailing space of the context moves to the
/// choices, as a generation would continue it).
fn item_tokens(tok: &Tok, item: &McItem) -> Result<(Vec<u32>, Vec<Vec<u32>>)> {
    let (ctx, lead) = match item.context.strip_suffix(' ') {
        Some(c) => (c, " "),
        None => (item.context.as_str(), ""),
    };
    let mut ctx_ids = tok.encode_document(ctx)?;
    if ctx_ids.is_empty() {
        ctx_ids = tok.eos.into_iter().collect();
    }
    if ctx_ids.is_empty() {
        bail!("the context encodes to no tokens and the tokenizer has no EOS to stand in");
    }
    let choices = item
        .choices
        .iter()
        .map(|choice| {
            let ids = tok.encode(&format!("{lead}{choice}"))?;
            if ids.is_empty() {
                bail!("choice `{choice}` encodes to no tokens");
            }
            Ok(ids)
        })
        .collect::<Result<_>>()?;
    Ok((ctx_ids, choices))
}

/// One row per choice, `context + choice` (any device).
fn flat_rows(ctx: &[u32], choices: &[Vec<u32>], first_slot: usize) -> Vec<Row> {
    choices
        .iter()
        .enumerate()
        .map(|(k, c)| {
            let all: Vec<u32> = ctx.iter().chain(c).copied().collect();
            let n = all.len() - 1;
            Row {
                ids: all[..n].to_vec(),
                branch: vec![0; n],
                positions: (0..n).collect(),
                scored: (ctx.len() - 1..n).map(|p| (p, all[p + 1], first_slot + k)).collect(),
            }
        })
        .collect()
}

/// One row per item: the context once as the trunk, then each choice (less its last token,
/// which predicts nothing) as a branch that continues the context's positions. The context's
/// last position predicts every choice's first token.
fn tree_row(ctx: &[u32], choices: &[Vec<u32>], first_slot: usize) -> Row {
    let mut r = Row {
        ids: ctx.to_vec(),
        branch: vec![0; ctx.len()],
        positions: (0..ctx.len()).collect(),
        scored: Vec::new(),
    };
    for (k, c) in choices.iter().enumerate() {
        let mut prev = ctx.len() - 1;
        for (m, &id) in c.iter().enumerate() {
            r.scored.push((prev, id, first_slot + k));
            if m + 1 < c.len() {
                prev = r.ids.len();
                r.ids.push(id);
                r.branch.push(k as u32 + 1);
                r.positions.push(ctx.len() + m);
            }
        }
    }
    r
}

/// Summed log-probability of every row's scored predictions, by slot. Rows are sorted by
/// length and run in batches (right-padded: padding comes after every real position).
fn score_rows(model: &Model, rows: &[Row], slots: usize, pad: u32, tree: bool, fwd: Fwd) -> Result<Vec<f64>> {
    let mut order: Vec<usize> = (0..rows.len()).collect();
    order.sort_by_key(|&r| rows[r].ids.len());
    let mut logprob = vec![0f64; slots];
    let unit = if tree { "items" } else { "choices" };
    let mut progress = crate::progress::Progress::new("multiple choice", rows.len() as u64, unit);
    let mut at = 0;
    while at < order.len() {
        // Sorted ascending, so the last row of a group is its longest.
        let mut end = at + 1;
        while end < order.len() && (end + 1 - at) * rows[order[end]].ids.len() <= BATCH_TOKENS {
            end += 1;
        }
        let len = rows[order[end - 1]].ids.len();
        let (mut ids, mut branch, mut positions) = (Vec::new(), Vec::new(), Vec::new());
        let (mut keep, mut targets, mut slot_of) = (Vec::new(), Vec::new(), Vec::new());
        for (b, &r) in order[at..end].iter().enumerate() {
            let row = &rows[r];
            let padding = len - row.ids.len();
            ids.extend(row.ids.iter().copied().chain(std::iter::repeat_n(pad, padding)));
            branch.extend(
                row.branch
                    .iter()
                    .copied()
                    .chain(std::iter::repeat_n(PAD_BRANCH, padding)),
            );
            positions.extend(row.positions.iter().copied().chain(std::iter::repeat_n(0, padding)));
            for &(p, target, slot) in &row.scored {
                keep.push((b * len + p) as u32);
                targets.push(target);
                slot_of.push(slot);
            }
        }
        let ids = Tensor::from_vec(ids, (end - at, len), &model.device)?;
        let h = if tree {
            let rows = TreeRows::new(branch, positions);
            model.hidden_tree(&ids, fwd, &rows)?
        } else {
            model.hidden(&ids, fwd, None)?
        };
        // Only the scored positions go through the head (a fifth of the model's FLOPs here).
        let h = h.index_select(&Tensor::new(keep.as_slice(), &model.device)?, 0)?;
        let per = model
            .head_loss(&h, &targets, true)?
            .per_token
            .context("per-token losses")?;
        for (&slot, &nll) in slot_of.iter().zip(&per) {
            logprob[slot] -= nll as f64;
        }
        progress.set(end as u64, "");
        at = end;
    }
    progress.finish();
    Ok(logprob)
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

/// Scores every item. On the CPU's fused path each item is one row (its context computed once,
/// the choices as branches after it, [`tree_row`]); elsewhere each choice is its own row. Rows
/// run in length-sorted batches, so a set of thousands of items costs a few hundred forwards.
pub fn score_items(model: &Model, tok: &Tok, items: &[McItem], fwd: Fwd) -> Result<McResult> {
    let tree = model.device.is_cpu() && !fwd.composed;
    let mut rows = Vec::new();
    let mut slots = 0;
    for (k, it) in items.iter().enumerate() {
        let (ctx, choices) = item_tokens(tok, it).with_context(|| format!("item {}", k + 1))?;
        if tree {
            rows.push(tree_row(&ctx, &choices, slots));
        } else {
            rows.extend(flat_rows(&ctx, &choices, slots));
        }
        slots += choices.len();
    }
    let logprob = score_rows(model, &rows, slots, tok.eos.unwrap_or(0), tree, fwd)?;
    let mut scores = Vec::with_capacity(items.len());
    let mut r = 0;
    for item in items {
        let n = item.choices.len();
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
