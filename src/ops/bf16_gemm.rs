//! A bf16 GEMM for Zen 4 / Sapphire Rapids class CPUs: `C[m, n] = A[m, k] B[k, n]` with A and
//! B in bfloat16 and f32 accumulation through `vdpbf16ps` (AVX512-BF16).
//!
//! candle computes bf16 matmuls by widening to f32 through its `gemm` crate's f32 FMA kernels
//! (AVX-512 with the crate's `x86-v4` feature, which strata turns on); `vdpbf16ps` does two
//! multiply-adds per f32 lane, which is where PyTorch's (oneDNN's) CPU lead comes from
//! (docs/design.md, pitfall 6). Layout: `vdpbf16ps` multiplies pairs of adjacent bf16 values,
//! so both operands are stored as `u32` pairs along k (low half = even k).
//! A is row-major pairs (an activation row converted to bf16 is exactly that); B is packed into
//! panels of 48 columns, `panel[p][j] = (B[2p][j], B[2p+1][j])`. The micro-kernel holds an
//! 8 x 48 f32 tile in 24 zmm registers.

use half::bf16;
use rayon::prelude::*;

/// Columns per B panel (three zmm of 16 f32 lanes).
pub const NR: usize = 48;
/// Rows per micro-kernel tile.
pub const MR: usize = 8;

/// Whether this CPU runs the kernel (checked once).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *OK.get_or_init(|| {
            std::env::var("STRATA_NO_BF16_GEMM").is_err()
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bf16")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A bf16 weight `w [n, k]` packed both ways a linear layer needs: `W^T` for the forward and
/// `W` for the input gradient. Built once when the model loads.
#[derive(Debug)]
pub struct LinearPack {
    /// `B = W^T`.
    pub fwd: PackedB,
    /// `B = W`.
    pub bwd: PackedB,
}

impl LinearPack {
    /// Packs a row-major `w [n, k]`.
    pub fn new(w: &[bf16], n: usize, k: usize) -> Self {
        Self {
            fwd: PackedB::from_transposed(w, n, k),
            bwd: PackedB::from_rows(w, n, k),
        }
    }

    /// Packs a row-major f32 `w [n, k]`, each value rounded to bf16 (a trained weight's
    /// working copy under mixed precision).
    pub fn from_f32(w: &[f32], n: usize, k: usize) -> Self {
        Self::new(&to_bf16(w), n, k)
    }

    /// Repacks both layouts in place from an updated f32 `w [n, k]` (the refresh of a trained
    /// weight's bf16 copy after each update; the packs are reused, the rounded weight is a
    /// temporary).
    pub fn refresh_f32(&mut self, w: &[f32]) {
        let (n, k) = (self.fwd.n, self.bwd.n);
        assert_eq!(w.len(), n * k, "refresh: weight size changed");
        let wb = to_bf16(w);
        self.fwd.fill_transposed(&wb, n, k);
        self.bwd.fill_rows(&wb, n, k);
    }

    /// Bytes held by both packings.
    pub fn bytes(&self) -> usize {
        self.fwd.bytes() + self.bwd.bytes()
    }
}

/// `x` rounded to bf16 (nearest even), in parallel, 16 values an instruction where the CPU
/// has AVX512-BF16.
pub fn to_bf16(x: &[f32]) -> Vec<bf16> {
    let mut out = vec![bf16::ZERO; x.len()];
    // SAFETY: `half::bf16` is `repr(transparent)` over `u16`, so the buffer is `len` u16s.
    let bits = unsafe { std::slice::from_raw_parts_mut(out.as_mut_ptr() as *mut u16, out.len()) };
    bits.par_chunks_mut(1 << 14)
        .zip(x.par_chunks(1 << 14))
        .for_each(|(d, s)| f32_to_bf16_bits(s, d));
    out
}

/// B packed into 48-column panels of bf16 pairs along k.
#[derive(Debug, Clone)]
pub struct PackedB {
    /// Columns of B.
    pub n: usize,
    /// Pairs along k (`ceil(k / 2)`).
    pub kp: usize,
    data: Vec<u32>,
}

