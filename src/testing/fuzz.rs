//! The fuzz targets' bodies (`fuzz/`, run by `scripts/fuzz.sh`), here so that every input a
//! fuzzer found becomes a regression test that runs the same code (`tests/fuzz_regressions.rs`):
//! each takes one input and must return, never panic, hang or allocate without bound. Inputs
//! holding several files separate them with [`MARK`].

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use crate::data::formats::ChatFormat;
use crate::model::tokenizer::{tokenizer_json_from_gguf, GgufVocab, Tok};
use crate::model::{BaseDtype, Model};
use crate::train::checkpoint;
use crate::train::recipe::Recipe;

/// Separates the files of a multi-file input (a model directory, an adapter, a checkpoint).
pub const MARK: &[u8] = b"\n@@strata-part@@\n";

/// The files of a multi-file input, `n` of them (missing ones empty).
pub fn parts(data: &[u8], n: usize) -> Vec<&[u8]> {
    let mut out = Vec::with_capacity(n);
    let mut rest = data;
    while out.len() + 1 < n {
        match rest.windows(MARK.len()).position(|w| w == MARK) {
            Some(i) => {
                out.push(&rest[..i]);
                rest = &rest[i + MARK.len()..];
            }
            None => break,
        }
    }
    out.push(rest);
    out.resize(n, &[]);
    out
}

/// Joins files into one input (the inverse of [`parts`]).
pub fn join(files: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, f) in files.iter().enumerate() {
        if i > 0 {
            out.extend_from_slice(MARK);
        }
        out.extend_from_slice(f);
    }
    out
}

/// A scratch directory of this process (in memory where the machine has /dev/shm).
pub fn scratch(name: &str) -> PathBuf {
    let root = if Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let d = root.join(format!("strata-fuzz-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).expect("scratch directory");
    d
}

/// Writes `files` (name, bytes) into `dir`, removing what an earlier input left there.
pub fn write_files(dir: &Path, files: &[(&str, &[u8])]) {
    for e in std::fs::read_dir(dir).expect("scratch is readable").flatten() {
        let p = e.path();
        if p.is_dir() {
            std::fs::remove_dir_all(&p).ok();
        } else {
            std::fs::remove_file(&p).ok();
        }
    }
    for (name, bytes) in files {
        let p = dir.join(name);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).expect("scratch subdirectory");
        }
        std::fs::write(p, bytes).expect("scratch file");
    }
}

/// The tiny synthetic model's tokenizer (byte-level BPE from GGUF metadata).
pub fn tiny_tok() -> &'static Tok {
    static TOK: OnceLock<Tok> = OnceLock::new();
    TOK.get_or_init(|| {
        let v = crate::model::tokenizer::tiny_vocab();
        let json = tokenizer_json_from_gguf(&v, "tiny").expect("tiny vocab");
        Tok::from_json(json, Some(0), None, None).expect("tiny tokenizer")
    })
}

/// Model loading is tried only on files this small (a fuzzed shape must not make the target
/// itself slow: the loaders' own bounds are what is under test).
pub const LOAD_PARAMS: usize = 1 << 20;

/// The trainable tensors the checkpoint target restores into (and its seed writes).
pub fn checkpoint_params() -> Vec<(String, candle_core::Var)> {
    let dev = candle_core::Device::Cpu;
    ["a.lora_A.weight", "a.lora_B.weight"]
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let t = candle_core::Tensor::full(i as f32 + 0.5, (3, 4), &dev).expect("tensor");
            (n.to_string(), candle_core::Var::from_tensor(&t).expect("var"))
        })
        .collect()
}

/// A GGUF file: header, metadata, configuration, vocabulary and tensor table checked as
/// `strata::model::open` checks them; then, for files that pass, every tensor loaded
/// (dequantized, and as stored), as a training run would. The tokenizer built from the
/// vocabulary has a target of its own (`gguf_tokenizer`), which keeps this one fast.
pub fn gguf(data: &[u8]) {
    let dir = scratch("gguf");
    let p = dir.join("m.gguf");
    std::fs::write(&p, data).expect("scratch file");
    let Ok((src, cfg, _vocab)) = crate::model::gguf::read_gguf(&p) else {
        return;
    };
    if crate::model::source::check_inventory(&cfg, &src).is_err() || cfg.num_params() > LOAD_PARAMS {
        return;
    }
    let dev = candle_core::Device::Cpu;
    let base = if data.len().is_multiple_of(2) {
        BaseDtype::F32
    } else {
        BaseDtype::AsStored
    };
    let _ = Model::load(&cfg, &src, base, false, &dev);
}

/// A Hugging Face model directory: config.json, tokenizer.json, model.safetensors (or a shard
/// index and its shard); for directories that open, every tensor loaded.
pub fn hf_dir(data: &[u8]) {
    let p = parts(data, 4);
    let dir = scratch("hf");
    let mut files = vec![("config.json", p[0]), ("tokenizer.json", p[1])];
    if p[3].is_empty() {
        files.push(("model.safetensors", p[2]));
    } else {
        files.push(("shard-1.safetensors", p[2]));
        files.push(("model.safetensors.index.json", p[3]));
    }
    write_files(&dir, &files);
    let Ok(src) = crate::model::open(&dir) else { return };
    if src.config.num_params() > LOAD_PARAMS {
        return;
    }
    let dev = candle_core::Device::Cpu;
    for base in [BaseDtype::F32, BaseDtype::Nf4] {
        let _ = Model::load(&src.config, src.weights.as_ref(), base, false, &dev);
    }
}

