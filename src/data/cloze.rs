//! Continuation-choice items built from documents (`data::mc` format): the context is a window of
//! a document's words, the answer the words that follow it, and the distractors spans of the same
//! number of words from other documents of the same source. A model that follows the document
//! ranks its true continuation first; one that lost its grip on that kind of text does not.
//!
//! Windows do not overlap, so no item's context contains another item's answer.

use std::collections::BTreeMap;

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
}
