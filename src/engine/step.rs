//! One micro-batch forward and backward, written out explicitly (llm.c style).
//!
//! The LM head runs outside the autograd graph (`ops::lm_head`): it returns the loss and dL/dh,
//! and the graph below is seeded with `sum(h * dL/dh)`. With recomputation (the default) only
//! each block's input is kept during the forward; the backward walks the blocks from the top,
//! re-running each one with its input as a `Var` and seeding it with the gradient from above, so
//! a single block's graph is alive at any time (docs/design.md, pitfall 4). Selective recomputation
//! also keeps every adapted projection's frozen product from the forward
//! (`ops::lora_linear::KeptProducts`), so re-running a block skips its base GEMMs.

use anyhow::{Context, Result};
use candle_core::{DType, Tensor, TensorId, Var};
use std::collections::HashMap;

use crate::model::{BlockState, Fwd, Model, Param};
use crate::ops::lm_head::{lm_head_loss, HeadOptions};
use crate::ops::lora_linear::KeptProducts;
use std::sync::Arc;

/// How the backward gets the activations it needs (`train.recompute`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Recompute {
    /// Keep every block's graph from the forward: fastest, most activation memory.
    Off,
    /// Keep only each block's input and re-run the block in the backward (gradient
    /// checkpointing): least memory.
    #[default]
    Blocks,
    /// [`Recompute::Blocks`] that also keeps each adapted projection's frozen product (bf16;
    /// f32 under an f32 base), so the re-run costs only the adapters, norms and attention.
    Selective,
    /// [`Recompute::Selective`] in this many layers, the ones whose products cost the most to
    /// recompute first ([`selective_layers`]); the others as [`Recompute::Blocks`].
    Partial(usize),
    /// The fastest of the others whose predicted peak fits the memory budget, chosen by the
    /// trainer before the run (`train::memory::choose_recompute`); a step cannot run it.
    Auto,
}

impl Recompute {
    /// Parses `off`, `blocks`, `selective`, `selective:K` (K layers) or `auto` (a recipe may
    /// also say `false` / `true`, the older boolean form).
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "off" => Ok(Self::Off),
            "blocks" => Ok(Self::Blocks),
            "selective" => Ok(Self::Selective),
            "auto" => Ok(Self::Auto),
            _ => match s.strip_prefix("selective:").map(str::parse::<usize>) {
                Some(Ok(k)) => Ok(Self::Partial(k)),
                _ => anyhow::bail!("recompute `{s}`: expected off, blocks, selective, selective:K (K layers) or auto"),
            },
        }
    }

    /// The name [`Recompute::parse`] reads.
    pub fn name(self) -> String {
        match self {
            Self::Off => "off".into(),
            Self::Blocks => "blocks".into(),
            Self::Selective => "selective".into(),
            Self::Partial(k) => format!("selective:{k}"),
            Self::Auto => "auto".into(),
        }
    }

    /// Which of `n` layers keep their frozen products, `costs[i]` ranking layer `i` as
    /// [`selective_layers`] reads it.
    pub fn kept(self, costs: &[u8]) -> Vec<bool> {
        match self {
            Self::Selective => vec![true; costs.len()],
            Self::Partial(k) => selective_layers(costs, k),
            _ => vec![false; costs.len()],
        }
    }
}

/// The `k` layers that keep their products under [`Recompute::Partial`]: lowest
/// [`crate::model::precision::keep_rank`] first, then from the bottom up.
pub fn selective_layers(costs: &[u8], k: usize) -> Vec<bool> {
    let mut order: Vec<usize> = (0..costs.len()).collect();
    order.sort_by_key(|&i| (costs[i], i));
    let mut kept = vec![false; costs.len()];
    for &i in order.iter().take(k) {
        kept[i] = true;
    }
    kept
}

impl<'de> serde::Deserialize<'de> for Recompute {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Form;
        impl serde::de::Visitor<'_> for Form {
            type Value = Recompute;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("\"off\", \"blocks\", \"selective\", \"selective:K\" or \"auto\" (or true / false)")
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> std::result::Result<Recompute, E> {
                Ok(if v { Recompute::Blocks } else { Recompute::Off })
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> std::result::Result<Recompute, E> {
                Recompute::parse(v).map_err(E::custom)
            }
        }
        d.deserialize_any(Form)
    }
}

/// A packed micro-batch: `ids [b, t]` and flattened next-token targets (`IGNORE` to skip).
#[derive(Clone, Debug)]
pub struct Batch {
    /// Input token ids, u32 `[b, t]`.
    pub ids: Tensor,
    /// Targets, `b * t` of them.
    pub targets: Vec<u32>,
    /// Packed documents kept apart (`data.packing = "documents"`): each position's document
    /// and RoPE position; `None`: every row attended whole.
    pub documents: Option<crate::model::decoder::TreeRows>,
}

