//! Writes the seed inputs of every fuzz target into `fuzz/corpus/<target>/`: valid files made
//! the way the test suite makes them (the tiny synthetic model, its tokenizer, adapter and a
//! checkpoint), and the recipes this repository ships.

use anyhow::Result;
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use std::path::{Path, PathBuf};
use strata::adapter::LoraPlan;
use strata::model::{Arch, BaseDtype, Model, MODULES};
use strata::testing::fuzz::join;

fn put(root: &Path, target: &str, name: &str, bytes: &[u8]) -> Result<()> {
    let d = root.join(target);
    std::fs::create_dir_all(&d)?;
    std::fs::write(d.join(name), bytes)?;
    Ok(())
}

fn main() -> Result<()> {
    let root = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "corpus".into()));
    let work = strata::testing::fuzz::scratch("seeds");
    let dev = Device::Cpu;

    // GGUF files of both families, quantized and not: one layer, narrow, so that a fuzzed
    // input stays small (the tokenizer's vocabulary is most of it).
    let v = strata::model::tokenizer::tiny_vocab();
    let micro = |arch, tied| strata::model::ModelConfig {
        num_layers: 1,
        num_heads: 2,
        num_kv_heads: 1,
        head_dim: 16,
        intermediate_size: 32,
        ..strata::testing::tiny_config(arch, v.tokens.len(), tied)
    };
    for (i, (arch, tied, ty)) in [
        (Arch::Llama, true, GgmlDType::Q8_0),
        (Arch::Llama, false, GgmlDType::F32),
        (Arch::Qwen2, true, GgmlDType::Q4_0),
    ]
    .into_iter()
    .enumerate()
    {
        let p = work.join(format!("m{i}.gguf"));
        strata::testing::write_gguf_of(&p, &micro(arch, tied), i as u64, ty)?;
        put(&root, "gguf", &format!("seed-{i}"), &std::fs::read(&p)?)?;
    }

    // A Hugging Face directory, single file and sharded: a model of 16 words with a word-level
    // tokenizer, so that the tokenizer.json is small too.
    let words: Vec<String> = (0..16).map(|i| format!("w{i}")).collect();
    let tok_json = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "unk_token": "w0",
                  "vocab": words.iter().enumerate().map(|(i, w)| (w.clone(), serde_json::Value::from(i))).collect::<serde_json::Map<_, _>>()}
    });
    let tok = strata::model::tokenizer::Tok::from_json(tok_json.to_string(), Some(0), None, None)?;
    let hcfg = strata::model::ModelConfig {
        hidden_size: 8,
        head_dim: 4,
        intermediate_size: 16,
        num_layers: 1,
        ..strata::testing::tiny_config(Arch::Qwen2, words.len(), true)
    };
    let hsrc = strata::testing::random_weights(&hcfg, 2);
    let model = Model::load(&hcfg, &hsrc, BaseDtype::F32, false, &dev)?;
    let hf = work.join("hf");
    strata::adapter::merge::write_hf_dir(
        &model,
        &tok,
        &hf,
        false,
        strata::adapter::merge::Store::Float(DType::F32),
    )?;
    let read = |n: &str| std::fs::read(hf.join(n));
    let (config, tok, st) = (
        read("config.json")?,
        read("tokenizer.json")?,
        read("model.safetensors")?,
    );
    put(&root, "hf_dir", "seed-0", &join(&[&config, &tok, &st]))?;
    let names: Vec<String> = strata::model::WeightSource::names(&hsrc);
    let index = serde_json::json!({
        "weight_map": names.iter().map(|n| (n.clone(), serde_json::Value::from("shard-1.safetensors"))).collect::<serde_json::Map<_, _>>()
    });
    put(
        &root,
        "hf_dir",
        "seed-1",
        &join(&[&config, &tok, &st, index.to_string().as_bytes()]),
    )?;

    // The GGUF tokenizer's parts.
    let types: Vec<u8> = v.types.iter().map(|&t| t as u8).collect();
    put(
        &root,
        "gguf_tokenizer",
        "seed-0",
        &join(&[
            v.model.as_bytes(),
            v.pre.as_bytes(),
            v.tokens.join("\n").as_bytes(),
            &types,
            v.merges.join("\n").as_bytes(),
        ]),
    )?;

    // Every recipe the repository ships.
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for dir in [repo.join("recipes"), repo.join("recipes/forgetting")] {
        for e in std::fs::read_dir(&dir)? {
            let p = e?.path();
            if p.extension().is_some_and(|x| x == "toml") {
                let name = p.file_name().unwrap().to_string_lossy().into_owned();
                put(&root, "recipe", &name, &std::fs::read(&p)?)?;
            }
        }
    }

    // Chat and text data with a ChatML template.
    let chatml = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
    let chat = r#"{"messages": [{"role": "user", "content": "the cat"}, {"role": "assistant", "content": "sat on the mat"}]}
{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "42?"}, {"role": "assistant", "content": "yes"}]}"#;
    let text = "{\"text\": \"the cat sat on the mat. the dog ran.\"}\n{\"text\": \"42 is a number\"}\n";
    put(
        &root,
        "data",
        "seed-0",
        &join(&[chatml.as_bytes(), chat.as_bytes(), text.as_bytes()]),
    )?;

    // A PEFT adapter for the tiny model, with a layered rank pattern.
    let cfg = strata::testing::tiny_config(Arch::Llama, v.tokens.len(), true);
    let mut m = Model::load(
        &cfg,
        &strata::testing::random_weights(&cfg, 5),
        BaseDtype::F32,
        false,
        &dev,
    )?;
    let mut plan = LoraPlan::uniform(4, 8.0, &MODULES);
    plan.rank_pattern = vec![(r"model\.layers\.1\.mlp\.down_proj".into(), 2)];
    plan.attach(&mut m, 3)?;
    let ad = work.join("adapter");
    strata::adapter::peft::save(&m, &plan, &ad, "tiny")?;
    let read = |n: &str| std::fs::read(ad.join(n));
    put(
        &root,
        "adapter",
        "seed-0",
        &join(&[&read("adapter_config.json")?, &read("adapter_model.safetensors")?]),
    )?;

    // A checkpoint of a run of 5 steps of 4 rows over 10 domain and 4 general rows.
    let params = strata::testing::fuzz::checkpoint_params();
    let mut opt = strata::engine::optim::AdamW::new(0.0);
    opt.t = 1;
    for (n, v) in &params {
        let z = Tensor::full(0.25f32, v.dims(), &dev)?;
        opt.moments.insert(n.clone(), (z.clone(), z));
    }
    let metrics = strata::eval::TextMetrics {
        tokens: 10,
        loss: 2.0,
        perplexity: 2f64.exp(),
        accuracy: 0.5,
        perplexity_ci: (7.0, 8.0),
    };
    let state = strata::train::checkpoint::RunState {
        step: 1,
        adam_t: 1,
        mixer: strata::data::mix::Mixer::new(10, 4, 1)?,
        control: strata::train::callback::Control {
            step: 1,
            total_steps: 5,
            domain_share: 0.5,
            micro_batch: 2,
            effective_batch: 4,
            lr: Default::default(),
            stop: false,
        },
        callbacks: Default::default(),
        bad_in_a_row: 0,
        recompute: Some("blocks".into()),
        trained_tokens: 64,
        elapsed_s: 1.5,
        epoch: 0,
        eval_before: metrics,
        general_before: Some(metrics),
        metrics: vec!["{\"step\": 0}".into()],
    };
    let ck = strata::train::checkpoint::save(&work.join("ck"), &state, &params, &opt, 2)?;
    let read = |n: &str| std::fs::read(ck.join(n));
    put(
        &root,
        "checkpoint",
        "seed-0",
        &join(&[
            &read("state.json")?,
            &read("trainable.safetensors")?,
            &read("optimizer.safetensors")?,
        ]),
    )?;
    std::fs::remove_dir_all(&work)?;
    println!("seeds written under {}", root.display());
    Ok(())
}
