//! `strata data build`: the evaluation sets of the embedded default, with a data card.
//!
//! Today it builds the WordNet definition-to-term multiple-choice sets (domain: noun.possession;
//! general: other noun files). The training corpora of issue 3 are not built yet.

use anyhow::{bail, Context, Result};
use serde_json::json;
use std::path::PathBuf;

use crate::data::wordnet::{build_items, read_data_noun, NOUN_FILES};

/// Arguments of `strata data`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// What to do (`build`).
    pub action: String,
    /// The asset cache written by scripts/fetch.sh.
    #[arg(long, default_value = "assets")]
    pub assets: PathBuf,
    /// Output directory.
    #[arg(long, default_value = "data")]
    pub out: PathBuf,
    /// Seed of item order, distractors and answer positions.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// General-knowledge noun files.
    #[arg(long, num_args = 1.., default_values = ["noun.animal", "noun.food", "noun.artifact", "noun.plant", "noun.body"])]
    pub general_files: Vec<String>,
    /// At most this many items per set (0: all).
    #[arg(long, default_value_t = 0)]
    pub max_items: usize,
    /// Training text files or directories: items whose definition appears there are left out.
    #[arg(long, num_args = 1..)]
    pub exclude: Vec<PathBuf>,
}

/// Runs `strata data`.
pub fn run(a: Args) -> Result<()> {
    if a.action != "build" {
        bail!("unknown action `{}`; available: build", a.action);
    }
    let data_noun = a.assets.join("debian/wordnet-base/usr/share/wordnet/data.noun");
    let by_file = read_data_noun(&data_noun)?;
    let exclude = if a.exclude.is_empty() {
        String::new()
    } else {
        crate::data::load_documents(&a.exclude)?.join("\n").to_lowercase()
    };
    let lex = |name: &str| -> Result<u32> {
        NOUN_FILES
            .iter()
            .find(|(_, n)| *n == name)
            .map(|(k, _)| *k)
            .with_context(|| format!("unknown WordNet noun file `{name}`"))
    };
    let max = if a.max_items == 0 { usize::MAX } else { a.max_items };
    let domain = build_items(
        by_file
            .get(&lex("noun.possession")?)
            .map(|v| v.as_slice())
            .unwrap_or(&[]),
        max,
        a.seed,
        &exclude,
    );
    // Distractors come from the same file as the answer: build per file, then interleave.
    let per_file = max.div_ceil(a.general_files.len().max(1));
    let mut general = Vec::new();
    for (k, f) in a.general_files.iter().enumerate() {
        if f == "noun.possession" {
            bail!("noun.possession is the domain set; it cannot also be general");
        }
        let syn = by_file.get(&lex(f)?).cloned().unwrap_or_default();
        general.extend(build_items(&syn, per_file, a.seed.wrapping_add(k as u64 + 1), &exclude));
    }
    general.truncate(max);
    let mc = a.out.join("mc");
    std::fs::create_dir_all(&mc).with_context(|| format!("cannot create {}", mc.display()))?;
    for (name, items) in [("domain.jsonl", &domain), ("general.jsonl", &general)] {
        let text: String = items
            .iter()
            .map(|i| serde_json::to_string(i).map(|s| s + "\n"))
            .collect::<Result<_, _>>()?;
        crate::util::write_atomic(&mc.join(name), text.as_bytes())?;
    }
    let card = json!({
        "source": {"package": "Debian wordnet-base 1:3.0-37", "file": "usr/share/wordnet/data.noun", "license": "WordNet 3.0 license (Princeton, permissive)"},
        "format": "{\"context\": \"Definition: <gloss>.\\nTerm: \", \"choices\": [4 lemmas of the same lexicographer file], \"answer\": i}",
        "domain": {"file": "mc/domain.jsonl", "lexicographer_files": ["noun.possession"], "items": domain.len()},
        "general": {"file": "mc/general.jsonl", "lexicographer_files": a.general_files, "items": general.len()},
        "seed": a.seed,
        "excluded_against": a.exclude,
        "rules": "definition = gloss before the first ';'; answer = the synset's first lemma; items whose definition contains the answer, whose answer has more than 3 words, or whose definition appears in the excluded text are dropped; one item per answer",
        "chance_accuracy": 0.25,
    });
    crate::util::write_atomic(
        &a.out.join("data_card.json"),
        serde_json::to_string_pretty(&card)?.as_bytes(),
    )?;
    println!(
        "data card ({}):\n{}",
        a.out.join("data_card.json").display(),
        serde_json::to_string_pretty(&card)?
    );
    Ok(())
}
