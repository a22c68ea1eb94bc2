//! Every decoder family strata runs against transformers itself (tests/fixtures/arch, written by
//! `scripts/arch_fixture.py`: float64 logits of tiny random models), and Qwen3 and Gemma 3
//! trained end to end: LoRA and QLoRA learn on their GGUFs, and merged exports carry their norms.

use anyhow::Result;
use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};
use strata::model::config::Arch;
use strata::model::{BaseDtype, Fwd, Model, ModelConfig};

fn fixture() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/arch")
}

#[test]
fn every_family_gives_transformers_logits() -> Result<()> {
    let reference = candle_core::safetensors::load(fixture().join("logits.safetensors"), &Device::Cpu)?;
    for name in ["llama", "qwen2", "qwen3", "gemma3"] {
        let dir = fixture().join(name);
        let cfg = ModelConfig::from_hf_file(&dir.join("config.json"))?;
        assert_eq!(cfg.arch.gguf_name(), name);
        let src = strata::model::hf::SafetensorsSource::open(&[dir.join("model.safetensors")])?;
        let m = Model::load(&cfg, &src, BaseDtype::F32, false, &Device::Cpu)?;
        let ids: Vec<u32> = reference[&format!("{name}.ids")]
            .to_vec1::<i64>()?
            .iter()
            .map(|&i| i as u32)
            .collect();
        let got = m.logits(
            &Tensor::from_vec(ids.clone(), (1, ids.len()), &Device::Cpu)?,
            Fwd::eval(),
            None,
        )?;
        let want = &reference[name];
        let scale = want.abs()?.max_all()?.to_scalar::<f32>()?;
        let diff = (&got - want)?.abs()?.max_all()?.to_scalar::<f32>()? / scale;
        assert!(diff < 2e-5, "{name}: max difference {diff} of the largest logit");
        assert_eq!(
            got.argmax(1)?.to_vec1::<u32>()?,
            want.argmax(1)?.to_vec1::<u32>()?,
            "{name}: arg-max differs"
        );
    }
    Ok(())
}

/// Config fields that would change the math are refused by name; a sliding window applies to
/// the layers the config says.
#[test]
fn configs_that_change_the_math_are_refused() -> Result<()> {
    let text = std::fs::read_to_string(fixture().join("qwen3/config.json"))?;
    let base: serde_json::Value = serde_json::from_str(&text)?;
    let p = std::path::Path::new("config.json");
    for (k, v, want) in [
        ("hidden_act", serde_json::json!("gelu"), "hidden_act"),
        ("attention_bias", serde_json::json!(true), "attention_bias"),
        ("mlp_bias", serde_json::json!(true), "mlp_bias"),
        ("partial_rotary_factor", serde_json::json!(0.5), "partial_rotary_factor"),
    ] {
        let mut c = base.clone();
        c[k] = v;
        let e = format!("{:#}", ModelConfig::from_hf_json(&c, p).unwrap_err());
        assert!(e.contains(want), "{k}: {e}");
    }
    // transformers 5 lists the layer kinds, and the list decides; without it, the switches do.
    let mut c = base.clone();
    c.as_object_mut().unwrap().remove("layer_types");
    c.as_object_mut().unwrap().remove("max_window_layers");
    c["use_sliding_window"] = serde_json::json!(true);
    c["sliding_window"] = serde_json::json!(32);
    let cfg = ModelConfig::from_hf_json(&c, p)?;
    // The window is applied (past it, a position sees only the last 32), not a bound.
    assert_eq!(
        (cfg.context(), cfg.layer_window(0), cfg.layer_window(1)),
        (128, Some(32), Some(32))
    );
    assert_eq!(ModelConfig::from_hf_json(&cfg.to_hf_json("float32"), p)?, cfg);
    // transformers' Qwen: windowed from max_window_layers up.
    c["max_window_layers"] = serde_json::json!(1);
    let cfg = ModelConfig::from_hf_json(&c, p)?;
    assert_eq!((cfg.layer_window(0), cfg.layer_window(1)), (None, Some(32)));
    assert_eq!(ModelConfig::from_hf_json(&cfg.to_hf_json("float32"), p)?, cfg);
    c["use_sliding_window"] = serde_json::json!(false);
    assert_eq!(ModelConfig::from_hf_json(&c, p)?.layer_window(1), None);
    c["layer_types"] = serde_json::json!(["sliding_attention", "full_attention"]);
    let cfg = ModelConfig::from_hf_json(&c, p)?;
    assert_eq!((cfg.layer_window(0), cfg.layer_window(1)), (Some(32), None));
    Ok(())
}

