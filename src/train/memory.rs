//! Memory you can plan: a training run's peak resident memory predicted by part before it runs
//! (`strata inspect --recipe`), and printed beside the measured peak after every run.
//!
//! Every part is counted from the buffers the code actually holds: the weights in their stored
//! precision (with the bf16 kernel's two packed copies when it packs), adapter and optimizer
//! state (value, accumulated gradient, two AdamW moments: 16 bytes a trained parameter), the
//! activations the step keeps (each block's input with recomputation, plus one block's graph
//! and its gradients; every block's graph without), the LM head's logits chunk, and the
//! process's own footprint measured when the prediction is made.

use crate::engine::Recompute;
use crate::model::config::ModelConfig;
use crate::model::precision::keep_rank;
use crate::model::{BaseDtype, BaseTensor, PerProj, Proj};
use crate::retain::FisherFormat;
use crate::util::human_bytes;

/// One part of the prediction.
#[derive(Clone, Debug)]
pub struct Part {
    /// What it is (`weights nf4`, `activations` ...).
    pub name: String,
    /// Bytes.
    pub bytes: u64,
}

/// A predicted peak, by part.
#[derive(Clone, Debug, Default)]
pub struct Prediction {
    /// The parts, in the order they are printed.
    pub parts: Vec<Part>,
}

impl Prediction {
    /// The predicted peak.
    pub fn total(&self) -> u64 {
        self.parts.iter().map(|p| p.bytes).sum()
    }

    /// Bytes of the parts whose name starts with `prefix`.
    pub fn part(&self, prefix: &str) -> u64 {
        self.parts
            .iter()
            .filter(|p| p.name.starts_with(prefix))
            .map(|p| p.bytes)
            .sum()
    }

    /// Bytes of the frozen weights as held (with the bf16 kernel's packs), trained ones aside.
    pub fn weights(&self) -> u64 {
        self.part("weights") + self.part("bf16 kernel")
    }

    fn add(&mut self, name: &str, bytes: u64) {
        if bytes == 0 {
            return;
        }
        match self.parts.iter_mut().find(|p| p.name == name) {
            Some(p) => p.bytes += bytes,
            None => self.parts.push(Part {
                name: name.to_string(),
                bytes,
            }),
        }
    }

    /// A two-column table, one line a part, then the total.
    pub fn table(&self) -> String {
        let mut s = String::new();
        for p in &self.parts {
            s += &format!("  {:<34} {:>10}\n", p.name, human_bytes(p.bytes));
        }
        s += &format!("  {:<34} {:>10}\n", "predicted peak", human_bytes(self.total()));
        s
    }

    /// The parts as a JSON object (name -> bytes) with the total.
    pub fn to_json(&self) -> serde_json::Value {
        let mut m = serde_json::Map::new();
        for p in &self.parts {
            m.insert(p.name.clone(), p.bytes.into());
        }
        m.insert("total".into(), self.total().into());
        serde_json::Value::Object(m)
    }
}

/// What a run holds, as far as memory goes.
pub struct RunShape<'a> {
    /// The model.
    pub cfg: &'a ModelConfig,
    /// Precision of the embeddings, head and anything without a per-module choice.
    pub base: BaseDtype,
    /// Base precision of every projection, by layer.
    pub bases: &'a [PerProj<BaseDtype>],
    /// Full fine-tuning (every weight trained in f32).
    pub full: bool,
    /// Frozen bf16 weights packed for the bf16 kernel (when the CPU has it).
    pub pack: bool,
    /// Trained dense weights under bf16 mixed precision: each holds a bf16 kernel copy (both
    /// layouts) beside its f32 master.
    pub mixed: bool,
    /// AdamW's moments in 8 bits (`train.optimizer = "adamw8bit"`).
    pub adam8: bool,
    /// Base modules trained beside the adapters (`modules_to_save`, SAVABLE names).
    pub saved: &'a [String],
    /// Rows per micro-batch.
    pub rows: usize,
    /// Tokens per row.
    pub seq_len: usize,
    /// What the backward recomputes.
    pub recompute: Recompute,
    /// Adapter rank of every projection, by layer, 0 where none (the adapter
    /// parameters follow, and selective recomputation keeps the adapted ones' frozen products).
    pub ranks: &'a [PerProj<usize>],
    /// Bytes of a projection kept `as-stored` (a GGUF quant type), by Hugging Face weight name.
    pub stored_bytes: &'a dyn Fn(&str) -> Option<u64>,
    /// Bytes of a memory-mapped checkpoint that stay resident once read.
    pub mapped: u64,
    /// The process's resident memory just before the model is loaded (binary, tokenizer and, in
    /// a training run, the tokenized data).
    pub runtime: u64,
    /// Bytes of the Fisher that EWC holds (as stored: bf16 entries, or row and column sums when
    /// factored); 0 without EWC.
    pub ewc_fisher: u64,
    /// Distillation to the base on the general rows (`retain.distill_lambda > 0`).
    pub distill: bool,
    /// A frozen copy of the base beside the trained weights (full fine-tuning with a term that
    /// compares with the base: `Recipe::keeps_base_copy`), in the forward's precision.
    pub base_copy: bool,
}

