//! Hugging Face model directories: `config.json`, `model.safetensors` or a sharded
//! `model.safetensors.index.json` (memory-mapped), `tokenizer.json`.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;
use safetensors::SafeTensors;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::config::ModelConfig;
use super::source::{ModelSource, WeightSource};
use super::tokenizer::Tok;

/// Memory-mapped safetensors files with a name -> tensor index (each header parsed once).
pub struct SafetensorsSource {
    files: Vec<(PathBuf, Mmap)>,
    index: HashMap<String, Entry>,
}

/// Where one tensor lies: its file, type, shape and byte range in the mapping.
struct Entry {
    file: usize,
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    bytes: std::ops::Range<usize>,
}

fn st_dtype(d: safetensors::Dtype) -> Option<DType> {
    Some(match d {
        safetensors::Dtype::F32 => DType::F32,
        safetensors::Dtype::F16 => DType::F16,
        safetensors::Dtype::BF16 => DType::BF16,
        safetensors::Dtype::F64 => DType::F64,
        safetensors::Dtype::U8 => DType::U8,
        safetensors::Dtype::U32 => DType::U32,
        safetensors::Dtype::I64 => DType::I64,
        _ => return None,
    })
}

impl SafetensorsSource {
    /// Maps `files` and indexes their tensors; malformed headers are reported with the file
    /// name, and a tensor named in two shards is refused.
    pub fn open(files: &[PathBuf]) -> Result<Self> {
        if files.is_empty() {
            bail!("no safetensors files to open");
        }
        let mut out = Self {
            files: Vec::new(),
            index: HashMap::new(),
        };
        for f in files {
            crate::fsio::check_regular_file(f)?;
            let file = std::fs::File::open(f).with_context(|| format!("cannot open {}", f.display()))?;
            // SAFETY: the file is opened read-only; strata never writes to a file it has mapped.
            let mmap = unsafe { Mmap::map(&file) }.with_context(|| format!("cannot map {}", f.display()))?;
            let (header, meta) = SafeTensors::read_metadata(&mmap)
                .map_err(|e| anyhow::anyhow!("{}: not a valid safetensors file: {e}", f.display()))?;
            let id = out.files.len();
            let data = 8 + header;
            for (name, info) in meta.tensors() {
                let (s, e) = info.data_offsets;
                let entry = Entry {
                    file: id,
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    bytes: data + s..data + e,
                };
                if out.index.insert(name.clone(), entry).is_some() {
                    bail!("{}: tensor `{name}` is also in another shard", f.display());
                }
            }
            out.files.push((f.clone(), mmap));
        }
        Ok(out)
    }

    /// Reads tensor `name` without conversion.
    pub fn raw(&self, name: &str) -> Result<Tensor> {
        let e = self
            .index
            .get(name)
            .with_context(|| format!("{}: no tensor named `{name}`", self.describe()))?;
        let (path, mmap) = &self.files[e.file];
        let dtype = st_dtype(e.dtype).with_context(|| {
            format!(
                "{}: tensor `{name}` has unsupported dtype {:?}",
                path.display(),
                e.dtype
            )
        })?;
        Ok(Tensor::from_raw_buffer(
            &mmap[e.bytes.clone()],
            dtype,
            &e.shape,
            &Device::Cpu,
        )?)
    }
}

/// Suffix of the JSON quant state bitsandbytes writes beside each 4-bit weight.
const BNB_NF4_STATE: &str = ".quant_state.bitsandbytes__nf4";

