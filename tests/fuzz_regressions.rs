//! Every input a fuzzer found (`tests/fixtures/fuzz/<target>/`, see `scripts/fuzz.sh`) runs
//! again through its target's code (`strata::testing::fuzz`): each must return, without a
//! panic. The empty input and cut-off valid files run through every target too.

use std::path::Path;
use strata::testing::fuzz;

/// A fuzz target's body.
type Target = fn(&[u8]);

const TARGETS: [(&str, Target); 7] = [
    ("gguf", fuzz::gguf),
    ("hf_dir", fuzz::hf_dir),
    ("gguf_tokenizer", fuzz::gguf_tokenizer),
    ("recipe", fuzz::recipe),
    ("data", fuzz::data),
    ("adapter", fuzz::adapter),
    ("checkpoint", fuzz::checkpoint),
];

#[test]
fn found_inputs_and_cut_files_run_through_their_targets() -> anyhow::Result<()> {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fuzz");
    let dir = std::env::temp_dir().join(format!("strata-fuzzreg-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let gguf = dir.join("m.gguf");
    strata::testing::write_tiny_gguf(
        &gguf,
        strata::model::Arch::Qwen2,
        true,
        1,
        candle_core::quantized::GgmlDType::Q8_0,
    )?;
    let valid = std::fs::read(&gguf)?;
    let recipe = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes/smollm2-lora.toml"))?;
    let mut ran = 0;
    for (name, run) in TARGETS {
        let found = fixtures.join(name);
        if found.is_dir() {
            for e in std::fs::read_dir(&found)? {
                run(&std::fs::read(e?.path())?);
                ran += 1;
            }
        }
        run(&[]);
        for cut in [1, 7, 64, valid.len() / 3, valid.len() - 1] {
            run(&valid[..cut]);
        }
        run(&valid);
        run(&recipe[..recipe.len() / 2]);
        run(&fuzz::join(&[&recipe, &valid, &[0xff; 40]]));
    }
    fuzz::gguf(&valid);
    eprintln!("{ran} found inputs replayed");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