/// Bytes of an NF4 weight of `n` elements in blocks of 64 (codes, then fp32 scales or 8-bit
/// scales with one fp32 per 256 of them and the offset).
pub fn nf4_bytes(n: u64, double_quant: bool) -> u64 {
    let blocks = n.div_ceil(64);
    n.div_ceil(2)
        + if double_quant {
            blocks + 4 * blocks.div_ceil(256) + 4
        } else {
            4 * blocks
        }
}

/// Elements of the base tensors a `modules_to_save` entry covers.
fn saved_elems(cfg: &ModelConfig, m: BaseTensor) -> u64 {
    let (h, v, l) = (cfg.hidden_size as u64, cfg.vocab_size as u64, cfg.num_layers as u64);
    match m {
        BaseTensor::Embed | BaseTensor::Head => v * h,
        BaseTensor::Norm => h,
        // Per-layer norms: only those the family has.
        norm => cfg
            .arch
            .layer_norms(cfg.head_dim, cfg.hidden_size)
            .iter()
            .find(|(k, _)| *k == norm)
            .map_or(0, |(_, w)| l * *w as u64),
    }
}

/// Predicts the peak resident memory of a training run.
pub fn predict(s: &RunShape<'_>) -> Prediction {
    let mut p = Prediction::default();
    p.add("process before the model (measured)", s.runtime);
    p.add("checkpoint pages (memory-mapped)", s.mapped);
    let trained = add_weights(s, &mut p);
    add_training_state(s, trained, &mut p);
    add_activations(s, &mut p);
    add_retain(s, &mut p);
    // The head's logits chunk and the final hidden states with their gradient.
    let (c, n) = (s.cfg, s.tokens());
    let rows = (crate::ops::lm_head::chunk_rows(c.vocab_size) as u64).min(n);
    p.add(
        "logits chunk",
        rows * c.vocab_size as u64 * 4 + 2 * n * c.hidden_size as u64 * 4,
    );
    p
}

impl RunShape<'_> {
    /// Tokens a micro-batch.
    fn tokens(&self) -> u64 {
        (self.rows * self.seq_len) as u64
    }

    fn saved(&self, m: &str) -> bool {
        self.saved.iter().any(|x| x == m)
    }

    /// The CPU's bf16 kernel packs frozen bf16 weights.
    fn kernel_packs(&self) -> bool {
        self.pack && crate::ops::bf16_gemm::available()
    }

    /// `[out, in]` elements of every adapted projection.
    fn adapted_sizes(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.ranks
            .iter()
            .flat_map(|row| row.iter())
            .filter(|(_, &r)| r > 0)
            .map(|(m, _)| self.cfg.linear_shape(m))
    }
}

