//! TensorBoard event files (`train.log = ["tensorboard"]`): every metrics line's numbers as
//! scalars of the same names (`loss`, `lr/lora_a`, `eval/loss`, ...), for users who keep
//! TensorBoard. A file is a TFRecord stream of `tensorflow.Event` protobufs: each record is its
//! length (u64 LE), the length's masked CRC-32C, the bytes and their masked CRC-32C.
//!
//! The few protobuf fields needed are written by hand (a protobuf crate and generated code would
//! be a build step for five fields); the reader below decodes exactly what the writer writes and
//! checks every CRC, which is how the tests hold the files to the format.

use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::io::Write;
use std::path::{Path, PathBuf};

/// TFRecord's CRC mask (the same constant TensorFlow's `record_writer` applies).
fn masked_crc(bytes: &[u8]) -> u32 {
    let c = crc32c::crc32c(bytes);
    c.rotate_right(15).wrapping_add(0xa282_ead8)
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A length-delimited field (wire type 2).
fn bytes_field(out: &mut Vec<u8>, field: u32, b: &[u8]) {
    varint(out, u64::from(field << 3 | 2));
    varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

/// An `Event` with `wall_time` (1, double), `step` (2, int64) and either `file_version` (3) or
/// a `Summary` (5) of `Value { tag (1), simple_value (2, float) }`.
fn event(wall: f64, step: i64, body: EventBody) -> Vec<u8> {
    let mut e = Vec::new();
    e.push(1 << 3 | 1);
    e.extend_from_slice(&wall.to_le_bytes());
    e.push(2 << 3);
    varint(&mut e, step as u64);
    match body {
        EventBody::Version => bytes_field(&mut e, 3, b"brain.Event:2"),
        EventBody::Scalars(values) => {
            let mut summary = Vec::new();
            for (tag, v) in values {
                let mut val = Vec::new();
                bytes_field(&mut val, 1, tag.as_bytes());
                val.push(2 << 3 | 5);
                val.extend_from_slice(&v.to_le_bytes());
                bytes_field(&mut summary, 1, &val);
            }
            bytes_field(&mut e, 5, &summary);
        }
    }
    e
}

enum EventBody<'a> {
    Version,
    Scalars(&'a [(String, f32)]),
}

/// The numbers of a metrics line as `(tag, value)`: nested objects joined with `/`, `step`,
/// strings, booleans and non-finite values left out.
pub fn scalars_of(line: &Value) -> Vec<(String, f32)> {
    fn walk(prefix: &str, v: &Value, out: &mut Vec<(String, f32)>) {
        match v {
            Value::Number(n) => {
                if let Some(x) = n.as_f64().filter(|x| x.is_finite()) {
                    out.push((prefix.to_string(), x as f32));
                }
            }
            Value::Object(m) => {
                for (k, x) in m {
                    if prefix.is_empty() && k == "step" {
                        continue;
                    }
                    let tag = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}/{k}")
                    };
                    walk(&tag, x, out);
                }
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk("", line, &mut out);
    out
}

/// One run's event file, written as the run logs.
pub struct EventWriter {
    file: std::io::BufWriter<std::fs::File>,
    path: PathBuf,
}

/// Event files strata writes in a run directory.
fn is_event_file(p: &Path) -> bool {
    p.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with("events.out.tfevents.") && n.ends_with(".strata"))
}

impl EventWriter {
    /// A new event file in `dir`. Earlier strata event files there are removed: a run (fresh or
    /// resumed) writes its whole history again, as it does `metrics.jsonl`, so TensorBoard never
    /// shows the steps a crashed run logged past its last checkpoint twice.
    pub fn create(dir: &Path) -> Result<Self> {
        for e in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
            let p = e?.path();
            if is_event_file(&p) {
                std::fs::remove_file(&p).with_context(|| format!("cannot remove {}", p.display()))?;
            }
        }
        let now = wall_clock();
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_else(|_| "host".into());
        let path = dir.join(format!(
            "events.out.tfevents.{}.{}.{}.strata",
            now as u64,
            host.trim(),
            std::process::id()
        ));
        let f = std::fs::File::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
        let mut w = Self {
            file: std::io::BufWriter::new(f),
            path,
        };
        w.record(&event(now, 0, EventBody::Version))?;
        Ok(w)
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn record(&mut self, data: &[u8]) -> Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        self.file.write_all(&len)?;
        self.file.write_all(&masked_crc(&len).to_le_bytes())?;
        self.file.write_all(data)?;
        self.file.write_all(&masked_crc(data).to_le_bytes())?;
        Ok(())
    }

    /// Writes a metrics line's scalars at its `step` and flushes, so TensorBoard sees the step.
    pub fn write_line(&mut self, line: &Value) -> Result<()> {
        let step = line.get("step").and_then(Value::as_i64).unwrap_or(0);
        let values = scalars_of(line);
        if values.is_empty() {
            return Ok(());
        }
        self.record(&event(wall_clock(), step, EventBody::Scalars(&values)))
            .and_then(|_| Ok(self.file.flush()?))
            .with_context(|| format!("cannot write {}", self.path.display()))
    }
}

fn wall_clock() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// One decoded event: its step and scalars (the version event has none).
#[derive(Debug, PartialEq)]
pub struct Scalars {
    /// The event's step.
    pub step: i64,
    /// `(tag, value)` in the order written.
    pub values: Vec<(String, f32)>,
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.0.len() < n {
            bail!("truncated: {n} bytes wanted, {} left", self.0.len());
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }

    fn varint(&mut self) -> Result<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.take(1)?[0];
            v |= u64::from(b & 0x7f) << shift;
            if b < 0x80 {
                return Ok(v);
            }
        }
        bail!("varint longer than 10 bytes")
    }

    /// The next `(field, wire type)` and, for length-delimited fields, their bytes.
    fn field(&mut self) -> Result<(u64, &'a [u8])> {
        let key = self.varint()?;
        let bytes = match key & 7 {
            0 => {
                self.varint()?;
                &[][..]
            }
            1 => self.take(8)?,
            2 => {
                let n = self.varint()? as usize;
                self.take(n)?
            }
            5 => self.take(4)?,
            w => bail!("wire type {w} is not one strata writes"),
        };
        Ok((key, bytes))
    }
}