/// Loss statistics of one micro-batch.
#[derive(Clone, Copy, Debug, Default)]
pub struct StepStats {
    /// Sum of token NLLs.
    pub nll_sum: f64,
    /// Counted tokens.
    pub count: usize,
    /// Correct arg-max predictions.
    pub correct: usize,
    /// What the extra term (if any) returned as its loss.
    pub extra: f64,
}

/// What an extra loss on the final hidden states returned.
pub struct Extra {
    /// Its value.
    pub loss: f64,
    /// Its gradient `dL/dhn`, already scaled as it should enter the step.
    pub dh: Tensor,
    /// Its gradient with respect to the head, when the head is trained and the term reads it
    /// (distillation under full fine-tuning), scaled alike.
    pub dw_head: Option<Tensor>,
}

/// An extra loss on the final hidden states `hn [b * t, hidden]` (detached).
pub type ExtraTerm<'a> = &'a dyn Fn(&Tensor) -> Result<Extra>;

/// Gradients accumulated across micro-batches, keyed by parameter, with a pending factor
/// (clipping) that the optimizer applies as it reads them instead of a pass over every gradient.
pub struct GradAcc {
    grads: HashMap<TensorId, Tensor>,
    factor: f64,
}

impl Default for GradAcc {
    fn default() -> Self {
        Self {
            grads: HashMap::new(),
            factor: 1.0,
        }
    }
}

impl GradAcc {
    /// Adds `g` to the gradient of `v`.
    pub fn add(&mut self, v: &Var, g: &Tensor) -> Result<()> {
        // A pending factor belongs to what was summed before it: settle it first.
        self.settle()?;
        let id = v.as_tensor().id();
        // Stored detached: a gradient must never keep a graph alive across steps.
        let g = g.to_dtype(DType::F32)?.detach();
        let next = match self.grads.remove(&id) {
            Some(acc) => (acc + g)?,
            None => g,
        };
        self.grads.insert(id, next);
        Ok(())
    }

    /// Adds rows `g [ids.len(), width]` into the rows `ids` of `v`'s gradient (a trained
    /// embedding's lookup): one scatter into a copy of what is summed, where a dense gradient
    /// added to it would take a zeroed buffer of the whole table, the scatter's copy of it and a
    /// third pass for the sum.
    pub fn add_rows(&mut self, v: &Var, ids: &Tensor, g: &Tensor) -> Result<()> {
        self.settle()?;
        let id = v.as_tensor().id();
        let g = g.to_dtype(DType::F32)?;
        let base = match self.grads.remove(&id) {
            Some(acc) => acc,
            None => Tensor::zeros(v.as_tensor().shape(), DType::F32, v.as_tensor().device())?,
        };
        self.grads.insert(id, base.index_add(ids, &g, 0)?.detach());
        Ok(())
    }

    /// The gradient of `v`, if any reached it (the pending factor applied).
    pub fn get(&self, v: &Var) -> Option<Tensor> {
        let g = self.grads.get(&v.as_tensor().id())?;
        if self.factor == 1.0 {
            Some(g.clone())
        } else {
            (g * self.factor).ok()
        }
    }

    /// The gradient of `v` as summed, before the pending [`GradAcc::factor`] (what the
    /// optimizer reads, applying the factor in its own pass).
    pub fn unscaled(&self, v: &Var) -> Option<&Tensor> {
        self.grads.get(&v.as_tensor().id())
    }

    /// The factor every gradient is still to be multiplied by.
    pub fn factor(&self) -> f64 {
        self.factor
    }

    /// Multiplies every gradient by `s` (clipping), lazily.
    pub fn scale(&mut self, s: f64) -> Result<()> {
        self.factor *= s;
        Ok(())
    }

    fn settle(&mut self) -> Result<()> {
        if self.factor != 1.0 {
            for g in self.grads.values_mut() {
                *g = (&*g * self.factor)?;
            }
            self.factor = 1.0;
        }
        Ok(())
    }

    /// Global L2 norm of all gradients: sums of squares in f64 over borrowed f32 values, no
    /// copy of any gradient. Bit for bit the same in every run: the map's order (random per
    /// process) and the thread pool's splits must not change the clipping factor, or two runs
    /// of one recipe drift apart.
    pub fn norm(&self) -> Result<f64> {
        use rayon::prelude::*;
        let mut sums = Vec::with_capacity(self.grads.len());
        for g in self.grads.values() {
            let s = if g.device().is_cpu() {
                let v = crate::ops::f32_view(g)?;
                // Chunk sums kept in order, then added in that order: the same sum however the
                // chunks were spread over threads.
                let chunks: Vec<f64> = v.get().par_chunks(1 << 14).map(sum_squares).collect();
                chunks.iter().sum::<f64>()
            } else {
                g.sqr()?.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?
            };
            sums.push(s);
        }
        sums.sort_by(f64::total_cmp);
        Ok(sums.iter().sum::<f64>().sqrt() * self.factor.abs())
    }