/// Weights in their stored precision; returns the elements trained, which are counted with the
/// training state instead.
fn add_weights(s: &RunShape<'_>, p: &mut Prediction) -> u64 {
    let c = s.cfg;
    let (h, l, v) = (c.hidden_size as u64, c.num_layers as u64, c.vocab_size as u64);
    let (q, kv) = (c.q_dim() as u64, c.kv_dim() as u64);
    let kernel = s.kernel_packs();
    let mut trained: u64 = s
        .ranks
        .iter()
        .flat_map(|row| row.iter())
        .map(|(m, &r)| {
            let (o, i) = c.linear_shape(m);
            (r * (o + i)) as u64
        })
        .sum();
    let sixteen = matches!(s.base, BaseDtype::Bf16 | BaseDtype::Nf4 | BaseDtype::Nf4Dq);
    for (kind, elems) in [
        (BaseTensor::Embed, v * h),
        (BaseTensor::Head, if c.tie_word_embeddings { 0 } else { v * h }),
    ] {
        if s.full || s.saved(kind.module()) {
            trained += elems;
        } else if sixteen {
            p.add("weights bf16 (embeddings, head)", 2 * elems);
        } else {
            p.add("weights f32 (embeddings, head)", 4 * elems);
        }
    }
    let head_frozen = !s.saved(BaseTensor::Embed.module()) && !s.saved(BaseTensor::Head.module());
    let head_trained = if c.tie_word_embeddings {
        s.full || s.saved(BaseTensor::Embed.module())
    } else {
        s.full || s.saved(BaseTensor::Head.module())
    };
    if s.mixed && head_trained {
        p.add("bf16 copies of trained weights", 4 * v * h);
    }
    if sixteen && kernel && !s.full && head_frozen {
        // The frozen head packed twice (forward and backward layouts).
        p.add("bf16 kernel packs", 4 * v * h);
    }
    let norms = h + l * c
        .arch
        .layer_norms(c.head_dim, c.hidden_size)
        .iter()
        .map(|n| n.1 as u64)
        .sum::<u64>();
    let bias = if c.arch.qkv_bias() { l * (q + 2 * kv) } else { 0 };
    if s.full {
        trained += norms + bias;
    } else {
        let saved_norms: u64 = [
            BaseTensor::Norm,
            BaseTensor::AttnNorm,
            BaseTensor::MlpNorm,
            BaseTensor::QNorm,
            BaseTensor::KNorm,
        ]
        .iter()
        .filter(|m| s.saved(m.module()))
        .map(|m| saved_elems(c, *m))
        .sum();
        trained += saved_norms;
        p.add("weights f32 (norms, biases, rope)", 4 * (norms - saved_norms + bias));
    }
    for (layer, row) in s.bases.iter().enumerate() {
        for (m, prec) in row.iter() {
            let (o, inp) = c.linear_shape(m);
            let n = (o * inp) as u64;
            if s.full {
                trained += n;
                if s.mixed {
                    p.add("bf16 copies of trained weights", 4 * n);
                }
                continue;
            }
            match prec {
                BaseDtype::F32 => p.add("weights f32", 4 * n),
                BaseDtype::Bf16 => {
                    p.add("weights bf16", 2 * n);
                    if kernel {
                        p.add("bf16 kernel packs", 4 * n);
                    }
                }
                BaseDtype::Nf4 => p.add("weights nf4", nf4_bytes(n, false)),
                BaseDtype::Nf4Dq => p.add("weights nf4-dq", nf4_bytes(n, true)),
                BaseDtype::AsStored => match (s.stored_bytes)(&format!("{}.weight", m.path(layer))) {
                    Some(b) => p.add("weights as stored", b),
                    None => p.add("weights f32", 4 * n),
                },
            }
        }
    }
    // RoPE's cos and sin tables, f32: full rows and the fused op's half rows, for the first
    // positions of the context (later ones are computed when asked).
    p.add(
        "weights f32 (norms, biases, rope)",
        (c.context().min(crate::ops::rope::TABLE_POSITIONS) * c.head_dim * 3 * 4) as u64,
    );
    trained
}

