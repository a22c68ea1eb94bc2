//! Differentiable building blocks of the decoder.
//!
//! candle's fused ops (`candle_nn::ops::rms_norm`, `softmax_last_dim`, `rotary_emb`) have no
//! backward and silently cut the gradient (docs/design.md, pitfall 2), and its matmul backward computes a
//! gradient for frozen weights (pitfall 1). Everything here either has its own backward or is a
//! composition of candle primitives whose backward is correct.

pub mod attention;
pub mod bf16_gemm;
pub mod dequant_device;
pub mod dequant_linear;
pub mod fast_exp;
pub mod frozen_linear;
pub mod fused_attention;
pub mod lm_head;
pub mod lora_linear;
pub mod norm;
pub mod quant_linear;
pub mod rope;
pub mod swiglu;
pub mod trained_linear;

pub use frozen_linear::{frozen_linear, frozen_matmul};

/// The contiguous f32 data of a custom op's CPU input, or an error naming the op.
pub(crate) fn cpu_f32<'a>(
    s: &'a candle_core::CpuStorage,
    l: &candle_core::Layout,
    op: &str,
) -> candle_core::Result<&'a [f32]> {
    match s {
        candle_core::CpuStorage::F32(v) => {
            let (a, b) = l
                .contiguous_offsets()
                .ok_or_else(|| candle_core::Error::Msg(format!("{op}: inputs must be contiguous")))?;
            Ok(&v[a..b])
        }
        _ => candle_core::bail!("{op}: inputs must be f32"),
    }
}

/// A tensor's f32 values on the CPU for a backward: borrowed from its storage when it is a
/// contiguous f32 CPU tensor (no copy on the hot path), else converted once.
pub(crate) enum F32View<'a> {
    Borrowed(candle_core::StorageRef<'a>, std::ops::Range<usize>),
    Owned(Vec<f32>),
}

impl F32View<'_> {
    /// The values, row-major.
    pub(crate) fn get(&self) -> &[f32] {
        match self {
            F32View::Borrowed(g, r) => match &**g {
                candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)) => &v[r.clone()],
                _ => unreachable!("F32View::Borrowed only holds f32 CPU storage"),
            },
            F32View::Owned(v) => v,
        }
    }
}

/// [`F32View`] of `t`.
pub(crate) fn f32_view(t: &candle_core::Tensor) -> candle_core::Result<F32View<'_>> {
    let (st, l) = t.storage_and_layout();
    if let (candle_core::Storage::Cpu(candle_core::CpuStorage::F32(_)), Some((a, b))) = (&*st, l.contiguous_offsets()) {
        return Ok(F32View::Borrowed(st, a..b));
    }
    drop(st);
    Ok(F32View::Owned(
        t.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1()?,
    ))
}

/// Runs `f` on `t`'s values, mutably and in place; `t` must be a contiguous f32 CPU tensor.
/// Holds `t`'s storage lock for the call, so `f` must not read `t` through another handle; it
/// may open other tensors the same way, which is how one pass updates a parameter and its
/// optimizer moments together.
pub(crate) fn with_f32_mut<F>(t: &candle_core::Tensor, f: F) -> candle_core::Result<()>
where
    F: FnOnce(&mut [f32]) -> candle_core::Result<()>,
{
    struct Apply<F>(std::cell::RefCell<Option<F>>);
    impl<F: FnOnce(&mut [f32]) -> candle_core::Result<()>> candle_core::InplaceOp1 for Apply<F> {
        fn name(&self) -> &'static str {
            "f32-in-place"
        }
        fn cpu_fwd(&self, s: &mut candle_core::CpuStorage, l: &candle_core::Layout) -> candle_core::Result<()> {
            let (candle_core::CpuStorage::F32(v), Some((a, b))) = (s, l.contiguous_offsets()) else {
                candle_core::bail!("in-place update: the tensor is not contiguous f32");
            };
            let f = self.0.borrow_mut().take().expect("called once");
            f(&mut v[a..b])
        }
    }
    if !(t.device().is_cpu() && t.dtype() == candle_core::DType::F32 && t.is_contiguous()) {
        candle_core::bail!("in-place update: needs a contiguous f32 CPU tensor");
    }
    t.inplace_op1(&Apply(std::cell::RefCell::new(Some(f))))
}

/// `c[m, n] = alpha * a[m, k] b[k, n] (+ c if acc)` in f32 through the `gemm` crate, each operand
/// given as `(slice, row stride, column stride)`, `c` contiguous; `parallel` spreads it over the
/// rayon pool.
#[allow(clippy::too_many_arguments)]
pub(crate) fn sgemm(
    m: usize,
    n: usize,
    k: usize,
    a: (&[f32], usize, usize),
    b: (&[f32], usize, usize),
    c: &mut [f32],
    acc: bool,
    alpha: f32,
    parallel: bool,
) {
    sgemm_ld(m, n, k, a, b, (c, n), acc, alpha, parallel)
}

/// [`sgemm`] with an explicit row stride for `c` (`(slice, ldc)`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn sgemm_ld(
    m: usize,
    n: usize,
    k: usize,
    a: (&[f32], usize, usize),
    b: (&[f32], usize, usize),
    c: (&mut [f32], usize),
    acc: bool,
    alpha: f32,
    parallel: bool,
) {
    let (c, ldc) = c;
    let last = |rows: usize, cols: usize, rs: usize, cs: usize| {
        if rows == 0 || cols == 0 {
            0
        } else {
            (rows - 1) * rs + (cols - 1) * cs + 1
        }
    };
    assert!(
        a.0.len() >= last(m, k, a.1, a.2) && b.0.len() >= last(k, n, b.1, b.2) && c.len() >= m * n,
        "sgemm: operand too short"
    );
    let par = if parallel {
        gemm::Parallelism::Rayon(rayon::current_num_threads())
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the assertion above checks that every addressed element lies inside its slice.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            ldc as isize,
            acc,
            a.0.as_ptr(),
            a.2 as isize,
            a.1 as isize,
            b.0.as_ptr(),
            b.2 as isize,
            b.1 as isize,
            if acc { 1.0 } else { 0.0 },
            alpha,
            false,
            false,
            false,
            par,
        )
    }
}
