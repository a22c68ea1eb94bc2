//! A frozen projection held compactly (NF4 with or without double quantization, or bf16 without
//! the bf16 kernel's packs): `y = x W^T` with the weight decoded to f32 a slab of rows at a time
//! inside the product, and a backward that returns dL/dx only. No decoded copy of the weight
//! outlives one slab, so the weight costs its stored bytes and nothing more.

use candle_core::quantized::{GgmlType, QTensor};
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use half::bf16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;
use std::sync::Arc;

use super::{bf16_gemm, cpu_f32, f32_view, sgemm_ld};
use crate::quant::nf4::Nf4Tensor;

/// A weight `[rows, cols]` the op decodes slab by slab.
#[derive(Clone)]
pub enum Compact {
    /// NF4 codes and scales.
    Nf4(Arc<Nf4Tensor>),
    /// A contiguous bf16 tensor.
    Bf16(Tensor),
    /// A contiguous f32 tensor (rows copied; for an f32 LM head, one logits buffer at a time).
    F32(Tensor),
    /// A GGUF block-quantized tensor (Q4_0 ... Q8_0, K-quants) on the CPU; see [`gguf_decodable`].
    Gguf(Arc<QTensor>),
}

/// Whether a GGUF tensor can be decoded a slab of rows at a time: a block type strata decodes,
/// on the CPU, with rows made of whole blocks.
pub fn gguf_decodable(q: &QTensor) -> bool {
    use candle_core::quantized::GgmlDType as G;
    let supported = matches!(
        q.dtype(),
        G::Q4_0 | G::Q4_1 | G::Q5_0 | G::Q5_1 | G::Q8_0 | G::Q2K | G::Q3K | G::Q4K | G::Q5K | G::Q6K
    );
    let cols = q.shape().dims().last().copied().unwrap_or(0);
    supported && q.device().is_cpu() && q.shape().rank() == 2 && cols % q.dtype().block_size() == 0 && q.data().is_ok()
}

/// Decodes whole blocks of type `T` from their bytes into `out`.
fn blocks_to_f32<T: GgmlType>(bytes: &[u8], out: &mut [f32]) {
    let n = bytes.len() / std::mem::size_of::<T>();
    if bytes.as_ptr().align_offset(std::mem::align_of::<T>()) == 0 {
        // SAFETY: the bytes are `n` whole blocks of `T` (a plain `repr(C)` struct of integers
        // and f16s, valid for any bit pattern) as candle stores them, and aligned for `T`.
        let blocks = unsafe { std::slice::from_raw_parts(bytes.as_ptr() as *const T, n) };
        T::to_float(blocks, out);
    } else {
        let mut v: Vec<T> = Vec::with_capacity(n);
        // SAFETY: copies n blocks' bytes into a buffer allocated (and so aligned) for n blocks.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), v.as_mut_ptr() as *mut u8, bytes.len());
            v.set_len(n);
        }
        T::to_float(&v, out);
    }
}

/// Decodes rows `r0..` of a GGUF tensor whose raw blocks are `data` into `out`.
fn gguf_rows(q: &QTensor, data: &[u8], cols: usize, r0: usize, out: &mut [f32]) {
    use candle_core::quantized::k_quants::*;
    use candle_core::quantized::GgmlDType as G;
    let ty = q.dtype();
    let row_bytes = cols / ty.block_size() * ty.type_size();
    let rows = out.len() / cols;
    let bytes = &data[r0 * row_bytes..(r0 + rows) * row_bytes];
    match ty {
        G::Q4_0 => blocks_to_f32::<BlockQ4_0>(bytes, out),
        G::Q4_1 => blocks_to_f32::<BlockQ4_1>(bytes, out),
        G::Q5_0 => blocks_to_f32::<BlockQ5_0>(bytes, out),
        G::Q5_1 => blocks_to_f32::<BlockQ5_1>(bytes, out),
        G::Q8_0 => blocks_to_f32::<BlockQ8_0>(bytes, out),
        G::Q2K => blocks_to_f32::<BlockQ2K>(bytes, out),
        G::Q3K => blocks_to_f32::<BlockQ3K>(bytes, out),
        G::Q4K => blocks_to_f32::<BlockQ4K>(bytes, out),
        G::Q5K => blocks_to_f32::<BlockQ5K>(bytes, out),
        G::Q6K => blocks_to_f32::<BlockQ6K>(bytes, out),
        // `gguf_decodable` admits only the types above.
        _ => out.fill(f32::NAN),
    }
}

