//! The embedded default's training corpora, built from the asset cache (docs/design.md, "Assets"):
//!
//! - finance: the economics passages of the State of the Union addresses, the GnuCash guide and
//!   help (DocBook), and GCIDE entries labelled (Com.), (Finance), (Stock Exchange), (Banking),
//!   (Bookkeeping) or (Polit. Econ.);
//! - general: the other passages of the addresses and a seeded sample of the other GCIDE entries.
//!
//! Every document (an address, a DocBook chapter, a dictionary entry) lands wholly in train or
//! wholly in held-out, chosen by a seeded hash of its id, so no held-out text was trained on; an
//! address's finance and general passages share its fate.

use anyhow::{bail, Context, Result};
use regex::Regex;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use crate::rng::mix;

/// One document of a corpus.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Doc {
    /// The document's text.
    pub text: String,
    /// Where it came from (`sotu`, `gnucash`, `gcide`).
    pub source: &'static str,
    /// Its id within the source (file stem, entry head word); the unit of the split.
    pub doc: String,
}

/// Word stems that mark a sentence as being about money, trade or public finance.
const FINANCE_STEMS: [&str; 40] = [
    "econom",
    "tax",
    "budget",
    "deficit",
    "debt",
    "dollar",
    "inflation",
    "tariff",
    "bank",
    "currenc",
    "revenue",
    "treasur",
    "price",
    "wage",
    "interest rate",
    "market",
    "credit",
    "invest",
    "income",
    "fiscal",
    "monetar",
    "financ",
    "loan",
    "mortgage",
    "saving",
    "pension",
    "stock",
    "bond",
    "money",
    "expenditure",
    "appropriation",
    "surplus",
    "payroll",
    "unemploy",
    "commerc",
    "trade",
    "export",
    "import",
    "specie",
    "spending",
];

/// Sentences per passage when an address is cut into passages.
const PASSAGE_SENTENCES: usize = 4;
/// Finance-stem hits that make a passage a finance passage.
const FINANCE_HITS: usize = 4;

/// Counts finance stems at word starts in `text` (lowercase).
fn finance_hits(lower: &str) -> usize {
    let b = lower.as_bytes();
    FINANCE_STEMS
        .iter()
        .map(|s| {
            lower
                .match_indices(s)
                .filter(|(i, _)| *i == 0 || !b[i - 1].is_ascii_alphabetic())
                .count()
        })
        .sum()
}

/// Splits text into sentences at `.`, `?` or `!` followed by whitespace.
fn sentences(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    let b = text.as_bytes();
    for i in 0..b.len() {
        if matches!(b[i], b'.' | b'?' | b'!') && b.get(i + 1).is_some_and(|c| c.is_ascii_whitespace()) {
            let s = text[start..=i].trim();
            if !s.is_empty() {
                out.push(s);
            }
            start = i + 1;
        }
    }
    let tail = text[start..].trim();
    if !tail.is_empty() {
        out.push(tail);
    }
    out
}

/// Splits one address into its finance passages and its other passages (each joined with blank
/// lines, runs of same-kind passages merged).
pub fn split_address(text: &str) -> (String, String) {
    let (mut fin, mut gen) = (Vec::new(), Vec::new());
    for chunk in sentences(text).chunks(PASSAGE_SENTENCES) {
        let passage = chunk.join(" ");
        if finance_hits(&passage.to_lowercase()) >= FINANCE_HITS {
            fin.push(passage);
        } else {
            gen.push(passage);
        }
    }
    (fin.join("\n\n"), gen.join("\n\n"))
}

/// The State of the Union addresses as (finance, general) documents, one pair per address.
pub fn sotu(dir: &Path) -> Result<(Vec<Doc>, Vec<Doc>)> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list {} (run scripts/fetch.sh)", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "txt"))
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("{}: no addresses (.txt) inside; run scripts/fetch.sh", dir.display());
    }
    let (mut fin, mut gen) = (Vec::new(), Vec::new());
    for f in files {
        let text = std::fs::read_to_string(&f).with_context(|| format!("cannot read {}", f.display()))?;
        let id = f.file_stem().unwrap_or_default().to_string_lossy().to_string();
        let (a, b) = split_address(&text);
        for (text, out) in [(a, &mut fin), (b, &mut gen)] {
            if !text.is_empty() {
                out.push(Doc {
                    text,
                    source: "sotu",
                    doc: id.clone(),
                });
            }
        }
    }
    Ok((fin, gen))
}

