//! Long-context RoPE scaling end to end: a Llama 3.1-style `rope_scaling` (Hugging Face
//! config) and the same scaling as a GGUF's `rope_freqs` factors (how llama.cpp's converter
//! stores it) give the same logits, which differ from the unscaled model's; an export that
//! cannot state the scaling is refused, and a GGUF export keeps the factors.

use anyhow::Result;
use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};
use strata::model::config::{Arch, RopeScaling};
use strata::model::{BaseDtype, Fwd, Model};
use strata::testing::{tiny_config, RawGguf, RawTensor};

fn logits(m: &Model) -> Result<Tensor> {
    let ids: Vec<u32> = (0..48).map(|i| (i * 7 % 250) as u32 + 3).collect();
    let ids = Tensor::from_vec(ids, (1, 48), &Device::Cpu)?;
    m.logits(&ids, Fwd::eval(), None)
}

#[test]
fn llama3_scaling_from_a_config_and_from_gguf_factors_agree() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("strata-rope-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let vocab = strata::model::tokenizer::tiny_vocab();
    let plain = tiny_config(Arch::Llama, vocab.tokens.len(), true);
    // Head size 8, base 10^4: wavelengths 6.3, 63, 628 and 6283 positions against an original
    // context of 16, so one frequency is blended and three are scaled.
    let scaling = RopeScaling::Llama3 {
        factor: 4.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 16,
    };
    let scaled = strata::model::ModelConfig {
        rope_scaling: scaling.clone(),
        ..plain.clone()
    };
    let p = dir.join("plain.gguf");
    let src = strata::testing::write_gguf_of(&p, &plain, 4, GgmlDType::F32)?;
    let dev = Device::Cpu;
    let reference = logits(&Model::load(&scaled, &src, BaseDtype::F32, false, &dev)?)?;
    let unscaled = logits(&Model::load(&plain, &src, BaseDtype::F32, false, &dev)?)?;
    let gap = (&reference - &unscaled)?.abs()?.max_all()?.to_scalar::<f32>()?;
    assert!(gap > 1e-3, "the scaling changed nothing ({gap})");

    // The same model as a GGUF with llama.cpp's per-frequency factors.
    let base = RopeScaling::None.inv_freqs(plain.head_dim, plain.rope_theta);
    let want = scaling.inv_freqs(plain.head_dim, plain.rope_theta);
    let factors: Vec<f32> = base.iter().zip(&want).map(|(b, w)| (b / w) as f32).collect();
    let mut g = RawGguf::read(&p)?;
    g.tensors.push(RawTensor {
        name: "rope_freqs.weight".into(),
        dims: vec![factors.len() as u64],
        ty: 0,
        data: factors.iter().flat_map(|f| f.to_le_bytes()).collect(),
        offset: None,
    });
    let q = dir.join("llama31.gguf");
    g.write(&q)?;
    let opened = strata::model::open(&q)?;
    assert!(matches!(opened.config.rope_scaling, RopeScaling::Factors(ref k) if k.len() == 4));
    let m = Model::load(&opened.config, opened.weights.as_ref(), BaseDtype::F32, false, &dev)?;
    let got = logits(&m)?;
    let diff = (&got - &reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
    assert!(diff < 1e-4, "GGUF factors and the llama3 config disagree by {diff}");

    // A Hugging Face export cannot state per-frequency factors: refused, not written wrong.
    let e = strata::adapter::merge::write_hf_dir(
        &m,
        &opened.tokenizer,
        &dir.join("hf"),
        false,
        strata::adapter::merge::Store::Float(candle_core::DType::F32),
    )
    .unwrap_err();
    assert!(format!("{e:#}").contains("rope_freqs"), "{e:#}");
    // A GGUF export keeps them.
    let out = dir.join("merged.gguf");
    strata::adapter::merge::write_gguf_file(&m, &q, &out, true, "f32")?;
    assert_eq!(
        strata::model::open(&out)?.config.rope_scaling,
        opened.config.rope_scaling
    );
    // The config form round-trips through a Hugging Face directory.
    let hf = dir.join("hf-l3");
    let ms = Model::load(&scaled, &src, BaseDtype::F32, false, &dev)?;
    strata::adapter::merge::write_hf_dir(
        &ms,
        &opened.tokenizer,
        &hf,
        false,
        strata::adapter::merge::Store::Float(candle_core::DType::F32),
    )?;
    let back = strata::model::open(&hf)?;
    assert_eq!(back.config.rope_scaling, scaling);
    let again = logits(&Model::load(
        &back.config,
        back.weights.as_ref(),
        BaseDtype::F32,
        false,
        &dev,
    )?)?;
    assert_eq!((&again - &reference)?.abs()?.max_all()?.to_scalar::<f32>()?, 0.0);
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// The fixture's directory (`scripts/rope_fixture.py`).
fn fixture() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/rope")
}

/// strata's logits for the fixture model under config `name`, on the first `t` of `ids`.
fn fixture_logits(name: &str, ids: &[u32]) -> Result<Tensor> {
    let dir = fixture();
    let cfg = strata::model::ModelConfig::from_hf_file(&dir.join(format!("{name}.json")))?;
    let src = strata::model::hf::SafetensorsSource::open(&[dir.join("model.safetensors")])?;
    let m = Model::load(&cfg, &src, BaseDtype::F32, false, &Device::Cpu)?;
    let ids = Tensor::from_vec(ids.to_vec(), (1, ids.len()), &Device::Cpu)?;
    m.logits(&ids, Fwd::eval(), None)
}

/// Every scaling transformers defines and strata runs (linear, dynamic NTK, llama3, YaRN in
/// Qwen2.5's and DeepSeek's forms) gives transformers' own float64 logits on a Llama
/// 3.2-shaped model (GQA, tied embeddings), 48 positions against an original context of 16:
/// the long-context path of each is what is compared. Each scaling also moves the logits away
/// from the unscaled model's, so none of them can pass by doing nothing.
#[test]
fn every_scaling_gives_transformers_logits() -> Result<()> {
    let reference = candle_core::safetensors::load(fixture().join("logits.safetensors"), &Device::Cpu)?;
    let ids: Vec<u32> = reference["ids"].to_vec1::<i64>()?.iter().map(|&i| i as u32).collect();
    let plain = fixture_logits("default", &ids)?;
    for name in ["default", "linear", "dynamic", "llama3", "yarn", "yarn_mscale"] {
        let want = &reference[name];
        let got = fixture_logits(name, &ids)?;
        let scale = want.abs()?.max_all()?.to_scalar::<f32>()?;
        let diff = (&got - want)?.abs()?.max_all()?.to_scalar::<f32>()? / scale;
        assert!(diff < 2e-5, "{name}: max difference {diff} of the largest logit");
        let argmax = |t: &Tensor| -> Result<Vec<u32>> { Ok(t.argmax(1)?.to_vec1::<u32>()?) };
        assert_eq!(argmax(&got)?, argmax(want)?, "{name}: arg-max differs");
        if name != "default" {
            let moved = (&got - &plain)?.abs()?.max_all()?.to_scalar::<f32>()? / scale;
            assert!(moved > 1e-3, "{name}: the scaling changed nothing ({moved})");
        }
    }
    // Dynamic NTK changes nothing while a forward stays inside the original context.
    let short = &ids[..12];
    let (d, p) = (fixture_logits("dynamic", short)?, fixture_logits("default", short)?);
    assert_eq!((&d - &p)?.abs()?.max_all()?.to_scalar::<f32>()?, 0.0);
    Ok(())
}

/// Configs round-trip through a Hugging Face directory's `config.json`, and each scaling's
/// context is what it was made for: YaRN and dynamic NTK extend it by their factor, and
/// a sequence past it is refused.
#[test]
fn scaled_contexts_round_trip_and_bound_the_sequence() -> Result<()> {
    let dir = fixture();
    for (name, context) in [
        ("default", 64),
        ("dynamic", 64),
        ("llama3", 64),
        ("yarn", 64),
        ("yarn_mscale", 64),
    ] {
        let cfg = strata::model::ModelConfig::from_hf_file(&dir.join(format!("{name}.json")))?;
        assert_eq!(cfg.context(), context, "{name}");
        let back = strata::model::ModelConfig::from_hf_json(&cfg.to_hf_json("float32"), std::path::Path::new("x"))?;
        assert_eq!(back, cfg, "{name}");
    }
    let ids: Vec<u32> = (0..65).map(|i| i % 60 + 3).collect();
    let e = fixture_logits("yarn", &ids).unwrap_err();
    assert!(format!("{e:#}").contains("64"), "{e:#}");
    Ok(())
}

fn gguf_with(
    dir: &std::path::Path,
    name: &str,
    kvs: Vec<(&str, candle_core::quantized::gguf_file::Value)>,
) -> Result<std::path::PathBuf> {
    let p = dir.join(name);
    strata::testing::write_tiny_gguf(&p, Arch::Llama, true, 1, GgmlDType::F32)?;
    let mut g = RawGguf::read(&p)?;
    g.kvs.extend(kvs.into_iter().map(|(k, v)| (k.to_string(), v)));
    g.write(&p)?;
    Ok(p)
}

/// llama.cpp's YaRN keys read as transformers' YaRN with the same frequencies and amplitude
/// (llama.cpp multiplies cos and sin by 1 + 0.1 ln(factor), transformers' default attention
/// factor); keys strata does not read and scalings it does not compute are refused by name.
#[test]
fn gguf_yarn_is_read_and_the_unknown_is_refused() -> Result<()> {
    use candle_core::quantized::gguf_file::Value;
    let dir = std::env::temp_dir().join(format!("strata-rope-yarn-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let p = gguf_with(
        &dir,
        "yarn.gguf",
        vec![
            ("llama.rope.scaling.type", Value::String("yarn".into())),
            ("llama.rope.scaling.factor", Value::F32(4.0)),
            ("llama.rope.scaling.original_context_length", Value::U32(32)),
            ("llama.rope.scaling.finetuned", Value::Bool(true)),
        ],
    )?;
    let cfg = strata::model::open(&p)?.config;
    assert_eq!(
        cfg.rope_scaling,
        RopeScaling::Yarn {
            factor: 4.0,
            original_max_position_embeddings: 32,
            attention_factor: 1.0 + 0.1 * 4f64.ln(),
            beta_fast: 32.0,
            beta_slow: 1.0,
            truncate: true,
        }
    );
    assert_eq!(cfg.context(), 128.max(cfg.max_position_embeddings));
    for (kvs, want) in [
        (
            vec![("llama.rope.scaling.type", Value::String("longrope".into()))],
            "llama.rope.scaling.type",
        ),
        (
            vec![
                ("llama.rope.scaling.type", Value::String("yarn".into())),
                ("llama.rope.scaling.factor", Value::F32(4.0)),
                ("llama.rope.scaling.yarn_log_multiplier", Value::F32(0.1)),
            ],
            "yarn_log_multiplier",
        ),
        (
            vec![
                ("llama.rope.scaling.type", Value::String("yarn".into())),
                ("llama.rope.scaling.factor", Value::F32(4.0)),
                ("llama.rope.scaling.attn_factor", Value::F32(0.8)),
            ],
            "attn_factor",
        ),
        (
            vec![("llama.rope.scaling.type", Value::String("yarn".into()))],
            "llama.rope.scaling.factor",
        ),
    ] {
        let p = gguf_with(&dir, "bad.gguf", kvs)?;
        let e = format!("{:#}", strata::model::open(&p).err().expect("opened"));
        assert!(e.contains(want), "{want}: {e}");
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
