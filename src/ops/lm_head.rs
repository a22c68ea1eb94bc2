//! The LM head and cross-entropy, fused and chunked, with an explicit backward.
//!
//! Logits over a large vocabulary are the biggest tensor of a step (`tokens x vocab`, 200 MB for
//! 1,024 tokens of SmolLM2) and a third of its time (docs/design.md, pitfall 5). Here logits exist one
//! chunk of rows at a time, and the gradient is produced in the same pass as the loss: for each
//! chunk, `dlogits = softmax - onehot`, then `dh = dlogits W` (and `dW += dlogits^T h` when the
//! head is trained). The caller feeds `dh` back into the graph below.

use candle_core::{DType, Result, Tensor, D};
use rayon::prelude::*;

use super::bf16_gemm::{self, LinearPack};
use super::fast_exp::{exp_in_place, lane_sum};

/// Marks a target position that contributes no loss (prompt tokens, padding).
pub const IGNORE: u32 = u32::MAX;

/// What one pass of the head produced.
#[derive(Debug)]
pub struct HeadOutput {
    /// Sum of the token negative log-likelihoods over counted positions.
    pub nll_sum: f64,
    /// Number of counted (non-ignored) positions.
    pub count: usize,
    /// Counted positions whose arg-max prediction equals the target.
    pub correct: usize,
    /// Per-position NLL (0 at ignored positions), when asked for.
    pub per_token: Option<Vec<f32>>,
    /// dL/dh `[n, hidden]` where `L = grad_scale * nll_sum`, when a gradient was asked for.
    pub dh: Option<Tensor>,
    /// dL/dW `[vocab, hidden]`, when asked for.
    pub dw: Option<Tensor>,
}

/// The head weight packed for the bf16 kernel, both ways (logits and input gradient): a frozen
/// head's, built once, or a trained head's working copy (`ops::trained_linear::TrainPack`).
pub type HeadPack = LinearPack;

impl LinearPack {
    /// Packs a head `w [vocab, hidden]` (rounded to bf16); `None` when the CPU lacks AVX512-BF16.
    pub fn of_head(w: &Tensor) -> Result<Option<Self>> {
        if !bf16_gemm::available() || !w.device().is_cpu() {
            return Ok(None);
        }
        let (v, h) = w.dims2()?;
        let wb: Vec<half::bf16> = w.to_dtype(DType::BF16)?.flatten_all()?.to_vec1()?;
        Ok(Some(Self::new(&wb, v, h)))
    }
}

/// Rows of logits materialised at once for a vocabulary: up to 256, fewer for large
/// vocabularies so that a chunk's logits stay within 64 MiB (110 rows at Qwen2's 152k).
pub fn chunk_rows(vocab: usize) -> usize {
    ((64usize << 20) / (4 * vocab.max(1))).clamp(32, 256)
}

/// Options of [`lm_head_loss`].
#[derive(Clone, Copy, Debug)]
pub struct HeadOptions<'a> {
    /// Rows of logits materialised at once.
    pub chunk: usize,
    /// Scale of the loss whose gradient is returned; `None` computes no gradient.
    pub grad_scale: Option<f64>,
    /// Also return the gradient of the head weight.
    pub want_dw: bool,
    /// Keep per-position NLLs.
    pub per_token: bool,
    /// Run the head through the bf16 kernel with this packing (a frozen head's, or a trained
    /// head's working copy: then `want_dw` sums the weight gradient through the kernel too).
    pub pack: Option<&'a HeadPack>,
}

impl Default for HeadOptions<'_> {
    fn default() -> Self {
        Self {
            chunk: 256,
            grad_scale: None,
            want_dw: false,
            per_token: false,
            pack: None,
        }
    }
}

/// A row's negative log-likelihood and arg-max.
type RowStat = (f64, u32);

/// `sum(xs)` in f64 over f32 partial sums of 256 values (the vocabulary-wide sums of the
/// softmax, without a serial f64 chain per value).
fn sum_f64(xs: &[f32]) -> f64 {
    xs.chunks(256).map(|c| lane_sum(c) as f64).sum()
}

