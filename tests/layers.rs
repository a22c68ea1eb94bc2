//! The crate's modules import only downward: each top-level module may use the ones below it in
//! [`LAYERS`] and its own, never one above (the order `lib.rs` documents). Test code (`mod
//! tests` blocks) and `testing` (the tests' scaffolding) are exempt.

use std::collections::BTreeMap;
use std::path::Path;

/// Bottom to top; modules on one row may not import each other.
const LAYERS: &[&[&str]] = &[
    &["util", "rng", "quant", "fsio", "progress", "dist"],
    &["ops"],
    &["model"],
    &["adapter", "data"],
    &["eval", "engine"],
    &["retain"],
    &["train"],
    &["cli"],
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|row| row.contains(&module))
}

/// The source with `#[cfg(test)]` items cut out (the attribute and the braced item after it).
fn without_tests(src: &str) -> String {
    let mut out = String::new();
    let mut rest = src;
    while let Some(at) = rest.find("#[cfg(test)]") {
        out.push_str(&rest[..at]);
        let after = &rest[at..];
        let Some(open) = after.find('{') else { break };
        let mut depth = 0usize;
        let mut end = after.len();
        for (i, c) in after[open..].char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = open + i + 1;
                        break;
                    }
                }
                _ => {}
            }
        }
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

fn files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).expect("src is readable") {
        let p = e.expect("entry").path();
        if p.is_dir() {
            files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn modules_import_only_downward() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut all = Vec::new();
    files(&src, &mut all);
    let mut upward: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut unlisted = Vec::new();
    for path in all {
        let rel = path.strip_prefix(&src).expect("under src");
        let top = rel.iter().next().and_then(|s| s.to_str()).expect("a name");
        let module = top.trim_end_matches(".rs");
        if matches!(module, "lib" | "main" | "testing") {
            continue;
        }
        let Some(own) = layer_of(module) else {
            unlisted.push(module.to_string());
            continue;
        };
        let text = without_tests(&std::fs::read_to_string(&path).expect("readable"));
        for (i, _) in text.match_indices("crate::") {
            let used: String = text[i + 7..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if used == module {
                continue;
            }
            match layer_of(&used) {
                Some(l) if l < own => {}
                Some(_) => upward
                    .entry(format!("{} -> {used}", rel.display()))
                    .or_default()
                    .push(used.clone()),
                None if used == "testing" => upward
                    .entry(format!("{} -> testing (test scaffolding)", rel.display()))
                    .or_default()
                    .push(used.clone()),
                None => {}
            }
        }
    }
    assert!(unlisted.is_empty(), "modules missing from LAYERS: {unlisted:?}");
    assert!(
        upward.is_empty(),
        "imports that go up or sideways: {:#?}",
        upward.keys().collect::<Vec<_>>()
    );
}
