//! Diagonal Fisher information on general data, over the weights EWC protects.
//!
//! `F = mean over rows of (d log p(row) / d theta)^2`, where `log p(row)` is the row's mean token
//! log-likelihood (so `F` sits on the scale of the training loss and `ewc_lambda` means the same
//! at any sequence length). Two estimators: *empirical* takes the data's own next tokens as
//! labels; *sampled* draws each label from the model's own next-token distribution (the true
//! Fisher's expectation, estimated with one sample per position).
//!
//! Under LoRA the protected weights are the adapted modules' *effective* weights
//! `W + s B A`; the gradient with respect to `W` equals the gradient with respect to the
//! effective weight, so the estimate runs on a model whose projections are trainable (with any
//! earlier stage's adapter attached) and reads the projections' gradients. Under full
//! fine-tuning every weight is protected.
//!
//! Size: one value per protected weight. SmolLM2-135M's seven projections in 30 layers are 106 M
//! values (212 MB in bf16); a 7B model's are ~6.5 B (13 GB in bf16), too much to keep beside the
//! model on a 24 GB card. The `factored` format stores each matrix's Fisher as its row sums and
//! column sums, `F_ij ~= r_i c_j / sum(r)` (the rank-1 factorisation Adafactor uses for second
//! moments), `out + in` values per matrix: 2 MB for SmolLM2, ~10 MB for 7B.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::data::Sequences;
use crate::engine::step::{forward_backward, Batch, GradAcc, Recompute};
use crate::model::decoder::TreeRows;
use crate::model::hf::save_safetensors;
use crate::model::{Fwd, Model};
use crate::ops::lm_head::IGNORE;
use crate::rng::{mix, Rng};

/// Which labels the squared gradients are taken with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Estimator {
    /// The data's next tokens.
    Empirical,
    /// Labels drawn from the model's own predictions.
    Sampled,
}

/// How a Fisher file stores each weight's diagonal (`retain.fisher_format`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FisherFormat {
    /// Every entry.
    Full,
    /// Row and column sums (and the total), a rank-one approximation.
    Factored,
}

impl FisherFormat {
    /// Parses `full` or `factored`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "full" => Ok(Self::Full),
            "factored" => Ok(Self::Factored),
            o => bail!("fisher format `{o}`: expected full or factored"),
        }
    }

    /// The name [`FisherFormat::parse`] reads.
    pub fn name(self) -> &'static str {
        match self {
            Self::Full => "full",
            Self::Factored => "factored",
        }
    }
}

impl Estimator {
    /// Parses `empirical` or `sampled`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "empirical" => Ok(Self::Empirical),
            "sampled" => Ok(Self::Sampled),
            _ => bail!("fisher estimator `{s}`: expected empirical or sampled"),
        }
    }
}

/// One weight's Fisher diagonal.
#[derive(Clone, Debug)]
pub enum FisherTensor {
    /// Every entry, `[out, in]` (in memory as stored: f32, or bf16 / f16; [`FisherTensor::dense`]
    /// gives f32).
    Full(Tensor),
    /// Row sums `[out]`, column sums `[in]` and their total: `F_ij ~= r_i c_j / total`.
    Factored {
        /// Row sums.
        rows: Tensor,
        /// Column sums.
        cols: Tensor,
        /// Sum of all entries.
        total: f64,
    },
}

impl FisherTensor {
    /// The dense diagonal `[out, in]` (expanded from the factors when factored).
    pub fn dense(&self) -> Result<Tensor> {
        Ok(match self {
            Self::Full(t) => t.to_dtype(DType::F32)?,
            Self::Factored { rows, cols, total } => {
                let r = rows.to_dtype(DType::F32)?.unsqueeze(1)?;
                let c = cols.to_dtype(DType::F32)?.unsqueeze(0)?;
                (r.broadcast_mul(&c)? / total.max(f64::MIN_POSITIVE))?
            }
        })
    }

    /// The `[out, in]` shape of the weight this estimate is for.
    pub fn shape(&self) -> Vec<usize> {
        match self {
            Self::Full(t) => t.dims().to_vec(),
            Self::Factored { rows, cols, .. } => vec![rows.elem_count(), cols.elem_count()],
        }
    }

    /// Refuses entries no estimator writes (a Fisher is a mean of squares: finite, >= 0).
    fn check(&self, name: &str, path: &Path) -> Result<()> {
        let parts: Vec<&Tensor> = match self {
            Self::Full(t) => vec![t],
            Self::Factored { rows, cols, .. } => vec![rows, cols],
        };
        for t in parts {
            let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            if let Some(x) = v.iter().find(|x| !(x.is_finite() && **x >= 0.0)) {
                bail!(
                    "{}: the Fisher of `{name}` holds {x}; a Fisher's entries are finite and >= 0 (the file is corrupt)",
                    path.display()
                );
            }
        }
        Ok(())
    }

    /// The factored form of this tensor.
    pub fn factored(&self) -> Result<Self> {
        let f = self.dense()?;
        let rows = f.sum(1)?;
        let cols = f.sum(0)?;
        let total = f.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        Ok(Self::Factored { rows, cols, total })
    }
}