    /// Sums every gradient of `params` over the ranks of `comm`'s job, in `params` order (so
    /// every rank makes the same calls): a parameter one rank has no gradient for joins with
    /// zeros, and one no rank has stays without. Returns the bytes this rank sent.
    pub fn sum_over(&mut self, comm: &dyn crate::dist::Collective, params: &[(String, Var)]) -> Result<usize> {
        if comm.size() == 1 {
            return Ok(0);
        }
        self.settle()?;
        let mut held: Vec<f64> = params
            .iter()
            .map(|(_, v)| f64::from(u8::from(self.grads.contains_key(&v.as_tensor().id()))))
            .collect();
        comm.sum_f64(&mut held)?;
        let mut ids = Vec::new();
        let mut grads = Vec::new();
        for ((_, v), h) in params.iter().zip(held) {
            if h == 0.0 {
                continue;
            }
            let id = v.as_tensor().id();
            grads.push(match self.grads.remove(&id) {
                Some(g) => g,
                None => Tensor::zeros(v.as_tensor().shape(), DType::F32, v.as_tensor().device())?,
            });
            ids.push(id);
        }
        let bytes = comm.sum_tensors(&mut grads)?;
        self.grads.extend(ids.into_iter().zip(grads));
        Ok(bytes)
    }

    /// Drops every gradient.
    pub fn clear(&mut self) {
        self.grads.clear();
        self.factor = 1.0;
    }
}

fn collect(grads: &candle_core::backprop::GradStore, vars: &[(String, Var)], acc: &mut GradAcc) -> Result<()> {
    for (_, v) in vars {
        if let Some(g) = grads.get(v.as_tensor()) {
            acc.add(v, g)?;
        }
    }
    Ok(())
}

/// Adds the weight gradients the trained projections summed in their packs (outside the graph).
fn collect_packs(model: &Model, acc: &mut GradAcc) -> Result<()> {
    for (v, g) in model.take_pack_grads()? {
        acc.add(&v, &g)?;
    }
    Ok(())
}

/// Runs one micro-batch and adds the gradient of `grad_scale * sum(token NLL)` to `acc`.
pub fn forward_backward(
    model: &Model,
    batch: &Batch,
    grad_scale: f64,
    recompute: Recompute,
    fwd: Fwd,
    acc: &mut GradAcc,
) -> Result<StepStats> {
    forward_backward_with(model, batch, grad_scale, recompute, fwd, acc, None)
}