fn pair(lo: bf16, hi: bf16) -> u32 {
    lo.to_bits() as u32 | (hi.to_bits() as u32) << 16
}

impl PackedB {
    fn alloc(n: usize, k: usize) -> Self {
        let kp = k.div_ceil(2);
        Self {
            n,
            kp,
            data: vec![0; n.div_ceil(NR) * kp * NR],
        }
    }

    /// `B = W^T` for a row-major `w [n, k]` (the forward of a linear layer, `x W^T`).
    pub fn from_transposed(w: &[bf16], n: usize, k: usize) -> Self {
        let mut out = Self::alloc(n, k);
        out.fill_transposed(w, n, k);
        out
    }

    fn fill_transposed(&mut self, w: &[bf16], n: usize, k: usize) {
        let kp = self.kp;
        self.data.par_chunks_mut(kp * NR).enumerate().for_each(|(pb, panel)| {
            for jj in 0..NR.min(n - pb * NR) {
                let row = &w[(pb * NR + jj) * k..(pb * NR + jj + 1) * k];
                for p in 0..kp {
                    let hi = if 2 * p + 1 < k { row[2 * p + 1] } else { bf16::ZERO };
                    panel[p * NR + jj] = pair(row[2 * p], hi);
                }
            }
        });
    }

    /// `B = W` for a row-major `w [k, n]` (the input gradient of a linear layer, `g W`).
    pub fn from_rows(w: &[bf16], k: usize, n: usize) -> Self {
        let mut out = Self::alloc(n, k);
        out.fill_rows(w, k, n);
        out
    }

    fn fill_rows(&mut self, w: &[bf16], k: usize, n: usize) {
        let kp = self.kp;
        self.data.par_chunks_mut(kp * NR).enumerate().for_each(|(pb, panel)| {
            let j0 = pb * NR;
            let cols = NR.min(n - j0);
            for p in 0..kp {
                let r0 = &w[2 * p * n + j0..2 * p * n + j0 + cols];
                let dst = &mut panel[p * NR..p * NR + cols];
                if 2 * p + 1 < k {
                    let r1 = &w[(2 * p + 1) * n + j0..(2 * p + 1) * n + j0 + cols];
                    for jj in 0..cols {
                        dst[jj] = pair(r0[jj], r1[jj]);
                    }
                } else {
                    for jj in 0..cols {
                        dst[jj] = pair(r0[jj], bf16::ZERO);
                    }
                }
            }
        });
    }

    /// `B = X` for a row-major f32 `x [k, n]` (a weight gradient's activations), each value
    /// rounded to bf16 as it is paired, 16 columns an instruction.
    fn from_rows_f32(x: &[f32], k: usize, n: usize) -> Self {
        assert!(available(), "bf16 packing called on a CPU without AVX512-BF16");
        assert!(
            x.len() >= k * n,
            "from_rows_f32: {} values for {k} rows of {n}",
            x.len()
        );
        let mut out = Self::alloc(n, k);
        let kp = out.kp;
        out.data.par_chunks_mut(kp * NR).enumerate().for_each(|(pb, panel)| {
            let j0 = pb * NR;
            let cols = NR.min(n - j0);
            for p in 0..kp {
                for t in (0..cols).step_by(16) {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: `available()` was asserted; the loads stay inside rows 2p and
                    // 2p + 1 (< k) of x at columns below n, the store inside the panel.
                    unsafe {
                        use std::arch::x86_64::*;
                        let lo = x.as_ptr().add(2 * p * n + j0 + t);
                        let hi = if 2 * p + 1 < k { lo.add(n) } else { std::ptr::null() };
                        let v = pairs16(lo, hi, cols - t);
                        _mm512_storeu_si512(panel.as_mut_ptr().add(p * NR + t) as *mut _, v);
                    }
                }
            }
        });
        out
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.data.len() * 4
    }
}