/// Value, accumulated gradient and two AdamW moments of the `trained` elements (all f32), the
/// dense gradients of a trained embedding or head, and AdamW's working set.
fn add_training_state(s: &RunShape<'_>, trained: u64, p: &mut Prediction) {
    let c = s.cfg;
    let (h, i, v) = (c.hidden_size as u64, c.intermediate_size as u64, c.vocab_size as u64);
    // Value and accumulated gradient (f32), and the two moments: f32, or one byte each with
    // an f32 maximum per block (the few tensors under 8-bit's minimum size are counted so too).
    let moments = if s.adam8 {
        2 * trained + 8 * trained.div_ceil(crate::engine::adam8::BLOCK as u64)
    } else {
        8 * trained
    };
    p.add("trained parameters + AdamW state", 8 * trained + moments);
    // A trained embedding gets dense gradients: from the lookup and, tied, from the head; an
    // untied trained head gets its own.
    let embed_trained = s.full || s.saved(BaseTensor::Embed.module());
    let head_trained = !c.tie_word_embeddings && (s.full || s.saved(BaseTensor::Head.module()));
    let dense_grads = (embed_trained as u64 * if c.tie_word_embeddings { 2 } else { 1 } + head_trained as u64) * v * h;
    p.add("trained parameters + AdamW state", 4 * dense_grads);
    // AdamW updates in place; the 8-bit update a slice at a time, through the new values of a
    // slice of the largest tensor and their copy on the way back.
    let largest = if embed_trained || head_trained {
        v * h
    } else if s.full {
        i * h
    } else {
        0
    };
    p.add(
        "trained parameters + AdamW state",
        if s.adam8 { 2 * 4 } else { 0 } * largest.min(crate::engine::optim::UPDATE_SLICE as u64),
    );
}

/// Activations, f32, for a micro-batch: what the recomputation keeps, one block's graph and
/// gradients, and the frozen products selective recomputation keeps.
fn add_activations(s: &RunShape<'_>, p: &mut Prediction) {
    let c = s.cfg;
    let (h, i, l) = (c.hidden_size as u64, c.intermediate_size as u64, c.num_layers as u64);
    let (q, kv) = (c.q_dim() as u64, c.kv_dim() as u64);
    let n = s.tokens();
    let t = s.seq_len as u64;
    // One block's graph: norms, q/k/v, attention out, o, two residuals, gate/up and their
    // product, down; LoRA's low-rank intermediates are small beside these and left out.
    let graph = n * (6 * h + 2 * q + 2 * kv + 3 * i) * 4;
    // candle's backward keeps a gradient for every node of the block's graph until it returns,
    // so the gradients double the graph; plus the attention's per-task score tiles.
    let grads = graph + 4 * t * t * 4;
    if s.recompute == Recompute::Off {
        p.add("activations (every block)", l * graph + (l + 1) * n * h * 4 + grads);
    } else {
        p.add("activations (block inputs)", (l + 1) * n * h * 4);
        p.add("activations (one block + grads)", graph + grads);
    }
    let keep = s.recompute.kept(&keep_ranks(s.ranks, s.bases));
    if keep.iter().any(|&k| k) && !s.full {
        // Every adapted projection's frozen product in the layers that keep them, bf16 (f32
        // under an f32 base), all alive when the forward reaches the head.
        let mut kept = 0;
        for (layer, row) in s.ranks.iter().enumerate().filter(|(l, _)| keep[*l]) {
            for (m, &r) in row.iter() {
                if r > 0 {
                    let out = c.linear_shape(m).0 as u64;
                    let bytes = if s.bases[layer][m] == BaseDtype::F32 { 4 } else { 2 };
                    kept += n * out * bytes;
                }
            }
        }
        p.add("activations (kept frozen products)", kept);
    }
    if keep.iter().any(|&k| k) && s.full && s.mixed {
        // Mixed precision keeps every trained projection's product (bf16) in those layers.
        let per_layer: u64 = Proj::ALL.into_iter().map(|m| c.linear_shape(m).0 as u64).sum();
        let layers = keep.iter().filter(|&&k| k).count() as u64;
        p.add("activations (kept products)", n * per_layer * 2 * layers);
    }
    if s.full {
        // One block's weight gradients before they reach the accumulator.
        let per_block: u64 = Proj::ALL
            .into_iter()
            .map(|m| {
                let (o, i) = c.linear_shape(m);
                (o * i) as u64
            })
            .sum();
        p.add("activations (one block + grads)", 4 * per_block);
    }
}

