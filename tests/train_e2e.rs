//! `strata train` end to end on a tiny synthetic GGUF: it learns, and the same seed gives the
//! same run bit for bit (dropout on), with a loadable PEFT adapter at the end.

use anyhow::Result;
use candle_core::quantized::GgmlDType;
use strata::model::config::Arch;
use strata::testing::write_tiny_gguf;
use strata::train::recipe::Recipe;

fn setup(dir: &std::path::Path) -> Result<()> {
    write_tiny_gguf(&dir.join("tiny.gguf"), Arch::Llama, true, 3, GgmlDType::F32)?;
    strata::testing::write_tiny_corpus(dir)
}

fn recipe(dir: &std::path::Path, out: &str) -> String {
    // The common tiny run, with a layer of its own rank.
    strata::testing::tiny_lora_recipe(dir, out, 12, 7, "").replace(
        "dropout = 0.1\n",
        "dropout = 0.1\n[[lora.layers]]\nlayers = \"0\"\nr = 8\n",
    )
}

fn losses(path: &std::path::Path) -> Result<Vec<f64>> {
    let text = std::fs::read_to_string(path)?;
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?.get("loss")?.as_f64())
        .collect())
}

#[test]
fn training_learns_and_is_reproducible() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("strata-e2e-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    setup(&dir)?;
    let mut runs = Vec::new();
    for out in ["run1", "run2"] {
        let text = recipe(&dir, out);
        let r = Recipe::parse(&text, "e2e.toml", &[])?;
        runs.push(strata::train::trainer::run(&r, &text)?);
    }
    let (a, b) = (&runs[0], &runs[1]);
    assert_eq!(a.eval_after, b.eval_after);
    assert_eq!(a.steps, 12);
    assert!(
        a.eval_after.loss < a.eval_before.loss,
        "held-out loss {} -> {}",
        a.eval_before.loss,
        a.eval_after.loss
    );
    let (la, lb) = (
        losses(&dir.join("run1/metrics.jsonl"))?,
        losses(&dir.join("run2/metrics.jsonl"))?,
    );
    assert_eq!(la.len(), 12);
    assert_eq!(la, lb, "same seed, different loss curve");
    let wa = std::fs::read(dir.join("run1/adapter/adapter_model.safetensors"))?;
    let wb = std::fs::read(dir.join("run2/adapter/adapter_model.safetensors"))?;
    assert_eq!(wa, wb, "same seed, different adapter bytes");
    // A different seed is a different run.
    let text = recipe(&dir, "run3").replace("seed = 7", "seed = 8");
    strata::train::trainer::run(&Recipe::parse(&text, "e2e.toml", &[])?, &text)?;
    assert_ne!(losses(&dir.join("run3/metrics.jsonl"))?, la);
    // The adapter loads back onto the model.
    let src = strata::model::open(&dir.join("tiny.gguf"))?;
    let mut m = strata::model::Model::load(
        &src.config,
        src.weights.as_ref(),
        strata::model::BaseDtype::F32,
        false,
        &candle_core::Device::Cpu,
    )?;
    let plan = strata::adapter::peft::load(&mut m, &dir.join("run1/adapter"))?;
    assert_eq!(plan.resolve(0, strata::model::Proj::Q)?.unwrap().r, 8);
    assert_eq!(plan.resolve(1, strata::model::Proj::Q)?.unwrap().r, 4);
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

fn fresh_dir(tag: &str) -> Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("strata-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    setup(&dir)?;
    Ok(dir)
}

fn train_with(text: &str, opts: strata::train::trainer::RunOptions) -> Result<strata::train::trainer::RunSummary> {
    strata::train::trainer::run_with(&Recipe::parse(text, "e2e.toml", &[])?, text, opts)
}

/// A run with general data mixed in at a scheduled share, LoRA+ and checkpoints every 6 steps.
fn mixed_recipe(dir: &std::path::Path, out: &str) -> String {
    recipe(dir, out).replace(
        "seq_len = 16",
        "seq_len = 16\ngeneral = [\"DIR/data/doc0.txt\"]\ndomain_share = 0.9\ndomain_share_end = 0.5\nmix_schedule = \"cosine\"",
    )
    .replace("DIR", &dir.display().to_string())
        + "checkpoint_every = 6\nkeep_checkpoints = 3\nloraplus_ratio = 4.0\n"
}

/// `recompute = "auto"` chooses against the budget when a run begins, and a resumed run keeps
/// that choice even where its own budget would choose otherwise.
#[test]
fn auto_recompute_is_chosen_once_per_run() -> Result<()> {
    let dir = fresh_dir("auto-recompute")?;
    let with = |out: &str, budget: &str| {
        mixed_recipe(&dir, out) + &format!("recompute = \"auto\"\nmemory_budget_gb = {budget}\n")
    };
    let whole = train_with(&with("whole", "1000"), Default::default())?;
    assert_eq!(
        whole.recompute, "off",
        "a budget that holds everything runs without recomputation"
    );
    let tight = train_with(&with("tight", "0.001"), Default::default())?;
    assert_eq!(
        tight.recompute, "blocks",
        "a budget nothing fits runs in the least memory"
    );
    let resumed = train_with(
        &with("resumed", "0.001"),
        strata::train::trainer::RunOptions {
            resume: Some(dir.join("whole/checkpoints/step-000006")),
            ..Default::default()
        },
    )?;
    assert_eq!(resumed.recompute, "off");
    assert_eq!(
        losses(&dir.join("whole/metrics.jsonl"))?,
        losses(&dir.join("resumed/metrics.jsonl"))?
    );
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn resume_continues_bit_exactly() -> Result<()> {
    let dir = fresh_dir("resume")?;
    let whole = train_with(&mixed_recipe(&dir, "whole"), Default::default())?;
    assert_eq!(whole.steps, 12);
    let ck = dir.join("whole/checkpoints");
    let kept: Vec<_> = std::fs::read_dir(&ck)?.map(|e| e.unwrap().file_name()).collect();
    assert_eq!(kept.len(), 2, "{kept:?}");
    // Continue a second run from the checkpoint at step 6, as a killed run would be.
    let resumed = train_with(
        &mixed_recipe(&dir, "resumed"),
        strata::train::trainer::RunOptions {
            resume: Some(ck.join("step-000006")),
            ..Default::default()
        },
    )?;
    assert_eq!(resumed.steps, 12);
    let (la, lb) = (
        losses(&dir.join("whole/metrics.jsonl"))?,
        losses(&dir.join("resumed/metrics.jsonl"))?,
    );
    assert_eq!(la.len(), 12);
    assert_eq!(la, lb, "resumed loss curve differs");
    // Steps 1-6 came from the checkpoint (timings included, byte for byte), not from a rerun.
    let text = |run: &str| std::fs::read_to_string(dir.join(run).join("metrics.jsonl")).unwrap();
    let (ta, tb) = (text("whole"), text("resumed"));
    let first7 = |t: &str| t.lines().take(7).map(String::from).collect::<Vec<_>>();
    assert_eq!(first7(&ta), first7(&tb));
    assert_ne!(
        ta.lines().nth(8),
        tb.lines().nth(8),
        "step 8 should have been recomputed (new timings)"
    );
    let wa = std::fs::read(dir.join("whole/adapter/adapter_model.safetensors"))?;
    let wb = std::fs::read(dir.join("resumed/adapter/adapter_model.safetensors"))?;
    assert_eq!(wa, wb, "resumed adapter bytes differ");
    assert_eq!(whole.eval_after, resumed.eval_after);
    // The mix moved from 0.9 towards 0.5, and LoRA B ran at 4x LoRA A's rate; both are logged.
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(dir.join("whole/metrics.jsonl"))?
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|v: &serde_json::Value| v.get("loss").is_some())
        .collect();
    let share = |i: usize| lines[i]["domain_share"].as_f64().unwrap();
    assert!(
        (share(0) - 0.9).abs() < 1e-9 && share(11) < 0.55,
        "{} {}",
        share(0),
        share(11)
    );
    let lr = &lines[5]["lr"];
    assert!((lr["lora_b"].as_f64().unwrap() / lr["lora_a"].as_f64().unwrap() - 4.0).abs() < 1e-9);
    // A wrong resume point is a clear error.
    let e = train_with(
        &mixed_recipe(&dir, "bad"),
        strata::train::trainer::RunOptions {
            resume: Some(dir.join("nowhere")),
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(format!("{e:#}").contains("no checkpoint found"), "{e:#}");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// Forces the micro-batch to change mid-run, as the memory monitor would.
struct ForceMicro {
    at: usize,
    micro: usize,
}

impl strata::train::callback::Callback for ForceMicro {
    fn name(&self) -> &str {
        "force_micro"
    }
    fn on_step_begin(&mut self, c: &mut strata::train::callback::Control) -> Result<()> {
        if c.step == self.at {
            c.set_micro_batch(self.micro);
        }
        Ok(())
    }
}

#[test]
fn changing_the_micro_batch_keeps_the_loss_curve() -> Result<()> {
    let dir = fresh_dir("micro")?;
    // 4 rows per step as one micro-batch of 4; then forced to 1 row (4 accumulated) at step 3.
    let text = |out: &str| recipe(&dir, out).replace("batch = 2\ngrad_accum = 2", "batch = 4\ngrad_accum = 1");
    train_with(&text("plain"), Default::default())?;
    train_with(
        &text("forced"),
        strata::train::trainer::RunOptions {
            callbacks: vec![Box::new(ForceMicro { at: 3, micro: 1 })],
            ..Default::default()
        },
    )?;
    let (a, b) = (
        losses(&dir.join("plain/metrics.jsonl"))?,
        losses(&dir.join("forced/metrics.jsonl"))?,
    );
    assert_eq!(a.len(), 12);
    for (x, y) in a.iter().zip(&b) {
        assert!(
            (x - y).abs() < 1e-4 * x.abs(),
            "loss {x} vs {y} after a micro-batch change"
        );
    }
    let micro: Vec<u64> = std::fs::read_to_string(dir.join("forced/metrics.jsonl"))?
        .lines()
        .filter_map(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()?
                .get("micro_batch")?
                .as_u64()
        })
        .collect();
    assert_eq!(&micro[..4], &[4, 4, 4, 1]);
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn out_of_memory_halves_the_micro_batch_and_retries() -> Result<()> {
    let mut c = strata::train::callback::Control {
        step: 0,
        total_steps: 1,
        weights: vec![1.0],
        legacy_domain_share: None,
        micro_batch: 8,
        effective_batch: 8,
        lr: Default::default(),
        stop: false,
    };
    let mut tries = Vec::new();
    let out = strata::train::trainer::with_oom_retry(&mut c, |m| {
        tries.push(m);
        if m > 2 {
            anyhow::bail!("CUDA_ERROR_OUT_OF_MEMORY: out of memory")
        }
        Ok(m * 10)
    })?;
    assert_eq!((out, tries, c.micro_batch), (20, vec![8, 4, 2], 2));
    // Other errors are not retried.
    let e = strata::train::trainer::with_oom_retry(&mut c, |_| -> Result<()> { anyhow::bail!("shape mismatch") });
    assert!(e.is_err());
    Ok(())
}

#[test]
fn modules_to_save_train_beside_adapters_and_round_trip() -> Result<()> {
    let dir = fresh_dir("mts")?;
    let text = recipe(&dir, "mts").replace(
        "dropout = 0.1",
        "dropout = 0.1\nmodules_to_save = [\"norm\", \"input_layernorm\", \"embed_tokens\"]",
    );
    let s = train_with(&text, Default::default())?;
    let src = strata::model::open(&dir.join("tiny.gguf"))?;
    let load = || {
        strata::model::Model::load(
            &src.config,
            src.weights.as_ref(),
            strata::model::BaseDtype::F32,
            false,
            &candle_core::Device::Cpu,
        )
    };
    let base = load()?;
    let mut m = load()?;
    let plan = strata::adapter::peft::load(&mut m, &dir.join("mts/adapter"))?;
    assert_eq!(plan.modules_to_save, vec!["norm", "input_layernorm", "embed_tokens"]);
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("mts/adapter/adapter_config.json"))?)?;
    assert_eq!(
        cfg["modules_to_save"],
        serde_json::json!(["model.norm", "input_layernorm", "embed_tokens"])
    );
    // The saved norms and embeddings moved during training, and the reloaded model scores the
    // held-out rows exactly as the trained one did.
    let names = [
        "model.norm.weight",
        "model.layers.0.input_layernorm.weight",
        "model.embed_tokens.weight",
    ];
    let mods: Vec<String> = plan.modules_to_save.clone();
    let (tb, tm) = (base.savable(&mods)?, m.savable(&mods)?);
    for name in names {
        let a = tb.iter().find(|(n, _)| n == name).unwrap().1;
        let b = tm.iter().find(|(n, _)| n == name).unwrap().1;
        let d: f32 = (a - b)?.abs()?.max_all()?.to_scalar()?;
        assert!(d > 0.0, "{name} did not train");
    }
    let r = Recipe::parse(&text, "e2e.toml", &[])?;
    let held = strata::train::trainer::load_sequences(&r, &src.tokenizer, &r.data.train)?.split_off(0.2);
    let after = strata::eval::eval_sequences(&m, &held, 2, strata::model::Fwd::eval())?;
    assert_eq!(
        after, s.eval_after,
        "reloaded adapter + saved modules score differently"
    );
    let without = strata::eval::eval_sequences(&base, &held, 2, strata::model::Fwd::eval())?;
    assert_ne!(without, after);
    assert!(s.trainable_params > 0);
    // A module that cannot be saved is refused with the choices named.
    let bad = text.replace("\"embed_tokens\"]", "\"q_proj\"]");
    let e = Recipe::parse(&bad, "e2e.toml", &[])?.plan(3).unwrap_err();
    assert!(format!("{e:#}").contains("choose from"), "{e:#}");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// Poisons the learning rate at one step, so the weights turn NaN and later losses are not finite.
struct PoisonLr(usize);

impl strata::train::callback::Callback for PoisonLr {
    fn name(&self) -> &str {
        "poison_lr"
    }
    fn on_step_begin(&mut self, c: &mut strata::train::callback::Control) -> Result<()> {
        if c.step == self.0 {
            c.lr.values_mut().for_each(|v| *v = f64::NAN);
        }
        Ok(())
    }
}

#[test]
fn non_finite_steps_are_skipped_then_stop_the_run_keeping_the_last_good_checkpoint() -> Result<()> {
    let dir = fresh_dir("nan")?;
    let text = recipe(&dir, "nan") + "checkpoint_every = 2\nkeep_checkpoints = 5\nmax_bad_steps = 3\n";
    let e = train_with(
        &text,
        strata::train::trainer::RunOptions {
            callbacks: vec![Box::new(PoisonLr(4))],
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(format!("{e:#}").contains("not finite for 3 steps in a row"), "{e:#}");
    // Step 5's update wrote NaNs; steps 6-8 were skipped and logged; no checkpoint after step 4.
    let ck = strata::train::checkpoint::list(&dir.join("nan/checkpoints"))?;
    let last = ck.last().unwrap();
    assert!(last.ends_with("step-000004"), "{last:?}");
    let saved = candle_core::safetensors::load(last.join("trainable.safetensors"), &candle_core::Device::Cpu)?;
    for (n, t) in saved {
        let s: f32 = t.sqr()?.sum_all()?.to_scalar()?;
        assert!(s.is_finite(), "{n} is not finite in the last checkpoint");
    }
    let skipped = std::fs::read_to_string(dir.join("nan/metrics.jsonl"))?
        .lines()
        .filter(|l| l.contains("\"skipped\":true"))
        .count();
    assert_eq!(skipped, 3);
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn retention_terms_are_logged_and_the_fisher_is_reused() -> Result<()> {
    let dir = fresh_dir("retain")?;
    let fisher = dir.join("fisher.safetensors");
    let text = |out: &str| {
        recipe(&dir, out).replace(
            "seq_len = 16",
            &format!(
                "seq_len = 16\ngeneral = [\"{0}/data/doc1.txt\", \"{0}/data/doc2.txt\"]\ndomain_share = 0.5",
                dir.display()
            ),
        ) + &format!(
            "[retain]\nfisher = \"{}\"\nfisher_data = [\"{}/data/doc3.txt\"]\nfisher_rows = 4\newc_lambda = 50.0\ncontrastive_lambda = 0.1\nsegment = 4\n",
            fisher.display(),
            dir.display()
        )
    };
    let text = |out: &str| text(out).replace("batch = 2\ngrad_accum = 2", "batch = 4\ngrad_accum = 1");
    train_with(&text("a"), Default::default())?;
    assert!(fisher.exists() && dir.join("fisher.safetensors.json").exists());
    let stamp = std::fs::metadata(&fisher)?.modified()?;
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(dir.join("a/metrics.jsonl"))?
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|v: &serde_json::Value| v.get("ce").is_some())
        .collect();
    // Step 1 starts at the anchor (EWC 0); later steps have moved away from it.
    assert_eq!(lines[0]["ewc"].as_f64(), Some(0.0));
    assert!(lines[5]["ewc"].as_f64().unwrap() > 0.0);
    assert!(lines.iter().all(|v| v["contrastive"].as_f64().unwrap() > 0.0));
    for v in &lines {
        let total = v["ce"].as_f64().unwrap() + v["ewc"].as_f64().unwrap() + 0.1 * v["contrastive"].as_f64().unwrap();
        assert!((total - v["loss"].as_f64().unwrap()).abs() < 1e-9);
    }
    // A second run reuses the Fisher file and repeats the run exactly.
    train_with(&text("b"), Default::default())?;
    assert_eq!(std::fs::metadata(&fisher)?.modified()?, stamp);
    assert_eq!(
        losses(&dir.join("a/metrics.jsonl"))?,
        losses(&dir.join("b/metrics.jsonl"))?
    );
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// QLoRA with the layered policy on a tiny model: layer 0 frozen in bf16, layer 1 in NF4 with
/// double quantization. Training lowers the held-out loss, the adapter records the base it was
/// trained against, and merging folds it into that base (dequantized NF4 + s B A), which
/// reproduces the training-time model far better than folding it into the original weights.
#[test]
fn qlora_layered_trains_and_merges_into_the_base_it_saw() -> Result<()> {
    let dir = fresh_dir("qlora")?;
    let text = recipe(&dir, "q")
        .replace("[model]\n", "[model]\nbase_dtype = \"nf4-dq\"\n")
        .replace("layers = \"0\"\nr = 8", "layers = \"0\"\nr = 8\nbase = \"bf16\"");
    let s = train_with(&text, Default::default())?;
    assert!(
        s.eval_after.loss < s.eval_before.loss,
        "held-out loss {} -> {}",
        s.eval_before.loss,
        s.eval_after.loss
    );
    let adapter = dir.join("q/adapter");
    let (base, per) = strata::adapter::peft::recorded_bases(&adapter)?.expect("base record");
    assert_eq!(base, strata::model::BaseDtype::Nf4Dq);
    assert_eq!(per["model.layers.0.self_attn.q_proj"], strata::model::BaseDtype::Bf16);
    assert_eq!(per["model.layers.1.mlp.down_proj"], strata::model::BaseDtype::Nf4Dq);

    let gguf = dir.join("tiny.gguf");
    let ids = candle_core::Tensor::new(&[[1u32, 5, 9, 3, 7, 2, 8, 4]], &candle_core::Device::Cpu)?;
    let logits = |m: &strata::model::Model| m.logits(&ids, strata::model::Fwd::eval(), None);
    let (src, seen) = strata::adapter::open_adapted(&gguf, Some(&adapter), None, &candle_core::Device::Cpu, true)?;
    let seen_logits = logits(&seen)?;
    strata::adapter::merge::write_hf_dir(
        &seen,
        &src.tokenizer,
        &dir.join("merged"),
        true,
        strata::adapter::merge::Store::Float(candle_core::DType::F32),
    )?;
    let (_, merged) = strata::adapter::open_adapted(
        &dir.join("merged"),
        None,
        Some(strata::model::BaseDtype::F32),
        &candle_core::Device::Cpu,
        true,
    )?;
    let (_, naive) = strata::adapter::open_adapted(
        &gguf,
        Some(&adapter),
        Some(strata::model::BaseDtype::F32),
        &candle_core::Device::Cpu,
        true,
    )?;
    let gap =
        |a: &candle_core::Tensor| -> Result<f32> { Ok((a - &seen_logits)?.abs()?.max_all()?.to_scalar::<f32>()?) };
    let (faithful, onto_original) = (gap(&logits(&merged)?)?, gap(&logits(&naive)?)?);
    assert!(
        faithful < 0.25 * onto_original,
        "merged into the NF4 base: {faithful}; onto the original weights: {onto_original}"
    );
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// Distillation to the base (adapters off) on the general rows: zero while the adapter is still
/// zero, logged beside the other terms, and holding the adapted model's distribution on those
/// rows far closer to the base's than the same run without it (a weight of 1e-9 measures the
/// KL without acting on it).
#[test]
fn distillation_holds_the_general_rows_to_the_base() -> Result<()> {
    let dir = fresh_dir("distill")?;
    let text = |out: &str, lambda: f64| {
        recipe(&dir, out)
            .replace(
                "seq_len = 16",
                &format!(
                    "seq_len = 16\ngeneral = [\"{0}/data/doc1.txt\", \"{0}/data/doc2.txt\"]\ndomain_share = 0.5",
                    dir.display()
                ),
            )
            .replace("batch = 2\ngrad_accum = 2", "batch = 4\ngrad_accum = 1")
            .replace("lr = 1e-2", "lr = 3e-2")
            .replace("steps = 12", "steps = 16")
            + &format!("[retain]\ndistill_lambda = {lambda}\n")
    };
    let metrics = |out: &str| -> Result<Vec<serde_json::Value>> {
        Ok(std::fs::read_to_string(dir.join(out).join("metrics.jsonl"))?
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .filter(|v: &serde_json::Value| v.get("ce").is_some())
            .collect())
    };
    train_with(&text("probe", 1e-9), Default::default())?;
    train_with(&text("held", 5.0), Default::default())?;
    let (probe, held) = (metrics("probe")?, metrics("held")?);
    assert!(
        held[0]["distill"].as_f64().unwrap() < 1e-6,
        "a zero adapter is the base"
    );
    for v in &held {
        let total = v["ce"].as_f64().unwrap() + 5.0 * v["distill"].as_f64().unwrap();
        assert!((total - v["loss"].as_f64().unwrap()).abs() < 1e-9);
    }
    let tail = |m: &[serde_json::Value]| {
        m[m.len() - 4..]
            .iter()
            .map(|v| v["distill"].as_f64().unwrap())
            .sum::<f64>()
    };
    let (free, kept) = (tail(&probe), tail(&held));
    assert!(
        free > 0.0 && kept < 0.5 * free,
        "KL to the base: {kept} with distillation, {free} without"
    );
    // Full fine-tuning distils to a frozen copy of the base (its own head; the trained head gets
    // the term's gradient too): zero at the first step in f32, within bf16's rounding under
    // mixed precision, and holding the distribution as under LoRA.
    let full = |out: &str, lambda: f64, precision: &str| {
        text(out, lambda)
            .replace(
                "[lora]\nr = 4\nalpha = 8\ndropout = 0.1\n[[lora.layers]]\nlayers = \"0\"\nr = 8\n",
                "",
            )
            .replace(
                "[train]",
                &format!("[train]\nmode = \"full\"\nprecision = \"{precision}\""),
            )
            .replace("lr = 3e-2", "lr = 1e-2")
    };
    assert!(!full("x", 1.0, "f32").contains("[lora]"));
    train_with(&full("full-probe", 1e-9, "f32"), Default::default())?;
    train_with(&full("full-held", 5.0, "f32"), Default::default())?;
    let (probe, held) = (metrics("full-probe")?, metrics("full-held")?);
    assert!(
        held[0]["distill"].as_f64().unwrap() < 1e-6,
        "the first step's model is the base"
    );
    let (free, kept) = (tail(&probe), tail(&held));
    assert!(
        free > 0.0 && kept < 0.5 * free,
        "full fine-tuning, KL to the base: {kept} with distillation, {free} without"
    );
    train_with(&full("full-bf16", 5.0, "auto"), Default::default())?;
    let first = metrics("full-bf16")?[0]["distill"].as_f64().unwrap();
    assert!(first < 1e-3, "bf16 copy against bf16 working weights: KL {first}");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// Whether a test may skip for want of an outside tool: not under `scripts/test.sh`, which
/// installs them and sets `STRATA_REQUIRE_TOOLS=1`.
fn tool_missing(what: &str) -> bool {
    if std::env::var_os("STRATA_REQUIRE_TOOLS").is_some() {
        panic!("{what} is missing; scripts/test-deps.sh installs it");
    }
    eprintln!("skipped: {what} is missing (scripts/test-deps.sh installs it)");
    true
}

/// `train.log = ["tensorboard"]` writes event files whose scalars are the metrics lines'
/// numbers, read back by strata's decoder (every CRC checked) and by TensorBoard's own reader.
#[test]
fn tensorboard_event_files_hold_the_metrics() -> Result<()> {
    let dir = fresh_dir("tb")?;
    let text = recipe(&dir, "tb") + "eval_every = 4\nlog = [\"jsonl\", \"tensorboard\"]\n";
    train_with(&text, Default::default())?;
    let run = dir.join("tb");
    let mut want: std::collections::BTreeMap<String, Vec<(i64, f32)>> = Default::default();
    for line in std::fs::read_to_string(run.join("metrics.jsonl"))?.lines() {
        let v: serde_json::Value = serde_json::from_str(line)?;
        let step = v["step"].as_i64().unwrap_or(0);
        for (tag, x) in strata::train::tensorboard::scalars_of(&v) {
            want.entry(tag).or_default().push((step, x));
        }
    }
    assert!(want["loss"].len() == 12 && want.contains_key("lr/lora_a") && want.contains_key("eval/loss"));
    let files: Vec<_> = std::fs::read_dir(&run)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("events.out.tfevents.")
        })
        .collect();
    assert_eq!(files.len(), 1);
    let mut got: std::collections::BTreeMap<String, Vec<(i64, f32)>> = Default::default();
    for ev in strata::train::tensorboard::read_events(&files[0])? {
        for (tag, x) in ev.values {
            got.entry(tag).or_default().push((ev.step, x));
        }
    }
    assert_eq!(got, want);
    let have_tb = std::process::Command::new("python3")
        .args(["-c", "import tensorboard"])
        .status()
        .is_ok_and(|s| s.success());
    if !have_tb && tool_missing("the tensorboard Python package") {
        return Ok(());
    }
    let out = std::process::Command::new("python3")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/tensorboard_check.py"))
        .arg(&run)
        .output()?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let theirs: std::collections::BTreeMap<String, Vec<(i64, f32)>> = serde_json::from_slice(&out.stdout)?;
    assert_eq!(theirs, want, "TensorBoard reads the same series");
    Ok(())
}

/// A user's Parquet data sets train as they are: alpaca and sharegpt rows (pyarrow-written
/// fixtures, nested columns), a tiny GGUF with a ChatML template; the loss falls. A JSONL file
/// with bad rows beside them trains with `data.bad_rows = "skip"` and stops without it.
#[test]
fn parquet_alpaca_and_sharegpt_sets_train_as_they_are() -> Result<()> {
    let dir = fresh_dir("parquet")?;
    add_chat_template(&dir.join("tiny.gguf"))?;
    let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/parquet");
    for format in ["alpaca", "sharegpt"] {
        let text = recipe(&dir, format)
            .replace(
                &format!("train = [\"{}/data\"]", dir.display()),
                &format!("train = [\"{fixtures}/{format}.parquet\"]\neval = [\"{fixtures}/{format}.json\"]\nformat = \"{format}\""),
            )
            .replace("seq_len = 16", "seq_len = 128")
            .replace("grad_accum = 2", "grad_accum = 1");
        let s = train_with(&text, Default::default())?;
        let l = losses(&dir.join(format).join("metrics.jsonl"))?;
        assert!(l.len() >= 12 && l[l.len() - 1] < l[0], "{format}: {l:?}");
        assert!(s.steps == 12, "{format}");
    }
    let bad = dir.join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"instruction\": \"a\", \"output\": \"the\"}\n{\"instruction\": 3}\n{\"instruction\": \"b\", \"output\": \"the the\"}\n",
    )?;
    let text = |skip: bool| {
        recipe(&dir, "bad")
            .replace(
                &format!("train = [\"{}/data\"]", dir.display()),
                &format!(
                    "train = [\"{}\"]\nformat = \"alpaca\"\neval_fraction = 0.4\n{}",
                    bad.display(),
                    if skip { "bad_rows = \"skip\"" } else { "" }
                ),
            )
            .replace("seq_len = 16", "seq_len = 48")
    };
    let e = format!(
        "{:#}",
        train_with(&text(false).replace("eval_fraction = 0.2\n", ""), Default::default()).unwrap_err()
    );
    assert!(e.contains("bad.jsonl:2") && e.contains("`instruction`"), "{e}");
    train_with(&text(true).replace("eval_fraction = 0.2\n", ""), Default::default())?;
    Ok(())
}

/// Full fine-tuning in bf16 mixed precision with 8-bit AdamW moments: the optimizer file holds
/// the block-quantized moments, and a run resumed from a checkpoint ends on the same weights,
/// byte for byte, as the run that was never stopped. A resume with the other optimizer is
/// refused, naming it.
#[test]
fn full_finetuning_with_8bit_adamw_resumes_bit_exactly() -> Result<()> {
    let dir = fresh_dir("adam8")?;
    let full = |out: &str, optimizer: &str| {
        strata::testing::tiny_lora_recipe(&dir, out, 12, 3, "")
            .replace("[lora]\nr = 4\nalpha = 8\ndropout = 0.1\n", "")
            .replace("lr = 1e-2", "lr = 1e-3")
            .replace(
                "[train]\n",
                &format!("[train]\nmode = \"full\"\noptimizer = \"{optimizer}\"\ncheckpoint_every = 6\nkeep_checkpoints = 3\n"),
            )
    };
    let whole = train_with(&full("whole", "adamw8bit"), Default::default())?;
    assert_eq!(whole.steps, 12);
    let ck = dir.join("whole/checkpoints");
    let opt = candle_core::safetensors::load(ck.join("step-000012/optimizer.safetensors"), &candle_core::Device::Cpu)?;
    assert!(
        opt.keys().any(|k| k.starts_with("m8.")) && opt.keys().any(|k| k.starts_with("m.")),
        "8-bit moments for the large tensors, f32 for the small: {:?}",
        opt.keys().collect::<Vec<_>>()
    );
    let resume = |out: &str, optimizer: &str| {
        train_with(
            &full(out, optimizer),
            strata::train::trainer::RunOptions {
                resume: Some(ck.join("step-000006")),
                ..Default::default()
            },
        )
    };
    resume("resumed", "adamw8bit")?;
    let (la, lb) = (
        losses(&dir.join("whole/metrics.jsonl"))?,
        losses(&dir.join("resumed/metrics.jsonl"))?,
    );
    assert_eq!(la, lb, "resumed loss curve differs");
    let bytes = |run: &str| std::fs::read(dir.join(run).join("checkpoints/step-000012/trainable.safetensors"));
    assert_eq!(bytes("whole")?, bytes("resumed")?, "resumed weights differ");
    let e = resume("other", "adamw").unwrap_err();
    assert!(format!("{e:#}").contains("adamw8bit"), "{e:#}");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// Named sources: the domain/general pair and the same two sources as `[[data.sources]]` at
/// the same weights train identically (same rows, same losses); three sources at 5:3:2, one in
/// its own format (alpaca rows beside raw text), get exactly their shares of the run's rows.
#[test]
fn named_sources_mix_by_weight_and_the_pair_is_their_two_source_case() -> Result<()> {
    let dir = fresh_dir("sources")?;
    std::fs::create_dir_all(dir.join("general"))?;
    for i in 0..4 {
        let text = format!("a bird {i} flew over the hill and the river. ").repeat(8);
        std::fs::write(dir.join(format!("general/g{i}.txt")), text)?;
    }
    let rows: String = (0..12)
        .map(|i| format!("{{\"instruction\": \"the cat {i}\", \"output\": \"sat on the mat\"}}\n"))
        .collect();
    std::fs::write(dir.join("alpaca.jsonl"), rows)?;
    let d = dir.display();
    let base = |out: &str| strata::testing::tiny_lora_recipe(&dir, out, 10, 5, "");
    let pair = base("pair").replace(
        &format!("train = [\"{d}/data\"]"),
        &format!("train = [\"{d}/data\"]\ngeneral = [\"{d}/general\"]\ndomain_share = 0.75"),
    );
    // The sources replace `train`; their tables go at the end (TOML allows them after [train]).
    let with_sources = |out: &str, tables: &str| {
        base(out).replace(
            &format!("train = [\"{d}/data\"]"),
            &format!("eval = [\"{d}/data/doc0.txt\"]"),
        ) + tables
    };
    let named = with_sources(
        "named",
        &format!(
            "[[data.sources]]\nname = \"cats\"\ntrain = [\"{d}/data\"]\nweight = 0.75\n\
             [[data.sources]]\nname = \"birds\"\ntrain = [\"{d}/general\"]\nweight = 0.25\ngeneral = true\n"
        ),
    );
    // The pair with the same held-out file.
    let pair = pair.replace(
        &format!("train = [\"{d}/data\"]"),
        &format!("train = [\"{d}/data\"]\neval = [\"{d}/data/doc0.txt\"]"),
    );
    train_with(&pair, Default::default())?;
    train_with(&named, Default::default())?;
    assert_eq!(
        losses(&dir.join("pair/metrics.jsonl"))?,
        losses(&dir.join("named/metrics.jsonl"))?
    );

    // The ChatML rows need more than the tiny recipe's 16 tokens.
    let three = with_sources(
        "three",
        &format!(
            "[[data.sources]]\nname = \"cats\"\ntrain = [\"{d}/data\"]\nweight = 5\n\
             [[data.sources]]\nname = \"birds\"\ntrain = [\"{d}/general\"]\nweight = 3\n\
             [[data.sources]]\nname = \"qa\"\ntrain = [\"{d}/alpaca.jsonl\"]\nweight = 2\nformat = \"alpaca\"\n"
        ),
    )
    .replace("seq_len = 16", "seq_len = 48");
    add_chat_template(&dir.join("tiny.gguf"))?;
    train_with(&three, Default::default())?;
    let text = std::fs::read_to_string(dir.join("three/metrics.jsonl"))?;
    let last = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .rfind(|v| v.get("shares_realised").is_some())
        .expect("a step line with shares");
    // 10 steps of 4 rows: 20, 12 and 8 rows.
    for (name, want) in [("cats", 0.5), ("birds", 0.3), ("qa", 0.2)] {
        let got = last["shares_realised"][name].as_f64().unwrap();
        assert!((got - want).abs() < 1e-12, "{name}: {got}");
    }
    Ok(())
}

/// Gives the tiny GGUF a ChatML template, so that chat-format data can be rendered.
fn add_chat_template(gguf: &std::path::Path) -> Result<()> {
    let mut raw = strata::testing::RawGguf::read(gguf)?;
    raw.kvs.push((
        "tokenizer.chat_template".into(),
        candle_core::quantized::gguf_file::Value::String(
            "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}".into(),
        ),
    ));
    raw.write(gguf)
}

/// Packing with document boundaries (`data.packing = "documents"`) trains end to end: the
/// held-out loss falls, and the run differs from stream packing (the boundaries change what
/// is attended and trained on).
#[test]
fn packing_by_documents_trains() -> Result<()> {
    let dir = fresh_dir("packing")?;
    let d = dir.display();
    let text = |out: &str, packing: &str| {
        strata::testing::tiny_lora_recipe(&dir, out, 12, 3, "")
            .replace(
                &format!("train = [\"{d}/data\"]"),
                &format!("train = [\"{d}/data\"]\npacking = \"{packing}\""),
            )
            .replace("seq_len = 16", "seq_len = 64")
    };
    let s = train_with(&text("docs", "documents"), Default::default())?;
    assert!(
        s.eval_after.loss < s.eval_before.loss,
        "held-out loss {} -> {}",
        s.eval_before.loss,
        s.eval_after.loss
    );
    train_with(&text("stream", "stream"), Default::default())?;
    assert_ne!(
        losses(&dir.join("docs/metrics.jsonl"))?,
        losses(&dir.join("stream/metrics.jsonl"))?
    );
    // The default packs by documents on the CPU (the same run as `documents`), as a stream on
    // a GPU.
    let auto = strata::testing::tiny_lora_recipe(&dir, "auto", 12, 3, "").replace("seq_len = 16", "seq_len = 64");
    let r = strata::train::recipe::Recipe::parse(&auto, "auto.toml", &[])?;
    assert_eq!(r.data.packing, strata::train::recipe::Packing::Auto);
    assert!(r.data.packing.by_documents(true) && !r.data.packing.by_documents(false));
    train_with(&auto, Default::default())?;
    assert_eq!(
        losses(&dir.join("docs/metrics.jsonl"))?,
        losses(&dir.join("auto/metrics.jsonl"))?
    );
    let e = format!(
        "{:#}",
        train_with(&text("bad", "rows"), Default::default()).unwrap_err()
    );
    assert!(e.contains("data.packing"), "{e}");
    Ok(())
}
