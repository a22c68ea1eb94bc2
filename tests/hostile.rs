//! Crafted files a stranger could publish: each is refused with a clear error naming the file and
//! what is wrong, quickly and without a large allocation; through the command line, with exit
//! code 1 and no panic text.

use anyhow::Result;
use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::GgmlDType;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use strata::model::config::Arch;
use strata::model::open;
use strata::testing::{write_tiny_gguf, RawGguf};

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("strata-hostile-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A valid tiny model's parts (two layers, Q8_0 matrices).
fn valid(dir: &Path) -> RawGguf {
    let p = dir.join("valid.gguf");
    write_tiny_gguf(&p, Arch::Llama, false, 3, GgmlDType::Q8_0).unwrap();
    RawGguf::read(&p).unwrap()
}

/// Opening `path` fails within a second, the message containing every one of `want`.
fn refused(path: &Path, want: &[&str]) {
    let t = Instant::now();
    let e = match open(path) {
        Ok(_) => panic!("{} opened", path.display()),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "{}: took {:?}",
        path.display(),
        t.elapsed()
    );
    let name = path.file_name().unwrap().to_string_lossy();
    assert!(e.contains(name.as_ref()), "error does not name the file: {e}");
    for w in want {
        assert!(e.contains(w), "`{w}` not in: {e}");
    }
}

/// `strata ARGS` exits with 1, names `want` and prints no panic.
fn cli_refuses(args: &[&str], want: &str) {
    let out = Command::new(env!("CARGO_BIN_EXE_strata")).args(args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
    assert!(err.contains(want), "{args:?}: `{want}` not in {err}");
    assert!(!err.contains("panicked"), "{args:?}: {err}");
}

#[test]
fn crafted_gguf_headers_are_refused() -> Result<()> {
    let dir = tmp("gguf");
    let write = |name: &str, f: &dyn Fn(&mut RawGguf)| -> PathBuf {
        let mut g = valid(&dir);
        f(&mut g);
        let p = dir.join(name);
        g.write(&p).unwrap();
        p
    };
    // Zero dimensions, zero sizes.
    let p = write("ndims0.gguf", &|g| g.tensor("token_embd.weight").dims.clear());
    refused(&p, &["token_embd.weight", "0 dimensions"]);
    let p = write("zero.gguf", &|g| {
        let t = g.tensor("blk.0.attn_q.weight");
        t.dims = vec![0, 64];
        t.data.clear();
    });
    refused(&p, &["blk.0.attn_q.weight", "dimension of 0"]);
    // Alignment of 0, or not a power of two.
    for (n, a) in [("align0.gguf", 0u32), ("align3.gguf", 3)] {
        let p = write(n, &|g| g.kvs.push(("general.alignment".into(), Value::U32(a))));
        refused(&p, &["general.alignment"]);
    }
    // Layer counts the tensors do not back (2^31 and 1000 layers for two layers' tensors).
    let p = write("layers-huge.gguf", &|g| {
        *g.kv("llama.block_count") = Value::U32(1 << 31)
    });
    refused(&p, &["2147483648 layers"]);
    let p = write("layers-1000.gguf", &|g| *g.kv("llama.block_count") = Value::U32(1000));
    refused(&p, &["1000 layers", "tensors for 2"]);
    // Duplicate keys and tensors.
    let p = write("dupkey.gguf", &|g| {
        g.kvs.push(("llama.block_count".into(), Value::U32(2)));
    });
    refused(&p, &["llama.block_count", "appears twice"]);
    let p = write("duptensor.gguf", &|g| {
        let t = g.tensor("output_norm.weight");
        let copy = strata::testing::RawTensor {
            name: t.name.clone(),
            dims: t.dims.clone(),
            ty: t.ty,
            data: t.data.clone(),
            offset: None,
        };
        g.tensors.push(copy);
    });
    refused(&p, &["output_norm.weight", "appears twice"]);
    // Settings no model has: NaN or negative theta and epsilon, a head size of 0, an EOS id
    // beyond the vocabulary, dimensions whose product overflows.
    let p = write("theta-nan.gguf", &|g| {
        *g.kv("llama.rope.freq_base") = Value::F32(f32::NAN)
    });
    refused(&p, &["rope theta NaN"]);
    let p = write("eps-neg.gguf", &|g| {
        *g.kv("llama.attention.layer_norm_rms_epsilon") = Value::F32(-1e-5)
    });
    refused(&p, &["RMSNorm epsilon"]);
    let p = write("headdim0.gguf", &|g| {
        *g.kv("llama.attention.key_length") = Value::U32(0)
    });
    refused(&p, &["llama.attention.key_length", "positive integer"]);
    let p = write("eos.gguf", &|g| {
        *g.kv("tokenizer.ggml.eos_token_id") = Value::U32(1 << 30)
    });
    refused(&p, &["eos token id 1073741824", "outside the vocabulary"]);
    let p = write("eos-wide.gguf", &|g| {
        *g.kv("tokenizer.ggml.eos_token_id") = Value::U64((1 << 32) + 1)
    });
    refused(&p, &["tokenizer.ggml.eos_token_id", "token id"]);
    let p = write("overflow.gguf", &|g| {
        g.tensor("blk.1.ffn_up.weight").dims = vec![1 << 40, 1 << 40]
    });
    refused(&p, &["blk.1.ffn_up.weight", "more elements than the file"]);
    let p = write("width.gguf", &|g| *g.kv("llama.embedding_length") = Value::U32(1 << 20));
    refused(&p, &["token_embd.weight", "embedding_length"]);
    // A few MB of u8 metadata: refused by the memory budget, not read into 32x its size.
    let p = write("bigmeta.gguf", &|g| {
        g.kvs.push(("junk".into(), Value::Array(vec![Value::U8(7); 4 << 20])));
    });
    refused(&p, &["metadata", "more than"]);
    // A wrong value type where a number belongs, a bool that is not 0 or 1.
    let p = write("theta-str.gguf", &|g| {
        *g.kv("llama.rope.freq_base") = Value::String("x".into())
    });
    refused(&p, &["llama.rope.freq_base", "must be a number"]);
    let mut g = valid(&dir);
    g.kvs.push(("flag".into(), Value::Bool(true)));
    let mut bytes = g.bytes();
    let at = bytes.windows(4).position(|w| w == b"flag").unwrap() + 4 + 4;
    bytes[at] = 9;
    std::fs::write(dir.join("bool.gguf"), &bytes)?;
    refused(&dir.join("bool.gguf"), &["flag", "bool"]);
    // Misaligned or overlapping-the-end offsets.
    let p = write("offset.gguf", &|g| g.tensor("output_norm.weight").offset = Some(3));
    refused(&p, &["output_norm.weight", "alignment"]);
    let p = write("offset-end.gguf", &|g| {
        g.tensor("output_norm.weight").offset = Some(1 << 40)
    });
    refused(&p, &["output_norm.weight", "ends at byte"]);

    // Through the command line: exit code 1, no panic text.
    cli_refuses(
        &["inspect", dir.join("align0.gguf").to_str().unwrap()],
        "general.alignment",
    );
    cli_refuses(
        &["inspect", dir.join("layers-1000.gguf").to_str().unwrap()],
        "1000 layers",
    );
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn special_files_are_refused_before_they_are_opened() -> Result<()> {
    let dir = tmp("special");
    let fifo = dir.join("pipe.gguf");
    if Command::new("mkfifo").arg(&fifo).status().is_ok_and(|s| s.success()) {
        refused(&fifo, &["FIFO"]);
        let rfifo = dir.join("r.toml");
        Command::new("mkfifo").arg(&rfifo).status()?;
        cli_refuses(&["train", rfifo.to_str().unwrap()], "not a plain file");
    }
    cli_refuses(&["train", "/dev/zero"], "not a plain file");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn crafted_hf_directories_are_refused() -> Result<()> {
    let dir = tmp("hf");
    let gguf = dir.join("m.gguf");
    let (cfg, src) = write_tiny_gguf(&gguf, Arch::Llama, true, 7, GgmlDType::F32)?;
    let model = strata::model::Model::load(
        &cfg,
        &src,
        strata::model::BaseDtype::F32,
        false,
        &candle_core::Device::Cpu,
    )?;
    let hf = dir.join("hf");
    strata::adapter::merge::write_hf_dir(
        &model,
        &open(&gguf)?.tokenizer,
        &hf,
        false,
        strata::adapter::merge::Store::Float(candle_core::DType::F32),
    )?;
    open(&hf)?;
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(hf.join("config.json"))?)?;
    let with = |k: &str, v: serde_json::Value| {
        let mut c = config.clone();
        c[k] = v;
        std::fs::write(hf.join("config.json"), c.to_string()).unwrap();
    };
    with("num_hidden_layers", 1u64.into());
    let e = format!("{:#}", open(&hf).err().unwrap());
    assert!(e.contains("declares 1 layers") && e.contains("tensors for 2"), "{e}");
    with("num_hidden_layers", (1u64 << 31).into());
    assert!(format!("{:#}", open(&hf).err().unwrap()).contains("2147483648 layers"));
    with("eos_token_id", 99999u64.into());
    assert!(format!("{:#}", open(&hf).err().unwrap()).contains("outside the vocabulary"));
    with("rope_theta", (-5.0).into());
    assert!(format!("{:#}", open(&hf).err().unwrap()).contains("rope theta -5"));
    with("rope_theta", "fast".into());
    assert!(format!("{:#}", open(&hf).err().unwrap()).contains("`rope_theta` must be a number"));
    with("intermediate_size", 8u64.into());
    let e = format!("{:#}", open(&hf).err().unwrap());
    assert!(
        e.contains("mlp.gate_proj.weight") && e.contains("configuration implies [8,"),
        "{e}"
    );
    std::fs::write(hf.join("config.json"), config.to_string())?;

    // An index whose weight map names nothing.
    let single = hf.join("model.safetensors");
    std::fs::rename(&single, hf.join("shard.safetensors"))?;
    std::fs::write(hf.join("model.safetensors.index.json"), r#"{"weight_map": {}}"#)?;
    let e = format!("{:#}", open(&hf).err().unwrap());
    assert!(
        e.contains("model.safetensors.index.json") && e.contains("names no shard"),
        "{e}"
    );
    std::fs::remove_file(hf.join("model.safetensors.index.json"))?;
    std::fs::rename(hf.join("shard.safetensors"), &single)?;

    // 20,000 zero-size tensors: the header is parsed once, not once per tensor.
    let many = dir.join("many.safetensors");
    let mut header = serde_json::Map::new();
    for i in 0..20_000 {
        header.insert(
            format!("t{i}"),
            serde_json::json!({"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}),
        );
    }
    let h = serde_json::Value::Object(header).to_string();
    let mut bytes = (h.len() as u64).to_le_bytes().to_vec();
    bytes.extend(h.as_bytes());
    std::fs::write(&many, &bytes)?;
    let t = Instant::now();
    let st = strata::model::hf::SafetensorsSource::open(std::slice::from_ref(&many))?;
    for i in 0..20_000 {
        strata::model::WeightSource::stored_type(&st, &format!("t{i}")).unwrap();
    }
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn hostile_data_and_templates_fail_cleanly() -> Result<()> {
    use strata::data::chat::{render, Message};
    let dir = tmp("data");
    let gguf = dir.join("m.gguf");
    write_tiny_gguf(&gguf, Arch::Llama, true, 7, GgmlDType::F32)?;
    let tok = open(&gguf)?.tokenizer;
    let msgs = vec![Message {
        role: "user".into(),
        content: "hi".into(),
    }];
    let e = render(
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        &msgs,
        false,
        &tok,
    )
    .unwrap_err();
    assert!(format!("{e:#}").contains("instructions"), "{e:#}");
    let e = render(
        "{% for i in range(1000) %}{{ 'x' * 1000000 }}{% endfor %}",
        &msgs,
        false,
        &tok,
    )
    .unwrap_err();
    assert!(format!("{e:#}").contains("printed more than"), "{e:#}");
    assert_eq!(render("{{ messages[0].content }}", &msgs, false, &tok)?, "hi");

    // A data directory with a link to itself is walked once.
    let data = dir.join("data");
    std::fs::create_dir_all(&data)?;
    std::fs::write(data.join("a.txt"), "some text")?;
    #[cfg(unix)]
    std::os::unix::fs::symlink(&data, data.join("again"))?;
    let t = Instant::now();
    assert_eq!(
        strata::data::text::load_documents(std::slice::from_ref(&data))?.len(),
        1
    );
    assert!(t.elapsed() < Duration::from_secs(2));
    // A JSONL document beyond the cap: an error naming the line, read in bounded memory.
    let big = dir.join("big.jsonl");
    {
        use std::io::Write;
        let mut f = std::io::BufWriter::new(std::fs::File::create(&big)?);
        writeln!(f, "{{\"text\": \"fine\"}}")?;
        write!(f, "{{\"text\": \"")?;
        let chunk = "word ".repeat(1 << 16);
        for _ in 0..(strata::fsio::DOCUMENT_CAP as usize / chunk.len() + 1) {
            f.write_all(chunk.as_bytes())?;
        }
        writeln!(f, "\"}}")?;
    }
    let e = strata::data::text::load_documents(std::slice::from_ref(&big)).unwrap_err();
    assert!(format!("{e:#}").contains("big.jsonl:2: the line is longer"), "{e:#}");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// A checkpoint that does not fit the run resuming it, an adapter holding NaN or a bad alpha,
/// and a Fisher file with an empty total: each refused, naming the file and the field.
#[test]
fn tampered_checkpoints_adapters_and_fishers_are_refused() -> Result<()> {
    use strata::train::recipe::Recipe;
    use strata::train::trainer::{run_with, RunOptions};
    let dir = tmp("ck");
    write_tiny_gguf(&dir.join("tiny.gguf"), Arch::Llama, true, 3, GgmlDType::F32)?;
    strata::testing::write_tiny_corpus(&dir)?;
    let text = |out: &str| {
        format!(
            "[model]\npath = \"{0}/tiny.gguf\"\n[lora]\nr = 4\n[data]\ntrain = [\"{0}/data\"]\nseq_len = 16\n\
             [train]\nbatch = 2\ngrad_accum = 2\nsteps = 4\nlr = 1e-2\ncheckpoint_every = 2\nout = \"{0}/{out}\"\n",
            dir.display()
        )
    };
    let run = |t: &str, resume: Option<PathBuf>| {
        run_with(
            &Recipe::parse(t, "r.toml", &[]).unwrap(),
            t,
            RunOptions {
                resume,
                ..Default::default()
            },
        )
    };
    run(&text("a"), None)?;
    let ck = dir.join("a/checkpoints/step-000004");
    let state: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(ck.join("state.json"))?)?;
    let resume_with = |edit: &dyn Fn(&mut serde_json::Value), tag: &str| -> String {
        let copy = dir.join(format!("ck-{tag}"));
        let _ = std::fs::remove_dir_all(&copy);
        std::fs::create_dir_all(&copy).unwrap();
        for f in ["trainable.safetensors", "optimizer.safetensors"] {
            std::fs::copy(ck.join(f), copy.join(f)).unwrap();
        }
        let mut s = state.clone();
        edit(&mut s);
        std::fs::write(copy.join("state.json"), s.to_string()).unwrap();
        match run(&text(tag), Some(copy)) {
            Ok(_) => panic!("a tampered checkpoint ({tag}) resumed"),
            Err(e) => format!("{e:#}"),
        }
    };
    let e = resume_with(&|s| s["control"]["micro_batch"] = 3.into(), "micro");
    assert!(e.contains("state.json") && e.contains("micro-batch 3"), "{e}");
    let e = resume_with(&|s| s["mixer"]["walks"][0]["cursor"] = 10_000.into(), "cursor");
    assert!(e.contains("cursor 10000"), "{e}");
    let e = resume_with(&|s| s["mixer"]["walks"][0]["order"][0] = 99_999.into(), "order");
    assert!(e.contains("not a permutation"), "{e}");
    let e = resume_with(
        &|s| {
            let w = s["mixer"]["walks"][0].clone();
            s["mixer"]["walks"].as_array_mut().unwrap().push(w);
        },
        "walks",
    );
    assert!(e.contains("walks 2 sources"), "{e}");
    let e = resume_with(&|s| s["step"] = 99.into(), "step");
    assert!(e.contains("step 99"), "{e}");
    // The training data shrank since the checkpoint.
    std::fs::remove_file(dir.join("data/doc5.txt"))?;
    let e = format!("{:#}", run(&text("shrunk"), Some(ck.clone())).unwrap_err());
    assert!(e.contains("data packs into") || e.contains("plans"), "{e}");
    strata::testing::write_tiny_corpus(&dir)?;
    // A checkpoint without its optimizer state.
    std::fs::remove_file(ck.join("optimizer.safetensors"))?;
    let e = format!("{:#}", run(&text("noopt"), Some(ck.clone())).unwrap_err());
    assert!(e.contains("optimizer.safetensors is missing"), "{e}");

    // The run's adapter, with a NaN in one tensor, then with an infinite alpha.
    let adapter = dir.join("a/adapter");
    let src = open(&dir.join("tiny.gguf"))?;
    let load = || -> String {
        let mut m = strata::model::Model::load(
            &src.config,
            src.weights.as_ref(),
            strata::model::BaseDtype::F32,
            false,
            &candle_core::Device::Cpu,
        )
        .unwrap();
        match strata::adapter::peft::load(&mut m, &adapter) {
            Ok(_) => panic!("a corrupt adapter loaded"),
            Err(e) => format!("{e:#}"),
        }
    };
    let st = adapter.join("adapter_model.safetensors");
    let good = std::fs::read(&st)?;
    let mut tensors = candle_core::safetensors::load(&st, &candle_core::Device::Cpu)?;
    let key = tensors.keys().find(|k| k.contains("lora_A")).unwrap().clone();
    let t = &tensors[&key];
    let mut v = t.flatten_all()?.to_vec1::<f32>()?;
    v[3] = f32::NAN;
    let bad = candle_core::Tensor::from_vec(v, t.shape(), &candle_core::Device::Cpu)?;
    tensors.insert(key.clone(), bad);
    let mut named: Vec<(String, candle_core::Tensor)> = tensors.into_iter().collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    strata::model::hf::save_safetensors(&st, &named)?;
    let e = load();
    assert!(e.contains(&key) && e.contains("non-finite"), "{e}");
    std::fs::write(&st, &good)?;
    let cfg_path = adapter.join("adapter_config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path)?)?;
    cfg["lora_alpha"] = serde_json::json!(-4.0);
    std::fs::write(&cfg_path, cfg.to_string())?;
    let e = load();
    assert!(e.contains("lora_alpha") && e.contains("finite positive"), "{e}");

    // A factored Fisher whose total holds nothing.
    let fisher = dir.join("f.safetensors");
    let z = candle_core::Tensor::zeros(4, candle_core::DType::F32, &candle_core::Device::Cpu)?;
    let empty = candle_core::Tensor::zeros(0, candle_core::DType::F32, &candle_core::Device::Cpu)?;
    strata::model::hf::save_safetensors(
        &fisher,
        &[
            ("w.fisher_rows".into(), z.clone()),
            ("w.fisher_cols".into(), z),
            ("w.fisher_total".into(), empty),
        ],
    )?;
    std::fs::write(
        dir.join("f.safetensors.json"),
        r#"{"model": "m", "estimator": "empirical", "rows": 1, "seq_len": 16, "stages": 1, "decay": 1.0, "format": "factored", "data": []}"#,
    )?;
    let e = strata::retain::fisher::Fisher::load(&fisher, &candle_core::Device::Cpu)
        .err()
        .map(|e| format!("{e:#}"));
    let e = e.expect("an empty Fisher total loaded");
    assert!(
        e.contains("f.safetensors") && e.contains("w.fisher_total") && e.contains("one finite positive"),
        "{e}"
    );
    // Entries no estimator writes, and a Fisher estimated for another shape.
    let dev = candle_core::Device::Cpu;
    let nan = candle_core::Tensor::new(&[1f32, f32::NAN, 0.5, 2.0], &dev)?;
    let one = candle_core::Tensor::new(&[1f32], &dev)?;
    let ones = candle_core::Tensor::ones(4, candle_core::DType::F32, &dev)?;
    strata::model::hf::save_safetensors(
        &fisher,
        &[
            ("w.fisher_rows".into(), nan),
            ("w.fisher_cols".into(), ones.clone()),
            ("w.fisher_total".into(), one.clone()),
        ],
    )?;
    let e = match strata::retain::fisher::Fisher::load(&fisher, &dev) {
        Ok(_) => panic!("a NaN Fisher loaded"),
        Err(e) => format!("{e:#}"),
    };
    assert!(e.contains("`w`") && e.contains("finite and >= 0"), "{e}");
    let name = "model.layers.0.self_attn.q_proj.weight";
    strata::model::hf::save_safetensors(
        &fisher,
        &[
            (format!("{name}.fisher_rows"), ones.clone()),
            (format!("{name}.fisher_cols"), ones),
            (format!("{name}.fisher_total"), one),
        ],
    )?;
    let f = strata::retain::fisher::Fisher::load(&fisher, &dev)?;
    let mut m = strata::model::Model::load(
        &src.config,
        src.weights.as_ref(),
        strata::model::BaseDtype::F32,
        false,
        &dev,
    )?;
    strata::adapter::LoraPlan::uniform(4, 8.0, &strata::model::MODULES).attach(&mut m, 1)?;
    let e = match strata::retain::Ewc::new(&m, &f, 1.0) {
        Ok(_) => panic!("a Fisher of the wrong shape was accepted"),
        Err(e) => format!("{e:#}"),
    };
    assert!(e.contains(name) && e.contains("shape [4, 4]"), "{e}");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// A real model of many layers (1,000 tiny ones) opens and inspects in time linear in its
/// size: nothing is compiled or scanned once per layer per layer.
#[test]
fn a_thousand_layer_model_inspects_quickly() -> Result<()> {
    let dir = tmp("deep");
    let v = strata::model::tokenizer::tiny_vocab();
    let cfg = strata::model::ModelConfig {
        num_layers: 1000,
        ..strata::testing::tiny_config(Arch::Llama, v.tokens.len(), true)
    };
    let p = dir.join("deep.gguf");
    strata::testing::write_gguf_of(&p, &cfg, 1, GgmlDType::Q8_0)?;
    let t = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_strata"))
        .arg("inspect")
        .arg(&p)
        .output()?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("1000 layers"));
    assert!(t.elapsed() < Duration::from_secs(20), "inspect took {:?}", t.elapsed());
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
