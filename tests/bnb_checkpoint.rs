//! Checkpoints saved by transformers + bitsandbytes in 4-bit (`tests/fixtures/bnb4bit`, made by
//! `scripts/bnb_checkpoint_fixture.py`): strata reads the `quant_state` tensors, dequantizes to
//! exactly bitsandbytes' values, runs on the codes as stored (the same logits as on the
//! dequantized weights), and writes them back in the same layout.

use anyhow::Result;
use candle_core::{DType, Device};
use std::path::PathBuf;
use strata::adapter::merge::{hf_tensors, Store};
use strata::model::hf::SafetensorsSource;
use strata::model::{BaseDtype, LinearWeight, Model, ModelConfig, WeightSource};

fn fixture(variant: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/bnb4bit")
        .join(variant)
}

fn bits(hex: &str) -> Vec<u32> {
    (0..hex.len() / 8)
        .map(|i| {
            let b = u32::from_str_radix(&hex[8 * i..8 * i + 8], 16).expect("hex");
            b.swap_bytes()
        })
        .collect()
}

#[test]
fn bnb_4bit_weights_dequantize_to_bitsandbytes_values() -> Result<()> {
    for variant in ["nf4", "nf4-dq"] {
        let dir = fixture(variant);
        let src = SafetensorsSource::open(&[dir.join("model.safetensors")])?;
        let reference: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json"))?)?;
        for (module, r) in reference.as_object().expect("object") {
            let name = format!("{module}.weight");
            let q = src.get_nf4(&name)?.expect("a 4-bit weight");
            let shape: Vec<usize> = serde_json::from_value(r["shape"].clone())?;
            assert_eq!(vec![q.rows, q.cols], shape);
            assert_eq!(
                matches!(q.scales, strata::quant::nf4::Scales::Nested(_)),
                variant == "nf4-dq"
            );
            let ours: Vec<u32> = q.dequantize().iter().map(|v| v.to_bits()).collect();
            assert_eq!(ours, bits(r["values"].as_str().expect("hex")), "{variant} {module}");
            // Read as a float tensor, the same values.
            let dense: Vec<f32> = src.get(&name)?.flatten_all()?.to_vec1()?;
            assert_eq!(dense, q.dequantize());
        }
    }
    Ok(())
}

#[test]
fn bnb_4bit_checkpoints_load_as_stored_and_save_in_their_own_layout() -> Result<()> {
    for (variant, dq) in [("nf4", false), ("nf4-dq", true)] {
        let dir = fixture(variant);
        let cfg = ModelConfig::from_hf_file(&dir.join("config.json"))?;
        let src = SafetensorsSource::open(&[dir.join("model.safetensors")])?;
        let model = Model::load(&cfg, &src, BaseDtype::AsStored, false, &Device::Cpu)?;
        for b in &model.blocks {
            for p in b.proj.values() {
                assert!(matches!(p.w, LinearWeight::Nf4(_)), "{variant}: codes used as stored");
            }
        }
        // On the codes as stored, the model computes what it computes on the dequantized weights.
        let dense = Model::load(&cfg, &src, BaseDtype::F32, false, &Device::Cpu)?;
        let ids = candle_core::Tensor::new(&[[1u32, 7, 3, 60, 12]], &Device::Cpu)?;
        let (a, b) = (
            model.logits(&ids, strata::model::Fwd::eval(), None)?,
            dense.logits(&ids, strata::model::Fwd::eval(), None)?,
        );
        let d = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(d < 2e-2, "{variant}: logits differ by {d}");
        // Written back as a bitsandbytes checkpoint: every quantized tensor equal to the file's,
        // byte for byte, and the JSON quant state equal as JSON.
        let out = hf_tensors(&model, false, Store::Nf4(dq))?;
        let mut compared = 0;
        for (name, t) in &out {
            if !name.contains(".weight.") && src.get_nf4(name)?.is_none() {
                continue;
            }
            let theirs = src.raw(name)?;
            if name.ends_with(".quant_state.bitsandbytes__nf4") {
                let json = |t: &candle_core::Tensor| -> Result<serde_json::Value> {
                    Ok(serde_json::from_slice(&t.flatten_all()?.to_vec1::<u8>()?)?)
                };
                assert_eq!(json(t)?, json(&theirs)?, "{name}");
            } else {
                assert_eq!(t.dims(), theirs.dims(), "{name}");
                assert_eq!(t.dtype(), theirs.dtype(), "{name}");
                let bytes = |t: &candle_core::Tensor| -> Result<Vec<u8>> {
                    Ok(match t.dtype() {
                        DType::U8 => t.flatten_all()?.to_vec1::<u8>()?,
                        _ => t
                            .flatten_all()?
                            .to_vec1::<f32>()?
                            .iter()
                            .flat_map(|v| v.to_le_bytes())
                            .collect(),
                    })
                };
                assert_eq!(bytes(t)?, bytes(&theirs)?, "{name}");
            }
            compared += 1;
        }
        let per_weight = if dq { 6 } else { 4 };
        assert_eq!(compared, 7 * cfg.num_layers * per_weight, "{variant}");
    }
    Ok(())
}
