//! `e^x` sixteen lanes at a time, for the softmaxes (attention, the LM head's cross-entropy) and
//! SiLU of the training step, which otherwise spend about a tenth of a step in libm's scalar
//! `expf`.
//!
//! Cephes' `expf` scheme: `x = n ln2 + r` with `|r| <= ln2 / 2` (ln2 split in two for an exact
//! reduction), a degree-7 polynomial for `e^r`, then `2^n` applied exactly. Within 2 ulp of the
//! true value over the normal range; `-inf` gives 0, large inputs `inf`, and NaN stays NaN, so a
//! diverged step is still caught. The scalar fallback runs the same arithmetic (fused
//! multiply-adds, ties-to-even rounding), so lanes and tails agree bit for bit except where the
//! result is subnormal.

/// Inputs are clamped to `[LO, HI]`: `e^LO` underflows to (nearly) zero and `e^HI` overflows
/// to infinity, so the clamp changes no result while keeping `n` finite.
const LO: f32 = -104.0;
const HI: f32 = 89.0;
const LOG2E: f32 = std::f32::consts::LOG2_E;
/// ln 2 = C1 + C2, C1 with few enough bits that `n * C1` is exact.
const C1: f32 = 0.693_359_4;
const C2: f32 = -2.121_944_4e-4;
/// `e^r ~ 1 + r + r^2 (P5 + P4 r + ... + P0 r^5)`.
const P: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    1.666_666_5e-1,
    0.5,
];

/// `e^x` (the scalar path of [`exp_in_place`]).
#[inline]
pub fn exp(x: f32) -> f32 {
    let x = x.clamp(LO, HI);
    let n = (x * LOG2E).round_ties_even();
    let r = n.mul_add(-C2, n.mul_add(-C1, x));
    let mut p = P[0];
    for c in &P[1..] {
        p = p.mul_add(r, *c);
    }
    let y = p.mul_add(r * r, r) + 1.0;
    // 2^n in two factors, each a normal f32 for n in [-150, 129].
    let n = n as i32;
    let (h, l) = (n / 2, n - n / 2);
    y * f32::from_bits(((h + 127) as u32) << 23) * f32::from_bits(((l + 127) as u32) << 23)
}

/// `x = e^x` for every value.
pub fn exp_in_place(xs: &mut [f32]) {
    let mut i = 0;
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX512F (checked); full loads and stores stay below xs.len()
        // and the last group's are masked to it.
        unsafe { i = exp_avx512(xs.as_mut_ptr(), xs.len()) };
    }
    for x in &mut xs[i..] {
        *x = exp(*x);
    }
}

/// `sum(xs)` over sixteen independent partial sums, an order the compiler can vectorize (a
/// plain `iter().sum()` is one serial chain of additions).
pub fn lane_sum(xs: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let mut chunks = xs.chunks_exact(16);
    for c in &mut chunks {
        for (a, x) in acc.iter_mut().zip(c) {
            *a += x;
        }
    }
    acc.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
}

/// `max(xs)` (NaNs ignored, `-inf` for none) over sixteen independent lanes, which the compiler
/// vectorizes (a fold is one serial chain of compares).
pub fn lane_max(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 16];
    let mut chunks = xs.chunks_exact(16);
    for c in &mut chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a = a.max(x);
        }
    }
    acc.iter()
        .chain(chunks.remainder())
        .fold(f32::NEG_INFINITY, |m, &x| m.max(x))
}

/// `e^x` of every value, the last partial group of 16 through masked loads and stores (a
/// scalar tail would call libm's `fmaf` per operation on CPUs built without FMA codegen).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn exp_avx512(xs: *mut f32, n: usize) -> usize {
    use std::arch::x86_64::*;
    let mut i = 0;
    while i + 16 <= n {
        _mm512_storeu_ps(xs.add(i), exp16(_mm512_loadu_ps(xs.add(i))));
        i += 16;
    }
    if i < n {
        let mask: __mmask16 = (1u16 << (n - i)) - 1;
        let x = _mm512_maskz_loadu_ps(mask, xs.add(i));
        _mm512_mask_storeu_ps(xs.add(i), mask, exp16(x));
    }
    n
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn exp16(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    // min/max return their second operand when either is NaN: NaN passes through.
    let x = _mm512_max_ps(_mm512_set1_ps(LO), _mm512_min_ps(_mm512_set1_ps(HI), x));
    let t = _mm512_mul_ps(x, _mm512_set1_ps(LOG2E));
    let nn = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(t);
    let r = _mm512_fnmadd_ps(nn, _mm512_set1_ps(C1), x);
    let r = _mm512_fnmadd_ps(nn, _mm512_set1_ps(C2), r);
    let mut p = _mm512_set1_ps(P[0]);
    for c in &P[1..] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(*c));
    }
    let y = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0));
    _mm512_scalef_ps(y, nn)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ulps(a: f32, b: f32) -> u32 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    #[test]
    fn within_two_ulp_of_f64_and_lanes_agree_with_the_scalar_path() {
        // 200,003 values: the last three go through the masked tail.
        let xs: Vec<f32> = (0..200_003).map(|i| -87.0 + i as f32 * (175.0 / 200_003.0)).collect();
        let mut v = xs.clone();
        exp_in_place(&mut v);
        for (&x, &y) in xs.iter().zip(&v) {
            let want = (x as f64).exp() as f32;
            assert!(ulps(y, want) <= 2, "exp({x}) = {y}, want {want}");
            assert_eq!(y.to_bits(), exp(x).to_bits(), "lane and scalar differ at {x}");
        }
    }

    #[test]
    fn edges_zero_infinity_and_nan() {
        let mut v = vec![
            f32::NEG_INFINITY,
            -1e30,
            -104.5,
            0.0,
            -0.0,
            89.0,
            1e30,
            f32::INFINITY,
            f32::NAN,
        ];
        v.resize(16, 0.0);
        let mut scalar = v.clone();
        exp_in_place(&mut v);
        scalar.iter_mut().for_each(|x| *x = exp(*x));
        for out in [&v, &scalar] {
            assert!(out[0] == 0.0 && out[1] == 0.0 && out[2] < 1e-44, "{out:?}");
            assert_eq!((out[3], out[4]), (1.0, 1.0));
            assert!(out[5].is_infinite() && out[6].is_infinite() && out[7].is_infinite());
            assert!(out[8].is_nan());
        }
    }

    /// The lane-wise max equals a serial fold on every length around the lane count, with
    /// the maximum anywhere (tail included), -inf entries, and none at all.
    #[test]
    fn lane_max_equals_a_fold() {
        for n in [0usize, 1, 15, 16, 17, 33, 100] {
            for at in 0..n {
                let mut xs: Vec<f32> = (0..n).map(|i| -((i * 7 % 11) as f32) - 1.0).collect();
                xs[at] = 3.5;
                if n > 2 {
                    xs[(at + 1) % n] = f32::NEG_INFINITY;
                }
                assert_eq!(lane_max(&xs), 3.5, "n {n}, max at {at}");
            }
        }
        assert_eq!(lane_max(&[]), f32::NEG_INFINITY);
    }
}