/// GCIDE's subject labels that mark an entry as finance.
pub const GCIDE_LABELS: [&str; 6] = [
    "(Com.)",
    "(Finance)",
    "(Stock Exchange)",
    "(Banking)",
    "(Bookkeeping)",
    "(Polit. Econ.)",
];

/// Decodes dictd's base-64 numbers (`A`-`Z`, `a`-`z`, `0`-`9`, `+`, `/`, most significant first).
pub fn dictd_number(s: &str) -> Option<u64> {
    s.bytes().try_fold(0u64, |acc, c| {
        let d = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        acc.checked_mul(64).map(|a| a + d as u64)
    })
}

/// Turns one GCIDE entry's markup into plain text: pronunciations (`\Ac"tu*al\`, `(d[=e]"...)`),
/// source tags (`[1913 Webster]`, `[PJC]`), cross-reference braces and accent codes removed.
pub fn clean_gcide(entry: &str) -> String {
    static RULES: std::sync::OnceLock<Vec<(Regex, &'static str)>> = std::sync::OnceLock::new();
    let rules = RULES.get_or_init(|| {
        [
            (r"\\[^\\\n]*\\", ""),
            (r#"\([^()\n]*[\[\]"`*][^()\n]*\)"#, ""),
            (r"\[[^\]\n]*(Webster|PJC|WordNet|Century|Supp)[^\]\n]*\]", ""),
            (r"\[[^\]\s]{1,6}\]", ""),
            (r"[{}]", ""),
            (r"[ \t]+", " "),
            (r" ?\n ?", "\n"),
            (r"\n{3,}", "\n\n"),
            (r" ([,.;:])", "$1"),
        ]
        .into_iter()
        .map(|(p, r)| (Regex::new(p).expect("static regex"), r))
        .collect()
    });
    let mut s = entry.to_string();
    for (re, rep) in rules {
        s = re.replace_all(&s, *rep).into_owned();
    }
    s.trim().to_string()
}

/// GCIDE entries from the dictd files as (finance, other) documents, one per entry.
pub fn gcide(index: &Path, dict: &Path) -> Result<(Vec<Doc>, Vec<Doc>)> {
    let idx = std::fs::read_to_string(index)
        .with_context(|| format!("cannot read {} (run scripts/fetch.sh)", index.display()))?;
    let text = std::fs::read(dict).with_context(|| format!("cannot read {} (run scripts/fetch.sh)", dict.display()))?;
    let mut seen = std::collections::HashSet::new();
    let (mut fin, mut other) = (Vec::new(), Vec::new());
    for (i, line) in idx.lines().enumerate() {
        let f: Vec<&str> = line.split('\t').collect();
        let bad = || format!("{}:{}: not a dictd index line", index.display(), i + 1);
        if f.len() != 3 {
            bail!(bad());
        }
        if f[0].starts_with("00-database") {
            continue;
        }
        let (off, len) = (
            dictd_number(f[1]).with_context(bad)?,
            dictd_number(f[2]).with_context(bad)?,
        );
        if !seen.insert(off) {
            continue;
        }
        let end = off
            .checked_add(len)
            .filter(|&e| e <= text.len() as u64)
            .with_context(|| {
                format!(
                    "{}:{}: entry runs past the end of {} ({} bytes)",
                    index.display(),
                    i + 1,
                    dict.display(),
                    text.len()
                )
            })?;
        let raw = String::from_utf8_lossy(&text[off as usize..end as usize]);
        let is_fin = GCIDE_LABELS.iter().any(|l| raw.contains(l));
        let doc = Doc {
            text: clean_gcide(&raw),
            source: "gcide",
            doc: format!("{}@{off}", f[0]),
        };
        if doc.text.len() < 40 {
            continue;
        }
        if is_fin { &mut fin } else { &mut other }.push(doc);
    }
    Ok((fin, other))
}

fn entity_re() -> &'static Regex {
    static RE: std::sync::OnceLock<Regex> = std::sync::OnceLock::new();
    RE.get_or_init(|| Regex::new(r"&([A-Za-z][A-Za-z0-9_.-]*);").expect("static regex"))
}

/// Expands the entities defined by the document's DTDs (their values may hold markup and
/// further entities, so this runs before tags are stripped).
fn expand_defined(s: &str, defs: &HashMap<String, String>) -> String {
    let mut cur = s.to_string();
    for _ in 0..4 {
        let next = entity_re()
            .replace_all(&cur, |c: &regex::Captures| {
                defs.get(&c[1]).cloned().unwrap_or_else(|| c[0].to_string())
            })
            .into_owned();
        if next == cur {
            break;
        }
        cur = next;
    }
    cur
}

/// Expands the standard and typographic entities (after tags are gone, so `&lt;` stays text);
/// an unknown entity becomes nothing.
fn expand_standard(s: &str) -> String {
    entity_re()
        .replace_all(s, |c: &regex::Captures| {
            match &c[1] {
                "lt" => "<",
                "gt" => ">",
                "amp" => "&",
                "quot" | "ldquo" | "rdquo" => "\"",
                "apos" | "rsquo" | "lsquo" => "'",
                "mdash" => "—",
                "ndash" => "–",
                "minus" => "-",
                "nbsp" => " ",
                _ => "",
            }
            .to_string()
        })
        .into_owned()
}

/// Plain text of a DocBook file: comments and tags removed, block elements turned into
/// paragraph breaks, entities expanded with `defs`.
pub fn docbook_text(xml: &str, defs: &HashMap<String, String>) -> String {
    static RULES: std::sync::OnceLock<Vec<(Regex, &'static str)>> = std::sync::OnceLock::new();
    let rules = RULES.get_or_init(|| {
        [
            (r"(?s)<!--.*?-->", ""),
            (r"(?s)<\?.*?\?>|<!DOCTYPE[^>]*>", ""),
            (
                r"(?s)<(screenshot|mediaobject|indexterm)\b.*?</(screenshot|mediaobject|indexterm)>",
                "",
            ),
            (
                r"</?(para|title|listitem|term|row|entry|sect\d|chapter|simpara|note|tip|warning|caution)\b[^>]*>",
                "\n\n",
            ),
            (r"<[^>]+>", ""),
            (r"[ \t\r]+", " "),
            (r" ?\n ?", "\n"),
            (r"\n{3,}", "\n\n"),
        ]
        .into_iter()
        .map(|(p, r)| (Regex::new(p).expect("static regex"), r))
        .collect()
    });
    let mut s = expand_defined(xml, defs);
    for (re, rep) in rules {
        s = re.replace_all(&s, *rep).into_owned();
    }
    expand_standard(s.trim())
}

/// `<!ENTITY name "value">` definitions of the `.dtd` files in `dir` (parameter entities skipped).
fn dtd_entities(dir: &Path) -> Result<HashMap<String, String>> {
    let re = Regex::new(r#"<!ENTITY\s+([A-Za-z][A-Za-z0-9_.-]*)\s+"([^"]*)"\s*>"#).expect("static regex");
    let mut defs = HashMap::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let p = e?.path();
        if p.extension().is_some_and(|x| x == "dtd") {
            let text = std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?;
            for c in re.captures_iter(&text) {
                defs.entry(c[1].to_string()).or_insert_with(|| c[2].to_string());
            }
        }
    }
    Ok(defs)
}

/// The GnuCash guide and help (English DocBook under `help/C/`), one document per chapter file;
/// license appendices and legal notices are left out.
pub fn gnucash(help_c: &Path) -> Result<Vec<Doc>> {
    let mut docs = Vec::new();
    for book in ["gnucash-guide", "gnucash-help"] {
        let dir = help_c.join(book);
        let defs = dtd_entities(&dir).with_context(|| "run scripts/fetch.sh for gnucash-docs".to_string())?;
        let mut files: Vec<_> = std::fs::read_dir(&dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "xml"))
            .filter(|p| {
                let n = p.file_name().unwrap_or_default().to_string_lossy();
                !n.starts_with("fdl") && n != "legal.xml"
            })
            .collect();
        files.sort();
        for f in files {
            let xml = std::fs::read_to_string(&f).with_context(|| format!("cannot read {}", f.display()))?;
            let text = docbook_text(&xml, &defs);
            if text.len() > 200 {
                docs.push(Doc {
                    text,
                    source: "gnucash",
                    doc: format!("{book}/{}", f.file_stem().unwrap_or_default().to_string_lossy()),
                });
            }
        }
    }
    if docs.is_empty() {
        bail!("{}: no DocBook chapters found; run scripts/fetch.sh", help_c.display());
    }
    Ok(docs)
}

/// Whether a document is held out: a seeded hash of its source and id, `heldout` of them.
pub fn is_heldout(source: &str, doc: &str, seed: u64, heldout: f64) -> bool {
    let h = mix(&[seed, fnv(source.as_bytes()), fnv(doc.as_bytes())]);
    ((h >> 11) as f64 / (1u64 << 53) as f64) < heldout
}

fn fnv(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf29ce484222325u64, |h, &c| {
        (h ^ c as u64).wrapping_mul(0x100000001b3)
    })
}

