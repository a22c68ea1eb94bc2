//! Definition-to-term multiple-choice sets from WordNet's `data.noun` (Debian `wordnet-base`).
//!
//! Each synset of a lexicographer file gives one item: its gloss (up to the first `;`, without
//! examples) as the definition, its first lemma as the answer, and three distractors drawn from
//! lemmas of other synsets in the same file, so every choice is the same kind of thing. The
//! domain set is `noun.possession` (finance, property, taxes, fees); general sets are other noun
//! files. Items whose definition contains the term, or whose definition appears anywhere in the
//! training text, are left out.

use anyhow::{bail, Context, Result};
use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use super::mc::McItem;
use crate::rng::Rng;

/// WordNet's noun lexicographer files by number (from WordNet's `lexnames`).
pub const NOUN_FILES: [(u32, &str); 26] = [
    (3, "noun.Tops"),
    (4, "noun.act"),
    (5, "noun.animal"),
    (6, "noun.artifact"),
    (7, "noun.attribute"),
    (8, "noun.body"),
    (9, "noun.cognition"),
    (10, "noun.communication"),
    (11, "noun.event"),
    (12, "noun.feeling"),
    (13, "noun.food"),
    (14, "noun.group"),
    (15, "noun.location"),
    (16, "noun.motive"),
    (17, "noun.object"),
    (18, "noun.person"),
    (19, "noun.phenomenon"),
    (20, "noun.plant"),
    (21, "noun.possession"),
    (22, "noun.process"),
    (23, "noun.quantity"),
    (24, "noun.relation"),
    (25, "noun.shape"),
    (26, "noun.state"),
    (27, "noun.substance"),
    (28, "noun.time"),
];

/// One synset: its lemmas (spaces, not underscores) and its short definition.
#[derive(Clone, Debug)]
pub struct Synset {
    /// Lemmas, first is the head word.
    pub words: Vec<String>,
    /// Gloss up to the first `;`.
    pub definition: String,
}

/// Reads `data.noun`, grouping synsets by lexicographer file number.
pub fn read_data_noun(path: &Path) -> Result<BTreeMap<u32, Vec<Synset>>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read {} (run scripts/fetch.sh for wordnet-base)", path.display()))?;
    let mut out: BTreeMap<u32, Vec<Synset>> = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        if line.starts_with("  ") || line.trim().is_empty() {
            continue; // license header
        }
        let bad = || format!("{}:{}: not a WordNet data line", path.display(), i + 1);
        let (head, gloss) = line.split_once(" | ").with_context(bad)?;
        let f: Vec<&str> = head.split_whitespace().collect();
        if f.len() < 6 {
            bail!(bad());
        }
        let lex: u32 = f[1].parse().with_context(bad)?;
        let n = usize::from_str_radix(f[3], 16).with_context(bad)?;
        if f.len() < 4 + 2 * n {
            bail!(bad());
        }
        let words = (0..n)
            .map(|k| f[4 + 2 * k].replace('_', " "))
            .map(|w| strip_marker(&w))
            .collect();
        let definition = gloss.split(';').next().unwrap_or("").trim().to_string();
        out.entry(lex).or_default().push(Synset { words, definition });
    }
    Ok(out)
}

/// Adjective markers like `(a)` only occur on adjectives, but strip any `(..)` suffix anyway.
fn strip_marker(w: &str) -> String {
    match w.find('(') {
        Some(i) => w[..i].to_string(),
        None => w.to_string(),
    }
}

/// Lowercase with whitespace runs collapsed: the form in which definitions are looked up in text.
pub fn normalize(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase()
}

/// The (normalized) definitions among `synsets` that occur anywhere in `text`, found in one pass
/// over the text (Aho-Corasick), so checking tens of thousands against megabytes is quick.
pub fn definitions_in(synsets: &[&Synset], text: &str) -> HashSet<String> {
    let defs: Vec<String> = synsets.iter().map(|s| normalize(&s.definition)).collect();
    let ac = aho_corasick::AhoCorasick::new(&defs).expect("definitions build an automaton");
    ac.find_overlapping_iter(&normalize(text))
        .map(|m| defs[m.pattern().as_usize()].clone())
        .collect()
}