/// Softmax cross-entropy over rows of `logits [rows, v]` in place: returns each row's NLL and
/// arg-max, and, when `scales` is given, leaves `scale_i * (softmax - onehot)` in the rows
/// (zero for rows whose scale is 0).
fn softmax_ce_rows(logits: &mut [f32], v: usize, targets: &[u32], scales: Option<&[f32]>) -> Vec<RowStat> {
    logits
        .par_chunks_mut(v)
        .enumerate()
        .map(|(i, row)| {
            let (mut mx, mut am) = (f32::NEG_INFINITY, 0u32);
            for (j, &x) in row.iter().enumerate() {
                if x > mx {
                    mx = x;
                    am = j as u32;
                }
            }
            let t = targets[i] as usize;
            let tl = row[t];
            let mut sum = 0f64;
            if let Some(sc) = scales {
                row.iter_mut().for_each(|x| *x -= mx);
                exp_in_place(row);
                sum = sum_f64(row);
                let k = (sc[i] as f64 / sum) as f32;
                for x in row.iter_mut() {
                    *x *= k;
                }
                row[t] -= sc[i];
            } else {
                let mut buf = [0f32; 256];
                for part in row.chunks(buf.len()) {
                    let b = &mut buf[..part.len()];
                    b.iter_mut().zip(part).for_each(|(o, &x)| *o = x - mx);
                    exp_in_place(b);
                    sum += sum_f64(b);
                }
            }
            (sum.ln() + mx as f64 - tl as f64, am)
        })
        .collect()
}

/// The first `len` values of the logits buffer every chunk of a call reuses: a chunk's logits
/// are tens of MB, over malloc's mmap threshold, so a fresh buffer per chunk would be mapped,
/// page-faulted and zeroed by the kernel each time. The GEMMs overwrite it; no zeroing needed.
fn logits_buffer(buf: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if buf.len() < len {
        buf.resize(len, 0.0);
    }
    &mut buf[..len]
}

/// One chunk through the bf16 kernel: NLLs, arg-maxes and (when asked) `dh [c, hidden]`.
/// With `dw` (a trained head), also adds this chunk's `dlogits^T h` into it.
fn chunk_bf16(
    hc: &Tensor,
    pack: &HeadPack,
    idx: &[u32],
    scales: Option<&[f32]>,
    buf: &mut Vec<f32>,
    dw: Option<(&mut [f32], bool)>,
) -> Result<(Vec<RowStat>, Option<Tensor>)> {
    let (c, hidden) = hc.dims2()?;
    let v = pack.fwd.n;
    let x: Vec<f32> = hc.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let logits = logits_buffer(buf, c * v);
    bf16_gemm::gemm(&bf16_gemm::pack_a(&x, c, hidden), c, &pack.fwd, logits);
    let rows = softmax_ce_rows(logits, v, idx, scales);
    let dh = match scales {
        Some(_) => {
            let mut dh = vec![0f32; c * hidden];
            bf16_gemm::gemm(&bf16_gemm::pack_a(logits, c, v), c, &pack.bwd, &mut dh);
            if let Some((dw, accumulate)) = dw {
                bf16_gemm::weight_grad(logits, &x, c, v, hidden, dw, accumulate);
            }
            Some(Tensor::from_vec(dh, (c, hidden), hc.device())?)
        }
        None => None,
    };
    Ok((rows, dh))
}

/// One chunk against a frozen head without the kernel's packs (bf16 or f32): logits in one f32
/// buffer (the head decoded a slab of rows at a time), softmax in place, `dh` the same way back.
fn chunk_lean(
    hc: &Tensor,
    w: &super::dequant_linear::Compact,
    idx: &[u32],
    scales: Option<&[f32]>,
    buf: &mut Vec<f32>,
) -> Result<(Vec<RowStat>, Option<Tensor>)> {
    use super::dequant_linear::{g_w, use_kernel, x_wt};
    let (c, hidden) = hc.dims2()?;
    let (v, _) = w.dims()?;
    let x: Vec<f32> = hc.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let logits = logits_buffer(buf, c * v);
    // An f32 head stays f32; a bf16 one may use the kernel.
    let kernel = use_kernel(c) && !matches!(w, super::dequant_linear::Compact::F32(_));
    x_wt(&x, c, w, logits, kernel)?;
    let rows = softmax_ce_rows(logits, v, idx, scales);
    let dh = match scales {
        Some(_) => {
            let mut dh = vec![0f32; c * hidden];
            g_w(logits, c, w, &mut dh, kernel)?;
            Some(Tensor::from_vec(dh, (c, hidden), hc.device())?)
        }
        None => None,
    };
    Ok((rows, dh))
}

