//! `strata merge --out FILE.gguf`: a merged model written as GGUF reads back with the merged
//! model's logits, keeps the source's metadata and the tensors strata does not model, and
//! stores matrices in the asked type (falling back where rows are not whole blocks).
//! `scripts/llamacpp_check.sh` holds the same files to llama.cpp itself.

use anyhow::Result;
use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use strata::adapter::{merge, LoraPlan};
use strata::model::config::Arch;
use strata::model::gguf::{read_checked, write_tensors};
use strata::model::MODULES;
use strata::model::{open, BaseDtype, Fwd, Model};
use strata::testing::write_tiny_gguf;

fn tmp(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("strata-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// `max |a - b| / max |b|`.
fn rel_gap(a: &Tensor, b: &Tensor) -> Result<f32> {
    let d = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
    Ok(d / b.abs()?.max_all()?.to_scalar::<f32>()?)
}

fn load(path: &std::path::Path) -> Result<Model> {
    let src = open(path)?;
    Model::load(&src.config, src.weights.as_ref(), BaseDtype::F32, false, &Device::Cpu)
}

#[test]
fn merged_gguf_reads_back_with_the_merged_logits() -> Result<()> {
    for (arch, tied) in [(Arch::Llama, true), (Arch::Qwen2, false)] {
        let dir = tmp(&format!("gguf-export-{arch:?}"));
        let (cfg, weights) = write_tiny_gguf(&dir.join("plain.gguf"), arch, tied, 1, GgmlDType::F32)?;
        // The source gets a metadata entry and a tensor strata does not model, both of which
        // an export must carry over.
        let mut meta: Vec<(String, Value)> = read_checked(&dir.join("plain.gguf"))?.metadata.into_iter().collect();
        meta.push(("strata.test".into(), Value::String("kept".into())));
        let freqs = Tensor::new(&[1f32, 0.5, 0.25, 0.125], &Device::Cpu)?;
        let extra = vec![(
            "rope_freqs.weight".to_string(),
            QTensor::quantize(&freqs, GgmlDType::F32)?,
        )];
        let mut each = |f: &mut dyn FnMut(String, Tensor) -> Result<()>| {
            weights.0.iter().try_for_each(|(n, t)| f(n.clone(), t.clone()))
        };
        let source = dir.join("source.gguf");
        write_tensors(&source, &cfg, meta, &mut each, &extra, &|_, _| GgmlDType::F32)?;

        let mut model = load(&source)?;
        LoraPlan::uniform(4, 8.0, &MODULES).attach(&mut model, 5)?;
        for (_, l) in model.loras() {
            l.b.set(&Tensor::randn(0f32, 0.1, l.b.as_tensor().shape(), &Device::Cpu)?)?;
        }
        let ids = Tensor::from_vec(vec![3u32, 40, 7, 100, 12, 5], (1, 6), &Device::Cpu)?;
        let want = model.logits(&ids, Fwd::eval(), None)?;
        let base = load(&source)?.logits(&ids, Fwd::eval(), None)?;
        assert!(
            rel_gap(&base, &want)? > 1e-3,
            "{arch:?}: the adapter must change the logits"
        );

        let out = dir.join("merged-f32.gguf");
        let notes = merge::write_gguf_file(&model, &source, &out, true, "f32")?;
        assert!(notes.is_empty(), "{notes:?}");
        let got = load(&out)?.logits(&ids, Fwd::eval(), None)?;
        let g = rel_gap(&got, &want)?;
        assert!(g < 1e-5, "{arch:?}: merged f32 GGUF logits differ by {g}");
        let c = read_checked(&out)?;
        assert!(matches!(c.metadata.get("strata.test"), Some(Value::String(s)) if s == "kept"));
        assert!(matches!(c.metadata.get("general.file_type"), Some(Value::U32(0))));
        assert!(c.metadata.contains_key("tokenizer.ggml.tokens"));
        let mut f = std::fs::File::open(&out)?;
        let kept = c
            .tensor(&mut f, "rope_freqs.weight", &Device::Cpu)?
            .dequantize(&Device::Cpu)?;
        assert_eq!(kept.to_vec1::<f32>()?, freqs.to_vec1::<f32>()?);
        assert_eq!(c.tensor_infos.contains_key("output.weight"), !tied);

        // Q8_0 rows are whole blocks of 32 here: stored as asked, logits within its rounding.
        let out = dir.join("merged-q8_0.gguf");
        assert!(merge::write_gguf_file(&model, &source, &out, true, "q8_0")?.is_empty());
        let c = read_checked(&out)?;
        assert_eq!(c.tensor_infos["blk.0.ffn_down.weight"].ggml_dtype, GgmlDType::Q8_0);
        assert_eq!(c.tensor_infos["blk.0.attn_norm.weight"].ggml_dtype, GgmlDType::F32);
        let g = rel_gap(&load(&out)?.logits(&ids, Fwd::eval(), None)?, &want)?;
        assert!(g < 0.05, "{arch:?}: q8_0 logits differ by {g}");
        // Q4_K needs rows of 256: every matrix falls back to Q8_0, each one reported.
        let notes = merge::write_gguf_file(&model, &source, &dir.join("merged-q4k.gguf"), true, "q4_k")?;
        let matrices = read_checked(&dir.join("merged-q4k.gguf"))?
            .tensor_infos
            .values()
            .filter(|t| t.shape.rank() == 2)
            .count();
        assert_eq!(notes.len(), matrices, "{notes:?}");
        assert!(notes[0].contains("stored as Q8_0"), "{}", notes[0]);
    }
    Ok(())
}

#[test]
fn gguf_exports_that_cannot_be_made_say_why() -> Result<()> {
    let dir = tmp("gguf-export-errors");
    let e = merge::gguf_export_type(&dir.join("m.gguf"), "q3")
        .unwrap_err()
        .to_string();
    assert!(e.contains("choose one of f32, f16"), "{e}");
    let e = merge::gguf_export_type(&dir.join("hf-model"), "q8_0")
        .unwrap_err()
        .to_string();
    assert!(e.contains("convert_hf_to_gguf.py"), "{e}");
    Ok(())
}

/// `strata merge --adapter-only`: llama.cpp's LoRA GGUF, whose pairs added to the base file's
/// own tensors (as llama.cpp does: `W + B A`, alpha 0, so no further scale) give the merged
/// file's tensors, Llama's permuted Q/K rows included, under a plan whose layers differ in
/// rank and alpha.
#[test]
fn llama_lora_gguf_adds_up_to_the_merged_gguf() -> Result<()> {
    use strata::adapter::{llama_lora, PlanRule};
    for arch in [Arch::Llama, Arch::Qwen2] {
        let dir = tmp(&format!("llama-lora-{arch:?}"));
        let source = dir.join("source.gguf");
        write_tiny_gguf(&source, arch, false, 2, GgmlDType::F32)?;
        let mut model = load(&source)?;
        let plan = LoraPlan::uniform(4, 8.0, &MODULES).with_rules(
            &[PlanRule {
                layers: "1".into(),
                modules: None,
                r: 6,
                alpha: Some(3.0),
                base: None,
            }],
            2,
        )?;
        plan.attach(&mut model, 9)?;
        for (_, l) in model.loras() {
            l.b.set(&Tensor::randn(0f32, 0.1, l.b.as_tensor().shape(), &Device::Cpu)?)?;
        }
        let lora = dir.join("lora.gguf");
        llama_lora::write(&model, &lora, "f32")?;
        let merged = dir.join("merged.gguf");
        merge::write_gguf_file(&model, &source, &merged, true, "f32")?;

        let read = |p: &std::path::Path| -> Result<_> {
            let c = read_checked(p)?;
            let mut f = std::fs::File::open(p)?;
            let mut t = std::collections::HashMap::new();
            for name in c.tensor_infos.keys() {
                t.insert(
                    name.clone(),
                    c.tensor(&mut f, name, &Device::Cpu)?.dequantize(&Device::Cpu)?,
                );
            }
            Ok((c.metadata, t))
        };
        let (meta, pairs) = read(&lora)?;
        assert!(matches!(meta.get("general.type"), Some(Value::String(s)) if s == "adapter"));
        assert!(matches!(meta.get("adapter.type"), Some(Value::String(s)) if s == "lora"));
        assert!(matches!(meta.get("adapter.lora.alpha"), Some(Value::F32(a)) if *a == 0.0));
        assert!(matches!(meta.get("general.architecture"), Some(Value::String(s)) if s == arch.model_type()));
        assert_eq!(pairs.len(), 2 * 7 * 2);
        let (_, base) = read(&source)?;
        let (_, want) = read(&merged)?;
        for (name, a) in pairs.iter().filter(|(n, _)| n.ends_with(".lora_a")) {
            let w = name.trim_end_matches(".lora_a");
            let b = &pairs[&format!("{w}.lora_b")];
            let r = if w.starts_with("blk.1.") { 6 } else { 4 };
            assert_eq!(a.dims()[0], r, "{name}");
            let got = (&base[w] + b.matmul(a)?)?;
            let g = rel_gap(&got, &want[w])?;
            assert!(
                g < 1e-5,
                "{arch:?} {w}: base + B A differs from the merged weight by {g}"
            );
        }
        let e = llama_lora::write(&load(&source)?, &dir.join("none.gguf"), "f32").unwrap_err();
        assert!(e.to_string().contains("no adapter"), "{e}");
        assert!(llama_lora::write(&model, &dir.join("q.gguf"), "q8_0").is_err());
    }
    Ok(())
}