/// Gemma 3 past its window (40 tokens, a window of 8): the logits of a KV-cached generation, a
/// token at a time, and of the composed ops a GPU runs equal the fused whole-sequence forward.
#[test]
fn gemma3_window_holds_in_generation_and_composed_ops() -> Result<()> {
    let dir = fixture().join("gemma3");
    let cfg = ModelConfig::from_hf_file(&dir.join("config.json"))?;
    assert_eq!(cfg.layer_window(0), Some(8));
    assert_eq!(cfg.layer_window(2), None);
    let src = strata::model::hf::SafetensorsSource::open(&[dir.join("model.safetensors")])?;
    let m = Model::load(&cfg, &src, BaseDtype::F32, false, &Device::Cpu)?;
    let ids: Vec<u32> = (0..40u32).map(|i| (i * 7 + 3) % 64).collect();
    let whole = m.logits(
        &Tensor::from_vec(ids.clone(), (1, 40), &Device::Cpu)?,
        Fwd::eval(),
        None,
    )?;
    let composed = m.logits(
        &Tensor::from_vec(ids.clone(), (1, 40), &Device::Cpu)?,
        Fwd {
            composed: true,
            ..Fwd::eval()
        },
        None,
    )?;
    let mut caches = m.new_caches();
    let mut rows = Vec::new();
    for &id in &ids {
        rows.push(m.logits(&Tensor::new(&[[id]], &Device::Cpu)?, Fwd::eval(), Some(&mut caches))?);
    }
    let stepped = Tensor::cat(&rows, 0)?;
    let scale = whole.abs()?.max_all()?.to_scalar::<f32>()?;
    for (what, got) in [("generation", &stepped), ("composed", &composed)] {
        let d = (got - &whole)?.abs()?.max_all()?.to_scalar::<f32>()? / scale;
        assert!(d < 1e-5, "{what}: {d}");
    }
    Ok(())
}

/// Gemma 3 configs: transformers' older keys (`rope_local_base_freq`, `sliding_window_pattern`)
/// read as its layer kinds; the multimodal config, logit soft-capping and another activation
/// refused by name; a Hugging Face config written back reads the same.
#[test]
fn gemma3_configs_are_read_or_refused() -> Result<()> {
    let p = std::path::Path::new("config.json");
    let text = std::fs::read_to_string(fixture().join("gemma3/config.json"))?;
    let cfg = ModelConfig::from_hf_json(&serde_json::from_str(&text)?, p)?;
    assert_eq!(ModelConfig::from_hf_json(&cfg.to_hf_json("float32"), p)?, cfg);
    let old = serde_json::json!({"model_type": "gemma3_text", "hidden_size": 64, "num_attention_heads": 4,
        "num_key_value_heads": 1, "head_dim": 32, "num_hidden_layers": 12, "intermediate_size": 96,
        "vocab_size": 64, "sliding_window": 512, "sliding_window_pattern": 6, "rope_theta": 1e6,
        "rope_local_base_freq": 10000.0, "rope_scaling": {"rope_type": "linear", "factor": 8.0},
        "query_pre_attn_scalar": 32, "hidden_activation": "gelu_pytorch_tanh"});
    let c = ModelConfig::from_hf_json(&old, p)?;
    let global: Vec<usize> = (0..12).filter(|&i| c.layer_window(i).is_none()).collect();
    assert_eq!(global, vec![5, 11]);
    assert_eq!(c.rope_local_theta, Some(10_000.0));
    assert_eq!(c.query_scale(), 1.0);
    assert_eq!(ModelConfig::from_hf_json(&c.to_hf_json("float32"), p)?, c);
    for (k, v, want) in [
        ("hidden_activation", serde_json::json!("silu"), "hidden_activation"),
        (
            "final_logit_softcapping",
            serde_json::json!(30.0),
            "final_logit_softcapping",
        ),
        (
            "attn_logit_softcapping",
            serde_json::json!(50.0),
            "attn_logit_softcapping",
        ),
        ("model_type", serde_json::json!("gemma3"), "image-and-text"),
        ("layer_types", serde_json::json!(["sliding_attention"]), "layer_types"),
    ] {
        let mut c = old.clone();
        c[k] = v;
        let e = format!("{:#}", ModelConfig::from_hf_json(&c, p).unwrap_err());
        assert!(e.contains(want), "{k}: {e}");
    }
    Ok(())
}