/// [`forward_backward`] plus an extra term on the final hidden states (the contrastive
/// retention loss), whose gradient joins the head's at the top of the graph.
pub fn forward_backward_with(
    model: &Model,
    batch: &Batch,
    grad_scale: f64,
    recompute: Recompute,
    fwd: Fwd,
    acc: &mut GradAcc,
    extra: Option<ExtraTerm<'_>>,
) -> Result<StepStats> {
    let (b, t) = batch.ids.dims2()?;
    let vars = model.trainable();
    let head_var = match model.head.as_ref().unwrap_or(&model.embed) {
        Param::Train(v) => Some(v.clone()),
        Param::Frozen(_) => None,
    };
    // A trained head under mixed precision runs on its bf16 working copy (weight gradient
    // included); a frozen one on its packed copy when it has one.
    let train_head = model.train_head_pack()?;
    let opts = HeadOptions {
        chunk: crate::ops::lm_head::chunk_rows(model.cfg.vocab_size),
        grad_scale: Some(grad_scale),
        want_dw: head_var.is_some(),
        pack: train_head.as_deref().or(model.head_pack.as_deref()),
        ..Default::default()
    };
    // What an earlier call left in the packs (one that failed half-way) is not this batch's.
    model.take_pack_grads()?;
    let x0 = model.embed(&batch.ids)?;
    let n_layers = model.blocks.len();

    let top =
        |x_top: &Tensor, acc: &mut GradAcc| head_backward(model, batch, x_top, opts, head_var.as_ref(), extra, acc);

    if recompute == Recompute::Auto {
        anyhow::bail!("recompute = \"auto\" is chosen by the trainer before a run; pass the mode it chose");
    }
    if recompute == Recompute::Off {
        let mut x = x0;
        for i in 0..n_layers {
            x = model
                .block_forward(
                    i,
                    &x,
                    b,
                    t,
                    fwd,
                    BlockState {
                        tree: batch.documents.as_ref(),
                        ..Default::default()
                    },
                )
                .with_context(|| format!("block {i}"))?;
        }
        let (stats, grads) = top(&x, acc)?;
        collect(&grads, &vars, acc)?;
        collect_packs(model, acc)?;
        return Ok(stats);
    }

    let keep = recompute.kept(&model.keep_ranks());
    let kept = keep.iter().any(|&k| k).then(|| Arc::new(KeptProducts::default()));
    let block = |i: usize, x: &Tensor| {
        let state = BlockState {
            kept: kept.as_ref().filter(|_| keep[i]),
            tree: batch.documents.as_ref(),
            cache: None,
        };
        model.block_forward(i, x, b, t, fwd, state)
    };
    let mut inputs = Vec::with_capacity(n_layers + 1);
    inputs.push(x0.detach());
    for i in 0..n_layers {
        let y = block(i, &inputs[i]).with_context(|| format!("block {i}"))?;
        inputs.push(y.detach());
    }
    let x_top = Var::from_tensor(&inputs[n_layers])?;
    let (stats, grads) = top(x_top.as_tensor(), acc)?;
    collect(&grads, &vars, acc)?;
    let mut g = grads
        .get(x_top.as_tensor())
        .context("no gradient reached the last block")?
        .clone();
    drop(grads);
    for i in (0..n_layers).rev() {
        let xin = Var::from_tensor(&inputs[i])?;
        let y = block(i, xin.as_tensor())?;
        let grads = y.mul(&g)?.sum_all()?.backward()?;
        collect(&grads, &vars, acc)?;
        g = grads
            .get(xin.as_tensor())
            .context("no gradient reached a block input")?
            .clone();
        inputs.truncate(i + 1);
    }
    collect_packs(model, acc)?;
    embedding_backward(model, batch, g, acc)?;
    Ok(stats)
}

/// The final norm and the head (outside the graph), plus the extra term on the normed states:
/// the step's loss figures and the graph's gradients from the top, with the head's weight
/// gradients added to `acc` when the head is trained.
fn head_backward(
    model: &Model,
    batch: &Batch,
    x_top: &Tensor,
    opts: HeadOptions,
    head_var: Option<&Var>,
    extra: Option<ExtraTerm<'_>>,
    acc: &mut GradAcc,
) -> Result<(StepStats, candle_core::backprop::GradStore)> {
    let hn = model.final_norm(x_top)?;
    let out = lm_head_loss(&hn.detach(), model.head_weight(), &batch.targets, opts)?;
    let mut dh = out.dh.context("head returned no gradient")?;
    let mut extra_loss = 0.0;
    let mut extra_dw = None;
    if let Some(f) = extra {
        let e = f(&hn.detach())?;
        extra_loss = e.loss;
        let dt = dh.dtype();
        dh = (dh + e.dh.to_dtype(dt)?)?;
        extra_dw = e.dw_head;
    }
    let grads = hn.mul(&dh)?.sum_all()?.backward()?;
    if let (Some(v), Some(dw)) = (head_var, &out.dw) {
        acc.add(v, dw)?;
    }
    match (head_var, extra_dw) {
        (Some(v), Some(dw)) => acc.add(v, &dw)?,
        (None, Some(_)) => anyhow::bail!("an extra term returned a head gradient, but the head is frozen"),
        _ => {}
    }
    let stats = StepStats {
        nll_sum: out.nll_sum,
        count: out.count,
        correct: out.correct,
        extra: extra_loss,
    };
    Ok((stats, grads))
}

/// A trained embedding's gradient from the first block input's `g`: a scatter-add of its rows.
fn embedding_backward(model: &Model, batch: &Batch, mut g: Tensor, acc: &mut GradAcc) -> Result<()> {
    if let Param::Train(e) = &model.embed {
        let ids = batch.ids.flatten_all()?;
        // The block input's gradient through Gemma's embedding scale (`Model::embed`).
        if let Some(scale) = model.embed_scale() {
            g = g.affine(scale, 0.0)?;
        }
        acc.add_rows(e, &ids, &g)?;
    }
    Ok(())
}
/// `sum(x^2)` in f64 over eight independent lanes (a fixed order, so the same bits every run,
/// that the compiler vectorizes; a single chain waits on each addition in turn).
fn sum_squares(xs: &[f32]) -> f64 {
    let mut acc = [0f64; 8];
    let mut chunks = xs.chunks_exact(8);
    for c in &mut chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += (x as f64) * (x as f64);
        }
    }
    acc.iter().sum::<f64>() + chunks.remainder().iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>()
}