impl Compact {
    /// `[rows, cols]`.
    pub fn dims(&self) -> Result<(usize, usize)> {
        match self {
            Compact::Nf4(q) => Ok((q.rows, q.cols)),
            Compact::Bf16(t) | Compact::F32(t) => t.dims2(),
            Compact::Gguf(q) => q.shape().dims2(),
        }
    }

    /// Calls `f(decode)` where `decode(r0, out)` writes rows `r0..` into `out` in f32.
    fn with_decoder<R>(&self, f: impl FnOnce(&(dyn Fn(usize, &mut [f32]) + Sync)) -> R) -> Result<R> {
        match self {
            Compact::Nf4(q) => Ok(f(&|r0, out| q.dequant_rows(r0, out))),
            Compact::Gguf(q) => {
                if !gguf_decodable(q) {
                    candle_core::bail!(
                        "dequant-linear: GGUF type {:?} cannot be decoded by rows here",
                        q.dtype()
                    );
                }
                let cols = q.shape().dims2()?.1;
                let data = q.data()?;
                Ok(f(&|r0, out| gguf_rows(q, &data, cols, r0, out)))
            }
            Compact::F32(t) => {
                let cols = t.dims2()?.1;
                let (st, l) = t.storage_and_layout();
                let data = match &*st {
                    candle_core::Storage::Cpu(c) => cpu_f32(c, l, "dequant-linear weight")?,
                    _ => candle_core::bail!("dequant-linear: expected an f32 weight on the CPU"),
                };
                Ok(f(&|r0, out: &mut [f32]| {
                    out.copy_from_slice(&data[r0 * cols..r0 * cols + out.len()])
                }))
            }
            Compact::Bf16(t) => {
                let cols = t.dims2()?.1;
                let (st, l) = t.storage_and_layout();
                let data = match &*st {
                    candle_core::Storage::Cpu(CpuStorage::BF16(v)) => match l.contiguous_offsets() {
                        Some((a, b)) => &v[a..b],
                        None => candle_core::bail!("dequant-linear: the bf16 weight must be contiguous"),
                    },
                    _ => candle_core::bail!("dequant-linear: expected a bf16 weight on the CPU"),
                };
                Ok(f(&|r0, out: &mut [f32]| {
                    let src = &data[r0 * cols..r0 * cols + out.len()];
                    for (o, s) in out.iter_mut().zip(src) {
                        *o = s.to_f32();
                    }
                }))
            }
        }
    }
}

impl Compact {
    /// [`Compact::with_decoder`] in bf16 (rounded to nearest even): NF4 rounds once per block
    /// level and bf16 is copied as stored, so neither passes through an f32 slab.
    fn with_decoder_bf16<R>(&self, f: impl FnOnce(&(dyn Fn(usize, &mut [bf16]) + Sync)) -> R) -> Result<R> {
        match self {
            Compact::Nf4(q) => Ok(f(&|r0, out| q.dequant_rows_bf16(r0, out))),
            Compact::Bf16(t) => {
                let cols = t.dims2()?.1;
                let (st, l) = t.storage_and_layout();
                let data = match (&*st, l.contiguous_offsets()) {
                    (candle_core::Storage::Cpu(CpuStorage::BF16(v)), Some((a, b))) => &v[a..b],
                    _ => candle_core::bail!("dequant-linear: expected a contiguous bf16 weight on the CPU"),
                };
                Ok(f(&|r0, out: &mut [bf16]| {
                    out.copy_from_slice(&data[r0 * cols..r0 * cols + out.len()])
                }))
            }
            Compact::F32(_) | Compact::Gguf(_) => self.with_decoder(|decode| {
                f(&|r0, out: &mut [bf16]| {
                    let mut tmp = vec![0f32; out.len()];
                    decode(r0, &mut tmp);
                    bf16_gemm::f32_to_bf16_bits(&tmp, out.reinterpret_cast_mut());
                })
            }),
        }
    }
}