/// The weight gradient of a linear layer, `dw [n, k] = g^T x` for `g [m, n]` and `x [m, k]`
/// (m = tokens): both operands rounded to bf16, products summed in f32, through [`gemm`]
/// (A = g^T as pairs along m, B = x packed by rows). Overwrites `dw`, or adds into it when
/// `accumulate`.
pub fn weight_grad(g: &[f32], x: &[f32], m: usize, n: usize, k: usize, dw: &mut [f32], accumulate: bool) {
    assert!(
        g.len() >= m * n && x.len() >= m * k && dw.len() >= n * k,
        "weight_grad: operand sizes do not match"
    );
    assert!(available(), "bf16 weight gradient called on a CPU without AVX512-BF16");
    let a = pairs_transposed(&g[..m * n], m, n);
    let b = PackedB::from_rows_f32(&x[..m * k], m, k);
    gemm_into(&a, n, &b, dw, accumulate);
}

/// `g [m, n]` (f32) transposed into bf16 pair rows `[n, ceil(m/2)]`: row `j` holds
/// `(g[2p][j], g[2p+1][j])` at `p` (the high half zero past an odd `m`), each value rounded to
/// nearest even: the A operand of a weight gradient, whose sum runs over the tokens. Tiles of 16
/// columns by 16 pairs are converted, paired and transposed in registers, so that every store
/// is a run of 16 pairs of one row (a scalar transpose wrote one value per cache line).
fn pairs_transposed(g: &[f32], m: usize, n: usize) -> Vec<u32> {
    let mp = m.div_ceil(2);
    let mut a = vec![0u32; n * mp];
    // Rows of A per task: 64 rows of 16 pairs read 16 lines of g per tile row.
    const IB: usize = 64;
    a.par_chunks_mut(IB * mp).enumerate().for_each(|(blk, dst)| {
        let rows = dst.len() / mp;
        #[cfg(target_arch = "x86_64")]
        // SAFETY: callers checked `available()`; the tile reads stay inside g's m rows of n
        // columns (columns blk * IB + rows <= n) and the stores inside `dst`'s rows of mp.
        unsafe {
            transpose_pairs_avx512(g, m, n, blk * IB, rows, dst)
        };
    });
    a
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn transpose_pairs_avx512(g: &[f32], m: usize, n: usize, j0: usize, rows: usize, dst: &mut [u32]) {
    use std::arch::x86_64::*;
    let mp = m.div_ceil(2);
    for jb in (0..rows).step_by(16) {
        let cols = 16.min(rows - jb);
        for pb in (0..mp).step_by(16) {
            let pairs = 16.min(mp - pb);
            let mut r = [_mm512_setzero_si512(); 16];
            for (q, v) in r.iter_mut().enumerate().take(pairs) {
                let p = pb + q;
                let lo = g.as_ptr().add(2 * p * n + j0 + jb);
                let hi = if 2 * p + 1 < m { lo.add(n) } else { std::ptr::null() };
                *v = pairs16(lo, hi, cols);
            }
            transpose16(&mut r);
            let mask = ((1u32 << pairs) - 1) as u16;
            for (jj, v) in r.iter().enumerate().take(cols) {
                _mm512_mask_storeu_epi32(dst.as_mut_ptr().add((jb + jj) * mp + pb) as *mut _, mask, *v);
            }
        }
    }
}

/// 16 bf16 pairs `(lo[j], hi[j])` for `j < cols` (zero beyond, and for the high halves where
/// `hi` is null), rounded to nearest even as [`f32_to_bf16_bits`] does.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn pairs16(lo: *const f32, hi: *const f32, cols: usize) -> std::arch::x86_64::__m512i {
    use std::arch::x86_64::*;
    let mask = if cols >= 16 {
        0xffff
    } else {
        ((1u32 << cols) - 1) as u16
    };
    let l = _mm512_maskz_loadu_ps(mask, lo);
    let h = if hi.is_null() {
        _mm512_setzero_ps()
    } else {
        _mm512_maskz_loadu_ps(mask, hi)
    };
    let lb: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(l));
    let hb: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(h));
    _mm512_or_si512(
        _mm512_cvtepu16_epi32(lb),
        _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(hb)),
    )
}

