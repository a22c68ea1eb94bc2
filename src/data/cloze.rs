//! Continuation-choice items built from documents (`data::mc` format): the context is a window of
//! a document's words, the answer the words that follow it, and the distractors spans of the same
//! number of words from other documents of the same source. A model that follows the document
//! ranks its true continuation first; one that lost its grip on that kind of text does not.
//!
//! Windows do not overlap, so no item's context contains another item's answer.
//!
//! Term items (`term_items`) ask for domain knowledge rather than fluency: the context runs up
//! to a domain term in a held-out document, and every choice is the same few words that follow
//! it there, led by the true term or by another domain term. A model that learned the domain
//! knows which term the passage needs; raising every domain word alike does not help, because
//! every choice holds one.

use std::collections::{BTreeMap, HashMap, HashSet};

use super::corpus::Doc;
use super::mc::McItem;
use crate::rng::{mix, Rng};

/// How items are cut.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct ClozeShape {
    /// Words of context.
    pub context_words: usize,
    /// Words of each choice.
    pub span_words: usize,
    /// Choices per item (the answer and `choices - 1` distractors).
    pub choices: usize,
}

/// Items from `docs`, at most `max` (0: all), in a seeded order so that any prefix is a sample
/// of every document.
pub fn continuation_items(docs: &[Doc], shape: ClozeShape, max: usize, seed: u64) -> Vec<McItem> {
    let words: Vec<Vec<&str>> = docs.iter().map(|d| d.text.split_whitespace().collect()).collect();
    let mut by_source: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, d) in docs.iter().enumerate() {
        if words[i].len() >= shape.span_words {
            by_source.entry(d.source).or_default().push(i);
        }
    }
    let window = shape.context_words + shape.span_words;
    let mut rng = Rng::new(mix(&[seed, 0xc102e]));
    let mut items = Vec::new();
    for (i, d) in docs.iter().enumerate() {
        let others: Vec<usize> = by_source[d.source].iter().copied().filter(|&j| j != i).collect();
        if others.is_empty() {
            continue;
        }
        for start in (0..words[i].len().saturating_sub(window - 1)).step_by(window) {
            let w = &words[i][start..start + window];
            let answer = w[shape.context_words..].join(" ");
            let mut choices = vec![answer.clone()];
            let mut tries = 0;
            while choices.len() < shape.choices && tries < 20 * shape.choices {
                tries += 1;
                let o = &words[others[rng.below(others.len())]];
                let at = rng.below(o.len() - shape.span_words + 1);
                let span = o[at..at + shape.span_words].join(" ");
                if !choices.contains(&span) {
                    choices.push(span);
                }
            }
            if choices.len() < shape.choices {
                continue;
            }
            let pos = rng.below(shape.choices);
            choices.swap(0, pos);
            items.push(McItem {
                context: w[..shape.context_words].join(" ") + " ",
                choices,
                answer: pos,
            });
        }
    }
    Rng::new(mix(&[seed, 0xc103e])).shuffle(&mut items);
    if max > 0 {
        items.truncate(max);
    }
    items
}

/// How term items are cut and which words count as domain terms.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct TermShape {
    /// Words of context before the term.
    pub context_words: usize,
    /// Words after the term in every choice (the same in each).
    pub follow_words: usize,
    /// Choices per item.
    pub choices: usize,
    /// A term occurs at least this often in the domain training text.
    pub min_count: usize,
    /// ... and at least this many times as often (per word) as in the general training text.
    pub min_ratio: f64,
}

/// A word cut into leading punctuation, its letters (the part a term is matched on) and
/// trailing punctuation; `None` when the middle is not all ASCII letters or shorter than 4.
fn word_parts(w: &str) -> Option<(&str, &str, &str)> {
    let start = w.find(|c: char| c.is_ascii_alphabetic())?;
    let end = w.rfind(|c: char| c.is_ascii_alphabetic())? + 1;
    let core = &w[start..end];
    (core.len() >= 4 && core.bytes().all(|b| b.is_ascii_alphabetic())).then(|| (&w[..start], core, &w[end..]))
}

fn word_counts(docs: &[Doc]) -> (HashMap<String, usize>, usize) {
    let mut counts = HashMap::new();
    let mut total = 0;
    for d in docs {
        for w in d.text.split_whitespace() {
            total += 1;
            if let Some((_, core, _)) = word_parts(w) {
                *counts.entry(core.to_ascii_lowercase()).or_insert(0) += 1;
            }
        }
    }
    (counts, total)
}

