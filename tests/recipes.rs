//! Every shipped recipe parses and resolves its plan (so the docs and the examples stay valid).

use strata::train::recipe::Recipe;

#[test]
fn shipped_recipes_parse() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes");
    let mut n = 0;
    let mut files: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.extend(
        std::fs::read_dir(dir.join("forgetting"))
            .unwrap()
            .map(|e| e.unwrap().path()),
    );
    for p in files {
        if p.extension().and_then(|x| x.to_str()) != Some("toml") {
            continue;
        }
        if std::fs::read_to_string(&p).unwrap().contains("[[run]]") {
            // An experiment: its runs' recipe paths are relative to the project root.
            std::env::set_current_dir(env!("CARGO_MANIFEST_DIR")).unwrap();
            let ex = strata::cli::experiment::Experiment::load(&p).unwrap_or_else(|e| panic!("{e:#}"));
            // Every shipped experiment compares at least two recipes and has a quick variant.
            assert!(ex.runs.len() >= 2 && ex.quick.is_some(), "{}", p.display());
            continue;
        }
        let r = Recipe::load(&p, &[]).unwrap_or_else(|e| panic!("{}: {e:#}", p.display()));
        let plan = r.plan(30).unwrap();
        assert_eq!(plan.is_some(), !r.full(), "{}", p.display());
        n += 1;
    }
    assert!(n >= 9, "expected the shipped recipes in {}", dir.display());
}