/// The Fisher EWC holds and the penalty's working set; the frozen base copy.
fn add_retain(s: &RunShape<'_>, p: &mut Prediction) {
    if s.base_copy {
        // Loaded as a frozen model in the trained forward's precision: its weights as such a
        // LoRA run's base would hold them, without adapters.
        let base = if s.mixed { BaseDtype::Bf16 } else { BaseDtype::F32 };
        let bases = vec![PerProj([base; Proj::COUNT]); s.cfg.num_layers];
        let ranks = vec![PerProj([0; Proj::COUNT]); s.cfg.num_layers];
        let frozen = RunShape {
            base,
            bases: &bases,
            full: false,
            mixed: false,
            saved: &[],
            ranks: &ranks,
            ..*s
        };
        let mut copy = Prediction::default();
        add_weights(&frozen, &mut copy);
        p.add("retain: frozen base copy", copy.total());
    }
    if s.ewc_fisher > 0 {
        p.add("retain: Fisher (EWC)", s.ewc_fisher);
        // The penalty works one weight at a time: its Fisher widened to f32, B A, the anchor's
        // B* A*, delta, F delta and F delta^2, for the largest adapted weight.
        let largest = s.adapted_sizes().map(|(o, i)| (o * i) as u64).max().unwrap_or(0);
        p.add("retain: EWC penalty (one weight)", 6 * 4 * largest);
    }
    if s.distill {
        // The base's final hidden states of the micro-batch, the student's and teacher's kept
        // rows and their gradient (f32), and a student and a teacher logits chunk.
        let (h, v) = (s.cfg.hidden_size as u64, s.cfg.vocab_size as u64);
        let positions = (s.rows * s.seq_len) as u64;
        let chunk = crate::ops::lm_head::chunk_rows(s.cfg.vocab_size) as u64;
        p.add(
            "retain: distillation (base states, two logits chunks)",
            4 * (4 * positions * h + 2 * chunk * v),
        );
    }
}

/// Each layer's rank for keeping its frozen products ([`crate::model::precision::keep_rank`]),
/// from the adapter ranks and bases tables: what `Model::keep_ranks` reads off a built model.
pub fn keep_ranks(ranks: &[PerProj<usize>], bases: &[PerProj<BaseDtype>]) -> Vec<u8> {
    ranks
        .iter()
        .zip(bases)
        .map(|(r, b)| keep_rank(r.iter().filter(|(_, &rank)| rank > 0).map(|(m, _)| b[m])))
        .collect()
}

/// The fastest recomputation whose predicted peak fits `budget` bytes: no recomputation, then
/// selective in every layer, then in fewer layers one at a time, then per-block (the least
/// memory, chosen even when nothing fits: the run then says so). Full fine-tuning has no
/// frozen products to keep, so it chooses between off and blocks. Returns the choice and its
/// prediction.
pub fn choose_recompute(
    layers: usize,
    full: bool,
    budget: u64,
    predict: impl Fn(Recompute) -> anyhow::Result<Prediction>,
) -> anyhow::Result<(Recompute, Prediction)> {
    let mut candidates = vec![Recompute::Off];
    if !full {
        candidates.push(Recompute::Selective);
        candidates.extend((1..layers).rev().map(Recompute::Partial));
    }
    for r in candidates {
        let p = predict(r)?;
        if p.total() <= budget {
            return Ok((r, p));
        }
    }
    Ok((Recompute::Blocks, predict(Recompute::Blocks)?))
}

/// Adapter rank of every projection under `plan`, by layer, 0 where it puts none (everywhere
/// without a plan).
pub fn ranks(cfg: &ModelConfig, plan: Option<&crate::adapter::LoraPlan>) -> anyhow::Result<Vec<PerProj<usize>>> {
    let mut t = vec![PerProj::default(); cfg.num_layers];
    if let Some(plan) = plan {
        for (layer, row) in t.iter_mut().enumerate() {
            for m in Proj::ALL {
                row[m] = plan.resolve(layer, m)?.map(|ml| ml.r).unwrap_or(0);
            }
        }
    }
    Ok(t)
}

/// The prediction for a recipe on an opened model, `runtime` being the process's resident
/// memory now (before the model is loaded).
pub fn for_recipe(
    recipe: &super::recipe::Recipe,
    src: &crate::model::ModelSource,
    runtime: u64,
) -> anyhow::Result<Prediction> {
    for_recipe_with(recipe, src, runtime, recipe.train.recompute)
}