/// Runs `h [n, hidden]` (detached) through the head `w [vocab, hidden]` against `targets` (length
/// n, [`IGNORE`] to skip).
pub fn lm_head_loss(h: &Tensor, w: &Tensor, targets: &[u32], opt: HeadOptions) -> Result<HeadOutput> {
    let (n, hidden) = h.dims2()?;
    let (vocab, wh) = w.dims2()?;
    if hidden != wh {
        candle_core::bail!("lm head: hidden size {hidden} does not match head weight width {wh}");
    }
    if targets.len() != n {
        candle_core::bail!("lm head: {} targets for {n} positions", targets.len());
    }
    if let Some(&bad) = targets.iter().find(|&&t| t != IGNORE && t as usize >= vocab) {
        candle_core::bail!("lm head: target token {bad} is outside the vocabulary of {vocab}");
    }
    // The head runs outside autograd: a trained (Var) weight must not pull its gradient
    // computation into the graph the caller seeds with `dh`.
    let (h, w) = (&h.detach(), &w.detach());
    let dev = h.device();
    // f64 inputs (gradient tests) stay in f64; everything else computes the softmax in f32.
    let cdt = if h.dtype() == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let chunk = opt.chunk.max(1);
    let mut out = HeadOutput {
        nll_sum: 0.0,
        count: 0,
        correct: 0,
        per_token: opt.per_token.then(|| Vec::with_capacity(n)),
        dh: None,
        dw: None,
    };
    let mut dh_parts = Vec::new();
    let mut dw: Option<Tensor> = None;
    // A packed trained head sums its weight gradient here, chunk by chunk, in f32.
    let mut dw_packed: Option<Vec<f32>> = None;
    let mut buf = Vec::new();
    let mut start = 0;
    while start < n {
        let c = chunk.min(n - start);
        let tg = &targets[start..start + c];
        let mask: Vec<f32> = tg.iter().map(|&t| if t == IGNORE { 0.0 } else { 1.0 }).collect();
        let idx: Vec<u32> = tg.iter().map(|&t| if t == IGNORE { 0 } else { t }).collect();
        let counted = mask.iter().filter(|&&m| m > 0.0).count();
        if counted == 0 && opt.grad_scale.is_none() {
            if let Some(p) = out.per_token.as_mut() {
                p.extend(std::iter::repeat_n(0.0, c));
            }
            start += c;
            continue;
        }
        let hc = h.narrow(0, start, c)?;
        let lean = opt.pack.is_none()
            && matches!(w.dtype(), DType::BF16 | DType::F32)
            && w.device().is_cpu()
            && h.dtype() != DType::F64;
        let scales: Option<Vec<f32>> = opt.grad_scale.map(|s| mask.iter().map(|m| m * s as f32).collect());
        let (rows, dh, dw_part) = match opt.pack {
            Some(pack) => {
                if pack.fwd.n != vocab {
                    candle_core::bail!("lm head: packed head has {} rows, weight has {vocab}", pack.fwd.n);
                }
                let dw = match (opt.want_dw && scales.is_some(), &mut dw_packed) {
                    (false, _) => None,
                    (true, Some(acc)) => Some((acc.as_mut_slice(), true)),
                    (true, slot) => Some((slot.insert(vec![0f32; vocab * hidden]).as_mut_slice(), false)),
                };
                let (rows, dh) = chunk_bf16(&hc, pack, &idx, scales.as_deref(), &mut buf, dw)?;
                (rows, dh, None)
            }
            None if lean && !opt.want_dw => {
                use super::dequant_linear::Compact;
                let w = w.contiguous()?;
                let c = match w.dtype() {
                    DType::BF16 => Compact::Bf16(w),
                    _ => Compact::F32(w),
                };
                let (rows, dh) = chunk_lean(&hc, &c, &idx, scales.as_deref(), &mut buf)?;
                (rows, dh, None)
            }
            None => chunk_composed(&hc, w, &idx, scales.as_deref(), cdt, opt.want_dw)?,
        };
        for (i, (nll, am)) in rows.into_iter().enumerate() {
            if mask[i] > 0.0 {
                out.nll_sum += nll;
                out.count += 1;
                out.correct += (am == idx[i]) as usize;
            }
            if let Some(p) = out.per_token.as_mut() {
                p.push(nll as f32 * mask[i]);
            }
        }
        if let Some(dh) = dh {
            dh_parts.push(dh.to_dtype(h.dtype())?);
        }
        if let Some(part) = dw_part {
            dw = Some(match dw {
                None => part,
                Some(acc) => (acc + part)?,
            });
        }
        start += c;
    }
    if let Some(v) = dw_packed {
        dw = Some(Tensor::from_vec(v, (vocab, hidden), dev)?);
    }
    if opt.grad_scale.is_some() {
        out.dh = Some(Tensor::cat(&dh_parts, 0)?);
        out.dw = dw;
    }
    Ok(out)
}

