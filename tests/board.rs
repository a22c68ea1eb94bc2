//! `strata board` in a real browser: headless Chromium (Debian's `chromium`, which
//! `scripts/test-deps.sh` installs) opens the board while a tiny run trains, and the page's
//! training curve has more points the second time it is read than the first.

use anyhow::{bail, Context, Result};
use candle_core::quantized::GgmlDType;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use strata::model::config::Arch;
use strata::train::callback::{Callback, Control};
use strata::train::recipe::Recipe;

/// Slows each step so that the run is still training while the browser looks.
struct Slow;

impl Callback for Slow {
    fn name(&self) -> &str {
        "slow"
    }
    fn on_step_begin(&mut self, _c: &mut Control) -> Result<()> {
        std::thread::sleep(Duration::from_millis(150));
        Ok(())
    }
}

fn chromium() -> Option<PathBuf> {
    [
        "/usr/bin/chromium",
        "/usr/bin/chromium-browser",
        "/usr/bin/google-chrome",
    ]
    .into_iter()
    .map(PathBuf::from)
    .find(|p| p.is_file())
}

/// The board process; killed when the test ends, pass or fail.
struct Board(Child);

impl Drop for Board {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The page after its scripts ran for a moment, as the browser's DOM.
fn dom(browser: &Path, url: &str, profile: &Path) -> Result<String> {
    let out = Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--virtual-time-budget=1500",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(url)
        .stderr(Stdio::null())
        .output()
        .context("cannot start chromium")?;
    if !out.status.success() {
        bail!("chromium exited with {}", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The `data-points` the page puts on its body: training steps it has drawn.
fn points(dom: &str) -> Option<usize> {
    let body = &dom[dom.find("<body")?..];
    let at = body.find("data-points=\"")? + "data-points=\"".len();
    body[at..].split('"').next()?.parse().ok()
}

#[test]
fn the_board_shows_a_run_growing_while_it_trains() -> Result<()> {
    let Some(browser) = chromium() else {
        if std::env::var_os("STRATA_REQUIRE_TOOLS").is_some() {
            panic!("chromium is missing; scripts/test-deps.sh installs it");
        }
        eprintln!("skipped: chromium is missing (scripts/test-deps.sh installs it)");
        return Ok(());
    };
    let dir = std::env::temp_dir().join(format!("strata-board-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("runs"))?;
    strata::testing::write_tiny_gguf(&dir.join("tiny.gguf"), Arch::Llama, true, 3, GgmlDType::F32)?;
    strata::testing::write_tiny_corpus(&dir)?;

    let mut child = Command::new(env!("CARGO_BIN_EXE_strata"))
        .arg("board")
        .arg(dir.join("runs"))
        .args(["--port", "0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut first = String::new();
    std::io::BufReader::new(child.stdout.take().context("board stdout")?).read_line(&mut first)?;
    let board = Board(child);
    let url = first
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .with_context(|| format!("no address in `{first}`"))?
        .to_string();

    let text = strata::testing::tiny_lora_recipe(&dir, "runs/live", 100, 3, "eval_every = 25");
    let recipe = Recipe::parse(&text, "board.toml", &[])?;
    let trainer = std::thread::spawn(move || {
        let opts = strata::train::trainer::RunOptions {
            callbacks: vec![Box::new(Slow)],
            ..Default::default()
        };
        strata::train::trainer::run_with(&recipe, &text, opts).map(|_| ())
    });

    let metrics = dir.join("runs/live/metrics.jsonl");
    let steps_logged = || {
        std::fs::read_to_string(&metrics)
            .map(|t| t.lines().filter(|l| l.contains("\"micro_batch\"")).count())
            .unwrap_or(0)
    };
    let t0 = Instant::now();
    while steps_logged() < 3 {
        assert!(t0.elapsed() < Duration::from_secs(120), "the run logged no steps");
        std::thread::sleep(Duration::from_millis(50));
    }
    let page = format!("{url}?run=live&every=250");
    let profile = dir.join("profile");
    let a = dom(&browser, &page, &profile)?;
    std::thread::sleep(Duration::from_millis(1500));
    let b = dom(&browser, &page, &profile)?;
    let (pa, pb) = (points(&a), points(&b));
    eprintln!("the page drew {pa:?} steps, then {pb:?}");
    let training = steps_logged() < 100;
    trainer.join().expect("the run thread")?;
    drop(board);
    assert!(a.contains("<canvas"), "the page drew no chart: {a}");
    assert!(
        matches!((pa, pb), (Some(x), Some(y)) if x >= 3 && y > x),
        "the curve did not grow: {pa:?} then {pb:?}"
    );
    assert!(training, "the second look must be while the run trains");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