/// LoRA and QLoRA on a Qwen3 and a Gemma 3 GGUF: held-out loss falls; the adapter applied to
/// the base gives the same logits as the merged Hugging Face export, which holds every q/k norm
/// and reads back as the same family; the GGUF's base (Gemma's norms stored as 1 + w) gives
/// the logits of the weights it was written from.
#[test]
fn qwen3_and_gemma3_train_lora_and_qlora_and_merge() -> Result<()> {
    for arch in [Arch::Qwen3, Arch::Gemma3] {
        trains_and_merges(arch)?;
    }
    Ok(())
}

fn trains_and_merges(arch: Arch) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("strata-{}-{}", arch.gguf_name(), std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let gguf = dir.join("tiny.gguf");
    let (cfg, mem) = strata::testing::write_tiny_gguf(&gguf, arch, arch == Arch::Gemma3, 5, GgmlDType::F32)?;
    let opened = strata::model::open(&gguf)?;
    assert_eq!(opened.config, cfg);
    let ids = Tensor::new(&[[1u32, 5, 9, 3, 7, 2, 8, 4, 6, 1, 5, 9]], &Device::Cpu)?;
    let from_mem = Model::load(&cfg, &mem, BaseDtype::F32, false, &Device::Cpu)?.logits(&ids, Fwd::eval(), None)?;
    let from_gguf = Model::load(&cfg, opened.weights.as_ref(), BaseDtype::F32, false, &Device::Cpu)?.logits(
        &ids,
        Fwd::eval(),
        None,
    )?;
    let d = (&from_mem - &from_gguf)?.abs()?.max_all()?.to_scalar::<f32>()?;
    assert!(d < 1e-5, "{arch:?}: the GGUF base differs by {d}");
    strata::testing::write_tiny_corpus(&dir)?;
    for (out, extra) in [("lora", ""), ("qlora", "")] {
        let mut text = strata::testing::tiny_lora_recipe(&dir, out, 12, 3, extra);
        if out == "qlora" {
            text = text.replace("[model]\n", "[model]\nbase_dtype = \"nf4\"\n");
        }
        let recipe = strata::train::recipe::Recipe::parse(&text, "qwen3.toml", &[])?;
        let s = strata::train::trainer::run_with(&recipe, &text, Default::default())?;
        assert!(
            s.eval_after.loss < s.eval_before.loss,
            "{out}: held-out loss {} -> {}",
            s.eval_before.loss,
            s.eval_after.loss
        );
    }
    let adapter = dir.join("lora/adapter");
    let (src, adapted) =
        strata::adapter::open_adapted(&gguf, Some(&adapter), Some(BaseDtype::F32), &Device::Cpu, true)?;
    let want = adapted.logits(&ids, Fwd::eval(), None)?;
    let merged = dir.join("merged");
    strata::adapter::merge::write_hf_dir(
        &adapted,
        &src.tokenizer,
        &merged,
        true,
        strata::adapter::merge::Store::Float(candle_core::DType::F32),
    )?;
    let back = strata::model::open(&merged)?;
    assert_eq!(back.config, cfg);
    let names = back.weights.names();
    assert_eq!(
        names.iter().filter(|n| n.ends_with("self_attn.q_norm.weight")).count(),
        2
    );
    assert_eq!(
        names.iter().filter(|n| n.ends_with("self_attn.k_norm.weight")).count(),
        2
    );
    let m = Model::load(&back.config, back.weights.as_ref(), BaseDtype::F32, false, &Device::Cpu)?;
    let got = m.logits(&ids, Fwd::eval(), None)?;
    let d = (&got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
    assert!(d < 1e-4, "{arch:?}: merged export differs by {d}");
    // The merged GGUF export (norms back to 1 + w) gives the same logits too.
    let merged_gguf = dir.join("merged.gguf");
    strata::adapter::merge::write_gguf_file(&adapted, &gguf, &merged_gguf, true, "f32")?;
    let g = strata::model::open(&merged_gguf)?;
    let m = Model::load(&g.config, g.weights.as_ref(), BaseDtype::F32, false, &Device::Cpu)?;
    let d = (&m.logits(&ids, Fwd::eval(), None)? - &want)?
        .abs()?
        .max_all()?
        .to_scalar::<f32>()?;
    assert!(d < 1e-4, "{arch:?}: merged GGUF export differs by {d}");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