/// The tokenizer strata rebuilds from GGUF metadata: tokens, merges, token types and the
/// pre-tokenizer name as a GGUF could hold them, then a text encoded and decoded.
pub fn gguf_tokenizer(data: &[u8]) {
    let p = parts(data, 5);
    let lines = |b: &[u8]| -> Vec<String> { String::from_utf8_lossy(b).lines().map(String::from).collect() };
    let v = GgufVocab {
        model: String::from_utf8_lossy(p[0]).trim().to_string(),
        pre: String::from_utf8_lossy(p[1]).trim().to_string(),
        tokens: lines(p[2]),
        types: p[3].iter().map(|&b| b as i64 % 7).collect(),
        merges: lines(p[4]),
        ..Default::default()
    };
    let Ok(json) = tokenizer_json_from_gguf(&v, "fuzz") else {
        return;
    };
    let Ok(tok) = Tok::from_json(json, Some(0), None, None) else {
        return;
    };
    if let Ok(ids) = tok.encode("The cat, 123 times: <|im_end|>\n\tdone") {
        let _ = tok.decode(&ids);
    }
}

/// A recipe: TOML parsed and checked, then planned for a four-layer model (adapter plan, base
/// precisions, schedules evaluated over the run).
pub fn recipe(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(r) = Recipe::parse(text, "fuzz.toml", &[]) else {
        return;
    };
    let _ = r.plan(4);
    let _ = r.base_table(4);
    for (_, s) in r.schedules(100) {
        for step in [0, 1, 50, 99, 100] {
            let _ = s.lr(step);
        }
    }
}

/// Training data: chat JSONL rendered through a chat template (the input's first part) with
/// loss on assistant turns, and text JSONL tokenized and packed.
pub fn data(data: &[u8]) {
    let p = parts(data, 3);
    let dir = scratch("data");
    write_files(&dir, &[("chat/c.jsonl", p[1]), ("text/t.jsonl", p[2])]);
    let mut tok = tiny_tok().clone();
    tok.chat_template = Some(String::from_utf8_lossy(p[0]).into_owned());
    let formats = [
        ChatFormat::Messages,
        ChatFormat::Alpaca,
        ChatFormat::ShareGpt,
        ChatFormat::PromptCompletion,
    ];
    let format = formats[p[0].len() % formats.len()];
    let _ = crate::data::chat::load_chat(&[dir.join("chat")], &tok, 24, format, &Default::default());
    if let Ok(docs) = crate::data::text::load_documents(&[dir.join("text")]) {
        let _ = crate::data::text::pack(&tok, &docs, 16, false);
    }
}

/// A PEFT adapter directory (adapter_config.json, adapter_model.safetensors) loaded onto the
/// tiny two-layer model, then merged.
pub fn adapter(data: &[u8]) {
    let p = parts(data, 2);
    let dir = scratch("adapter");
    write_files(
        &dir,
        &[("adapter_config.json", p[0]), ("adapter_model.safetensors", p[1])],
    );
    // One model for the process: loading an adapter replaces the one before.
    static MODEL: Mutex<Option<Model>> = Mutex::new(None);
    let mut guard = MODEL.lock().unwrap_or_else(|e| e.into_inner());
    let model = guard.get_or_insert_with(|| {
        let cfg = crate::testing::tiny_config(
            crate::model::Arch::Llama,
            crate::model::tokenizer::tiny_vocab().tokens.len(),
            true,
        );
        let src = crate::testing::random_weights(&cfg, 5);
        Model::load(&cfg, &src, BaseDtype::F32, false, &candle_core::Device::Cpu).expect("tiny model")
    });
    if crate::adapter::peft::load(model, &dir).is_ok() {
        let _ = crate::adapter::merge::hf_tensors(
            model,
            true,
            crate::adapter::merge::Store::Float(candle_core::DType::F32),
        );
    }
}

/// A checkpoint (state.json, trainable.safetensors, optimizer.safetensors) read and checked
/// against a run of 5 steps of 4 rows over 10 domain and 4 general rows, as a resume does.
pub fn checkpoint(data: &[u8]) {
    let p = parts(data, 3);
    let dir = scratch("checkpoint");
    let step = "step-000001";
    write_files(
        &dir,
        &[
            (&format!("{step}/state.json"), p[0]),
            (&format!("{step}/trainable.safetensors"), p[1]),
            (&format!("{step}/optimizer.safetensors"), p[2]),
        ],
    );
    let Ok(mut ck) = checkpoint::load(&dir, &candle_core::Device::Cpu) else {
        return;
    };
    if ck.state.check(&[10, 4], 5, 4, &ck.dir).is_err() {
        return;
    }
    let params = checkpoint_params();
    if checkpoint::restore_params(&params, &ck.params, &ck.dir).is_ok() {
        let _ = checkpoint::check_moments(&params, &ck.moments, &ck.q8, ck.state.adam_t, &ck.dir);
    }
}
