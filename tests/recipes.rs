//! Every shipped recipe parses and resolves its plan (so the docs and the examples stay valid).

use strata::train::recipe::Recipe;

#[test]
fn shipped_recipes_parse() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().and_then(|x| x.to_str()) != Some("toml") {
            continue;
        }
        let r = Recipe::load(&p, &[]).unwrap_or_else(|e| panic!("{}: {e:#}", p.display()));
        let plan = r.plan(30).unwrap();
        assert_eq!(plan.is_some(), r.train.mode == "lora", "{}", p.display());
        n += 1;
    }
    assert!(n >= 3, "expected the shipped recipes in {}", dir.display());
}
