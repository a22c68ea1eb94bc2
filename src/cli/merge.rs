//! `strata merge`: a Hugging Face directory of the model, with an adapter folded in
//! (`W + s B A`, computed in f32) or without one (a GGUF -> safetensors conversion).
//!
//! An adapter trained on a 4-bit base is folded into that base the way training saw it: the NF4
//! weights are dequantized (`code * absmax`, in f32) and `s B A` added, then written in
//! `--dtype`. Folding it into the original 16-bit weights instead would add a correction made
//! for NF4's rounding to weights that never had it.

use anyhow::{Context, Result};

use crate::adapter::merge::Store;
use std::path::PathBuf;

/// Arguments of `strata merge`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The model and optional adapter.
    #[command(flatten)]
    pub model: super::ModelArgs,
    /// Output: a directory (a Hugging Face model), or a file ending in `.gguf` (a GGUF for
    /// llama.cpp, from a `.gguf` model: its tokenizer and metadata are kept).
    #[arg(long)]
    pub out: PathBuf,
    /// Stored precision. A directory: f32, bf16, f16, or nf4 / nf4-dq (a bitsandbytes 4-bit
    /// checkpoint: projections in NF4, the rest bf16; projections already in that NF4 layout
    /// keep their codes). A `.gguf` file: f32, f16, bf16, q8_0, q6_k, q5_k, q5_0, q4_k or q4_0
    /// for the matrices (vectors stay f32; rows that are not whole blocks fall back to q8_0).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// The base the adapter is folded into: auto (the one it was trained against, from its
    /// strata_base.json: an adapter trained on NF4 merges into the dequantized NF4 weights), or
    /// f32, bf16, nf4, nf4-dq, as-stored.
    #[arg(long, default_value = "auto")]
    pub base_dtype: String,
    /// Write the adapter alone, not merged, as a llama.cpp LoRA GGUF (`--out FILE.gguf`; for
    /// `llama-cli -m BASE.gguf --lora FILE.gguf` or Ollama's `ADAPTER`); `--dtype` f32, f16 or bf16.
    #[arg(long, requires = "adapter")]
    pub adapter_only: bool,
}

/// Runs `strata merge`.
pub fn run(a: Args) -> Result<()> {
    if a.adapter_only {
        return adapter_only(&a);
    }
    let merge = a.model.adapter.is_some();
    if a.out.extension().and_then(|e| e.to_str()) == Some("gguf") {
        if a.out.is_dir() {
            anyhow::bail!("--out {} is a directory; a GGUF export is a file", a.out.display());
        }
        // Checked before the model loads, which takes a while on a large one.
        crate::adapter::merge::gguf_export_type(&a.model.model, &a.dtype)?;
        let (_, model) = a.model.load(&a.base_dtype, &candle_core::Device::Cpu, false)?;
        let notes = crate::adapter::merge::write_gguf_file(&model, &a.model.model, &a.out, merge, &a.dtype)?;
        if let Some(n) = notes.first() {
            println!("{} matrices stored otherwise than {} (e.g. {n})", notes.len(), a.dtype);
        }
        println!(
            "wrote {} ({}, {}; llama.cpp: llama-cli -m {})",
            a.out.display(),
            if merge { "adapter merged" } else { "base model" },
            a.dtype,
            a.out.display()
        );
        return Ok(());
    }
    let store = Store::parse(&a.dtype).map_err(|e| anyhow::anyhow!("--dtype: {e}"))?;
    let (src, model) = a.model.load(&a.base_dtype, &candle_core::Device::Cpu, false)?;
    crate::adapter::merge::write_hf_dir(&model, &src.tokenizer, &a.out, merge, store)?;
    println!(
        "wrote {} ({}{})",
        a.out.display(),
        if a.model.adapter.is_some() {
            "adapter merged"
        } else {
            "base model"
        },
        format_args!(", {}", a.dtype)
    );
    Ok(())
}

/// `--adapter-only`: the adapter as a llama.cpp LoRA GGUF.
fn adapter_only(a: &Args) -> Result<()> {
    let dir = a.model.adapter.as_deref().expect("clap requires --adapter");
    if a.out.extension().and_then(|e| e.to_str()) != Some("gguf") || a.out.is_dir() {
        anyhow::bail!("--adapter-only writes one GGUF file: give --out a path ending in .gguf");
    }
    crate::adapter::llama_lora::lora_type(&a.dtype).context("--dtype")?;
    // Checked before the model loads (its header gives the layer count).
    let plan = crate::adapter::peft::read_plan(dir, crate::model::open(&a.model.model)?.config.num_layers)?;
    if !plan.modules_to_save.is_empty() {
        anyhow::bail!(
            "{}: the adapter also trains {:?} (modules_to_save), which a llama.cpp LoRA cannot carry; merge it instead (--out without --adapter-only)",
            dir.display(),
            plan.modules_to_save
        );
    }
    // The base is only read for its shapes: its blocks as stored are the cheapest to load.
    let (_, model) = a.model.load("as-stored", &candle_core::Device::Cpu, false)?;
    crate::adapter::llama_lora::write(&model, &a.out, &a.dtype)?;
    println!(
        "wrote {} (the adapter of {}, {})",
        a.out.display(),
        dir.display(),
        a.dtype
    );
    // llama.cpp adds the adapter to the GGUF's own weights; one trained against NF4 learned to
    // correct NF4's rounding of them instead.
    if let Some((_, per)) = crate::adapter::peft::recorded_bases(dir)? {
        let nf4 = per
            .values()
            .filter(|b| matches!(b, crate::model::BaseDtype::Nf4 | crate::model::BaseDtype::Nf4Dq))
            .count();
        if nf4 > 0 {
            println!(
                "note: {nf4} of its modules were trained on an NF4 base; llama.cpp applies them to the GGUF's own \
                 weights, not to the NF4 ones they learned beside. For the model exactly as trained, merge it \
                 (--out merged.gguf without --adapter-only)"
            );
        }
    }
    Ok(())
}