impl SafetensorsSource {
    /// Reads a bitsandbytes 4-bit weight (`QuantState.as_dict(packed=True)`: packed codes,
    /// `absmax`, `quant_map`, optionally `nested_absmax` / `nested_quant_map`, and the JSON
    /// state), checking every piece against the NF4 format strata implements.
    fn bnb_nf4(&self, name: &str) -> Result<Option<crate::quant::nf4::Nf4Tensor>> {
        use crate::quant::nf4::{dynamic_map, NestedAbsmax, Nf4Tensor, Scales, NESTED_BLOCK, NF4_CODE};
        let state_name = format!("{name}{BNB_NF4_STATE}");
        if !self.index.contains_key(&state_name) {
            if self
                .index
                .contains_key(&format!("{name}.quant_state.bitsandbytes__fp4"))
            {
                bail!("{}: `{name}` is stored in bitsandbytes FP4; strata reads NF4 4-bit checkpoints (bnb_4bit_quant_type=\"nf4\")", self.describe());
            }
            return Ok(None);
        }
        let bad = |what: &str| anyhow::anyhow!("{}: 4-bit weight `{name}`: {what}", self.describe());
        let state: serde_json::Value = serde_json::from_slice(&self.raw(&state_name)?.flatten_all()?.to_vec1::<u8>()?)
            .map_err(|e| bad(&format!("quant state is not valid JSON ({e})")))?;
        if state["quant_type"] != "nf4" {
            bail!(bad(&format!("quant_type {} is not nf4", state["quant_type"])));
        }
        let shape: Vec<usize> = state["shape"]
            .as_array()
            .and_then(|a| a.iter().map(|x| x.as_u64().map(|x| x as usize)).collect())
            .ok_or_else(|| bad("quant state has no shape"))?;
        let [rows, cols] = shape[..] else {
            bail!(bad(&format!("shape {shape:?} is not a matrix")))
        };
        let blocksize = state["blocksize"]
            .as_u64()
            .ok_or_else(|| bad("quant state has no blocksize"))? as usize;
        if blocksize == 0 {
            bail!(bad("blocksize 0"));
        }
        let n = rows
            .checked_mul(cols)
            .filter(|&n| n as u64 <= self.stored_bytes(name).unwrap_or(0).saturating_mul(2))
            .ok_or_else(|| bad(&format!("shape [{rows}, {cols}] does not fit the packed bytes stored")))?;
        let packed = self.raw(name)?.flatten_all()?.to_vec1::<u8>()?;
        if packed.len() != n.div_ceil(2) {
            bail!(bad(&format!("{} packed bytes for {n} values", packed.len())));
        }
        let f32s = |t: &str| -> Result<Vec<f32>> {
            Ok(self
                .raw(&format!("{name}.{t}"))?
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?)
        };
        if f32s("quant_map")? != NF4_CODE {
            bail!(bad("quant_map is not the NF4 code table"));
        }
        let blocks = n.div_ceil(blocksize);
        let scales = if self.index.contains_key(&format!("{name}.nested_absmax")) {
            if state["nested_blocksize"].as_u64() != Some(NESTED_BLOCK as u64) {
                bail!(bad("nested_blocksize is not 256"));
            }
            if f32s("nested_quant_map")? != dynamic_map() {
                bail!(bad("nested_quant_map is not bitsandbytes' signed dynamic map"));
            }
            let codes = self.raw(&format!("{name}.absmax"))?.flatten_all()?.to_vec1::<u8>()?;
            let absmax2 = f32s("nested_absmax")?;
            if codes.len() != blocks || absmax2.len() != blocks.div_ceil(NESTED_BLOCK) {
                bail!(bad("absmax and nested_absmax do not match the block count"));
            }
            let offset = state["nested_offset"].as_f64().ok_or_else(|| bad("no nested_offset"))? as f32;
            Scales::Nested(NestedAbsmax { codes, absmax2, offset })
        } else {
            let a = f32s("absmax")?;
            if a.len() != blocks {
                bail!(bad(&format!("{} absmax values for {blocks} blocks", a.len())));
            }
            Scales::Plain(a)
        };
        Ok(Some(Nf4Tensor {
            packed,
            scales,
            blocksize,
            rows,
            cols,
        }))
    }
}

impl WeightSource for SafetensorsSource {
    fn get(&self, name: &str) -> Result<Tensor> {
        // A 4-bit weight read as a float tensor: dequantized the way bitsandbytes does.
        if let Some(q) = self.bnb_nf4(name)? {
            return Ok(Tensor::from_vec(q.dequantize(), (q.rows, q.cols), &Device::Cpu)?);
        }
        self.raw(name)
    }

    fn get_nf4(&self, name: &str) -> Result<Option<crate::quant::nf4::Nf4Tensor>> {
        self.bnb_nf4(name)
    }

    fn mapped_bytes(&self) -> u64 {
        self.files.iter().map(|(_, m)| m.len() as u64).sum()
    }

