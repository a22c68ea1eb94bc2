//! Every decoder family strata runs against transformers itself (tests/fixtures/arch, written by
//! `scripts/arch_fixture.py`: float64 logits of tiny random models), and Qwen3 trained end to
//! end: LoRA and QLoRA learn on a Qwen3 GGUF, and a merged export carries its q/k norms.

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
    for name in ["llama", "qwen2", "qwen3"] {
        let dir = fixture().join(name);
        let cfg = ModelConfig::from_hf_file(&dir.join("config.json"))?;
        assert_eq!(cfg.arch.model_type(), name);
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

/// Config fields that would change the math are refused by name; a Mistral-style window bounds
/// the context (within it, full attention is the same thing).
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
    let mut c = base.clone();
    c["use_sliding_window"] = serde_json::json!(true);
    c["sliding_window"] = serde_json::json!(32);
    let cfg = ModelConfig::from_hf_json(&c, p)?;
    assert_eq!(cfg.context(), 32);
    assert_eq!(ModelConfig::from_hf_json(&cfg.to_hf_json("float32"), p)?, cfg);
    c["use_sliding_window"] = serde_json::json!(false);
    assert_eq!(ModelConfig::from_hf_json(&c, p)?.context(), 128);
    c["layer_types"] = serde_json::json!(["sliding_attention", "full_attention"]);
    assert_eq!(ModelConfig::from_hf_json(&c, p)?.context(), 32);
    Ok(())
}

/// LoRA and QLoRA on a Qwen3 GGUF: held-out loss falls; the adapter applied to the base gives
/// the same logits as the merged Hugging Face export, which holds every q/k norm and reads back
/// as Qwen3.
#[test]
fn qwen3_trains_lora_and_qlora_and_merges() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("strata-qwen3-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let gguf = dir.join("tiny.gguf");
    strata::testing::write_tiny_gguf(&gguf, Arch::Qwen3, false, 5, GgmlDType::F32)?;
    assert_eq!(strata::model::open(&gguf)?.config.arch, Arch::Qwen3);
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
    let ids = Tensor::new(&[[1u32, 5, 9, 3, 7, 2, 8, 4]], &Device::Cpu)?;
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
    assert_eq!(back.config.arch, Arch::Qwen3);
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
    assert!(d < 1e-4, "merged export differs by {d}");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
