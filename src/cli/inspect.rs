//! `strata inspect MODEL`: architecture, parameters by stored precision, and a memory estimate
//! for fine-tuning it; `--logits TEXT` dumps logits for numeric checks against a reference.

use anyhow::Result;
use candle_core::Tensor;
use serde_json::json;
use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::cli::policies::policies;
use crate::model::{open, Fwd};
use crate::util::human_bytes;

/// Arguments of `strata inspect`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// A `.gguf` file or a Hugging Face directory (or give `--recipe`).
    #[arg(required_unless_present = "recipe")]
    pub model: Option<PathBuf>,
    /// Predict the peak memory of this training recipe, by part.
    #[arg(long)]
    pub recipe: Option<PathBuf>,
    /// Rows per micro-batch for the memory estimate.
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    /// Tokens per row for the memory estimate.
    #[arg(long, default_value_t = 256)]
    pub seq_len: usize,
    /// Run the model on this text and write its token ids and logits as JSON to `--json`.
    #[arg(long, requires = "json")]
    pub logits: Option<String>,
    /// Output of `--logits`.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// A PEFT adapter to apply for `--logits`.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Print the token ids of this text as JSON and nothing else (tokenizer checks).
    #[arg(long, conflicts_with_all = ["logits", "recipe"])]
    pub tokenize: Option<String>,
}

/// Runs `strata inspect`.
pub fn run(a: Args) -> Result<()> {
    let runtime = crate::util::current_rss();
    let recipe = match &a.recipe {
        Some(r) => Some(crate::train::recipe::Recipe::load(r, &[])?),
        None => None,
    };
    let path = match (&a.model, &recipe) {
        (Some(m), _) => m.clone(),
        (None, Some(r)) => r.model.path.clone(),
        (None, None) => anyhow::bail!("give a model path or --recipe"),
    };
    let src = open(&path)?;
    if let Some(text) = &a.tokenize {
        println!("{}", serde_json::to_string(&src.tokenizer.encode(text)?)?);
        return Ok(());
    }
    let c = &src.config;
    println!("model        {}", path.display());
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
    use crate::model::config::RopeScaling;
    let scaling = match &c.rope_scaling {
        RopeScaling::None => "no scaling".to_string(),
        RopeScaling::Linear { factor } => format!("linear scaling x{factor}"),
        RopeScaling::Llama3 {
            factor,
            original_max_position_embeddings: o,
            ..
        } => format!("llama3 scaling x{factor} from {o}"),
        RopeScaling::Yarn {
            factor,
            original_max_position_embeddings: o,
            attention_factor,
            ..
        } => format!("yarn scaling x{factor} from {o}, attention factor {attention_factor:.4}"),
        RopeScaling::Dynamic { factor } => format!("dynamic NTK scaling x{factor} past {}", c.max_position_embeddings),
        RopeScaling::Factors(k) => format!(
            "rope_freqs scaling ({} factors, {:.3} to {:.3})",
            k.len(),
            k.iter().cloned().fold(f64::INFINITY, f64::min),
            k.iter().cloned().fold(0.0, f64::max)
        ),
    };
    println!(
        "rope theta   {} ({scaling}), rms eps {:e}, context {}",
        c.rope_theta,
        c.rms_norm_eps,
        c.context()
    );
    println!("attention    {}", attention_summary(c));
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
    println!(
        "\npredicted peak training memory, micro-batch {} x {} tokens, per-block recomputation (`train::memory`; every run prints its measured peak beside it):",
        a.batch, a.seq_len
    );
    println!(
        "{:<44} {:>10} {:>12} {:>12} {:>10}",
        "policy", "weights", "trained+opt", "activations", "total"
    );
    for p in policies(c)? {
        let pred = p.predict(c, a.batch, a.seq_len, true, crate::engine::Recompute::Blocks, runtime)?;
        let label = p.label(c);
        println!(
            "{label:<44} {:>10} {:>12} {:>12} {:>10}",
            match p.plan {
                Some(_) => human_bytes(pred.weights()),
                None => "(trained)".into(),
            },
            human_bytes(pred.part("trained")),
            human_bytes(pred.part("activations") + pred.part("logits")),
            human_bytes(pred.total())
        );
    }
    if let Some(r) = &recipe {
        // The run holds its tokenized data before the model loads: load it here too, so the
        // measured part of the plan is the run's.
        let mut data = Vec::new();
        for paths in [&r.data.train, &r.data.eval, &r.data.general, &r.data.general_eval] {
            if !paths.is_empty() {
                data.push(crate::train::trainer::load_sequences(r, &src.tokenizer, paths)?);
            }
        }
        let (recompute, plan, budget) = crate::train::memory::resolve_recompute(r, &src, crate::util::current_rss())?;
        println!(
            "\nrecipe {} (micro-batch {} x {} tokens, recompute = {}{}):",
            a.recipe.as_ref().expect("recipe").display(),
            r.train.batch,
            r.data.seq_len,
            recompute.name(),
            budget.map_or(String::new(), |b| format!(
                ", chosen by auto for a budget of {}",
                human_bytes(b)
            ))
        );
        print!("{}", plan.table());
        drop(data);
        if r.train.device != "cpu" {
            println!(
                "(the plan is the CPU path's; this recipe trains on {}, where the run reports the device's measured peak)",
                r.train.device
            );
        }
    }
    if let (Some(text), Some(out)) = (&a.logits, &a.json) {
        let (_, model) = crate::adapter::open_adapted(
            &path,
            a.adapter.as_deref(),
            Some(crate::model::BaseDtype::F32),
            &candle_core::Device::Cpu,
            false,
        )?;
        let ids = src.tokenizer.encode(text)?;
        let t = Tensor::from_vec(ids.clone(), (1, ids.len()), &model.device)?;
        let logits = model.logits(&t, Fwd::eval(), None)?;
        // Large vocabularies make JSON too long for readers such as Node (512 MB strings): the
        // logits then go to OUT.f32 beside it, raw little-endian f32 `[tokens, vocab]`.
        let doc = if logits.elem_count() > 4 << 20 {
            let raw = out.with_extension("f32");
            let bytes: Vec<u8> = logits
                .flatten_all()?
                .to_vec1::<f32>()?
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect();
            crate::util::write_atomic(&raw, &bytes)?;
            let file = raw.file_name().map(|f| f.to_string_lossy().into_owned());
            json!({"text": text, "ids": ids, "vocab": logits.dim(1)?, "logits_f32": file})
        } else {
            json!({"text": text, "ids": ids, "logits": logits.to_vec2::<f32>()?})
        };
        crate::util::write_atomic(out, serde_json::to_string(&doc)?.as_bytes())?;
        println!("\nwrote logits of {} tokens to {}", ids.len(), out.display());
    }
    Ok(())
}