/// Builds up to `max` items from the synsets of one file, in a seeded random order, leaving out
/// synsets whose (normalized) definition is in `excluded`.
pub fn build_items(synsets: &[Synset], max: usize, seed: u64, excluded: &HashSet<String>) -> Vec<McItem> {
    let mut rng = Rng::new(seed);
    let mut order: Vec<usize> = (0..synsets.len()).collect();
    rng.shuffle(&mut order);
    let heads: Vec<&str> = synsets.iter().map(|s| s.words[0].as_str()).collect();
    let mut used = std::collections::HashSet::new();
    let mut items = Vec::new();
    for &i in &order {
        if items.len() >= max {
            break;
        }
        let s = &synsets[i];
        let term = &s.words[0];
        let def_l = s.definition.to_lowercase();
        if s.definition.split_whitespace().count() < 3
            || term.split(' ').count() > 3
            || def_l.contains(&term.to_lowercase())
            || excluded.contains(&normalize(&s.definition))
            || !used.insert(term.to_lowercase())
        {
            continue;
        }
        let mut choices = vec![term.clone()];
        let mut tries = 0;
        while choices.len() < 4 && tries < 100 {
            tries += 1;
            let d = heads[rng.below(heads.len())];
            if !choices.iter().any(|c| c.eq_ignore_ascii_case(d)) && !s.words.iter().any(|w| w.eq_ignore_ascii_case(d))
            {
                choices.push(d.to_string());
            }
        }
        if choices.len() < 4 {
            continue;
        }
        let answer = rng.below(4);
        choices.swap(0, answer);
        items.push(McItem {
            context: format!("Definition: {}.\nTerm: ", s.definition),
            choices,
            answer,
        });
    }
    items
}

/// Instructions a chat model answers about a general term, for the chat-retention evaluation.
const PROMPT_TEMPLATES: [&str; 6] = [
    "What is {a} {term}? Answer in two sentences.",
    "Write a short paragraph about {term}.",
    "Give three facts about {term}.",
    "Explain to a child what {a} {term} is.",
    "Describe {a} {term} in one sentence.",
    "Where would you usually find {a} {term}?",
];

/// `n` user prompts about head words of `synsets` (one word or two, no capitals), seeded: the
/// held-out general prompts whose base-model answers the chat-retention evaluation keeps.
pub fn chat_prompts(synsets: &[&Synset], n: usize, seed: u64) -> Vec<String> {
    let mut terms: Vec<&str> = synsets
        .iter()
        .map(|s| s.words[0].as_str())
        .filter(|w| {
            w.split(' ').count() <= 2
                && w.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == ' ' || c == '-')
        })
        .collect();
    terms.sort_unstable();
    terms.dedup();
    let mut rng = Rng::new(seed);
    rng.shuffle(&mut terms);
    terms
        .iter()
        .take(n)
        .enumerate()
        .map(|(k, term)| {
            let a = if term.starts_with(['a', 'e', 'i', 'o', 'u']) {
                "an"
            } else {
                "a"
            };
            PROMPT_TEMPLATES[k % PROMPT_TEMPLATES.len()]
                .replace("{a}", a)
                .replace("{term}", term)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_data_lines_and_builds_clean_items() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("strata-wn-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let f = dir.join("data.noun");
        let mut text = String::from("  1 This software and database is being provided\n");
        let defs = [
            "money paid to the government on income",
            "a sum paid for a service rendered",
            "property owned by a person",
            "a loan secured by real estate",
            "an amount of money borrowed",
            "the ownership of a tax",
        ];
        for (k, d) in defs.iter().enumerate() {
            text += &format!("1324{k:04} 21 n 02 word_{k} 0 alt{k} 0 000 | {d}; \"an example\"  \n");
        }
        text += "00001740 03 n 01 entity 0 000 | that which exists  \n";
        std::fs::write(&f, text)?;
        let m = read_data_noun(&f)?;
        assert_eq!(m[&21].len(), 6);
        assert_eq!(m[&21][0].words, vec!["word 0", "alt0"]);
        assert_eq!(m[&21][0].definition, "money paid to the government on income");
        let all: Vec<&Synset> = m[&21].iter().collect();
        let excluded = definitions_in(&all, "We took\nA  Loan secured by real estate in the text");
        assert_eq!(excluded.len(), 1);
        let items = build_items(&m[&21], 10, 1, &excluded);
        assert!(!items.is_empty() && items.len() <= 5, "{}", items.len());
        for it in &items {
            assert_eq!(it.choices.len(), 4);
            assert!(it.choices[it.answer].starts_with("word"));
            assert!(!it.context.contains("a loan secured"), "excluded definition used");
            let mut c = it.choices.clone();
            c.sort();
            c.dedup();
            assert_eq!(c.len(), 4);
        }
        assert_eq!(
            build_items(&m[&21], 10, 1, &HashSet::new()),
            build_items(&m[&21], 10, 1, &HashSet::new())
        );
        let prompts = chat_prompts(&all, 4, 3);
        assert_eq!(prompts.len(), 4);
        assert!(
            prompts.iter().all(|p| p.ends_with(['?', '.']) && !p.contains('{')),
            "{prompts:?}"
        );
        assert_eq!(prompts, chat_prompts(&all, 4, 3));
        std::fs::write(&f, "garbage\n")?;
        assert!(read_data_noun(&f).unwrap_err().to_string().contains("data.noun:1"));
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