/// Weight rows dequantized per slab: large enough for the GEMM to run at speed, small enough
/// (`SLAB * in` floats) to stay in cache-sized memory.
const SLAB: usize = 128;

/// Rows per slab on the bf16 kernel's path: four of its 48-column panels.
const SLAB_BF16: usize = 192;

/// Calls `f(r0, rows, slab)` for each slab of up to `rows` of `W`'s rows, decoded to f32 into
/// one reused buffer.
fn for_each_slab(w: &Compact, rows: usize, mut f: impl FnMut(usize, usize, &[f32])) -> Result<()> {
    let (n, k) = w.dims()?;
    let mut slab = vec![0f32; rows * k];
    w.with_decoder(|decode| {
        for r0 in (0..n).step_by(rows) {
            let nc = rows.min(n - r0);
            let ws = &mut slab[..nc * k];
            decode(r0, ws);
            f(r0, nc, ws);
        }
    })
}

/// [`for_each_slab`] in bf16 for the kernel's path, the rows of each slab decoded in parallel.
fn for_each_slab_bf16(w: &Compact, rows: usize, mut f: impl FnMut(usize, usize, &[bf16])) -> Result<()> {
    let (n, k) = w.dims()?;
    let mut slab = vec![bf16::ZERO; rows * k];
    let tasks = rayon::current_num_threads().max(1);
    w.with_decoder_bf16(|decode| {
        for r0 in (0..n).step_by(rows) {
            let nc = rows.min(n - r0);
            let ws = &mut slab[..nc * k];
            let per = nc.div_ceil(tasks).max(1);
            ws.par_chunks_mut(per * k)
                .enumerate()
                .for_each(|(i, part)| decode(r0 + i * per, part));
            f(r0, nc, ws);
        }
    })
}

/// Whether products with `m` rows should run through the bf16 kernel: the CPU has it and there
/// are rows enough to amortize decoding and packing each slab (bitsandbytes computes in bf16 too).
pub(crate) fn use_kernel(m: usize) -> bool {
    m >= 16 && bf16_gemm::available()
}

/// `y [m, n] = x [m, k] W^T` for a compact `W [n, k]`, a slab of rows decoded at a time: through
/// the bf16 kernel when `kernel` (activations rounded to bf16), else the f32 GEMM.
pub(crate) fn x_wt(x: &[f32], m: usize, w: &Compact, y: &mut [f32], kernel: bool) -> Result<()> {
    let (n, k) = w.dims()?;
    if !kernel {
        // y[:, r0..r0+nc] = x [m, k] * ws^T: ws read as [k, nc] (row stride 1, column stride k).
        return for_each_slab(w, SLAB, |r0, nc, ws| {
            sgemm_ld(m, nc, k, (x, k, 1), (ws, 1, k), (&mut y[r0..], n), false, 1.0, true)
        });
    }
    let a = bf16_gemm::pack_a(x, m, k);
    let mut part = vec![0f32; m * SLAB_BF16];
    for_each_slab_bf16(w, SLAB_BF16, |r0, nc, ws| {
        let b = bf16_gemm::PackedB::from_transposed(ws, nc, k);
        bf16_gemm::gemm(&a, m, &b, &mut part[..m * nc]);
        for (dst, src) in y.chunks_mut(n).zip(part.chunks(nc)) {
            dst[r0..r0 + nc].copy_from_slice(src);
        }
    })
}