/// Each row's (NLL, arg-max), dh, and this chunk's part of dW.
type ComposedChunk = (Vec<(f64, u32)>, Option<Tensor>, Option<Tensor>);

/// One chunk through candle ops on materialised logits (any dtype and device; f64 for gradient
/// tests; a trained head's dW where it is not packed): each row's (NLL, arg-max), and with
/// `scales` (per-row gradient scales) dh and, when `want_dw`, this chunk's part of dW.
fn chunk_composed(
    hc: &Tensor,
    w: &Tensor,
    idx: &[u32],
    scales: Option<&[f32]>,
    cdt: DType,
    want_dw: bool,
) -> Result<ComposedChunk> {
    let (c, vocab) = (hc.dim(0)?, w.dim(0)?);
    let dev = hc.device();
    let logits = hc.to_dtype(w.dtype())?.matmul(&w.t()?)?.to_dtype(cdt)?;
    let m = logits.max_keepdim(D::Minus1)?;
    let e = logits.broadcast_sub(&m)?.exp()?;
    let s = e.sum_keepdim(D::Minus1)?;
    let idx_t = Tensor::from_vec(idx.to_vec(), (c, 1), dev)?;
    let tgt = logits.gather(&idx_t, 1)?;
    let nll = (s.log()? + m)?
        .sub(&tgt)?
        .squeeze(1)?
        .to_dtype(DType::F64)?
        .to_vec1::<f64>()?;
    let argmax = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
    let rows = nll.into_iter().zip(argmax).collect();
    let Some(scales) = scales else {
        return Ok((rows, None, None));
    };
    let r = Tensor::from_vec(scales.to_vec(), (c, 1), dev)?.to_dtype(cdt)?;
    let onehot = Tensor::zeros((c, vocab), cdt, dev)?.scatter_add(&idx_t, &Tensor::ones((c, 1), cdt, dev)?, 1)?;
    let gw = e
        .broadcast_div(&s)?
        .sub(&onehot)?
        .broadcast_mul(&r)?
        .to_dtype(w.dtype())?;
    let dh = gw.matmul(w)?;
    let dw = match want_dw {
        true => Some(gw.t()?.matmul(&hc.to_dtype(w.dtype())?)?),
        false => None,
    };
    Ok((rows, Some(dh), dw))
}

/// A head as the products the distillation term needs: logits `x W^T`, the input gradient
/// `g W` and, for a trained head, the weight gradient `g^T x`, through the bf16 kernel's packs
/// when the model has them (a frozen head's, or a trained head's working copy).
enum HeadView<'a> {
    Packed(&'a HeadPack),
    Lean(super::dequant_linear::Compact),
}

impl<'a> HeadView<'a> {
    fn of(side: KlSide<'a>) -> Result<Self> {
        let vocab = side.w.dim(0)?;
        Ok(match side.pack {
            Some(p) if p.fwd.n == vocab => HeadView::Packed(p),
            _ => {
                let w = side.w.detach().contiguous()?;
                HeadView::Lean(match w.dtype() {
                    DType::BF16 => super::dequant_linear::Compact::Bf16(w),
                    _ => super::dequant_linear::Compact::F32(w.to_dtype(DType::F32)?),
                })
            }
        })
    }