/// Transposes a 16 x 16 matrix of 32-bit values held one row per register: 32-bit and 64-bit
/// interleaves inside each 128-bit lane, then two rounds of lane shuffles.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn transpose16(r: &mut [std::arch::x86_64::__m512i; 16]) {
    use std::arch::x86_64::*;
    let mut t = [_mm512_setzero_si512(); 16];
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    // u[4i + c], lane L: column 4L + c of rows 4i..4i+4.
    let mut u = [_mm512_setzero_si512(); 16];
    for i in 0..4 {
        u[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    // Row 4L + c of the transpose is lane L of u[c], u[4 + c], u[8 + c], u[12 + c].
    for c in 0..4 {
        let x0 = _mm512_shuffle_i32x4::<0x44>(u[c], u[4 + c]);
        let x1 = _mm512_shuffle_i32x4::<0xEE>(u[c], u[4 + c]);
        let y0 = _mm512_shuffle_i32x4::<0x44>(u[8 + c], u[12 + c]);
        let y1 = _mm512_shuffle_i32x4::<0xEE>(u[8 + c], u[12 + c]);
        r[c] = _mm512_shuffle_i32x4::<0x88>(x0, y0);
        r[4 + c] = _mm512_shuffle_i32x4::<0xDD>(x0, y0);
        r[8 + c] = _mm512_shuffle_i32x4::<0x88>(x1, y1);
        r[12 + c] = _mm512_shuffle_i32x4::<0xDD>(x1, y1);
    }
}

/// Converts f32 rows `[m, k]` to bf16 pair rows `[m, ceil(k/2)]` (round to nearest even). A
/// row of bf16 values read as u32 is already its pairs (low half = even k), so each row is one
/// vector conversion (`vcvtneps2bf16`, 16 values an instruction) into its own output slice.
pub fn pack_a(x: &[f32], m: usize, k: usize) -> Vec<u32> {
    let kp = k.div_ceil(2);
    let mut out = vec![0u32; m * kp];
    assert!(x.len() >= m * k, "pack_a: {} values for {m} rows of {k}", x.len());
    out.par_chunks_mut(kp).enumerate().for_each(|(i, dst)| {
        // SAFETY: `dst` holds kp u32 = 2 kp >= k u16 at u32 (so also u16) alignment, and on
        // x86 (little-endian) the u16 at index 2p is the low half of u32 p.
        let half = unsafe { std::slice::from_raw_parts_mut(dst.as_mut_ptr() as *mut u16, 2 * kp) };
        f32_to_bf16_bits(&x[i * k..(i + 1) * k], &mut half[..k]);
        // An odd k leaves the last pair's high half at its initial zero.
    });
    out
}

/// `dst[i] = bf16(src[i])` bits, round to nearest even: 16 at a time with AVX512-BF16 (which
/// also flushes subnormal inputs to zero), the rest (and CPUs without it) with `half`.
pub fn f32_to_bf16_bits(src: &[f32], dst: &mut [u16]) {
    let n = src.len().min(dst.len());
    let mut i = 0;
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: the CPU has AVX512F and AVX512-BF16 (checked), and 16-value loads and
        // stores stay below n in both slices.
        unsafe { i = cvt_bf16_avx512(src.as_ptr(), dst.as_mut_ptr(), n) };
    }
    for j in i..n {
        dst[j] = bf16::from_f32(src[j]).to_bits();
    }
}

/// Converts the first `n / 16 * 16` values; returns how many it did.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn cvt_bf16_avx512(src: *const f32, dst: *mut u16, n: usize) -> usize {
    use std::arch::x86_64::*;
    let mut i = 0;
    while i + 16 <= n {
        let v = _mm512_loadu_ps(src.add(i));
        let b: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(v));
        _mm256_storeu_si256(dst.add(i) as *mut __m256i, b);
        i += 16;
    }
    i
}