/// A corpus split into train and held-out documents.
#[derive(Debug, Default)]
pub struct Split {
    /// Training documents.
    pub train: Vec<Doc>,
    /// Held-out documents.
    pub heldout: Vec<Doc>,
}

/// Splits documents by [`is_heldout`].
pub fn split(docs: Vec<Doc>, seed: u64, heldout: f64) -> Split {
    let mut s = Split::default();
    for d in docs {
        if is_heldout(d.source, &d.doc, seed, heldout) {
            s.heldout.push(d);
        } else {
            s.train.push(d);
        }
    }
    s
}

/// Documents and bytes by source.
pub fn sizes(docs: &[Doc]) -> BTreeMap<&'static str, (usize, usize)> {
    let mut m: BTreeMap<&'static str, (usize, usize)> = BTreeMap::new();
    for d in docs {
        let e = m.entry(d.source).or_default();
        e.0 += 1;
        e.1 += d.text.len();
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_split_into_finance_and_other_passages() {
        let text = "We will cut taxes and balance the budget. The deficit and the debt fall. \
                    Trade and investment grow. Wages rise. Our soldiers are brave. We honor them. \
                    The flag flies. Families gather.";
        let (fin, gen) = split_address(text);
        assert!(fin.contains("budget") && fin.contains("Wages rise."));
        assert!(gen.contains("soldiers") && !gen.contains("budget"));
        assert_eq!(sentences("A b. C d? E").len(), 3);
        assert_eq!(finance_hits("taxes, a syntax, the tax"), 2);
    }

    #[test]
    fn gcide_markup_is_cleaned() {
        let raw = "Actual \\Ac\"tu*al\\, n. (Finance)\n   Something actually received; real, as distinct from\n   estimated, receipts. [Cant] See {Real}.\n   [1913 Webster]\n";
        assert_eq!(
            clean_gcide(raw),
            "Actual, n. (Finance)\nSomething actually received; real, as distinct from\nestimated, receipts. See Real."
        );
        let raw2 = "DJIA \\DJIA\\ (d[=e]\"j[=a]*[imac]`[=a]), n. (Finance)\n   The Dow. [PJC]";
        assert_eq!(clean_gcide(raw2), "DJIA, n. (Finance)\nThe Dow.");
        assert_eq!(dictd_number("A"), Some(0));
        assert_eq!(dictd_number("BA"), Some(64));
        assert_eq!(dictd_number("KpRV"), Some(((10 * 64 + 41) * 64 + 17) * 64 + 21));
        assert_eq!(dictd_number("a-b"), None);
    }

    #[test]
    fn docbook_becomes_paragraphs_with_entities_expanded() {
        let defs: HashMap<String, String> = [
            ("appname".to_string(), "GnuCash".to_string()),
            ("app".to_string(), "<application>&appname;</application>".to_string()),
        ]
        .into();
        let xml = "<?xml version=\"1.0\"?>\n<!-- c -->\n<chapter id=\"x\"><title>Loans</title>\n<para>&app; tracks a <emphasis>loan</emphasis>;\n interest &amp; fees &lt;1%&gt;.</para><para>Next&rsquo;s.</para></chapter>";
        assert_eq!(
            docbook_text(xml, &defs),
            "Loans\n\nGnuCash tracks a loan;\ninterest & fees <1%>.\n\nNext's."
        );
    }

    #[test]
    fn split_is_by_document_and_seeded() {
        let docs: Vec<Doc> = (0..2000)
            .map(|i| Doc {
                text: format!("t{i}"),
                source: "sotu",
                doc: format!("d{}", i / 2),
            })
            .collect();
        let s = split(docs.clone(), 7, 0.1);
        // Both halves of a document share its fate.
        for d in &s.heldout {
            assert!(!s.train.iter().any(|t| t.doc == d.doc));
        }
        let frac = s.heldout.len() as f64 / docs.len() as f64;
        assert!((0.06..0.14).contains(&frac), "{frac}");
        assert_eq!(split(docs.clone(), 7, 0.1).heldout, s.heldout);
        assert_ne!(split(docs, 8, 0.1).heldout, s.heldout);
    }
}