    fn stored_bytes(&self, name: &str) -> Option<u64> {
        let mut bytes = self.index.get(name)?.bytes.len() as u64;
        if self.index.contains_key(&format!("{name}{BNB_NF4_STATE}")) {
            bytes += self.stored_bytes(&format!("{name}.absmax")).unwrap_or(0)
                + self.stored_bytes(&format!("{name}.nested_absmax")).unwrap_or(0);
        }
        Some(bytes)
    }

    fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.index.keys().cloned().collect();
        v.sort();
        v
    }

    fn stored_type(&self, name: &str) -> Option<String> {
        Some(format!("{:?}", self.index.get(name)?.dtype).to_lowercase())
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        // A bitsandbytes 4-bit weight is stored packed; its shape is in its JSON state.
        if self.index.contains_key(&format!("{name}{BNB_NF4_STATE}")) {
            return None;
        }
        Some(self.index.get(name)?.shape.clone())
    }

    fn describe(&self) -> String {
        match self.files.as_slice() {
            [(p, _)] => p.display().to_string(),
            fs => format!(
                "{} safetensors shards in {}",
                fs.len(),
                fs[0].0.parent().unwrap_or(Path::new(".")).display()
            ),
        }
    }
}

/// Opens a Hugging Face directory.
pub fn open_dir(dir: &Path) -> Result<ModelSource> {
    let config = ModelConfig::from_hf_file(&dir.join("config.json"))?;
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    let files = if single.exists() {
        vec![single]
    } else if index.exists() {
        let text = crate::fsio::read_text(&index, crate::fsio::TOKENIZER_CAP, "safetensors index")?;
        let v: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", index.display()))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .with_context(|| format!("{}: missing `weight_map`", index.display()))?;
        let mut shards: Vec<String> = map.values().filter_map(|s| s.as_str().map(String::from)).collect();
        shards.sort();
        shards.dedup();
        if shards.is_empty() {
            bail!(
                "{}: `weight_map` names no shard files; it must map each tensor name to the safetensors file holding it",
                index.display()
            );
        }
        for s in &shards {
            if s.contains('/') || s.contains('\\') || s.starts_with('.') {
                bail!("{}: shard name `{s}` must be a plain file name", index.display());
            }
        }
        shards.into_iter().map(|s| dir.join(s)).collect()
    } else {
        bail!(
            "{}: no model.safetensors or model.safetensors.index.json",
            dir.display()
        );
    };
    let weights = SafetensorsSource::open(&files)?;
    let tokenizer = Tok::from_file(&dir.join("tokenizer.json"), &dir.join("tokenizer_config.json"))?;
    Ok(ModelSource {
        path: dir.to_path_buf(),
        config,
        weights: Box::new(weights),
        tokenizer,
    })
}

/// A tensor to be written by [`save_deferred`]: its name, stored type and shape, and how to
/// make it when the writer reaches it (a merge computes each weight only then).
pub struct Deferred<'a> {
    /// Tensor name.
    pub name: String,
    /// Stored type (f32, bf16, f16 or u8); what `make` gives is converted to it.
    pub dtype: DType,
    /// Shape; `make` must give this shape.
    pub shape: Vec<usize>,
    /// Makes the tensor.
    pub make: Box<dyn Fn() -> Result<Tensor> + 'a>,
}

/// A tensor as safetensors sees it: its bytes are produced when the writer asks for them, so a
/// file is streamed tensor by tensor instead of being copied whole into memory first. The
/// writer's `data()` cannot fail, so a failure is kept in `failed` and reported after it.
struct Lazy<'a, 'e> {
    d: Deferred<'a>,
    dtype: safetensors::Dtype,
    failed: &'e std::cell::RefCell<Option<anyhow::Error>>,
}

impl Lazy<'_, '_> {
    fn bytes(&self) -> Result<Vec<u8>> {
        fn le<T: candle_core::WithDType, const N: usize>(t: &Tensor, f: impl Fn(T) -> [u8; N]) -> Result<Vec<u8>> {
            Ok(t.flatten_all()?.to_vec1::<T>()?.into_iter().flat_map(f).collect())
        }
        let t = (self.d.make)()?.to_device(&Device::Cpu)?.to_dtype(self.d.dtype)?;
        if t.dims() != self.d.shape {
            bail!(
                "tensor `{}` came out {:?}, not {:?}",
                self.d.name,
                t.dims(),
                self.d.shape
            );
        }
        match self.dtype {
            safetensors::Dtype::F32 => le::<f32, 4>(&t, |x| x.to_le_bytes()),
            safetensors::Dtype::BF16 => le::<half::bf16, 2>(&t, |x| x.to_le_bytes()),
            safetensors::Dtype::F16 => le::<half::f16, 2>(&t, |x| x.to_le_bytes()),
            _ => Ok(t.flatten_all()?.to_vec1::<u8>()?),
        }
    }
}