/// `dx [m, k] = g [m, n] W` for a compact `W [n, k]`, a slab of rows decoded at a time (see
/// [`x_wt`] for `kernel`).
pub(crate) fn g_w(g: &[f32], m: usize, w: &Compact, dx: &mut [f32], kernel: bool) -> Result<()> {
    let (n, k) = w.dims()?;
    if !kernel {
        // dx += g[:, r0..r0+nc] * ws [nc, k].
        return for_each_slab(w, SLAB, |r0, nc, ws| {
            sgemm_ld(m, k, nc, (&g[r0..], n, 1), (ws, k, 1), (&mut *dx, k), r0 > 0, 1.0, true)
        });
    }
    let mut gs = vec![0f32; m * SLAB_BF16];
    let mut part = vec![0f32; m * k];
    for_each_slab_bf16(w, SLAB_BF16, |r0, nc, ws| {
        let b = bf16_gemm::PackedB::from_rows(ws, nc, k);
        for (dst, src) in gs.chunks_mut(nc).zip(g.chunks(n)).take(m) {
            dst.copy_from_slice(&src[r0..r0 + nc]);
        }
        let a = bf16_gemm::pack_a(&gs[..m * nc], m, nc);
        bf16_gemm::gemm(&a, m, &b, &mut part);
        if r0 == 0 {
            dx.copy_from_slice(&part);
        } else {
            dx.iter_mut().zip(&part).for_each(|(d, p)| *d += p);
        }
    })
}

/// `x [m, k] -> [m, n]` against a compact `W [n, k]`.
pub struct DequantLinear {
    /// The weight.
    pub w: Compact,
    /// Run the products through the bf16 kernel (products of 16 rows or more, on CPUs with
    /// AVX512-BF16).
    pub kernel: bool,
}

impl CustomOp1 for DequantLinear {
    fn name(&self) -> &'static str {
        "dequant-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = cpu_f32(s, l, "dequant-linear")?;
        let (m, k) = l.shape().dims2()?;
        let (n, wk) = self.w.dims()?;
        if k != wk {
            candle_core::bail!("dequant-linear: input width {k} does not match the weight's {wk}");
        }
        let mut y = vec![0f32; m * n];
        x_wt(x, m, &self.w, &mut y, self.kernel)?;
        Ok((CpuStorage::F32(y), Shape::from((m, n))))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let (m, k) = x.dims2()?;
        let g = f32_view(g)?;
        let mut dx = vec![0f32; m * k];
        g_w(g.get(), m, &self.w, &mut dx, self.kernel)?;
        Ok(Some(Tensor::from_vec(dx, (m, k), x.device())?))
    }
}

