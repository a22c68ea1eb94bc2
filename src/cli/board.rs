//! `strata board [DIR]`: a local page of the runs and experiments under DIR, live while they
//! train. It only reads what runs already write (`metrics.jsonl`, `plan.json`, `recipe.toml`,
//! `summary.json`; an experiment's `table.md` and `results.json`), so it can watch a run without
//! touching it, and serves every asset itself (the page, and uPlot vendored from npm under
//! `web/vendor/`): nothing is fetched from the internet at view time.
//!
//! The page polls: `/api/list` for the runs, `/api/run?name=R&from=N` for a run's metrics lines
//! after the first N (so a long run is not sent again every two seconds), `/api/experiment?name=E`.
//! Names are matched against the runs found under DIR, never joined onto it, so no request
//! reaches a file outside DIR.

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// Arguments of `strata board`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The directory whose runs and experiments are shown (searched four levels deep).
    #[arg(default_value = "runs")]
    pub dir: PathBuf,
    /// Port to listen on (0: any free port, printed).
    #[arg(long, default_value_t = 6006)]
    pub port: u16,
    /// Address to listen on; the default serves this machine only.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
}

const PAGE: &str = include_str!("../../web/board.html");
const UPLOT_JS: &str = include_str!("../../web/vendor/uPlot.iife.min.js");
const UPLOT_CSS: &str = include_str!("../../web/vendor/uPlot.min.css");

/// How deep under DIR runs are looked for (`runs/forgetting/lora` is two).
const DEPTH: usize = 4;

/// What the board found in a directory.
#[derive(Clone, Debug, PartialEq)]
pub enum Kind {
    /// A training run: it has `metrics.jsonl`.
    Run,
    /// An experiment: it has `results.json` and `table.md`.
    Experiment,
}

/// A run or experiment under DIR: its name is the path relative to DIR.
#[derive(Clone, Debug)]
pub struct Found {
    /// Path relative to DIR, `/`-separated.
    pub name: String,
    /// Its directory.
    pub path: PathBuf,
    /// Run or experiment.
    pub kind: Kind,
}