/// How the estimate was made (written beside the tensors as `<file>.json`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct FisherMeta {
    /// The model it was estimated on.
    pub model: String,
    /// Estimator.
    pub estimator: Estimator,
    /// Rows (examples) averaged.
    pub rows: usize,
    /// Tokens per row.
    pub seq_len: usize,
    /// Stages accumulated (online EWC), 1 for a single estimate.
    pub stages: usize,
    /// Decay applied to earlier stages when accumulating.
    pub decay: f64,
    /// `full` (bf16 or f32 entries) or `factored`.
    pub format: String,
    /// Data it was estimated on.
    pub data: Vec<PathBuf>,
}

/// A Fisher estimate: one tensor per protected weight (Hugging Face names, `....weight`).
#[derive(Clone, Debug)]
pub struct Fisher {
    /// Tensors by weight name.
    pub tensors: BTreeMap<String, FisherTensor>,
    /// Provenance.
    pub meta: FisherMeta,
}

/// Draws a label per position from `softmax(row)`.
fn sample_label(row: &[f32], rng: &mut Rng) -> u32 {
    let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let z: f64 = row.iter().map(|&x| ((x - m) as f64).exp()).sum();
    let mut u = rng.next_f64() * z;
    for (i, &x) in row.iter().enumerate() {
        u -= ((x - m) as f64).exp();
        if u <= 0.0 {
            return i as u32;
        }
    }
    (row.len() - 1) as u32
}

/// The labels an estimator uses for one row: the data's, or draws from the model's predictions
/// at the positions that have a data label (seeded by `seed`).
pub fn labels(
    model: &Model,
    ids: &Tensor,
    targets: &[u32],
    documents: Option<&TreeRows>,
    est: Estimator,
    seed: u64,
) -> Result<Vec<u32>> {
    match est {
        Estimator::Empirical => Ok(targets.to_vec()),
        Estimator::Sampled => {
            let h = match documents {
                Some(d) => model.hidden_tree(ids, Fwd::eval(), d)?,
                None => model.hidden(ids, Fwd::eval(), None)?,
            };
            let logits = model.head_logits(&h)?.to_vec2::<f32>()?;
            let mut rng = Rng::new(seed);
            Ok(targets
                .iter()
                .zip(&logits)
                .map(|(&t, row)| {
                    if t == IGNORE {
                        IGNORE
                    } else {
                        sample_label(row, &mut rng)
                    }
                })
                .collect())
        }
    }
}

/// Estimates the Fisher diagonal of the weights `names` (which must be trainable in `model`)
/// over the rows of `seqs`, one row (example) at a time.
pub fn estimate(
    model: &Model,
    seqs: &Sequences,
    names: &[String],
    est: Estimator,
    seed: u64,
    comm: &dyn crate::dist::Collective,
) -> Result<BTreeMap<String, Tensor>> {
    let params = model.trainable();
    let vars: Vec<_> = names
        .iter()
        .map(|n| {
            params
                .iter()
                .find(|(p, _)| p == n)
                .map(|(_, v)| v.clone())
                .with_context(|| format!("weight `{n}` is not trainable in the Fisher model"))
        })
        .collect::<Result<_>>()?;
    let mut sums: Vec<Option<Tensor>> = vec![None; names.len()];
    // Under data parallelism each rank takes its share of the rows (each row's labels are
    // seeded by its index in the whole set, so the shares add up to the one-process estimate).
    let mine = crate::dist::shard(seqs.len(), comm.rank(), comm.size());
    let mut progress = crate::progress::Progress::new("fisher", mine.len() as u64, "rows");
    let mut acc = GradAcc::default();
    let mut used = 0usize;
    for r in mine.clone() {
        let ids = Tensor::from_vec(seqs.inputs[r].clone(), (1, seqs.seq_len), &model.device)?;
        // Packed documents stay apart here as in training.
        let documents = crate::data::mix::documents(&[seqs], &[(0, r)]).map(|(b, p)| TreeRows::new(b, p));
        let targets = labels(
            model,
            &ids,
            &seqs.targets[r],
            documents.as_ref(),
            est,
            mix(&[seed, r as u64]),
        )?;
        let count = targets.iter().filter(|&&t| t != IGNORE).count();
        if count == 0 {
            continue;
        }
        acc.clear();
        let batch = Batch {
            ids,
            targets,
            documents,
        };
        forward_backward(
            model,
            &batch,
            1.0 / count as f64,
            Recompute::Blocks,
            Fwd::eval(),
            &mut acc,
        )?;
        for (k, v) in vars.iter().enumerate() {
            let g2 = match acc.get(v) {
                Some(g) => g.sqr()?,
                None => v.as_tensor().zeros_like()?.to_dtype(DType::F32)?,
            };
            sums[k] = Some(match sums[k].take() {
                Some(s) => (s + g2)?,
                None => g2,
            });
        }
        used += 1;
        progress.set((r - mine.start) as u64 + 1, "");
    }
    progress.finish();
    if comm.size() > 1 {
        let mut all: Vec<Tensor> = Vec::with_capacity(vars.len());
        for (s, v) in sums.iter_mut().zip(&vars) {
            all.push(match s.take() {
                Some(t) => t,
                None => v.as_tensor().zeros_like()?.to_dtype(DType::F32)?,
            });
        }
        comm.sum_tensors(&mut all)?;
        sums = all.into_iter().map(Some).collect();
        let mut n = [used as f64];
        comm.sum_f64(&mut n)?;
        used = n[0] as usize;
    }
    if used == 0 {
        bail!("no row with a target token to estimate the Fisher information on");
    }
    names
        .iter()
        .zip(sums)
        .map(|(n, s)| Ok((n.clone(), (s.expect("every row adds") / used as f64)?)))
        .collect()
}

