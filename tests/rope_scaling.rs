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

/// A GGUF whose scaling strata does not compute (YaRN) is refused naming the key.
#[test]
fn unsupported_gguf_scaling_is_refused() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("strata-rope-yarn-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let p = dir.join("m.gguf");
    strata::testing::write_tiny_gguf(&p, Arch::Llama, true, 1, GgmlDType::F32)?;
    let mut g = RawGguf::read(&p)?;
    use candle_core::quantized::gguf_file::Value;
    g.kvs
        .push(("llama.rope.scaling.type".into(), Value::String("yarn".into())));
    g.kvs.push(("llama.rope.scaling.factor".into(), Value::F32(4.0)));
    g.write(&p)?;
    let e = format!("{:#}", strata::model::open(&p).err().expect("a YaRN GGUF opened"));
    assert!(e.contains("llama.rope.scaling.type") && e.contains("yarn"), "{e}");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