    fn logits(&self, x: &[f32], c: usize, hidden: usize, out: &mut [f32]) -> Result<()> {
        match self {
            HeadView::Packed(p) => bf16_gemm::gemm(&bf16_gemm::pack_a(x, c, hidden), c, &p.fwd, out),
            HeadView::Lean(w) => super::dequant_linear::x_wt(x, c, w, out, self.kernel(c))?,
        }
        Ok(())
    }

    fn back(&self, g: &[f32], c: usize, v: usize, dh: &mut [f32]) -> Result<()> {
        match self {
            HeadView::Packed(p) => bf16_gemm::gemm(&bf16_gemm::pack_a(g, c, v), c, &p.bwd, dh),
            HeadView::Lean(w) => super::dequant_linear::g_w(g, c, w, dh, self.kernel(c))?,
        }
        Ok(())
    }

    /// Adds `g^T x` (`g [c, v]`, `x [c, hidden]`) into `dw [v, hidden]`: through the kernel
    /// (bf16 operands, f32 sums) beside a packed working copy, as the cross-entropy's weight
    /// gradient is; in f32 otherwise.
    fn weight_grad(&self, g: &[f32], x: &[f32], c: usize, v: usize, hidden: usize, dw: &mut [f32]) -> Result<()> {
        match self {
            HeadView::Packed(_) => bf16_gemm::weight_grad(g, x, c, v, hidden, dw, true),
            HeadView::Lean(_) => {
                let dev = candle_core::Device::Cpu;
                let gt = Tensor::from_slice(&g[..c * v], (c, v), &dev)?;
                let xt = Tensor::from_slice(&x[..c * hidden], (c, hidden), &dev)?;
                let part: Vec<f32> = gt.t()?.matmul(&xt)?.flatten_all()?.to_vec1()?;
                dw.iter_mut().zip(part).for_each(|(d, p)| *d += p);
            }
        }
        Ok(())
    }

    fn kernel(&self, c: usize) -> bool {
        match self {
            HeadView::Packed(_) => true,
            HeadView::Lean(w) => {
                super::dequant_linear::use_kernel(c) && !matches!(w, super::dequant_linear::Compact::F32(_))
            }
        }
    }
}

/// One side of the distillation term: a head `w [vocab, hidden]` and its kernel pack, if any.
#[derive(Clone, Copy)]
pub struct KlSide<'a> {
    pub w: &'a Tensor,
    pub pack: Option<&'a HeadPack>,
}

/// What [`kl_head`] returns.
pub struct KlOutput {
    /// The summed KL over the rows.
    pub kl: f64,
    /// Gradient of `scale * kl` with respect to the student's hidden states.
    pub dh: Tensor,
    /// Gradient of `scale * kl` with respect to the student's head, when asked for (a trained
    /// head: full fine-tuning, or a tied embedding trained beside adapters).
    pub dw: Option<Tensor>,
}

/// `log softmax` of a row in place; returns nothing (the row then holds log-probabilities).
fn log_softmax_in_place(row: &mut [f32], tmp: &mut Vec<f32>) {
    let mx = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    tmp.clear();
    tmp.extend(row.iter().map(|&x| x - mx));
    exp_in_place(tmp);
    let lse = sum_f64(tmp).ln() as f32 + mx;
    row.iter_mut().for_each(|x| *x -= lse);
}

