//! Reading files strangers wrote: plain files only, sizes capped before anything is read,
//! directories walked without following a symlink back into themselves.
//!
//! Opening a FIFO blocks until a writer comes and `/dev/zero` never ends, so the kind of file
//! is checked before it is opened; every JSON, TOML and JSONL reader goes through a cap so a
//! crafted file gets a clear error instead of an allocation the machine cannot give.

use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

/// The most a small configuration file (`config.json`, a recipe, an adapter config, a
/// checkpoint's state) may hold.
pub const CONFIG_CAP: u64 = 16 << 20;
/// The most a `tokenizer.json` or a safetensors index may hold (the largest vocabularies
/// published take about 35 MB).
pub const TOKENIZER_CAP: u64 = 512 << 20;
/// The most a whole data file read at once (multiple-choice items, prompts, results) may hold.
pub const DATA_CAP: u64 = 1 << 30;
/// The most one text document (a `.txt`/`.md` file, one JSONL line) may hold.
pub const DOCUMENT_CAP: u64 = 64 << 20;

/// Checks that `path` is a plain file (following symlinks) and gives its size: FIFOs,
/// sockets, devices and directories are refused before they are opened.
pub fn check_regular_file(path: &Path) -> Result<u64> {
    let m = std::fs::metadata(path).with_context(|| format!("cannot open {}", path.display()))?;
    if !m.is_file() {
        let kind = if m.is_dir() {
            "a directory"
        } else {
            "not a plain file (a FIFO, socket or device)"
        };
        bail!("{} is {kind}; give the path of a regular file", path.display());
    }
    Ok(m.len())
}

/// The bytes of `path`, refused when it holds more than `cap` (`what` names the kind of file
/// in the error).
pub fn read_capped(path: &Path, cap: u64, what: &str) -> Result<Vec<u8>> {
    let size = check_regular_file(path)?;
    if size > cap {
        bail!(
            "{}: {size} bytes is more than a {what} may hold ({} MB); is this the right file?",
            path.display(),
            cap >> 20
        );
    }
    let f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut v = Vec::with_capacity(size as usize);
    // The file may grow between the check and the read.
    f.take(cap + 1)
        .read_to_end(&mut v)
        .with_context(|| format!("cannot read {}", path.display()))?;
    if v.len() as u64 > cap {
        bail!("{}: more than a {what} may hold ({} MB)", path.display(), cap >> 20);
    }
    Ok(v)
}

/// [`read_capped`] as UTF-8 text.
pub fn read_text(path: &Path, cap: u64, what: &str) -> Result<String> {
    String::from_utf8(read_capped(path, cap, what)?).map_err(|e| {
        anyhow::anyhow!(
            "{} is not UTF-8 text (invalid byte at {})",
            path.display(),
            e.utf8_error().valid_up_to()
        )
    })
}

/// Calls `line(number, text)` for each line of the JSONL (or any line-oriented) file `path`,
/// streaming: a line longer than `cap` is an error naming its number, never an allocation of
/// its size.
pub fn for_each_line(path: &Path, cap: u64, mut line: impl FnMut(usize, &str) -> Result<()>) -> Result<()> {
    check_regular_file(path)?;
    let f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut r = BufReader::with_capacity(1 << 16, f);
    let mut buf = Vec::new();
    for n in 1.. {
        buf.clear();
        let got = (&mut r)
            .take(cap + 1)
            .read_until(b'\n', &mut buf)
            .with_context(|| format!("cannot read {}", path.display()))?;
        if got == 0 {
            break;
        }
        if buf.len() as u64 > cap {
            bail!(
                "{}:{n}: the line is longer than {} MB; split the document into smaller ones",
                path.display(),
                cap >> 20
            );
        }
        let text = std::str::from_utf8(&buf).map_err(|e| {
            anyhow::anyhow!(
                "{}:{n}: not UTF-8 text (invalid byte at column {})",
                path.display(),
                e.valid_up_to() + 1
            )
        })?;
        line(n, text.trim_end_matches(['\n', '\r']))?;
    }
    Ok(())
}

/// Every plain file under `root` (itself when it is a file) whose name `keep` accepts, sorted.
/// Symlinks are followed, but a directory reached twice (a link back to a parent) is walked
/// once; FIFOs, sockets and devices are skipped.
pub fn walk_files(root: &Path, keep: &dyn Fn(&Path) -> bool) -> Result<Vec<PathBuf>> {
    let m = std::fs::metadata(root).with_context(|| format!("data path {} does not exist", root.display()))?;
    if m.is_file() {
        return Ok(vec![root.to_path_buf()]);
    }
    if !m.is_dir() {
        bail!(
            "{} is not a plain file or a directory (a FIFO, socket or device)",
            root.display()
        );
    }
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let canon = std::fs::canonicalize(&dir).with_context(|| format!("cannot resolve {}", dir.display()))?;
        if !seen.insert(canon) {
            continue;
        }
        for e in std::fs::read_dir(&dir).with_context(|| format!("cannot list {}", dir.display()))? {
            let p = e?.path();
            // A dangling link has no metadata: nothing to read there.
            let Ok(m) = std::fs::metadata(&p) else { continue };
            if m.is_dir() {
                stack.push(p);
            } else if m.is_file() && keep(&p) {
                out.push(p);
            }
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn special_files_caps_and_cycles_are_refused_or_survived() -> Result<()> {
        let e = read_capped(Path::new("/dev/zero"), CONFIG_CAP, "config").unwrap_err();
        assert!(e.to_string().contains("not a plain file"), "{e}");
        let dir = std::env::temp_dir().join(format!("strata-fsio-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("sub"))?;
        std::fs::write(dir.join("sub/a.txt"), "x".repeat(100))?;
        let e = read_capped(&dir.join("sub/a.txt"), 10, "recipe").unwrap_err();
        assert!(e.to_string().contains("more than a recipe may hold"), "{e}");
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(&dir, dir.join("sub/loop")).ok();
            let fifo = dir.join("sub/pipe.txt");
            let made = std::process::Command::new("mkfifo")
                .arg(&fifo)
                .status()
                .map(|s| s.success());
            let files = walk_files(&dir, &|p| p.extension().is_some_and(|x| x == "txt"))?;
            assert_eq!(files, vec![dir.join("sub/a.txt")]);
            if made.unwrap_or(false) {
                let e = read_capped(&fifo, 10, "recipe").unwrap_err();
                assert!(e.to_string().contains("FIFO"), "{e}");
            }
        }
        std::fs::write(dir.join("long.jsonl"), format!("{{}}\n{}\n", "y".repeat(50)))?;
        let mut n = 0;
        let e = for_each_line(&dir.join("long.jsonl"), 20, |_, _| {
            n += 1;
            Ok(())
        })
        .unwrap_err();
        assert!(e.to_string().contains("long.jsonl:2: the line is longer"), "{e}");
        assert_eq!(n, 1);
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