impl safetensors::View for Lazy<'_, '_> {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.d.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        match self.bytes() {
            Ok(b) => std::borrow::Cow::Owned(b),
            Err(e) => {
                self.failed.borrow_mut().get_or_insert(e);
                // The file is abandoned (see `save_deferred`); zeros keep the writer's count.
                std::borrow::Cow::Owned(vec![0; self.data_len()])
            }
        }
    }
    fn data_len(&self) -> usize {
        self.d.shape.iter().product::<usize>() * self.d.dtype.size_in_bytes()
    }
}

/// Writes tensors to `path` atomically (temporary file, then rename) with `{"format": "pt"}`,
/// streamed: only one tensor's bytes are in memory at a time.
pub fn save_safetensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let items = tensors
        .iter()
        .map(|(n, t)| Deferred {
            name: n.clone(),
            dtype: t.dtype(),
            shape: t.dims().to_vec(),
            make: Box::new(move || Ok(t.clone())),
        })
        .collect();
    save_deferred(path, items)
}

/// [`save_safetensors`] for tensors made one at a time as the writer reaches them.
pub fn save_deferred(path: &Path, items: Vec<Deferred<'_>>) -> Result<()> {
    let failed = std::cell::RefCell::new(None);
    let views: Vec<(String, Lazy)> = items
        .into_iter()
        .map(|d| {
            let dtype = match d.dtype {
                DType::F32 => safetensors::Dtype::F32,
                DType::BF16 => safetensors::Dtype::BF16,
                DType::F16 => safetensors::Dtype::F16,
                DType::U8 => safetensors::Dtype::U8,
                o => bail!("cannot save tensor `{}` of dtype {o:?}", d.name),
            };
            Ok((
                d.name.clone(),
                Lazy {
                    d,
                    dtype,
                    failed: &failed,
                },
            ))
        })
        .collect::<Result<_>>()?;
    let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    crate::util::write_atomic_with(path, |tmp| {
        safetensors::tensor::serialize_to_file(views, Some(meta), tmp)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        if let Some(e) = failed.borrow_mut().take() {
            return Err(e.context(format!("cannot write {}", path.display())));
        }
        std::fs::File::open(tmp)
            .and_then(|f| f.sync_all())
            .with_context(|| format!("cannot flush {} to disk", tmp.display()))?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tensor that cannot be made fails the write with its reason, and the file that was
    /// there before stays as it was (the write goes to a temporary file first).
    #[test]
    fn a_failed_deferred_write_keeps_the_old_file() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("strata-deferred-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let path = dir.join("model.safetensors");
        let ok = Tensor::arange(0f32, 6., &Device::Cpu)?.reshape((2, 3))?;
        save_safetensors(&path, &[("w".into(), ok.clone())])?;
        let before = std::fs::read(&path)?;
        let items = vec![
            Deferred {
                name: "w".into(),
                dtype: DType::BF16,
                shape: vec![2, 3],
                make: Box::new(|| Ok(ok.clone())),
            },
            Deferred {
                name: "x".into(),
                dtype: DType::F32,
                shape: vec![4],
                make: Box::new(|| bail!("the adapter does not fit this weight")),
            },
        ];
        let e = format!("{:#}", save_deferred(&path, items).unwrap_err());
        assert!(e.contains("does not fit"), "{e}");
        assert_eq!(std::fs::read(&path)?, before);
        let left: Vec<_> = std::fs::read_dir(&dir)?.map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left.len(), 1, "{left:?}");
        // A tensor made in another shape than announced is an error too.
        let items = vec![Deferred {
            name: "w".into(),
            dtype: DType::F32,
            shape: vec![3, 2],
            make: Box::new(|| Ok(ok.clone())),
        }];
        let e = format!("{:#}", save_deferred(&path, items).unwrap_err());
        assert!(e.contains("came out [2, 3], not [3, 2]"), "{e}");
        assert_eq!(std::fs::read(&path)?, before);
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