/// The recipe's recomputation, with `auto` resolved against its memory budget
/// (`train.memory_budget_gb`, or 85% of this process plus the memory the machine has free,
/// the memory monitor's high mark): the mode, its prediction, and the budget when resolved.
pub fn resolve_recompute(
    recipe: &super::recipe::Recipe,
    src: &crate::model::ModelSource,
    runtime: u64,
) -> anyhow::Result<(Recompute, Prediction, Option<u64>)> {
    let t = &recipe.train;
    if t.recompute != Recompute::Auto {
        return Ok((t.recompute, for_recipe(recipe, src, runtime)?, None));
    }
    let budget = match t.memory_budget_gb > 0.0 {
        true => (t.memory_budget_gb * 1e9) as u64,
        false => ((crate::util::current_rss() + crate::util::mem_available()) as f64 * 0.85) as u64,
    };
    let (r, p) = choose_recompute(src.config.num_layers, recipe.full(), budget, |r| {
        for_recipe_with(recipe, src, runtime, r)
    })?;
    Ok((r, p, Some(budget)))
}

/// [`for_recipe`] under another recomputation than the recipe's.
pub fn for_recipe_with(
    recipe: &super::recipe::Recipe,
    src: &crate::model::ModelSource,
    runtime: u64,
    recompute: Recompute,
) -> anyhow::Result<Prediction> {
    let cfg = &src.config;
    let plan = recipe.plan(cfg.num_layers)?;
    let bases = recipe.base_table(cfg.num_layers)?;
    let saved = plan.as_ref().map(|p| p.modules_to_save.clone()).unwrap_or_default();
    let stored = |name: &str| src.weights.stored_bytes(name);
    let rank_table = ranks(cfg, plan.as_ref())?;
    Ok(predict(&RunShape {
        cfg,
        base: recipe.model.base_dtype,
        bases: &bases,
        full: recipe.full(),
        pack: recipe.model.pack_bf16,
        mixed: recipe.train.precision.bf16_on_cpu(),
        adam8: recipe.train.optimizer == super::recipe::Optimizer::AdamW8bit,
        saved: &saved,
        rows: recipe.train.batch,
        seq_len: recipe.data.seq_len,
        recompute,
        ranks: &rank_table,
        stored_bytes: &stored,
        mapped: src.weights.mapped_bytes(),
        runtime,
        ewc_fisher: ewc_fisher_bytes(recipe, cfg, &rank_table),
        distill: recipe.retain.as_ref().is_some_and(|r| r.distill_lambda > 0.0),
        base_copy: recipe.keeps_base_copy(),
    }))
}

/// Bytes of the Fisher a recipe's EWC holds: its file's size when it exists (tensors held as
/// stored), else what `strata train` will write (bf16 entries of every adapted weight, or f32
/// row and column sums when factored); 0 without EWC.
fn ewc_fisher_bytes(recipe: &super::recipe::Recipe, cfg: &ModelConfig, ranks: &[PerProj<usize>]) -> u64 {
    let Some(r) = recipe.retain.as_ref().filter(|r| r.ewc_lambda > 0.0) else {
        return 0;
    };
    if let Some(len) = r
        .fisher
        .as_ref()
        .and_then(|f| std::fs::metadata(f).ok())
        .map(|m| m.len())
    {
        return len;
    }
    ranks
        .iter()
        .flat_map(|row| row.iter())
        .filter(|(_, &rank)| rank > 0)
        .map(|(m, _)| {
            let (o, i) = cfg.linear_shape(m);
            match r.fisher_format {
                FisherFormat::Factored => 4 * (o + i) as u64,
                FisherFormat::Full => 2 * (o * i) as u64,
            }
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nf4_bytes_match_the_tensor() {
        for (rows, cols) in [(64, 64), (300, 96), (7, 37)] {
            let w = vec![0.5f32; rows * cols];
            for dq in [false, true] {
                let t = crate::quant::nf4::Nf4Tensor::quantize(&w, rows, cols, 64, dq);
                assert_eq!(nf4_bytes((rows * cols) as u64, dq), t.bytes() as u64);
            }
        }
    }
}
