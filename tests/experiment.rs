//! `strata experiment` end to end on a tiny synthetic model: every run trains and is evaluated
//! in its own process, and the table, the results and the HTML report come out.

use anyhow::Result;
use candle_core::quantized::GgmlDType;
use std::process::Command;
use strata::model::config::Arch;
use strata::testing::write_tiny_gguf;
use strata::train::recipe::Recipe;

#[test]
fn experiment_runs_every_recipe_and_writes_the_table_and_report() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("strata-exp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("data"))?;
    write_tiny_gguf(&dir.join("tiny.gguf"), Arch::Llama, true, 3, GgmlDType::F32)?;
    for (name, text) in [
        ("dom", "the bank lends the money at a rate. "),
        ("gen", "the cat sat on the mat. "),
    ] {
        std::fs::write(dir.join(format!("data/{name}.txt")), text.repeat(40))?;
        std::fs::write(dir.join(format!("data/{name}-held.txt")), text.repeat(6))?;
    }
    let mc = |ctx: &str, a: &str, b: &str| {
        format!("{{\"context\": \"{ctx} \", \"choices\": [\"{a}\", \"{b}\"], \"answer\": 0}}\n")
    };
    std::fs::write(
        dir.join("data/dmc.jsonl"),
        mc("the bank lends the", "money", "cat").repeat(3),
    )?;
    std::fs::write(
        dir.join("data/gmc.jsonl"),
        mc("the cat sat on the", "mat", "rate").repeat(3),
    )?;
    std::fs::write(dir.join("data/gmc2.jsonl"), mc("the cat sat", "on", "bank").repeat(3))?;
    let d = dir.display();
    let recipe = |extra: &str| {
        format!(
            "[model]\npath = \"{d}/tiny.gguf\"\n[lora]\nr = 4\n[data]\ntrain = [\"{d}/data/dom.txt\"]\n{extra}eval = [\"{d}/data/dom-held.txt\"]\nseq_len = 16\n[train]\nbatch = 2\nlr = 1e-2\n"
        )
    };
    std::fs::write(dir.join("lora.toml"), recipe(""))?;
    std::fs::write(
        dir.join("retain.toml"),
        recipe(&format!("general = [\"{d}/data/gen.txt\"]\ndomain_share = 0.5\n"))
            + &format!("[retain]\nfisher = \"{d}/fisher.safetensors\"\nfisher_data = [\"{d}/data/gen.txt\"]\nfisher_rows = 3\newc_lambda = 10.0\ncontrastive_lambda = 0.1\nsegment = 8\n"),
    )?;
    std::fs::write(
        dir.join("exp.toml"),
        format!(
            "name = \"tiny\"\nout = \"{d}/full\"\ntokens = 256\nreference = \"plain LoRA\"\nset = [\"train.lr=2e-2\"]\n[eval]\ngeneral_mc = [\"{d}/data/gmc.jsonl\", \"{d}/data/gmc2.jsonl\"]\ndomain_mc = \"{d}/data/dmc.jsonl\"\ntext = [\"{d}/data/dom-held.txt\", \"{d}/data/gen-held.txt\"]\nseq_len = 16\n\
             [quick]\ntokens = 96\nmc_items = 2\ntext_rows = 2\nout = \"{d}/quick\"\n\
             [[prepare]]\nname = \"self replay\"\nout = \"{d}/self/replay.jsonl\"\nargs = [\"generate\", \"--samples\", \"3\", \"--max-tokens\", \"6\", \"--temperature\", \"1\"]\n\
             [[run]]\nname = \"plain LoRA\"\nrecipe = \"{d}/lora.toml\"\nmethod = \"LoRA\"\n\
             [[run]]\nname = \"LoRA, lr 3e-2\"\nrecipe = \"{d}/lora.toml\"\nset = [\"train.lr=3e-2\"]\nmethod = \"LoRA\"\ntokens = 512\n[[run]]\nname = \"LoRA + EWC\"\nrecipe = \"{d}/retain.toml\"\nreference = \"LoRA, lr 3e-2\"\n"
        ),
    )?;
    let out = Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(["experiment", &dir.join("exp.toml").display().to_string(), "--quick"])
        .output()?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let q = dir.join("quick");
    // The prepared file exists (three sampled documents) and is kept for the next experiment.
    let replay = std::fs::read_to_string(dir.join("self/replay.jsonl"))?;
    assert!(
        replay.lines().count() <= 3 && replay.contains("self-generated"),
        "{replay}"
    );
    let table = std::fs::read_to_string(q.join("table.md"))?;
    assert!(
        table.contains("| plain LoRA |") && table.contains("| LoRA + EWC |"),
        "{table}"
    );
    assert!(
        table.contains("data/gmc2 acc") && table.contains("data/dom-held ppl"),
        "{table}"
    );
    assert!(
        table.contains("3 steps"),
        "96 tokens / (2 rows x 16) = 3 steps: {table}"
    );
    let results: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(q.join("results.json"))?)?;
    for (i, r) in results["runs"].as_array().unwrap().iter().enumerate() {
        // The second run's own budget (512 tokens) is scaled as the experiment's (256 -> 96).
        assert_eq!(r["steps"], if i == 1 { 6 } else { 3 });
        assert!(r["peak_rss_bytes"].as_u64().unwrap() > 0);
        assert_eq!(r["general"]["items"], 2);
        assert_eq!(
            r["mc"].as_array().unwrap().len(),
            3,
            "two general sets and one domain set"
        );
        let text = r["text"].as_array().unwrap();
        assert_eq!(text.len(), 2);
        let ratio = &text[0]["ratio"];
        assert!(ratio[1].as_f64().unwrap() <= ratio[0].as_f64().unwrap());
        assert!(ratio[0].as_f64().unwrap() <= ratio[2].as_f64().unwrap());
    }
    let html = std::fs::read_to_string(q.join("report.html"))?;
    assert!(html.matches("<svg").count() == 2 && html.contains("learning vs forgetting"));
    assert_eq!(
        html.matches("stroke=\"#888888\"").count(),
        1,
        "the LoRA sweep is one frontier line"
    );
    assert!(dir.join("fisher.safetensors").exists());
    // The experiment's `set` reaches every recipe, and a run's own `set` overrides it.
    let lr = |run: &str| -> Result<f64> { Ok(Recipe::load(&q.join(run).join("recipe.toml"), &[])?.train.lr) };
    assert_eq!((lr("plain-lora")?, lr("lora-lr-3e-2")?), (2e-2, 3e-2));
    assert!(
        table.contains("LoRA, lr 3e-2: 192 (6 steps)"),
        "the run with its own budget is named in the note: {table}"
    );
    let n = results["runs"].as_array().unwrap().len();
    // Every other run's learning is read against the reference's: a table when the reference
    // learned clearly, a sentence saying so when not; the shares are in the results either way.
    assert!(
        table.contains("share of plain LoRA's [95%]") || table.contains("plain LoRA learned nothing clear"),
        "{table}"
    );
    // A run naming its own reference is read against it, in a group of its own.
    let groups: Vec<(&str, Vec<&str>)> = results["shares"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| {
            let runs = g["runs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r["name"].as_str().unwrap());
            (g["reference"].as_str().unwrap(), runs.collect())
        })
        .collect();
    assert_eq!(
        groups,
        [
            ("plain LoRA", vec!["LoRA, lr 3e-2"]),
            ("LoRA, lr 3e-2", vec!["LoRA + EWC"])
        ]
    );
    assert!(
        table.contains(&format!(
            "{n} runs: {} of 96 training tokens{}",
            n - 1,
            if n > 2 { " each" } else { " (" }
        )),
        "the usual budget is said of the runs on it: {table}"
    );

    // --reuse keeps every finished step whose inputs are unchanged: the same table, nothing rerun.
    let reuse = || -> Result<String> {
        let out = Command::new(env!("CARGO_BIN_EXE_strata"))
            .args([
                "experiment",
                &dir.join("exp.toml").display().to_string(),
                "--quick",
                "--reuse",
            ])
            .output()?;
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{err}");
        Ok(err)
    };
    let err = reuse()?;
    assert_eq!(
        err.matches("kept from an earlier sitting").count(),
        4,
        "base and three runs: {err}"
    );
    assert_eq!(std::fs::read_to_string(q.join("table.md"))?, table);
    // --run picks runs by name (the others are left alone); a name no run has is an error that
    // lists the names.
    let pick = |names: &[&str]| -> Result<std::process::Output> {
        let mut args = vec!["experiment".to_string(), dir.join("exp.toml").display().to_string()];
        args.extend(["--quick".into(), "--reuse".into()]);
        for n in names {
            args.extend(["--run".to_string(), n.to_string()]);
        }
        Ok(Command::new(env!("CARGO_BIN_EXE_strata")).args(args).output()?)
    };
    let out = pick(&["LoRA + EWC"])?;
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{err}");
    assert_eq!(
        err.matches("kept from an earlier sitting").count(),
        2,
        "base and one run: {err}"
    );
    let one = std::fs::read_to_string(q.join("table.md"))?;
    assert!(
        one.contains("| LoRA + EWC |") && !one.contains("| plain LoRA |"),
        "{one}"
    );
    let out = pick(&["LoRA + EWC", "no such run"])?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("--run names `no such run`") && err.contains("runs: plain LoRA; "),
        "{err}"
    );
    // An edited recipe reruns the runs that read it, and only those.
    let lora = std::fs::read_to_string(dir.join("lora.toml"))?;
    std::fs::write(dir.join("lora.toml"), lora.replace("lr = 1e-2", "lr = 2e-2"))?;
    let err = reuse()?;
    assert!(
        err.contains("LoRA + EWC (3 steps): kept") && err.contains("the base model: kept"),
        "{err}"
    );
    assert!(
        err.contains("plain LoRA (3 steps)\n") && err.contains("LoRA, lr 3e-2 (6 steps)\n"),
        "{err}"
    );
    assert_eq!((lr("plain-lora")?, lr("lora-lr-3e-2")?), (2e-2, 3e-2));
    // So does an edited data file, read through a recipe and named by no argument: the general
    // text only the EWC run replays (and estimates its Fisher on).
    let gen = std::fs::read_to_string(dir.join("data/gen.txt"))?;
    std::fs::write(dir.join("data/gen.txt"), gen + "a changed line of general text.\n")?;
    let err = reuse()?;
    assert!(
        err.contains("LoRA + EWC (3 steps)\n") && err.contains("plain LoRA (3 steps): kept"),
        "{err}"
    );
    std::fs::write(dir.join("lora.toml"), lora)?;
    // --finished-only runs nothing: the runs whose recipe changed since are listed as not
    // finished, the others reported as kept.
    let out = Command::new(env!("CARGO_BIN_EXE_strata"))
        .args([
            "experiment",
            &dir.join("exp.toml").display().to_string(),
            "--quick",
            "--finished-only",
        ])
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("LoRA + EWC (3 steps): kept") && !err.contains("plain LoRA (3 steps)\n"),
        "{err}"
    );
    let partial = std::fs::read_to_string(q.join("table.md"))?;
    assert!(
        partial.contains("| plain LoRA | not finished yet |") && partial.contains("| LoRA + EWC |"),
        "{partial}"
    );
    assert_eq!(
        (lr("plain-lora")?, lr("lora-lr-3e-2")?),
        (2e-2, 3e-2),
        "nothing was rerun"
    );
    // A broken run is reported, not hidden, and the others still finish.
    std::fs::write(dir.join("lora.toml"), recipe("").replace("dom.txt", "nothing.txt"))?;
    let out = Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(["experiment", &dir.join("exp.toml").display().to_string(), "--quick"])
        .output()?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("self replay present"));
    let table = std::fs::read_to_string(q.join("table.md"))?;
    assert!(
        table.contains("| plain LoRA | failed") && table.contains("| LoRA + EWC |"),
        "{table}"
    );
    // An experiment file naming what no run is fails before anything runs, saying so.
    let refused = |edit: &dyn Fn(String) -> String, want: &str| -> Result<()> {
        let file = dir.join("edited.toml");
        std::fs::write(&file, edit(std::fs::read_to_string(dir.join("exp.toml"))?))?;
        let out = Command::new(env!("CARGO_BIN_EXE_strata"))
            .args(["experiment", &file.display().to_string(), "--quick"])
            .output()?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(want), "{err}");
        Ok(())
    };
    // The short variant's subset of runs,
    let quick_out = format!("out = \"{d}/quick\"");
    refused(
        &|e| e.replace(&quick_out, &format!("runs = [\"no such run\"]\n{quick_out}")),
        "`no such run`, which no [[run]] is",
    )?;
    // the experiment's reference,
    refused(
        &|e| e.replace("reference = \"plain LoRA\"", "reference = \"nobody\""),
        "reference names `nobody`, which no [[run]] is",
    )?;
    // and a run's own reference.
    refused(
        &|e| e.replace("reference = \"LoRA, lr 3e-2\"", "reference = \"somebody\""),
        "run `LoRA + EWC`'s reference names `somebody`",
    )?;
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// A run at several seeds: each seed trained and evaluated under its own name, the tables
/// reading their mean per item, each seed's headline in the note; adding seeds keeps the run
/// made at the recipe's own seed; `--quick` trains the first seed only.
#[test]
fn runs_at_several_seeds_are_pooled_per_item() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("strata-exp-seeds-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    write_tiny_gguf(&dir.join("tiny.gguf"), Arch::Llama, true, 3, GgmlDType::F32)?;
    std::fs::write(dir.join("dom.txt"), "the bank lends the money at a rate. ".repeat(40))?;
    std::fs::write(dir.join("held.txt"), "the bank lends the money at a rate. ".repeat(6))?;
    let item = |ctx: &str, a: &str, b: &str| {
        format!("{{\"context\": \"{ctx} \", \"choices\": [\"{a}\", \"{b}\"], \"answer\": 0}}\n")
    };
    let items: String = ["bank", "money", "rate", "the", "lends", "at"]
        .iter()
        .map(|w| item("the bank lends the", w, "cat"))
        .collect();
    std::fs::write(dir.join("mc.jsonl"), &items)?;
    let d = dir.display();
    std::fs::write(
        dir.join("lora.toml"),
        format!(
            "[model]\npath = \"{d}/tiny.gguf\"\n[lora]\nr = 4\n[data]\ntrain = [\"{d}/dom.txt\"]\neval = [\"{d}/held.txt\"]\nseq_len = 16\n[train]\nbatch = 2\nlr = 3e-2\n"
        ),
    )?;
    let exp = |seeds: &str| {
        format!(
            "name = \"seeds\"\nout = \"{d}/out\"\ntokens = 96\nreference = \"plain\"\n[eval]\ngeneral_mc = \"{d}/mc.jsonl\"\ndomain_mc = \"{d}/mc.jsonl\"\ntext = [\"{d}/held.txt\"]\nseq_len = 16\n\
             [quick]\ntokens = 32\nmc_items = 6\ntext_rows = 2\nout = \"{d}/quick\"\n\
             [[run]]\nname = \"plain\"\nrecipe = \"{d}/lora.toml\"\n\
             [[run]]\nname = \"LoRA\"\nrecipe = \"{d}/lora.toml\"\nset = [\"train.lr=1e-2\"]\n{seeds}"
        )
    };
    let run = |seeds: &str, extra: &[&str]| -> Result<(bool, String)> {
        std::fs::write(dir.join("exp.toml"), exp(seeds))?;
        let out = Command::new(env!("CARGO_BIN_EXE_strata"))
            .arg("experiment")
            .arg(dir.join("exp.toml"))
            .args(extra)
            .output()?;
        Ok((out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned()))
    };
    let (ok, err) = run("", &[])?;
    assert!(ok, "{err}");
    let (ok, err) = run("seeds = [0, 5]\n", &["--reuse"])?;
    assert!(ok, "{err}");
    assert!(
        err.contains("LoRA (3 steps): kept") && err.contains("LoRA, seed 5 (3 steps)\n"),
        "the recipe's own seed is the run made before: {err}"
    );
    let out = dir.join("out");
    let seed = |run: &str| -> Result<u64> { Ok(Recipe::load(&out.join(run).join("recipe.toml"), &[])?.train.seed) };
    assert_eq!((seed("lora")?, seed("lora-seed-5")?), (0, 5));
    let results: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("results.json"))?)?;
    let lora = &results["runs"][1];
    assert_eq!(lora["seeds"], serde_json::json!([0, 5]));
    let per_seed = lora["per_seed"].as_array().unwrap();
    assert_eq!(per_seed.len(), 2);
    // The pooled accuracy is the mean of the seeds' (the same items at each).
    let mean = |part: &str| per_seed.iter().map(|s| s[part]["after"].as_f64().unwrap()).sum::<f64>() / 2.0;
    assert!((lora["general"]["after"].as_f64().unwrap() - mean("general")).abs() < 1e-12);
    assert!((lora["domain"]["after"].as_f64().unwrap() - mean("domain")).abs() < 1e-12);
    assert!(results["runs"][0]["per_seed"].as_array().unwrap().is_empty());
    let table = std::fs::read_to_string(out.join("table.md"))?;
    assert!(
        table.contains("| LoRA (mean of seeds 0, 5) |") && table.contains("LoRA: seed 0 forgetting"),
        "{table}"
    );
    assert!(table.contains("seed 5 forgetting"), "{table}");
    // The short variant trains every run once.
    let (ok, err) = run("seeds = [5, 0]\n", &["--quick"])?;
    assert!(ok, "{err}");
    assert!(
        dir.join("quick/lora-seed-5").exists() && !dir.join("quick/lora").exists(),
        "{err}"
    );
    // An empty or repeated list is refused before anything runs.
    for bad in ["seeds = []\n", "seeds = [1, 1]\n"] {
        let (ok, err) = run(bad, &[])?;
        assert!(!ok && err.contains("seeds of LoRA must be a non-empty list"), "{err}");
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