/// The attention pattern of a model in one line: windowed and global layers, the local RoPE
/// base, and what the family adds (q/k norms, biases, Gemma's extras, a query scale).
fn attention_summary(c: &crate::model::ModelConfig) -> String {
    let qk = if c.arch.qk_norm() { ", per-head q/k RMSNorm" } else { "" };
    let bias = if c.arch.qkv_bias() { ", q/k/v biases" } else { "" };
    let windowed = (0..c.num_layers).filter(|&i| c.layer_window(i).is_some()).count();
    let pattern = match (c.sliding_window, windowed) {
        (None, _) | (_, 0) => "causal over the whole context".to_string(),
        (Some(w), n) if n == c.num_layers => format!("sliding window of {w} in every layer"),
        (Some(w), n) => {
            let global: Vec<String> = (0..c.num_layers)
                .filter(|&i| c.layer_window(i).is_none())
                .map(|i| i.to_string())
                .collect();
            format!(
                "sliding window of {w} in {n} layers, global in layers {}",
                global.join(", ")
            )
        }
    };
    let local = match c.rope_local_theta {
        Some(t) if windowed > 0 => format!(", windowed layers on RoPE theta {t} (unscaled)"),
        _ => String::new(),
    };
    let gemma = if c.arch.sandwich_norms() {
        ", norms after attention and MLP, GELU-gated MLP, embedding x sqrt(hidden)"
    } else {
        ""
    };
    let qscale = match c.query_pre_attn_scalar {
        Some(s) if s != c.head_dim as f64 => format!(", query scale 1/sqrt({s})"),
        _ => String::new(),
    };
    format!("{pattern}{local}{qk}{bias}{gemma}{qscale}")
}