/// The domain's terms (lowercase) with their domain counts, most frequent first: words of the
/// domain training text that occur at least `min_count` times there and at least `min_ratio`
/// times as often per word as in the general training text (add-one smoothed).
pub fn domain_terms(domain: &[Doc], general: &[Doc], shape: TermShape) -> Vec<(String, usize)> {
    let (dom, n_dom) = word_counts(domain);
    let (gen, n_gen) = word_counts(general);
    let mut terms: Vec<(String, usize)> = dom
        .into_iter()
        .filter(|(w, c)| {
            let g = gen.get(w).copied().unwrap_or(0) as f64 + 1.0;
            *c >= shape.min_count && (*c as f64 / n_dom.max(1) as f64) >= shape.min_ratio * g / n_gen.max(1) as f64
        })
        .collect();
    terms.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    terms
}

/// `term` written the way `like` is: all capitals, a capital first, or lowercase.
fn cased_like(term: &str, like: &str) -> String {
    if like.len() > 1 && like.bytes().all(|b| b.is_ascii_uppercase()) {
        term.to_ascii_uppercase()
    } else if like.starts_with(|c: char| c.is_ascii_uppercase()) {
        let mut s = term.to_string();
        s[..1].make_ascii_uppercase();
        s
    } else {
        term.to_string()
    }
}