/// Reads an event file back, checking every record's CRCs; the first event must be the version.
pub fn read_events(path: &Path) -> Result<Vec<Scalars>> {
    let data = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut c = Cursor(&data);
    let mut out = Vec::new();
    while !c.0.is_empty() {
        let len = c.take(8)?;
        if u32::from_le_bytes(c.take(4)?.try_into()?) != masked_crc(len) {
            bail!("record {}: length CRC does not match", out.len());
        }
        let n = u64::from_le_bytes(len.try_into()?) as usize;
        let rec = c.take(n)?;
        if u32::from_le_bytes(c.take(4)?.try_into()?) != masked_crc(rec) {
            bail!("record {}: data CRC does not match", out.len());
        }
        let mut e = Cursor(rec);
        let mut ev = Scalars {
            step: 0,
            values: Vec::new(),
        };
        let mut version = false;
        while !e.0.is_empty() {
            let key = e.varint()?;
            match key {
                0x09 => drop(e.take(8)?),
                0x10 => ev.step = e.varint()? as i64,
                0x1a => {
                    let n = e.varint()? as usize;
                    version = e.take(n)? == b"brain.Event:2";
                }
                0x2a => {
                    let n = e.varint()? as usize;
                    let mut s = Cursor(e.take(n)?);
                    while !s.0.is_empty() {
                        let (_, val) = s.field()?;
                        let (mut tag, mut value) = (String::new(), f32::NAN);
                        let mut v = Cursor(val);
                        while !v.0.is_empty() {
                            match v.field()? {
                                (0x0a, b) => tag = String::from_utf8(b.to_vec())?,
                                (0x15, b) => value = f32::from_le_bytes(b.try_into()?),
                                _ => {}
                            }
                        }
                        ev.values.push((tag, value));
                    }
                }
                k => bail!("event field key {k:#x} is not one strata writes"),
            }
        }
        if version != out.is_empty() {
            bail!(
                "event {}: the file version must be the first event and only it",
                out.len()
            );
        }
        out.push(ev);
    }
    if out.is_empty() {
        bail!("no events");
    }
    Ok(out.into_iter().skip(1).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn metrics_lines_round_trip_through_event_files() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("strata-tb-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("events.out.tfevents.1.h.1.strata"), b"old")?;
        let mut w = EventWriter::create(&dir)?;
        w.write_line(&json!({"step": 1, "loss": 2.5, "lr": {"lora_a": 1e-3, "lora_b": 2e-3}, "skipped": false, "grad_norm": "NaN"}))?;
        w.write_line(&json!({"step": 300, "eval": {"loss": 2.0, "ppl": 7.39}}))?;
        let path = w.path().to_path_buf();
        drop(w);
        let files: Vec<_> = std::fs::read_dir(&dir)?.collect();
        assert_eq!(files.len(), 1, "the older event file is replaced");
        let ev = read_events(&path)?;
        let tags = |e: &Scalars| e.values.iter().map(|(t, _)| t.clone()).collect::<Vec<_>>();
        assert_eq!(ev.len(), 2);
        assert_eq!(
            (ev[0].step, tags(&ev[0])),
            (1, vec!["loss".into(), "lr/lora_a".into(), "lr/lora_b".into()])
        );
        assert_eq!(ev[0].values[1].1, 1e-3);
        assert_eq!(
            (ev[1].step, tags(&ev[1])),
            (300, vec!["eval/loss".into(), "eval/ppl".into()])
        );
        // A flipped bit anywhere is caught by a CRC.
        let mut bytes = std::fs::read(&path)?;
        let mid = bytes.len() / 2;
        bytes[mid] ^= 4;
        std::fs::write(&path, &bytes)?;
        assert!(read_events(&path).is_err());
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }

    /// CRC-32C's published check value, masked as TFRecord does.
    #[test]
    fn the_crc_is_castagnoli_masked() {
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(
            masked_crc(b"123456789"),
            0xe306_9283u32.rotate_right(15).wrapping_add(0xa282_ead8)
        );
    }
}
