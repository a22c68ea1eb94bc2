//! The fetch step's verification (scripts/fetch-lib.sh) on fixtures, without a network: a file
//! with the pinned checksum is accepted and not fetched again, a corrupted one is refused with
//! a message that says what to do, and a missing client is named.

use std::path::PathBuf;
use std::process::{Command, Output};

fn run(script: &str) -> Output {
    let lib = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/fetch-lib.sh");
    Command::new("bash")
        .arg("-c")
        .arg(format!(". '{}'\n{script}", lib.display()))
        .output()
        .expect("bash runs")
}

#[test]
fn checksums_are_enforced_and_missing_clients_named() -> std::io::Result<()> {
    let dir = std::env::temp_dir().join(format!("strata-fetch-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let f = dir.join("model.gguf");
    std::fs::write(&f, b"strata")?;
    // sha256("strata")
    let good = "82ba7e1f6f4171d3648bb4f785ca31992efe32df6e024acb5bccd297feb2f263";
    let bad = "0".repeat(64);
    let f = f.display();

    let ok = run(&format!("check '{f}' {good} && verified '{f}' {good} && echo fine"));
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    assert_eq!(String::from_utf8_lossy(&ok.stdout).trim(), "fine");

    let refused = run(&format!("check '{f}' {bad}; echo unreachable"));
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("checksum mismatch") && err.contains(good) && err.contains("remove it and run again"),
        "{err}"
    );
    assert!(!String::from_utf8_lossy(&refused.stdout).contains("unreachable"));

    // A corrupted or absent file is not "verified", so fetch.sh downloads it again.
    assert!(!run(&format!("verified '{f}' {bad}")).status.success());
    assert!(!run(&format!("verified '{f}.absent' {good}")).status.success());
    let gone = run(&format!("check '{f}.absent' {good}"));
    assert!(String::from_utf8_lossy(&gone.stderr).contains("missing after download"));

    let missing = run("need strata-no-such-client 'to download things'");
    assert!(!missing.status.success());
    let err = String::from_utf8_lossy(&missing.stderr);
    assert!(
        err.contains("'strata-no-such-client' is required (to download things)"),
        "{err}"
    );
    assert!(run("need bash 'a shell'").status.success());
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