/// Term items from `docs`, at most `max` (0: all), in a seeded order. Distractor terms are drawn
/// in proportion to their domain counts, so common terms are as likely wrong answers as right
/// ones; a distractor that is a prefix of the answer or has it as a prefix (account, accounts,
/// accounting) is never drawn, since it may fit the passage as well.
pub fn term_items(docs: &[Doc], terms: &[(String, usize)], shape: TermShape, max: usize, seed: u64) -> Vec<McItem> {
    let is_term: HashSet<&str> = terms.iter().map(|(t, _)| t.as_str()).collect();
    let cumulative: Vec<usize> = terms
        .iter()
        .scan(0, |acc, (_, c)| {
            *acc += c;
            Some(*acc)
        })
        .collect();
    let total = cumulative.last().copied().unwrap_or(0);
    let mut rng = Rng::new(mix(&[seed, 0x7e2a5]));
    let mut items = Vec::new();
    for d in docs {
        let words: Vec<&str> = d.text.split_whitespace().collect();
        let mut i = shape.context_words;
        while i + shape.follow_words < words.len() {
            let Some((pre, core, post)) = word_parts(words[i]) else {
                i += 1;
                continue;
            };
            let key = core.to_ascii_lowercase();
            if !is_term.contains(key.as_str()) {
                i += 1;
                continue;
            }
            let follow: String = words[i + 1..=i + shape.follow_words]
                .iter()
                .map(|w| format!(" {w}"))
                .collect();
            let mut keys = vec![key.clone()];
            let mut tries = 0;
            while keys.len() < shape.choices && tries < 50 * shape.choices && total > 0 {
                tries += 1;
                let r = rng.below(total);
                let t = &terms[cumulative.partition_point(|&c| c <= r)].0;
                if !keys
                    .iter()
                    .any(|k| k.starts_with(t.as_str()) || t.starts_with(k.as_str()))
                {
                    keys.push(t.clone());
                }
            }
            if keys.len() == shape.choices {
                let mut choices: Vec<String> = keys
                    .iter()
                    .enumerate()
                    .map(|(k, t)| {
                        let word = if k == 0 { core.to_string() } else { cased_like(t, core) };
                        format!("{word}{post}{follow}")
                    })
                    .collect();
                let pos = rng.below(shape.choices);
                choices.swap(0, pos);
                items.push(McItem {
                    context: words[i - shape.context_words..i].join(" ") + " " + pre,
                    choices,
                    answer: pos,
                });
            }
            // The next item's context starts after this one's last word.
            i += shape.follow_words + 1 + shape.context_words;
        }
    }
    Rng::new(mix(&[seed, 0x7e2a6])).shuffle(&mut items);
    if max > 0 {
        items.truncate(max);
    }
    items
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(source: &'static str, id: usize, n: usize) -> Doc {
        Doc {
            text: (0..n).map(|w| format!("d{id}w{w}")).collect::<Vec<_>>().join(" "),
            source,
            doc: id.to_string(),
        }
    }

    #[test]
    fn items_continue_their_document_and_distract_from_others() {
        let docs: Vec<Doc> = (0..6).map(|i| doc(if i < 3 { "a" } else { "b" }, i, 50)).collect();
        let shape = ClozeShape {
            context_words: 8,
            span_words: 4,
            choices: 4,
        };
        let items = continuation_items(&docs, shape, 0, 1);
        // 50 words hold four whole windows of 12.
        assert_eq!(items.len(), 6 * 4);
        for it in &items {
            let ctx: Vec<&str> = it.context.split_whitespace().collect();
            assert_eq!(ctx.len(), 8);
            assert!(it.context.ends_with(' '));
            let me = ctx[0].split('w').next().unwrap();
            let last: usize = ctx[7].split('w').nth(1).unwrap().parse().unwrap();
            let src = |id: &str| if id < "d3" { "a" } else { "b" };
            for (k, c) in it.choices.iter().enumerate() {
                let w: Vec<&str> = c.split_whitespace().collect();
                assert_eq!(w.len(), 4);
                let id = w[0].split('w').next().unwrap();
                if k == it.answer {
                    assert_eq!(w[0], format!("{me}w{}", last + 1));
                } else {
                    assert_ne!(id, me, "a distractor from the item's own document");
                    assert_eq!(src(id), src(me), "a distractor from another source");
                }
            }
        }
        // Answers are spread over the positions, and the order is seeded.
        assert!((0..4).all(|p| items.iter().any(|i| i.answer == p)));
        assert_eq!(continuation_items(&docs, shape, 5, 1), items[..5].to_vec());
        assert_ne!(continuation_items(&docs, shape, 0, 2), items);
    }

    fn text_doc(text: &str) -> Doc {
        Doc {
            text: text.into(),
            source: "a",
            doc: "x".into(),
        }
    }

    #[test]
    fn domain_terms_are_frequent_and_specific_to_the_domain() {
        let domain = [text_doc(
            &"the ledger shows the ledger balance of the (Account) and the ".repeat(10),
        )];
        let general = [text_doc(
            &"the dog ate the bone near the balance of the river ".repeat(30),
        )];
        let shape = TermShape {
            context_words: 2,
            follow_words: 1,
            choices: 2,
            min_count: 10,
            min_ratio: 4.0,
        };
        let terms = domain_terms(&domain, &general, shape);
        // Words under four letters never count; "balance" is as common in the general text.
        assert_eq!(
            terms,
            vec![
                ("ledger".to_string(), 20),
                ("account".to_string(), 10),
                ("shows".to_string(), 10)
            ]
        );
    }

    #[test]
    fn term_items_swap_only_the_term_and_keep_its_case_and_punctuation() {
        let terms: Vec<(String, usize)> = [
            ("ledger", 5),
            ("account", 4),
            ("accounts", 4),
            ("invoice", 3),
            ("dividend", 2),
        ]
        .iter()
        .map(|(t, c)| (t.to_string(), *c))
        .collect();
        let docs = [text_doc(
            "one two three Ledger, four five six seven eight nine (account) ten eleven twelve thirteen",
        )];
        let shape = TermShape {
            context_words: 3,
            follow_words: 2,
            choices: 3,
            min_count: 1,
            min_ratio: 1.0,
        };
        let items = term_items(&docs, &terms, shape, 0, 7);
        assert_eq!(items.len(), 2);
        for it in &items {
            let right = &it.choices[it.answer];
            let follow: Vec<&str> = right.split_whitespace().skip(1).collect();
            for c in &it.choices {
                assert_eq!(c.split_whitespace().skip(1).collect::<Vec<_>>(), follow);
            }
            if it.context.ends_with('(') {
                assert_eq!(it.context, "seven eight nine (");
                assert_eq!(right, "account) ten eleven");
                // Neither inflection of the answer is offered as a wrong one.
                assert!(it.choices.iter().all(|c| !c.starts_with("accounts")));
                assert!(it.choices.iter().all(|c| c
                    .split(')')
                    .next()
                    .unwrap()
                    .bytes()
                    .all(|b| b.is_ascii_lowercase())));
            } else {
                assert_eq!(it.context, "one two three ");
                assert_eq!(right, "Ledger, four five");
                assert!(it
                    .choices
                    .iter()
                    .all(|c| c.starts_with(|ch: char| ch.is_ascii_uppercase()) && c.contains(", four")));
            }
            let mut distinct = it.choices.clone();
            distinct.sort();
            distinct.dedup();
            assert_eq!(distinct.len(), 3);
        }
    }
}