impl Fisher {
    /// Adds `older` (an earlier stage's estimate) scaled by `decay`: online EWC.
    pub fn accumulate(&mut self, older: &Fisher, decay: f64) -> Result<()> {
        for (name, t) in self.tensors.iter_mut() {
            let Some(o) = older.tensors.get(name) else { continue };
            let sum = (t.dense()? + (o.dense()? * decay)?)?;
            *t = FisherTensor::Full(sum);
        }
        for (name, o) in &older.tensors {
            if !self.tensors.contains_key(name) {
                self.tensors
                    .insert(name.clone(), FisherTensor::Full((o.dense()? * decay)?));
            }
        }
        self.meta.stages += older.meta.stages;
        self.meta.decay = decay;
        Ok(())
    }

    /// Writes `path` (safetensors) and `path.json` (provenance): every entry in `dtype`, or
    /// row and column sums in f32 when `factored`.
    pub fn save(&self, path: &Path, format: FisherFormat, dtype: DType) -> Result<()> {
        let mut out = Vec::new();
        for (name, t) in &self.tensors {
            match format {
                FisherFormat::Full => out.push((format!("{name}.fisher"), t.dense()?.to_dtype(dtype)?)),
                FisherFormat::Factored => {
                    let FisherTensor::Factored { rows, cols, total } = t.factored()? else {
                        unreachable!()
                    };
                    out.push((format!("{name}.fisher_rows"), rows));
                    out.push((format!("{name}.fisher_cols"), cols));
                    out.push((
                        format!("{name}.fisher_total"),
                        Tensor::new(&[total as f32], &Device::Cpu)?,
                    ));
                }
            }
        }
        save_safetensors(path, &out)?;
        let meta = FisherMeta {
            format: format.name().into(),
            ..self.meta.clone()
        };
        crate::util::write_atomic(&meta_path(path), serde_json::to_string_pretty(&meta)?.as_bytes())
    }

    /// Reads a file written by [`Fisher::save`].
    pub fn load(path: &Path, dev: &Device) -> Result<Self> {
        let text = crate::fsio::read_text(&meta_path(path), crate::fsio::CONFIG_CAP, "Fisher provenance file")
            .with_context(|| {
                format!(
                    "cannot read {} (written beside every Fisher file)",
                    meta_path(path).display()
                )
            })?;
        let meta: FisherMeta = serde_json::from_str(&text)
            .with_context(|| format!("{}: not Fisher provenance", meta_path(path).display()))?;
        let mut raw =
            candle_core::safetensors::load(path, dev).with_context(|| format!("cannot read {}", path.display()))?;
        let mut tensors = BTreeMap::new();
        let names: Vec<String> = raw.keys().cloned().collect();
        for k in names {
            if let Some(n) = k.strip_suffix(".fisher") {
                // Kept as stored (bf16 by default): `dense` widens one weight's at a time, so a
                // run holds half the bytes an f32 copy would, and loses nothing the file had.
                let t = raw.remove(&k).expect("listed");
                if !matches!(t.dtype(), DType::F32 | DType::BF16 | DType::F16) {
                    bail!(
                        "{}: `{k}` is {:?}; a Fisher is stored in f32, bf16 or f16",
                        path.display(),
                        t.dtype()
                    );
                }
                tensors.insert(n.to_string(), FisherTensor::Full(t));
            } else if let Some(n) = k.strip_suffix(".fisher_rows") {
                let get = |raw: &mut std::collections::HashMap<String, Tensor>, s: &str| {
                    raw.remove(&format!("{n}.{s}"))
                        .with_context(|| format!("{}: `{n}.{s}` is missing", path.display()))
                };
                let rows = raw.remove(&k).expect("listed");
                let cols = get(&mut raw, "fisher_cols")?;
                let total = get(&mut raw, "fisher_total")?.flatten_all()?.to_vec1::<f32>()?;
                let total = match total[..] {
                    [t] if t.is_finite() && t > 0.0 => t as f64,
                    _ => bail!(
                        "{}: `{n}.fisher_total` must hold one finite positive number, found {total:?}",
                        path.display()
                    ),
                };
                tensors.insert(n.to_string(), FisherTensor::Factored { rows, cols, total });
            }
        }
        if tensors.is_empty() {
            bail!("{}: no Fisher tensors inside", path.display());
        }
        for (name, t) in &tensors {
            t.check(name, path)?;
        }
        Ok(Self { tensors, meta })
    }
}

fn meta_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".json");
    PathBuf::from(s)
}
