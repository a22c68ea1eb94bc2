//! Test helpers (built for the crate's own tests and, through the `testing` feature, its
//! integration tests; not part of the shipped library): finite-difference gradient checks, and
//! the synthetic models `strata bench` also uses.

pub use crate::cli::synthetic::*;

pub mod fuzz;

use candle_core::{Result, Tensor, Var};

/// Checks the autograd gradient of the scalar `f(x)` against central finite differences on
/// every element of `x` (f64 tensors), failing with the worst element if they disagree.
pub fn check_grad(x: &Tensor, f: impl Fn(&Tensor) -> Result<Tensor>, tol: f64) -> Result<()> {
    let var = Var::from_tensor(x)?;
    let y = f(var.as_tensor())?;
    let grads = y.backward()?;
    let g = grads
        .get(var.as_tensor())
        .ok_or_else(|| candle_core::Error::Msg("no gradient reached the input".into()))?
        .flatten_all()?
        .to_vec1::<f64>()?;
    let base = x.flatten_all()?.to_vec1::<f64>()?;
    let h = 1e-5;
    let mut worst = 0.0f64;
    for i in 0..base.len() {
        let mut p = base.clone();
        p[i] += h;
        let fp = f(&Tensor::from_vec(p.clone(), x.shape(), x.device())?)?.to_scalar::<f64>()?;
        p[i] -= 2.0 * h;
        let fm = f(&Tensor::from_vec(p, x.shape(), x.device())?)?.to_scalar::<f64>()?;
        let num = (fp - fm) / (2.0 * h);
        let err = (num - g[i]).abs() / (1.0 + num.abs());
        worst = worst.max(err);
        if err > tol {
            candle_core::bail!(
                "gradient mismatch at element {i}: autograd {} vs finite difference {num}",
                g[i]
            );
        }
    }
    assert!(worst.is_finite());
    Ok(())
}

/// The largest difference between the input gradients two computations of the same function give
/// (`y` and `y_ref` of input `x`), both seeded with `probe`.
pub fn dx_gap(y: &Tensor, y_ref: &Tensor, x: &Var, probe: &Tensor) -> Result<f32> {
    let g = y.mul(probe)?.sum_all()?.backward()?;
    let g_ref = y_ref.mul(probe)?.sum_all()?.backward()?;
    let missing = || candle_core::Error::Msg("no gradient reached the input".into());
    let (a, b) = (
        g.get(x.as_tensor()).ok_or_else(missing)?,
        g_ref.get(x.as_tensor()).ok_or_else(missing)?,
    );
    (a - b)?.abs()?.max_all()?.to_scalar::<f32>()
}

/// A GGUF file as its parts, to be written back as they are, valid or not: the crafted files of
/// the hostile-input tests are valid files with one part changed.
pub struct RawGguf {
    /// GGUF version (1 to 3).
    pub version: u32,
    /// Metadata in file order (duplicates allowed).
    pub kvs: Vec<(String, candle_core::quantized::gguf_file::Value)>,
    /// Tensors in file order.
    pub tensors: Vec<RawTensor>,
    /// Alignment of the tensor data (what the file's `general.alignment` should say).
    pub alignment: u64,
}

/// One tensor of a [`RawGguf`].
pub struct RawTensor {
    /// Name.
    pub name: String,
    /// Dimensions, outermost first (candle's order; the file stores them reversed).
    pub dims: Vec<u64>,
    /// ggml type id.
    pub ty: u32,
    /// Stored bytes.
    pub data: Vec<u8>,
    /// Offset to write instead of the one the layout gives.
    pub offset: Option<u64>,
}

