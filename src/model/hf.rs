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

/// Memory-mapped safetensors files with a name -> file index.
pub struct SafetensorsSource {
    files: Vec<(PathBuf, Mmap)>,
    index: HashMap<String, usize>,
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
    /// Maps `files` and indexes their tensors; malformed headers are reported with the file name.
    pub fn open(files: &[PathBuf]) -> Result<Self> {
        let mut out = Self {
            files: Vec::new(),
            index: HashMap::new(),
        };
        for f in files {
            let file = std::fs::File::open(f).with_context(|| format!("cannot open {}", f.display()))?;
            // SAFETY: the file is opened read-only; strata never writes to a file it has mapped.
            let mmap = unsafe { Mmap::map(&file) }.with_context(|| format!("cannot map {}", f.display()))?;
            let st = SafeTensors::deserialize(&mmap)
                .map_err(|e| anyhow::anyhow!("{}: not a valid safetensors file: {e}", f.display()))?;
            let id = out.files.len();
            for name in st.names() {
                out.index.insert(name.to_string(), id);
            }
            out.files.push((f.clone(), mmap));
        }
        Ok(out)
    }

    /// Reads tensor `name` without conversion.
    pub fn raw(&self, name: &str) -> Result<Tensor> {
        let &id = self
            .index
            .get(name)
            .with_context(|| format!("{}: no tensor named `{name}`", self.describe()))?;
        let (path, mmap) = &self.files[id];
        let st = SafeTensors::deserialize(mmap).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let view = st
            .tensor(name)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let dtype = st_dtype(view.dtype()).with_context(|| {
            format!(
                "{}: tensor `{name}` has unsupported dtype {:?}",
                path.display(),
                view.dtype()
            )
        })?;
        Ok(Tensor::from_raw_buffer(view.data(), dtype, view.shape(), &Device::Cpu)?)
    }
}

impl WeightSource for SafetensorsSource {
    fn get(&self, name: &str) -> Result<Tensor> {
        self.raw(name)
    }

    fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.index.keys().cloned().collect();
        v.sort();
        v
    }

    fn stored_type(&self, name: &str) -> Option<String> {
        let &id = self.index.get(name)?;
        let st = SafeTensors::deserialize(&self.files[id].1).ok()?;
        Some(format!("{:?}", st.tensor(name).ok()?.dtype()).to_lowercase())
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
        let text = std::fs::read_to_string(&index).with_context(|| format!("cannot read {}", index.display()))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", index.display()))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .with_context(|| format!("{}: missing `weight_map`", index.display()))?;
        let mut shards: Vec<String> = map.values().filter_map(|s| s.as_str().map(String::from)).collect();
        shards.sort();
        shards.dedup();
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

/// Writes tensors to `path` atomically (temporary file, then rename) with `{"format": "pt"}`.
pub fn save_safetensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    fn le<T: candle_core::WithDType>(t: &Tensor, f: impl Fn(&T) -> Vec<u8>) -> Result<Vec<u8>> {
        Ok(t.flatten_all()?.to_vec1::<T>()?.iter().flat_map(f).collect())
    }
    // One match decides both the bytes and the on-disk dtype, so the two cannot disagree.
    let mut data: Vec<(String, Vec<u8>, safetensors::Dtype, Vec<usize>)> = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let t = t.to_device(&Device::Cpu)?.contiguous()?;
        let (bytes, dt) = match t.dtype() {
            DType::F32 => (le::<f32>(&t, |x| x.to_le_bytes().to_vec())?, safetensors::Dtype::F32),
            DType::BF16 => (
                le::<half::bf16>(&t, |x| x.to_le_bytes().to_vec())?,
                safetensors::Dtype::BF16,
            ),
            DType::F16 => (
                le::<half::f16>(&t, |x| x.to_le_bytes().to_vec())?,
                safetensors::Dtype::F16,
            ),
            DType::U8 => (t.flatten_all()?.to_vec1::<u8>()?, safetensors::Dtype::U8),
            d => bail!("cannot save tensor `{name}` of dtype {d:?}"),
        };
        data.push((name.clone(), bytes, dt, t.dims().to_vec()));
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = data
        .iter()
        .map(|(n, b, dt, s)| Ok((n.clone(), safetensors::tensor::TensorView::new(*dt, s.clone(), b)?)))
        .collect::<Result<_, safetensors::SafeTensorError>>()?;
    let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    let bytes = safetensors::tensor::serialize(views, Some(meta))?;
    crate::util::write_atomic(path, &bytes)
}
