//! `strata inspect MODEL`: architecture, parameters by stored precision, and a memory estimate
//! for fine-tuning it; `--logits TEXT` dumps logits for numeric checks against a reference.

use anyhow::Result;
use candle_core::Tensor;
use serde_json::json;
use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::model::config::MODULES;
use crate::model::{open, Fwd};
use crate::util::human_bytes;

/// Arguments of `strata inspect`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// A `.gguf` file or a Hugging Face directory.
    pub model: PathBuf,
    /// Rows per micro-batch for the memory estimate.
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    /// Tokens per row for the memory estimate.
    #[arg(long, default_value_t = 256)]
    pub seq_len: usize,
    /// LoRA rank for the memory estimate (all seven projections).
    #[arg(long, default_value_t = 16)]
    pub rank: usize,
    /// Run the model on this text and write its token ids and logits as JSON to `--json`.
    #[arg(long, requires = "json")]
    pub logits: Option<String>,
    /// Output of `--logits`.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// A PEFT adapter to apply for `--logits`.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
}

/// Rough training-memory estimate in bytes (weights, trainable state, activations, logits chunk).
pub struct MemoryEstimate {
    /// Frozen or trained weights.
    pub weights: u64,
    /// Parameters, gradients and two AdamW moments of what is trained.
    pub trainable_state: u64,
    /// Activations kept for the backward (with per-block recomputation).
    pub activations: u64,
    /// One chunk of logits and its gradient.
    pub logits: u64,
}

impl MemoryEstimate {
    /// Sum of the parts.
    pub fn total(&self) -> u64 {
        self.weights + self.trainable_state + self.activations + self.logits
    }
}

/// Estimates the memory of training `cfg` (f32 everywhere) for `n` tokens per micro-batch.
pub fn estimate(
    cfg: &crate::model::ModelConfig,
    n: usize,
    seq: usize,
    trainable: u64,
    weight_bytes: u64,
) -> MemoryEstimate {
    let (h, i, l) = (
        cfg.hidden_size as u64,
        cfg.intermediate_size as u64,
        cfg.num_layers as u64,
    );
    let n = n as u64;
    // Kept block inputs, plus one block's graph: norms, q/k/v/o, gate/up/act/product, residuals,
    // and attention scores + probabilities per head.
    let per_block = n
        * (6 * h
            + 2 * (cfg.q_dim() as u64)
            + 2 * (cfg.kv_dim() as u64) * (cfg.num_heads / cfg.num_kv_heads) as u64
            + 4 * i)
        * 4
        + 3 * (n / seq as u64).max(1) * cfg.num_heads as u64 * (seq as u64).pow(2) * 4;
    MemoryEstimate {
        weights: weight_bytes,
        trainable_state: trainable * 16,
        activations: (l + 1) * n * h * 4 + per_block,
        logits: 3 * 256 * cfg.vocab_size as u64 * 4,
    }
}

/// Runs `strata inspect`.
pub fn run(a: Args) -> Result<()> {
    let src = open(&a.model)?;
    let c = &src.config;
    println!("model        {}", a.model.display());
    println!(
        "architecture {} ({} layers, hidden {}, {} query / {} key-value heads of {}, MLP {}, vocab {}, {} embeddings)",
        c.arch.model_type(),
        c.num_layers,
        c.hidden_size,
        c.num_heads,
        c.num_kv_heads,
        c.head_dim,
        c.intermediate_size,
        c.vocab_size,
        if c.tie_word_embeddings { "tied" } else { "untied" }
    );
    println!(
        "rope theta   {}, rms eps {:e}, context {}",
        c.rope_theta, c.rms_norm_eps, c.max_position_embeddings
    );
    let mut by_type: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for name in src.weights.names() {
        let ty = src.weights.stored_type(&name).unwrap_or_else(|| "?".into());
        let e = by_type.entry(ty).or_default();
        e.0 += 1;
    }
    let total = c.num_params();
    println!("parameters   {:.1} M", total as f64 / 1e6);
    for (ty, (count, _)) in &by_type {
        println!("  stored as {ty:<6} {count} tensors");
    }
    let lora: u64 = MODULES
        .iter()
        .map(|m| c.linear_shape(m).map(|(o, i)| (a.rank * (o + i)) as u64).unwrap_or(0))
        .sum::<u64>()
        * c.num_layers as u64;
    let n = a.batch * a.seq_len;
    println!(
        "\nestimated training memory, batch {} x {} tokens, per-block recomputation (an estimate, not a measurement):",
        a.batch, a.seq_len
    );
    println!(
        "{:<34} {:>10} {:>12} {:>12} {:>10} {:>10}",
        "mode", "weights", "train state", "activations", "logits", "total"
    );
    for (mode, trainable, wbytes) in [
        (format!("LoRA r={} (f32 base)", a.rank), lora, total as u64 * 4),
        (format!("LoRA r={} (bf16 base)", a.rank), lora, total as u64 * 2),
        ("full fine-tuning (f32)".to_string(), total as u64, 0),
    ] {
        let e = estimate(c, n, a.seq_len, trainable, wbytes);
        println!(
            "{mode:<34} {:>10} {:>12} {:>12} {:>10} {:>10}",
            human_bytes(e.weights),
            human_bytes(e.trainable_state),
            human_bytes(e.activations),
            human_bytes(e.logits),
            human_bytes(e.total())
        );
    }
    if let (Some(text), Some(out)) = (&a.logits, &a.json) {
        let (_, model) = super::load_model(&a.model, a.adapter.as_deref(), "f32")?;
        let ids = src.tokenizer.encode(text)?;
        let t = Tensor::from_vec(ids.clone(), (1, ids.len()), &model.device)?;
        let logits = model.logits(&t, Fwd::eval(), None)?.to_vec2::<f32>()?;
        crate::util::write_atomic(
            out,
            serde_json::to_string(&json!({"text": text, "ids": ids, "logits": logits}))?.as_bytes(),
        )?;
        println!("\nwrote logits of {} tokens to {}", ids.len(), out.display());
    }
    Ok(())
}