/// `x W^T` for f32 `x [m, k]` and a compact weight.
pub fn dequant_linear(x: &Tensor, w: Compact) -> Result<Tensor> {
    if let Compact::Bf16(t) = &w {
        if t.dtype() != DType::BF16 {
            candle_core::bail!("dequant-linear: expected a bf16 weight, got {:?}", t.dtype());
        }
    }
    if !x.device().is_cpu() {
        candle_core::bail!(
            "dequant-linear decodes weights held on the CPU; for activations on {:?}, upload NF4 \
             weights with ops::dequant_device::DeviceNf4 (GGUF weights: load them onto the device)",
            x.device().location()
        );
    }
    let x = if x.is_contiguous() { x.clone() } else { x.contiguous()? };
    let kernel = use_kernel(x.dim(0)?);
    x.apply_op1(DequantLinear { w, kernel })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Forward and dx equal the dense product with the dequantized weight, with and without
    /// double quantization, across slab boundaries; the same for an unpacked bf16 weight; on the
    /// f32 GEMM to float precision and on the bf16 kernel to bf16 precision.
    #[test]
    fn gradient_equals_dense_gradient_on_dequantized_weight() -> Result<()> {
        let dev = Device::Cpu;
        let (n, k, m) = (400, 96, 37);
        let x = Var::from_tensor(&Tensor::randn(0f32, 1., (m, k), &dev)?)?;
        let probe = Tensor::randn(0f32, 1., (m, n), &dev)?;
        for dq in [false, true] {
            let w: Vec<f32> = Tensor::randn(0f32, 0.05, (n, k), &dev)?.flatten_all()?.to_vec1()?;
            let q = Arc::new(Nf4Tensor::quantize(&w, n, k, 64, dq));
            let wd = Tensor::from_vec(q.dequantize(), (n, k), &dev)?;
            // NF4 keeps the weight within its 16 levels of each block's scale.
            let err = (&wd - Tensor::from_vec(w, (n, k), &dev)?)?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?;
            assert!(err < 0.05, "dq {dq}: quantization error {err}");
            assert!(q.bytes() < n * k * 4 / 7, "{} bytes", q.bytes());
            // The same weight held in bf16 goes through the same op.
            let wb = wd.to_dtype(candle_core::DType::BF16)?;
            let cases = [
                (Compact::Nf4(q.clone()), wd.clone()),
                (Compact::Bf16(wb.clone()), wb.to_dtype(candle_core::DType::F32)?),
            ];
            for (w, dense) in cases {
                let y_ref = x.as_tensor().matmul(&dense.t()?)?;
                let scale = y_ref.abs()?.max_all()?.to_scalar::<f32>()?;
                for kernel in [false, true] {
                    if kernel && !bf16_gemm::available() {
                        continue;
                    }
                    // Activations are rounded to bf16 on the kernel's path: about 3 significant
                    // digits.
                    let tol = if kernel { 5e-3 * scale } else { 1e-4 };
                    let y = x.as_tensor().apply_op1(DequantLinear { w: w.clone(), kernel })?;
                    let d = (&y - &y_ref)?.abs()?.max_all()?.to_scalar::<f32>()?;
                    assert!(d < tol, "dq {dq}, kernel {kernel}: forward differs by {d}");
                    let d = crate::testing::dx_gap(&y, &y_ref, &x, &probe)?;
                    assert!(d < 10.0 * tol, "dq {dq}, kernel {kernel}: dx differs by {d}");
                }
            }
        }
        Ok(())
    }

    /// GGUF block types decode by rows to exactly what candle's whole-tensor dequantization gives,
    /// and the op's forward and dx match the dense product on those weights.
    #[test]
    fn gguf_types_decode_by_rows_like_candle() -> Result<()> {
        use candle_core::quantized::GgmlDType as G;
        let dev = Device::Cpu;
        let (n, k, m) = (200, 512, 21);
        let w = Tensor::randn(0f32, 0.05, (n, k), &dev)?;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1., (m, k), &dev)?)?;
        let probe = Tensor::randn(0f32, 1., (m, n), &dev)?;
        for ty in [
            G::Q4_0,
            G::Q4_1,
            G::Q5_0,
            G::Q5_1,
            G::Q8_0,
            G::Q2K,
            G::Q3K,
            G::Q4K,
            G::Q5K,
            G::Q6K,
        ] {
            let q = Arc::new(QTensor::quantize(&w, ty)?);
            assert!(gguf_decodable(&q), "{ty:?}");
            let dense = q.dequantize(&dev)?;
            let c = Compact::Gguf(q.clone());
            let mut rows = vec![0f32; 3 * k];
            c.with_decoder(|decode| decode(5, &mut rows))?;
            assert_eq!(rows, dense.narrow(0, 5, 3)?.flatten_all()?.to_vec1::<f32>()?, "{ty:?}");
            let y = x.as_tensor().apply_op1(DequantLinear {
                w: c.clone(),
                kernel: false,
            })?;
            let y_ref = x.as_tensor().matmul(&dense.t()?)?;
            let d = (&y - &y_ref)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(d < 1e-4, "{ty:?}: forward differs by {d}");
            let d = crate::testing::dx_gap(&y, &y_ref, &x, &probe)?;
            assert!(d < 1e-4, "{ty:?}: dx differs by {d}");
            // The bf16 kernel's path (rows decoded to f32, then rounded): to bf16 precision.
            if bf16_gemm::available() {
                let y = x.as_tensor().apply_op1(DequantLinear { w: c, kernel: true })?;
                let tol = 5e-3 * y_ref.abs()?.max_all()?.to_scalar::<f32>()?;
                let d = (&y - &y_ref)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(d < tol, "{ty:?}, kernel: forward differs by {d}");
                let d = crate::testing::dx_gap(&y, &y_ref, &x, &probe)?;
                assert!(d < 10.0 * tol, "{ty:?}, kernel: dx differs by {d}");
            }
        }
        Ok(())
    }
}