impl RawGguf {
    /// The parts of a valid GGUF file (keys and tensors sorted by name).
    pub fn read(path: &std::path::Path) -> anyhow::Result<Self> {
        use std::io::{Read, Seek};
        let c = crate::model::gguf::read_checked(path)?;
        let mut kvs: Vec<_> = c.metadata.into_iter().collect();
        kvs.sort_by(|a, b| a.0.cmp(&b.0));
        let mut f = std::fs::File::open(path)?;
        let mut tensors = Vec::new();
        let mut infos: Vec<_> = c.tensor_infos.into_iter().collect();
        infos.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, info) in infos {
            let n = info.shape.elem_count() / info.ggml_dtype.block_size() * info.ggml_dtype.type_size();
            let mut data = vec![0u8; n];
            f.seek(std::io::SeekFrom::Start(c.tensor_data_offset + info.offset))?;
            f.read_exact(&mut data)?;
            tensors.push(RawTensor {
                name,
                dims: info.shape.dims().iter().map(|&d| d as u64).collect(),
                ty: crate::model::gguf_read::ggml_type_id(info.ggml_dtype),
                data,
                offset: None,
            });
        }
        Ok(Self {
            version: 3,
            kvs,
            tensors,
            alignment: 32,
        })
    }

    /// The metadata entry `key`, to change in place.
    pub fn kv(&mut self, key: &str) -> &mut candle_core::quantized::gguf_file::Value {
        &mut self
            .kvs
            .iter_mut()
            .find(|(k, _)| k == key)
            .unwrap_or_else(|| panic!("no key {key}"))
            .1
    }

    /// The tensor `name`, to change in place.
    pub fn tensor(&mut self, name: &str) -> &mut RawTensor {
        self.tensors
            .iter_mut()
            .find(|t| t.name == name)
            .unwrap_or_else(|| panic!("no tensor {name}"))
    }

    /// The file's bytes.
    pub fn bytes(&self) -> Vec<u8> {
        use candle_core::quantized::gguf_file::Value;
        fn s(out: &mut Vec<u8>, x: &str) {
            out.extend((x.len() as u64).to_le_bytes());
            out.extend(x.as_bytes());
        }
        fn ty(v: &Value) -> u32 {
            match v {
                Value::U8(_) => 0,
                Value::I8(_) => 1,
                Value::U16(_) => 2,
                Value::I16(_) => 3,
                Value::U32(_) => 4,
                Value::I32(_) => 5,
                Value::F32(_) => 6,
                Value::Bool(_) => 7,
                Value::String(_) => 8,
                Value::Array(_) => 9,
                Value::U64(_) => 10,
                Value::I64(_) => 11,
                Value::F64(_) => 12,
            }
        }
        fn val(out: &mut Vec<u8>, v: &Value) {
            match v {
                Value::U8(x) => out.push(*x),
                Value::I8(x) => out.push(*x as u8),
                Value::U16(x) => out.extend(x.to_le_bytes()),
                Value::I16(x) => out.extend(x.to_le_bytes()),
                Value::U32(x) => out.extend(x.to_le_bytes()),
                Value::I32(x) => out.extend(x.to_le_bytes()),
                Value::F32(x) => out.extend(x.to_le_bytes()),
                Value::Bool(x) => out.push(*x as u8),
                Value::String(x) => s(out, x),
                Value::Array(a) => {
                    out.extend(a.first().map_or(4, ty).to_le_bytes());
                    out.extend((a.len() as u64).to_le_bytes());
                    a.iter().for_each(|x| val(out, x));
                }
                Value::U64(x) => out.extend(x.to_le_bytes()),
                Value::I64(x) => out.extend(x.to_le_bytes()),
                Value::F64(x) => out.extend(x.to_le_bytes()),
            }
        }
        let mut out = b"GGUF".to_vec();
        out.extend(self.version.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend((self.kvs.len() as u64).to_le_bytes());
        for (k, v) in &self.kvs {
            s(&mut out, k);
            out.extend(ty(v).to_le_bytes());
            val(&mut out, v);
        }
        let a = self.alignment.max(1);
        let mut offset = 0u64;
        for t in &self.tensors {
            s(&mut out, &t.name);
            out.extend((t.dims.len() as u32).to_le_bytes());
            t.dims.iter().rev().for_each(|d| out.extend(d.to_le_bytes()));
            out.extend(t.ty.to_le_bytes());
            out.extend(t.offset.unwrap_or(offset).to_le_bytes());
            offset = (offset + t.data.len() as u64).div_ceil(a) * a;
        }
        out.resize((out.len() as u64).div_ceil(a) as usize * a as usize, 0);
        for t in &self.tensors {
            out.extend(&t.data);
            out.resize((out.len() as u64).div_ceil(a) as usize * a as usize, 0);
        }
        out
    }

    /// Writes the file to `path`.
    pub fn write(&self, path: &std::path::Path) -> anyhow::Result<()> {
        Ok(std::fs::write(path, self.bytes())?)
    }
}

/// A tiny LoRA recipe over [`crate::cli::synthetic::write_tiny_corpus`]'s text in `dir/data` and
/// a tiny GGUF at `dir/tiny.gguf`: `steps` steps of 2 x 2 rows of 16 tokens, output in
/// `dir/out`, `extra` appended to `[train]`. The integration tests' common run.
pub fn tiny_lora_recipe(dir: &std::path::Path, out: &str, steps: usize, seed: u64, extra: &str) -> String {
    format!(
        r#"
[model]
path = "{0}/tiny.gguf"
[lora]
r = 4
alpha = 8
dropout = 0.1
[data]
train = ["{0}/data"]
seq_len = 16
eval_fraction = 0.2
[train]
batch = 2
grad_accum = 2
steps = {steps}
lr = 1e-2
warmup = 2
seed = {seed}
out = "{0}/{out}"
{extra}
"#,
        dir.display()
    )
}
