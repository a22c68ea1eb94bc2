//! The GGUF header reader: every count, length, shape and offset checked against the file's
//! size before anything is allocated, duplicate keys and tensors refused, reads buffered.
//!
//! candle's `Content::read` bounds most lengths but keeps the last of duplicate keys, panics
//! on an alignment of 0, reads arrays one syscall per element from an unbuffered file, and
//! accepts zero dimensions; strata reads headers here and hands candle the checked `Content`.

use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file::{Content, TensorInfo, Value, VersionedMagic};
use candle_core::quantized::GgmlDType;
use std::collections::HashMap;
use std::io::{BufReader, Read};
use std::path::Path;

/// Bytes of memory one metadata value takes in candle's `Value` (the enum), before a string's
/// own bytes: the unit of the metadata memory budget.
const VALUE_BYTES: u64 = std::mem::size_of::<Value>() as u64;

/// The most memory the metadata may take (a 262k-token vocabulary with scores and types takes
/// about 30 MB): a few MB of u8 array in a file would otherwise cost 32x its size.
fn metadata_budget(file_size: u64) -> u64 {
    (256 << 20).min(16 << 20 | file_size.saturating_mul(4))
}

/// Arrays of arrays: GGUF allows them, no model uses more than one level.
const MAX_DEPTH: usize = 4;

struct Reader<R> {
    r: R,
    pos: u64,
    size: u64,
    v1: bool,
    budget: u64,
    file: String,
}

impl<R: Read> Reader<R> {
    fn bytes(&mut self, n: u64, what: &dyn Fn() -> String) -> Result<Vec<u8>> {
        if n > self.size.saturating_sub(self.pos) {
            bail!(
                "{}: {} needs {n} bytes at byte {} but the file has {} (truncated or corrupt)",
                self.file,
                what(),
                self.pos,
                self.size
            );
        }
        let mut v = vec![0u8; n as usize];
        self.r
            .read_exact(&mut v)
            .with_context(|| format!("{}: cannot read {}", self.file, what()))?;
        self.pos += n;
        Ok(v)
    }

    fn fixed<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N]> {
        let v = self.bytes(N as u64, what)?;
        Ok(v.try_into().expect("length checked"))
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32> {
        Ok(u32::from_le_bytes(self.fixed(what)?))
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64> {
        Ok(u64::from_le_bytes(self.fixed(what)?))
    }

    fn len(&mut self, what: &dyn Fn() -> String) -> Result<u64> {
        if self.v1 {
            Ok(self.u32(what)? as u64)
        } else {
            self.u64(what)
        }
    }

    fn spend(&mut self, bytes: u64, what: &dyn Fn() -> String) -> Result<()> {
        self.budget = self.budget.checked_sub(bytes).with_context(|| {
            format!(
                "{}: the metadata would take more than {} MB of memory at {} (a GGUF's metadata is its tokenizer and a few settings)",
                self.file,
                metadata_budget(self.size) >> 20,
                what()
            )
        })?;
        Ok(())
    }

    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String> {
        let n = self.len(what)?;
        let mut v = self.bytes(n, what)?;
        // Strings are not null-terminated by the spec, but some writers add one.
        while v.last() == Some(&0) {
            v.pop();
        }
        Ok(String::from_utf8(v).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()))
    }

    fn value(&mut self, ty: u32, depth: usize, what: &dyn Fn() -> String) -> Result<Value> {
        self.spend(VALUE_BYTES, what)?;
        Ok(match ty {
            0 => Value::U8(self.fixed::<1>(what)?[0]),
            1 => Value::I8(self.fixed::<1>(what)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.fixed(what)?)),
            3 => Value::I16(i16::from_le_bytes(self.fixed(what)?)),
            4 => Value::U32(self.u32(what)?),
            5 => Value::I32(i32::from_le_bytes(self.fixed(what)?)),
            6 => Value::F32(f32::from_le_bytes(self.fixed(what)?)),
            7 => match self.fixed::<1>(what)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => bail!("{}: {} is a bool stored as {b} (only 0 or 1)", self.file, what()),
            },
            8 => {
                let s = self.string(what)?;
                self.spend(s.len() as u64, what)?;
                Value::String(s)
            }
            9 => {
                if depth >= MAX_DEPTH {
                    bail!("{}: {} nests arrays more than {MAX_DEPTH} deep", self.file, what());
                }
                let elem = self.u32(what)?;
                let n = self.len(what)?;
                // Every element takes at least one byte in the file and a Value in memory.
                let min = match elem {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    10..=12 => 8,
                    8 => 8 - 4 * self.v1 as u64,
                    9 => 12 - 4 * self.v1 as u64,
                    t => bail!("{}: {} is an array of unknown type {t}", self.file, what()),
                };
                if n.saturating_mul(min) > self.size - self.pos {
                    bail!(
                        "{}: {} declares {n} elements, more than the {} bytes left in the file hold",
                        self.file,
                        what(),
                        self.size - self.pos
                    );
                }
                // Refused before the vector is allocated; each element then pays for itself.
                if n.saturating_mul(VALUE_BYTES) > self.budget {
                    self.spend(u64::MAX, what)?;
                }
                let mut vs = Vec::with_capacity(n as usize);
                for i in 0..n {
                    vs.push(self.value(elem, depth + 1, &|| format!("element {i} of {}", what()))?);
                }
                Value::Array(vs)
            }
            10 => Value::U64(self.u64(what)?),
            11 => Value::I64(i64::from_le_bytes(self.fixed(what)?)),
            12 => Value::F64(f64::from_le_bytes(self.fixed(what)?)),
            t => bail!("{}: {} has unknown value type {t}", self.file, what()),
        })
    }
}