/// Distillation to a teacher: `sum_i KL(softmax(t_i Wt^T) || softmax(h_i Ws^T))` over the rows
/// of `h` and `teacher` (`[n, hidden]` each), and the gradient of `scale` times that sum with
/// respect to `h`, which is `scale * (softmax(h Ws^T) - softmax(t Wt^T)) Ws` (and, with
/// `want_dw`, with respect to `Ws`: that difference transposed times `h`). Under LoRA the
/// teacher is the same model with its adapters off and one frozen head serves both sides, so
/// the base's distributions need no second copy; under full fine-tuning the teacher is a frozen
/// copy of the base with its own head.
pub fn kl_head(
    h: &Tensor,
    teacher: &Tensor,
    student: KlSide<'_>,
    teacher_head: KlSide<'_>,
    chunk: usize,
    scale: f64,
    want_dw: bool,
) -> Result<KlOutput> {
    let (n, hidden) = h.dims2()?;
    let (vocab, wh) = student.w.dims2()?;
    if teacher.dims2()? != (n, hidden) || wh != hidden || teacher_head.w.dims2()? != (vocab, hidden) {
        candle_core::bail!(
            "distillation: student {:?}, teacher {:?}, student head {:?} and teacher head {:?} do not agree",
            h.dims(),
            teacher.dims(),
            student.w.dims(),
            teacher_head.w.dims()
        );
    }
    let (head, thead) = (HeadView::of(student)?, HeadView::of(teacher_head)?);
    let hs: Vec<f32> = h.detach().to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let ts: Vec<f32> = teacher.detach().to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let mut dh = vec![0f32; n * hidden];
    let mut dw = want_dw.then(|| vec![0f32; vocab * hidden]);
    let mut kl = 0.0;
    let chunk = chunk.max(1);
    let (mut sl, mut tl) = (Vec::new(), Vec::new());
    for start in (0..n).step_by(chunk) {
        let c = chunk.min(n - start);
        let (a, b) = (start * hidden, (start + c) * hidden);
        let s = logits_buffer(&mut sl, c * vocab);
        head.logits(&hs[a..b], c, hidden, s)?;
        let t = logits_buffer(&mut tl, c * vocab);
        thead.logits(&ts[a..b], c, hidden, t)?;
        let parts: Vec<f64> = s
            .par_chunks_mut(vocab)
            .zip(t.par_chunks_mut(vocab))
            .map_init(Vec::new, |tmp, (sr, tr)| {
                log_softmax_in_place(sr, tmp);
                log_softmax_in_place(tr, tmp);
                let mut k = 0.0f64;
                // The student row becomes the gradient: scale * (p - q).
                for (x, &lq) in sr.iter_mut().zip(tr.iter()) {
                    let (p, q) = ((*x).exp(), lq.exp());
                    k += q as f64 * (lq - *x) as f64;
                    *x = scale as f32 * (p - q);
                }
                k
            })
            .collect();
        kl += parts.iter().sum::<f64>();
        head.back(s, c, vocab, &mut dh[a..b])?;
        if let Some(dw) = dw.as_mut() {
            head.weight_grad(s, &hs[a..b], c, vocab, hidden, dw)?;
        }
    }
    let dw = dw
        .map(|d| Tensor::from_vec(d, (vocab, hidden), h.device()))
        .transpose()?;
    Ok(KlOutput {
        kl,
        dh: Tensor::from_vec(dh, (n, hidden), h.device())?.to_dtype(h.dtype())?,
        dw,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn naive(h: &Tensor, w: &Tensor, targets: &[u32]) -> Result<Tensor> {
        let logits = h.matmul(&w.t()?)?;
        let lse = logits.exp()?.sum_keepdim(1)?.log()?;
        let mut terms = Vec::new();
        for (i, &t) in targets.iter().enumerate() {
            if t != IGNORE {
                terms.push((lse.get(i)?.get(0)? - logits.get(i)?.get(t as usize)?)?);
            }
        }
        Tensor::stack(&terms, 0)?.sum_all()
    }

    #[test]
    fn chunked_loss_and_gradients_match_autograd() -> Result<()> {
        let dev = Device::Cpu;
        let h = Var::from_tensor(&Tensor::randn(0f64, 1., (7, 5), &dev)?)?;
        let w = Var::from_tensor(&Tensor::randn(0f64, 1., (11, 5), &dev)?)?;
        let targets = [3, IGNORE, 0, 10, 4, IGNORE, 7];
        let loss = naive(h.as_tensor(), w.as_tensor(), &targets)?;
        let grads = (&loss * 0.5)?.backward()?;
        let out = lm_head_loss(
            h.as_tensor(),
            w.as_tensor(),
            &targets,
            HeadOptions {
                chunk: 3,
                grad_scale: Some(0.5),
                want_dw: true,
                per_token: true,
                pack: None,
            },
        )?;
        assert_eq!(out.count, 5);
        assert!((out.nll_sum - loss.to_scalar::<f64>()?).abs() < 1e-9);
        let pt = out.per_token.unwrap();
        assert_eq!(pt[1], 0.0);
        assert!((pt.iter().map(|&x| x as f64).sum::<f64>() - out.nll_sum).abs() < 1e-4);
        let d = (out.dh.unwrap() - grads.get(h.as_tensor()).unwrap())?
            .abs()?
            .max_all()?
            .to_scalar::<f64>()?;
        assert!(d < 1e-9, "dh differs by {d}");
        let d = (out.dw.unwrap() - grads.get(w.as_tensor()).unwrap())?
            .abs()?
            .max_all()?
            .to_scalar::<f64>()?;
        assert!(d < 1e-9, "dw differs by {d}");
        Ok(())
    }

    /// An unpacked bf16 head (decoded slab by slab into one logits buffer) gives the f32 head's
    /// loss, arg-maxes and `dh` on the same (bf16-representable) weights.
    #[test]
    fn lean_bf16_head_matches_the_f32_head() -> Result<()> {
        let dev = Device::Cpu;
        let h = Tensor::randn(0f32, 1., (9, 16), &dev)?;
        let w = Tensor::randn(0f32, 1., (300, 16), &dev)?.to_dtype(DType::BF16)?;
        let targets = [3, IGNORE, 0, 299, 4, 5, 6, 7, 8];
        let base = HeadOptions {
            chunk: 4,
            grad_scale: Some(0.25),
            per_token: true,
            ..Default::default()
        };
        let a = lm_head_loss(&h, &w.to_dtype(DType::F32)?, &targets, base)?;
        let b = lm_head_loss(&h, &w, &targets, base)?;
        // The f32 head (lean too) against the f64 composition.
        let exact = naive(&h.to_dtype(DType::F64)?, &w.to_dtype(DType::F64)?, &targets)?.to_scalar::<f64>()?;
        assert!(
            (a.nll_sum - exact).abs() < 1e-5 * exact.abs(),
            "{} vs {exact}",
            a.nll_sum
        );
        assert_eq!((a.count, a.correct), (b.count, b.correct));
        assert!((a.nll_sum - b.nll_sum).abs() < 1e-5 * a.nll_sum.abs());
        let d = (a.dh.unwrap() - b.dh.unwrap())?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(d < 1e-5, "dh differs by {d}");
        Ok(())
    }

    #[test]
    fn bf16_kernel_head_matches_the_f32_head() -> Result<()> {
        if !bf16_gemm::available() {
            return Ok(());
        }
        let dev = Device::Cpu;
        let round = |t: Tensor| t.to_dtype(DType::BF16)?.to_dtype(DType::F32);
        let h = round(Tensor::randn(0f32, 1., (9, 16), &dev)?)?;
        let w = round(Tensor::randn(0f32, 1., (70, 16), &dev)?)?;
        let targets = [3, IGNORE, 0, 69, 4, 5, 6, 7, 8];
        let pack = HeadPack::of_head(&w)?.unwrap();
        let base = HeadOptions {
            chunk: 4,
            grad_scale: Some(0.25),
            per_token: true,
            ..Default::default()
        };
        // The head as given (f32), and through the kernel's packs.
        let both = |o: HeadOptions| -> Result<(HeadOutput, HeadOutput)> {
            Ok((
                lm_head_loss(&h, &w, &targets, o)?,
                lm_head_loss(&h, &w, &targets, HeadOptions { pack: Some(&pack), ..o })?,
            ))
        };
        let (a, b) = both(base)?;
        assert_eq!((a.count, a.correct), (b.count, b.correct));
        assert!((a.nll_sum - b.nll_sum).abs() < 1e-3 * a.nll_sum.abs());
        let (da, db) = (a.dh.unwrap(), b.dh.unwrap());
        // The softmax gradient is rounded to bf16 before `dh = g W`: about 3 significant digits.
        let scale = da.abs()?.max_all()?.to_scalar::<f32>()?;
        let d = (da - db)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(d < 1e-2 * scale, "dh differs by {d} (scale {scale})");
        // A trained head's weight gradient through the kernel, summed over the chunks.
        let (a, b) = both(HeadOptions { want_dw: true, ..base })?;
        let (da, db) = (a.dw.unwrap(), b.dw.unwrap());
        let scale = da.abs()?.max_all()?.to_scalar::<f32>()?;
        let d = (da - db)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(scale > 0.0 && d < 1e-2 * scale, "dw differs by {d} (scale {scale})");
        Ok(())
    }

    /// The distillation term against candle's autograd of the composed KL, f32 and packed bf16:
    /// the student's hidden-state and head gradients, with the teacher's own head.
    #[test]
    fn kl_to_teacher_matches_autograd() -> Result<()> {
        let dev = Device::Cpu;
        let (n, hidden, vocab) = (7, 16, 40);
        let h0 = Tensor::randn(0f32, 1., (n, hidden), &dev)?;
        let t = Tensor::randn(0f32, 1., (n, hidden), &dev)?;
        let w = Tensor::randn(0f32, 0.5, (vocab, hidden), &dev)?;
        let wt = (&w + Tensor::randn(0f32, 0.1, (vocab, hidden), &dev)?)?;
        let hv = Var::from_tensor(&h0)?;
        let wv = Var::from_tensor(&w)?;
        let ls = candle_nn_log_softmax(&hv.as_tensor().matmul(&wv.as_tensor().t()?)?)?;
        let lt = candle_nn_log_softmax(&t.matmul(&wt.t()?)?)?;
        let kl = (lt.exp()? * (lt - ls)?)?.sum_all()?;
        let want = kl.to_scalar::<f32>()? as f64;
        let g = kl.affine(0.5, 0.)?.backward()?;
        let (gh, gw) = (g.get(hv.as_tensor()).unwrap(), g.get(wv.as_tensor()).unwrap());
        let side = |w| KlSide { w, pack: None };
        let out = kl_head(&h0, &t, side(&w), side(&wt), 3, 0.5, true)?;
        assert!(
            (out.kl - want).abs() < 1e-4 * want.abs().max(1.0),
            "{} vs {want}",
            out.kl
        );
        let err = (out.dh - gh)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(err < 1e-5, "gradient differs by {err}");
        let err = (out.dw.unwrap() - gw)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(err < 1e-5, "head gradient differs by {err}");
        // A student equal to its teacher has nothing to learn.
        let zero = kl_head(&t, &t, side(&w), side(&w), 4, 1.0, false)?;
        assert!(zero.kl.abs() < 1e-6 && zero.dh.abs()?.max_all()?.to_scalar::<f32>()? < 1e-6);
        assert!(zero.dw.is_none());
        // The bf16 kernel's packs give the same term within bf16's rounding.
        let (wb, wtb) = (w.to_dtype(DType::BF16)?, wt.to_dtype(DType::BF16)?);
        if let (Some(pack), Some(tpack)) = (HeadPack::of_head(&wb)?, HeadPack::of_head(&wtb)?) {
            let s = KlSide {
                w: &wb,
                pack: Some(&pack),
            };
            let ts = KlSide {
                w: &wtb,
                pack: Some(&tpack),
            };
            let p = kl_head(&h0, &t, s, ts, 5, 0.5, true)?;
            assert!((p.kl - want).abs() < 0.03 * want, "{} vs {want}", p.kl);
            let rel = |a: Tensor, b: &Tensor| -> Result<f32> {
                ((a - b)?.sqr()?.sum_all()?.sqrt()? / b.sqr()?.sum_all()?.sqrt()?)?.to_scalar::<f32>()
            };
            let r = rel(p.dh, gh)?;
            assert!(r < 0.05, "packed gradient off by {r}");
            let r = rel(p.dw.unwrap(), gw)?;
            assert!(r < 0.05, "packed head gradient off by {r}");
        }
        Ok(())
    }

    fn candle_nn_log_softmax(x: &Tensor) -> Result<Tensor> {
        let m = x.max_keepdim(1)?;
        let z = x.broadcast_sub(&m)?;
        z.broadcast_sub(&z.exp()?.sum_keepdim(1)?.log()?)
    }

    #[test]
    fn out_of_vocabulary_target_is_an_error() -> Result<()> {
        let dev = Device::Cpu;
        let h = Tensor::zeros((2, 3), DType::F32, &dev)?;
        let w = Tensor::zeros((4, 3), DType::F32, &dev)?;
        let err = lm_head_loss(&h, &w, &[1, 9], HeadOptions::default()).unwrap_err();
        assert!(err.to_string().contains("outside the vocabulary"));
        Ok(())
    }
}