/// The runs and experiments under `dir`, sorted by name.
pub fn discover(dir: &Path) -> Result<Vec<Found>> {
    let mut out = Vec::new();
    walk(dir, dir, 0, &mut out)?;
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

fn walk(root: &Path, d: &Path, depth: usize, out: &mut Vec<Found>) -> Result<()> {
    let name = || {
        let rel = d.strip_prefix(root).unwrap_or(d).to_string_lossy().replace('\\', "/");
        if rel.is_empty() {
            ".".to_string()
        } else {
            rel
        }
    };
    if d.join("metrics.jsonl").is_file() {
        out.push(Found {
            name: name(),
            path: d.to_path_buf(),
            kind: Kind::Run,
        });
    } else if d.join("results.json").is_file() && d.join("table.md").is_file() {
        out.push(Found {
            name: name(),
            path: d.to_path_buf(),
            kind: Kind::Experiment,
        });
    }
    if depth == DEPTH {
        return Ok(());
    }
    let Ok(entries) = std::fs::read_dir(d) else {
        return Ok(());
    };
    let mut subdirs: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        // An entry's own type: a symlink is not followed, so a loop cannot trap the walk.
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .filter(|p| {
            !matches!(
                p.file_name().and_then(|n| n.to_str()),
                Some("checkpoints" | "adapter" | "model")
            )
        })
        .collect();
    subdirs.sort();
    for s in subdirs {
        walk(root, &s, depth + 1, out)?;
    }
    Ok(())
}

/// A file's text if it exists and is not over `cap` bytes.
fn read_opt(p: &Path, cap: u64) -> Option<String> {
    crate::fsio::read_text(p, cap, "run file").ok()
}

/// Complete metrics lines from line `from` on (a line still being written is left for the next
/// poll), and the count of complete lines.
pub fn lines_from(text: &str, from: usize) -> (Vec<Value>, usize) {
    let complete = match text.rfind('\n') {
        Some(i) => &text[..=i],
        None => "",
    };
    let all: Vec<&str> = complete.lines().collect();
    let new = all
        .iter()
        .skip(from)
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    (new, all.len())
}

fn query(q: &str, key: &str) -> Option<String> {
    q.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| percent_decode(v))
    })
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                match u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16) {
                    Ok(v) => {
                        out.push(v);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The answer to one request: status, content type, body.
pub fn respond(dir: &Path, url: &str) -> (u16, &'static str, Vec<u8>) {
    let (path, q) = url.split_once('?').unwrap_or((url, ""));
    let jsonr = |v: Result<Value>| match v {
        Ok(v) => (200, "application/json", v.to_string().into_bytes()),
        Err(e) => (
            404,
            "application/json",
            json!({"error": format!("{e:#}")}).to_string().into_bytes(),
        ),
    };
    match path {
        "/" | "/index.html" => (200, "text/html; charset=utf-8", PAGE.as_bytes().to_vec()),
        "/uPlot.iife.min.js" => (200, "text/javascript", UPLOT_JS.as_bytes().to_vec()),
        "/uPlot.min.css" => (200, "text/css", UPLOT_CSS.as_bytes().to_vec()),
        "/api/list" => jsonr(list(dir)),
        "/api/run" => jsonr(run_json(dir, query(q, "name"), query(q, "from"))),
        "/api/experiment" => jsonr(experiment_json(dir, query(q, "name"))),
        _ => (404, "text/plain", b"not found".to_vec()),
    }
}

fn list(dir: &Path) -> Result<Value> {
    let found = discover(dir)?;
    Ok(json!({
        "dir": dir.display().to_string(),
        "runs": found.iter().filter(|f| f.kind == Kind::Run).map(|f| {
            let done = f.path.join("summary.json").is_file();
            json!({"name": f.name, "done": done})
        }).collect::<Vec<_>>(),
        "experiments": found.iter().filter(|f| f.kind == Kind::Experiment).map(|f| f.name.clone()).collect::<Vec<_>>(),
    }))
}

fn find(dir: &Path, name: Option<String>, kind: Kind) -> Result<Found> {
    let name = name.context("no name given")?;
    match discover(dir)?.into_iter().find(|f| f.name == name && f.kind == kind) {
        Some(f) => Ok(f),
        None => bail!("no {kind:?} named `{name}` under {}", dir.display()),
    }
}

fn json_file(p: &Path) -> Value {
    read_opt(p, crate::fsio::CONFIG_CAP)
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Value::Null)
}

fn run_json(dir: &Path, name: Option<String>, from: Option<String>) -> Result<Value> {
    let f = find(dir, name, Kind::Run)?;
    let from: usize = from.and_then(|s| s.parse().ok()).unwrap_or(0);
    let text = read_opt(&f.path.join("metrics.jsonl"), crate::fsio::DATA_CAP).unwrap_or_default();
    let (lines, next) = lines_from(&text, from);
    // A restarted run rewrites metrics.jsonl: fewer lines than the page holds means start again.
    let reset = next < from;
    let (lines, next) = if reset { lines_from(&text, 0) } else { (lines, next) };
    let mut v = json!({"name": f.name, "lines": lines, "next": next, "reset": reset,
        "plan": json_file(&f.path.join("plan.json")), "summary": json_file(&f.path.join("summary.json"))});
    if from == 0 || reset {
        v["recipe"] = read_opt(&f.path.join("recipe.toml"), crate::fsio::CONFIG_CAP).into();
    }
    Ok(v)
}

fn experiment_json(dir: &Path, name: Option<String>) -> Result<Value> {
    let f = find(dir, name, Kind::Experiment)?;
    Ok(
        json!({"name": f.name, "table": read_opt(&f.path.join("table.md"), crate::fsio::CONFIG_CAP),
        "results": json_file(&f.path.join("results.json"))}),
    )
}

/// Serves the board until the process is stopped.
pub fn run(a: Args) -> Result<()> {
    if !a.dir.is_dir() {
        bail!(
            "{} is not a directory; give the directory your runs write to (train.out's parent, e.g. `runs`)",
            a.dir.display()
        );
    }
    let server = tiny_http::Server::http((a.host.as_str(), a.port)).map_err(|e| {
        anyhow::anyhow!(
            "cannot listen on {}:{}: {e}; choose another --port (0 takes any free one)",
            a.host,
            a.port
        )
    })?;
    let addr = server.server_addr().to_ip().context("the server has no IP address")?;
    println!(
        "strata board: http://{addr}/ shows the runs under {} (Ctrl-C stops it)",
        a.dir.display()
    );
    use std::io::Write;
    std::io::stdout().flush()?;
    for req in server.incoming_requests() {
        let (code, ctype, body) = respond(&a.dir, req.url());
        let header = tiny_http::Header::from_bytes(&b"Content-Type"[..], ctype.as_bytes()).expect("a valid header");
        let nocache = tiny_http::Header::from_bytes(&b"Cache-Control"[..], &b"no-store"[..]).expect("a valid header");
        let resp = tiny_http::Response::from_data(body)
            .with_status_code(code)
            .with_header(header)
            .with_header(nocache);
        // A browser that went away mid-answer is not the board's error.
        let _ = req.respond(resp);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_are_found_and_names_never_leave_the_directory() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("strata-board-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("a/checkpoints/step-1"))?;
        std::fs::create_dir_all(dir.join("ex/lora"))?;
        std::fs::write(
            dir.join("a/metrics.jsonl"),
            "{\"step\":0}\n{\"step\":1,\"loss\":2}\n{\"step\":2",
        )?;
        std::fs::write(dir.join("a/checkpoints/step-1/metrics.jsonl"), "")?;
        std::fs::write(dir.join("ex/results.json"), "{}")?;
        std::fs::write(dir.join("ex/table.md"), "| a |")?;
        std::fs::write(dir.join("ex/lora/metrics.jsonl"), "")?;
        let names: Vec<(String, Kind)> = discover(&dir)?.into_iter().map(|f| (f.name, f.kind)).collect();
        assert_eq!(
            names,
            vec![
                ("a".into(), Kind::Run),
                ("ex".into(), Kind::Experiment),
                ("ex/lora".into(), Kind::Run)
            ]
        );
        let body = |url: &str| {
            let (code, _, b) = respond(&dir, url);
            (code, serde_json::from_slice::<Value>(&b).unwrap_or(Value::Null))
        };
        let (code, v) = body("/api/run?name=a&from=1");
        assert_eq!(code, 200);
        assert_eq!(
            v["lines"].as_array().map(|l| l.len()),
            Some(1),
            "the half-written line waits"
        );
        assert_eq!(v["next"], 2);
        let (_, v) = body("/api/run?name=a&from=5");
        assert_eq!(v["reset"], true, "a rewritten file starts the page again");
        for bad in [
            "/api/run?name=..%2F..%2Fetc",
            "/api/run?name=%2Fetc",
            "/api/run",
            "/api/experiment?name=a",
        ] {
            assert_eq!(body(bad).0, 404, "{bad}");
        }
        assert_eq!(respond(&dir, "/../Cargo.toml").0, 404);
        assert_eq!(body("/api/experiment?name=ex").1["table"], "| a |");
        assert_eq!(percent_decode("ex%2Flora+x%zz%4"), "ex/lora x%zz%4");
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