/// The ggml type ids candle can read (ggml.h's `ggml_type`).
const GGML_TYPES: [(u32, GgmlDType); 15] = [
    (0, GgmlDType::F32),
    (1, GgmlDType::F16),
    (2, GgmlDType::Q4_0),
    (3, GgmlDType::Q4_1),
    (6, GgmlDType::Q5_0),
    (7, GgmlDType::Q5_1),
    (8, GgmlDType::Q8_0),
    (9, GgmlDType::Q8_1),
    (10, GgmlDType::Q2K),
    (11, GgmlDType::Q3K),
    (12, GgmlDType::Q4K),
    (13, GgmlDType::Q5K),
    (14, GgmlDType::Q6K),
    (15, GgmlDType::Q8K),
    (30, GgmlDType::BF16),
];

fn ggml_dtype(t: u32) -> Option<GgmlDType> {
    GGML_TYPES.iter().find(|(id, _)| *id == t).map(|&(_, d)| d)
}

/// The id a GGUF file stores for `d`.
pub fn ggml_type_id(d: GgmlDType) -> u32 {
    GGML_TYPES.iter().find(|(_, x)| *x == d).map_or(u32::MAX, |&(id, _)| id)
}

/// Reads the GGUF header of `path`: metadata and tensor table, each tensor's bytes checked to
/// lie inside the file. Only plain files are read (see [`crate::fsio::check_regular_file`]).
pub fn read_header(path: &Path) -> Result<Content> {
    crate::fsio::check_regular_file(path)?;
    let f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let size = f.metadata()?.len();
    let file = path.display().to_string();
    let mut r = Reader {
        r: BufReader::with_capacity(1 << 16, f),
        pos: 0,
        size,
        v1: false,
        budget: metadata_budget(size),
        file: file.clone(),
    };
    let magic = r.fixed::<4>(&|| "the magic number".into())?;
    if &magic != b"GGUF" {
        bail!("{file}: not a GGUF file (it starts with {magic:?}, a GGUF file with \"GGUF\")");
    }
    let version = r.u32(&|| "the version".into())?;
    let magic = match version {
        1 => VersionedMagic::GgufV1,
        2 => VersionedMagic::GgufV2,
        3 => VersionedMagic::GgufV3,
        v => bail!("{file}: GGUF version {v} is not supported (1, 2 or 3)"),
    };
    r.v1 = version == 1;
    let n_tensors = r.len(&|| "the tensor count".into())?;
    let n_kv = r.len(&|| "the metadata count".into())?;
    // A key-value pair takes at least 13 bytes, a tensor entry 24.
    if n_kv.saturating_mul(13).saturating_add(n_tensors.saturating_mul(24)) > size {
        bail!("{file}: the header declares {n_tensors} tensors and {n_kv} metadata entries, more than a {size}-byte file can hold");
    }

    let mut metadata = HashMap::with_capacity(n_kv as usize);
    for i in 0..n_kv {
        let key = r.string(&|| format!("metadata key {i}"))?;
        let what = || format!("metadata `{key}`");
        let ty = r.u32(&what)?;
        let value = r.value(ty, 0, &what)?;
        if metadata.insert(key.clone(), value).is_some() {
            bail!("{file}: metadata `{key}` appears twice (a valid GGUF names each key once)");
        }
    }
    let alignment = match metadata.get("general.alignment") {
        None => 32,
        Some(Value::U32(a)) if a.is_power_of_two() && *a <= 1 << 16 => *a as u64,
        Some(v) => bail!("{file}: metadata `general.alignment` is {v:?}; it must be a u32 power of two up to 65536"),
    };

    let mut tensor_infos = HashMap::with_capacity(n_tensors as usize);
    let mut ends = Vec::with_capacity(n_tensors as usize);
    for i in 0..n_tensors {
        let name = r.string(&|| format!("tensor name {i}"))?;
        let what = || format!("tensor `{name}`");
        let n_dims = r.u32(&what)?;
        if !(1..=4).contains(&n_dims) {
            bail!("{file}: tensor `{name}` has {n_dims} dimensions (1 to 4 are valid)");
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            let d = r.len(&what)?;
            if d == 0 {
                bail!("{file}: tensor `{name}` has a dimension of 0 (every dimension holds at least one element)");
            }
            dims.push(d as usize);
        }
        dims.reverse();
        let ty = r.u32(&what)?;
        let ggml_dtype = ggml_dtype(ty).with_context(|| format!("{file}: tensor `{name}` has ggml type {ty}, which strata cannot read (F32, F16, BF16, Q4_0/1, Q5_0/1, Q8_0/1 and the K-quants)"))?;
        let offset = r.u64(&what)?;
        let elems = dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
            .filter(|&e| e <= size.saturating_mul(8))
            .with_context(|| {
                format!("{file}: tensor `{name}` has dimensions {dims:?}, more elements than the file can hold")
            })?;
        let bs = ggml_dtype.block_size() as u64;
        if !elems.is_multiple_of(bs) || dims.last().is_some_and(|&c| !(c as u64).is_multiple_of(bs)) {
            bail!("{file}: tensor `{name}` of shape {dims:?} does not split into whole {ggml_dtype:?} blocks of {bs}");
        }
        if offset % alignment != 0 {
            bail!("{file}: tensor `{name}` starts at offset {offset}, not a multiple of the alignment {alignment}");
        }
        let bytes = elems / bs * ggml_dtype.type_size() as u64;
        ends.push((name.clone(), offset.checked_add(bytes)));
        let info = TensorInfo {
            ggml_dtype,
            shape: candle_core::Shape::from(dims),
            offset,
        };
        if tensor_infos.insert(name.clone(), info).is_some() {
            bail!("{file}: tensor `{name}` appears twice (a valid GGUF names each tensor once)");
        }
    }
    let tensor_data_offset = r.pos.div_ceil(alignment) * alignment;
    for (name, end) in ends {
        let end = end
            .and_then(|e| e.checked_add(tensor_data_offset))
            .with_context(|| format!("{file}: tensor `{name}` offset overflows"))?;
        if end > size {
            bail!(
                "{file}: tensor `{name}` ends at byte {end} but the file has {size} bytes (truncated or corrupt file)"
            );
        }
    }
    Ok(Content {
        magic,
        metadata,
        tensor_infos,
        tensor_data_offset,
    })
}