/// `c [m, b.n] = a [m, kp pairs] x b`, overwriting `c`. Panics if the CPU lacks AVX512-BF16
/// (callers check [`available`]) or if the slices are too short.
pub fn gemm(a: &[u32], m: usize, b: &PackedB, c: &mut [f32]) {
    gemm_into(a, m, b, c, false)
}

/// [`gemm`], adding into `c` when `accumulate` (a weight gradient summed over chunks of rows).
pub fn gemm_into(a: &[u32], m: usize, b: &PackedB, c: &mut [f32], accumulate: bool) {
    assert!(available(), "bf16 gemm called on a CPU without AVX512-BF16");
    let (n, kp) = (b.n, b.kp);
    assert!(
        a.len() >= m * kp && c.len() >= m * n,
        "bf16 gemm: operand sizes do not match"
    );
    // Row blocks are independent: each task writes its own rows of C.
    const MC: usize = 32;
    c[..m * n].par_chunks_mut(MC * n).enumerate().for_each(|(bi, cblk)| {
        let r0 = bi * MC;
        let rows = cblk.len() / n;
        for pb in 0..n.div_ceil(NR) {
            let bp = &b.data[pb * kp * NR..(pb + 1) * kp * NR];
            let cols = NR.min(n - pb * NR);
            let mut i = 0;
            while i < rows {
                let mr = MR.min(rows - i);
                let ap = &a[(r0 + i) * kp..];
                let cp = &mut cblk[i * n + pb * NR..];
                // SAFETY: `available()` was checked; slices cover mr rows of kp pairs (A), the
                // panel (B) and mr rows of `cols` columns at stride n (C), as asserted above.
                unsafe {
                    #[cfg(target_arch = "x86_64")]
                    {
                        let (ap, bp, cp) = (ap.as_ptr(), bp.as_ptr(), cp.as_mut_ptr());
                        match (mr, accumulate) {
                            (8, false) => kernel::<8, false>(kp, ap, kp, bp, cp, n, cols),
                            (7, false) => kernel::<7, false>(kp, ap, kp, bp, cp, n, cols),
                            (6, false) => kernel::<6, false>(kp, ap, kp, bp, cp, n, cols),
                            (5, false) => kernel::<5, false>(kp, ap, kp, bp, cp, n, cols),
                            (4, false) => kernel::<4, false>(kp, ap, kp, bp, cp, n, cols),
                            (3, false) => kernel::<3, false>(kp, ap, kp, bp, cp, n, cols),
                            (2, false) => kernel::<2, false>(kp, ap, kp, bp, cp, n, cols),
                            (_, false) => kernel::<1, false>(kp, ap, kp, bp, cp, n, cols),
                            (8, true) => kernel::<8, true>(kp, ap, kp, bp, cp, n, cols),
                            (7, true) => kernel::<7, true>(kp, ap, kp, bp, cp, n, cols),
                            (6, true) => kernel::<6, true>(kp, ap, kp, bp, cp, n, cols),
                            (5, true) => kernel::<5, true>(kp, ap, kp, bp, cp, n, cols),
                            (4, true) => kernel::<4, true>(kp, ap, kp, bp, cp, n, cols),
                            (3, true) => kernel::<3, true>(kp, ap, kp, bp, cp, n, cols),
                            (2, true) => kernel::<2, true>(kp, ap, kp, bp, cp, n, cols),
                            (_, true) => kernel::<1, true>(kp, ap, kp, bp, cp, n, cols),
                        }
                    }
                }
                i += mr;
            }
        }
    });
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn kernel<const R: usize, const ACC: bool>(
    kp: usize,
    a: *const u32,
    lda: usize,
    b: *const u32,
    c: *mut f32,
    ldc: usize,
    cols: usize,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); 3]; R];
    for p in 0..kp {
        let bb = b.add(p * NR);
        let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(bb as *const _));
        let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(bb.add(16) as *const _));
        let b2: __m512bh = std::mem::transmute(_mm512_loadu_si512(bb.add(32) as *const _));
        for (i, row) in acc.iter_mut().enumerate() {
            let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(*a.add(i * lda + p) as i32));
            row[0] = _mm512_dpbf16_ps(row[0], av, b0);
            row[1] = _mm512_dpbf16_ps(row[1], av, b1);
            row[2] = _mm512_dpbf16_ps(row[2], av, b2);
        }
    }
    for (i, row) in acc.iter().enumerate() {
        let dst = c.add(i * ldc);
        for (t, v) in row.iter().enumerate() {
            let left = cols.saturating_sub(t * 16);
            if left >= 16 {
                let v = if ACC {
                    _mm512_add_ps(_mm512_loadu_ps(dst.add(t * 16)), *v)
                } else {
                    *v
                };
                _mm512_storeu_ps(dst.add(t * 16), v);
            } else if left > 0 {
                let mask = ((1u32 << left) - 1) as u16;
                let v = if ACC {
                    _mm512_add_ps(_mm512_maskz_loadu_ps(mask, dst.add(t * 16)), *v)
                } else {
                    *v
                };
                _mm512_mask_storeu_ps(dst.add(t * 16), mask, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn rand_bf16(n: usize, rng: &mut Rng) -> Vec<bf16> {
        (0..n).map(|_| bf16::from_f64(rng.normal())).collect()
    }

    /// The vector conversion rounds like `half` (nearest even, ties included) on normal values.
    #[test]
    fn vector_bf16_conversion_matches_half() {
        let mut rng = Rng::new(7);
        let mut x: Vec<f32> = (0..1000).map(|_| (rng.normal() * 100.0) as f32).collect();
        // Ties: exactly halfway between two bf16 values, both parities.
        x[0] = f32::from_bits(0x3f80_8000);
        x[1] = f32::from_bits(0x3f81_8000);
        x[2] = -0.0;
        x[3] = f32::INFINITY;
        let mut got = vec![0u16; x.len()];
        f32_to_bf16_bits(&x, &mut got);
        let want: Vec<u16> = x.iter().map(|&v| bf16::from_f32(v).to_bits()).collect();
        assert_eq!(got, want);
        // pack_a on an odd width: pairs in order, the last high half zero.
        let a = pack_a(&x[..2 * 7], 2, 7);
        assert_eq!(a.len(), 8);
        assert_eq!(a[3] >> 16, 0);
        assert_eq!(a[4] & 0xffff, want[7] as u32);
    }

    /// The weight gradient `g^T x` and the f32 repack against float64 references, on ragged
    /// shapes (odd token counts leave a half pair).
    #[test]
    fn weight_gradient_and_f32_repack_match_references() {
        if !available() {
            eprintln!("skipping: this CPU has no AVX512-BF16");
            return;
        }
        let mut rng = Rng::new(5);
        for &(m, n, k) in &[(1, 1, 2), (7, 50, 9), (33, 96, 17), (64, 130, 31)] {
            let g: Vec<f32> = rand_bf16(m * n, &mut rng).iter().map(|v| v.to_f32()).collect();
            let x: Vec<f32> = rand_bf16(m * k, &mut rng).iter().map(|v| v.to_f32()).collect();
            let mut dw = vec![f32::NAN; n * k];
            weight_grad(&g, &x, m, n, k, &mut dw, false);
            // Accumulating adds a second product on top: twice the first.
            let mut twice = dw.clone();
            weight_grad(&g, &x, m, n, k, &mut twice, true);
            assert!(dw
                .iter()
                .zip(&twice)
                .all(|(a, b)| (2.0 * a - b).abs() <= 1e-6 * (1.0 + b.abs())));
            for j in 0..n {
                for t in 0..k {
                    let r: f64 = (0..m).map(|i| g[i * n + j] as f64 * x[i * k + t] as f64).sum();
                    assert!(
                        (dw[j * k + t] as f64 - r).abs() < 1e-4 * (1.0 + r.abs()),
                        "dw {m}x{n}x{k} at {j},{t}"
                    );
                }
            }
            // Packing an f32 weight equals packing its bf16 rounding, and a refresh repacks.
            let w: Vec<f32> = (0..n * k).map(|_| rng.normal() as f32).collect();
            let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
            let mut p = LinearPack::from_f32(&vec![0.0; n * k], n, k);
            p.refresh_f32(&w);
            let want = LinearPack::new(&wb, n, k);
            assert_eq!((&p.fwd.data, &p.bwd.data), (&want.fwd.data, &want.bwd.data));
        }
    }

    /// The weight gradient's operands, converted and paired in registers, bit for bit what
    /// rounding each value with `half` and pairing it by index gives, on ragged shapes (odd
    /// token counts, widths off the 16-lane and 48-column grids, partial tiles).
    #[test]
    fn vector_pair_packing_matches_scalar_pairing() {
        if !available() {
            eprintln!("skipping: this CPU has no AVX512-BF16");
            return;
        }
        let mut rng = Rng::new(11);
        let bits = |v: f32| bf16::from_f32(v).to_bits() as u32;
        for &(m, n) in &[
            (1usize, 1usize),
            (2, 16),
            (3, 17),
            (33, 50),
            (64, 130),
            (97, 96),
            (130, 200),
        ] {
            let g: Vec<f32> = (0..m * n).map(|_| (rng.normal() * 3.0) as f32).collect();
            let mp = m.div_ceil(2);
            let a = pairs_transposed(&g, m, n);
            for j in 0..n {
                for p in 0..mp {
                    let hi = if 2 * p + 1 < m { bits(g[(2 * p + 1) * n + j]) } else { 0 };
                    let want = bits(g[2 * p * n + j]) | hi << 16;
                    assert_eq!(a[j * mp + p], want, "transposed pairs {m}x{n} at {j},{p}");
                }
            }
            let rounded: Vec<bf16> = g.iter().map(|&v| bf16::from_f32(v)).collect();
            let b = PackedB::from_rows_f32(&g, m, n);
            assert_eq!(b.data, PackedB::from_rows(&rounded, m, n).data, "row pairs {m}x{n}");
        }
    }

    #[test]
    fn matches_a_float64_reference_on_ragged_shapes() {
        if !available() {
            eprintln!("skipping: this CPU has no AVX512-BF16");
            return;
        }
        let mut rng = Rng::new(3);
        for &(m, k, n) in &[(1, 2, 1), (9, 7, 50), (17, 64, 96), (33, 31, 100)] {
            let x: Vec<f32> = rand_bf16(m * k, &mut rng).iter().map(|v| v.to_f32()).collect();
            let w = rand_bf16(n * k, &mut rng);
            // Forward: y = x w^T.
            let a = pack_a(&x, m, k);
            let mut y = vec![0f32; m * n];
            gemm(&a, m, &PackedB::from_transposed(&w, n, k), &mut y);
            for i in 0..m {
                for j in 0..n {
                    let r: f64 = (0..k).map(|t| x[i * k + t] as f64 * w[j * k + t].to_f64()).sum();
                    assert!(
                        (y[i * n + j] as f64 - r).abs() < 1e-4 * (1.0 + r.abs()),
                        "fwd {m}x{k}x{n} at {i},{j}"
                    );
                }
            }
            // Input gradient: dx = g w, with g [m, n] and w [n, k].
            let g: Vec<f32> = rand_bf16(m * n, &mut rng).iter().map(|v| v.to_f32()).collect();
            let mut dx = vec![0f32; m * k];
            gemm(&pack_a(&g, m, n), m, &PackedB::from_rows(&w, n, k), &mut dx);
            for i in 0..m {
                for t in 0..k {
                    let r: f64 = (0..n).map(|j| g[i * n + j] as f64 * w[j * k + t].to_f64()).sum();
                    assert!(
                        (dx[i * k + t] as f64 - r).abs() < 1e-4 * (1.0 + r.abs()),
                        "bwd {m}x{k}x{n} at {i},{t}"
                    );
                }
            }
        }
    }
}
