//! AdamW's moments in 8 bits, block-quantized as bitsandbytes' `AdamW8bit` keeps them: each
//! block of [`BLOCK`] values stores one f32 absolute maximum and one byte per value, an index
//! into a 256-entry dynamic map (the first moment on the signed map, the second on the unsigned
//! one, `create_dynamic_map(signed=...)`). Each update dequantizes a block, takes the f32 AdamW
//! step on it, and quantizes the new moments against the block's new maximum (nearest entry).
//! Tensors under [`MIN_8BIT`] values keep f32 moments, as bitsandbytes' `min_8bit_size` does.

use std::sync::OnceLock;

/// Values per quantization block.
pub const BLOCK: usize = 2048;
/// Smaller tensors keep f32 moments.
pub const MIN_8BIT: usize = 4096;

/// One tensor's two moments in 8 bits.
#[derive(Clone, Debug, PartialEq)]
pub struct Q8Moments {
    /// First-moment codes (signed map), one per value.
    pub m: Vec<u8>,
    /// First-moment absolute maximum per block.
    pub m_absmax: Vec<f32>,
    /// Second-moment codes (unsigned map), one per value.
    pub v: Vec<u8>,
    /// Second-moment absolute maximum per block.
    pub v_absmax: Vec<f32>,
}

impl Q8Moments {
    /// Zero moments for `n` values.
    pub fn zeros(n: usize) -> Self {
        let blocks = n.div_ceil(BLOCK);
        Self {
            m: vec![signed().zero; n],
            m_absmax: vec![0.0; blocks],
            v: vec![unsigned().zero; n],
            v_absmax: vec![0.0; blocks],
        }
    }

    /// Values held.
    pub fn len(&self) -> usize {
        self.m.len()
    }

    /// True for an empty tensor.
    pub fn is_empty(&self) -> bool {
        self.m.is_empty()
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.m.len() + self.v.len() + 4 * (self.m_absmax.len() + self.v_absmax.len())
    }

    /// The moments as f32 values (`m`, `v`).
    pub fn dequantize(&self) -> (Vec<f32>, Vec<f32>) {
        let de = |codes: &[u8], absmax: &[f32], book: &Codebook| -> Vec<f32> {
            codes
                .iter()
                .enumerate()
                .map(|(i, &c)| book.values[c as usize] * absmax[i / BLOCK])
                .collect()
        };
        (
            de(&self.m, &self.m_absmax, signed()),
            de(&self.v, &self.v_absmax, unsigned()),
        )
    }

    /// Checks a restored state: sizes for `n` values, absolute maxima finite and >= 0.
    pub fn check(&self, n: usize) -> Result<(), String> {
        let blocks = n.div_ceil(BLOCK);
        if self.m.len() != n || self.v.len() != n {
            return Err(format!(
                "{} and {} codes for a tensor of {n} values",
                self.m.len(),
                self.v.len()
            ));
        }
        if self.m_absmax.len() != blocks || self.v_absmax.len() != blocks {
            return Err(format!(
                "{} and {} block maxima for {blocks} blocks of {BLOCK}",
                self.m_absmax.len(),
                self.v_absmax.len()
            ));
        }
        if self
            .m_absmax
            .iter()
            .chain(&self.v_absmax)
            .any(|a| !a.is_finite() || *a < 0.0)
        {
            return Err("a block maximum is negative or not finite".into());
        }
        Ok(())
    }
}

/// A sorted 256-entry map with a table from an f32's top 16 bits to a code near it.
pub(crate) struct Codebook {
    pub(crate) values: [f32; 256],
    /// The code of 0.
    zero: u8,
    guess: Vec<u8>,
}

impl Codebook {
    fn new(values: [f32; 256]) -> Self {
        let exact = |x: f32| -> u8 {
            // The first midpoint that `x` does not exceed closes its bucket.
            let mut i = 0;
            while i + 1 < 256 && x > (values[i] + values[i + 1]) / 2.0 {
                i += 1;
            }
            i as u8
        };
        let guess = (0..=u16::MAX)
            .map(|b| {
                let x = f32::from_bits((b as u32) << 16);
                if x.is_finite() {
                    exact(x)
                } else {
                    0
                }
            })
            .collect();
        Self {
            values,
            zero: exact(0.0),
            guess,
        }
    }

    /// The nearest entry to `x` (in [-1, 1]): the table's guess, moved to the exact bucket.
    fn encode(&self, x: f32) -> u8 {
        let v = &self.values;
        let mut i = self.guess[(x.to_bits() >> 16) as usize] as usize;
        while i + 1 < 256 && x > (v[i] + v[i + 1]) / 2.0 {
            i += 1;
        }
        while i > 0 && x <= (v[i - 1] + v[i]) / 2.0 {
            i -= 1;
        }
        i as u8
    }
}

/// The signed dynamic map (bitsandbytes' `create_dynamic_map(signed=True)`, bit for bit).
pub(crate) fn signed() -> &'static Codebook {
    static BOOK: OnceLock<Codebook> = OnceLock::new();
    BOOK.get_or_init(|| Codebook::new(crate::quant::nf4::dynamic_map()))
}

/// The unsigned dynamic map (`create_dynamic_map(signed=False)`): 7 exponent bits, every
/// fraction item positive, computed as bitsandbytes does (f32 linspace means, f64 scales).
pub(crate) fn unsigned() -> &'static Codebook {
    static BOOK: OnceLock<Codebook> = OnceLock::new();
    BOOK.get_or_init(|| {
        let (max_exp, non_sign) = (7i32, 7i32);
        let mut data: Vec<f32> = Vec::with_capacity(256);
        for i in 0..max_exp {
            let items = 2usize.pow((i + non_sign - max_exp + 1) as u32) + 1;
            let bounds: Vec<f32> = (0..items)
                .map(|j| 0.1f32 + (1.0f32 - 0.1) * j as f32 / (items - 1) as f32)
                .collect();
            let scale = 10f64.powi(-(max_exp - 1) + i);
            data.extend(bounds.windows(2).map(|w| (scale * ((w[0] + w[1]) / 2.0) as f64) as f32));
        }
        data.push(0.0);
        data.push(1.0);
        data.resize(256, 0.0);
        data.sort_by(f32::total_cmp);
        Codebook::new(data.try_into().expect("256 entries"))
    })
}

/// One AdamW step over a slice of a tensor with 8-bit moments: `w` (this slice's values) is
/// read and the new values written to `out`; the codes and maxima of the blocks the slice covers
/// are updated in place. `first` is the slice's offset in the tensor (a multiple of [`BLOCK`]).
#[allow(clippy::too_many_arguments)]
pub(crate) fn update_slice(
    w: &[f32],
    g: &[f32],
    q: &mut Q8Moments,
    first: usize,
    out: &mut [f32],
    (b1, b2, eps): (f32, f32, f32),
    (ib1, ib2): (f32, f32),
    (lr, decay, gscale): (f32, f32, f32),
) {
    use rayon::prelude::*;
    debug_assert!(first.is_multiple_of(BLOCK));
    let b0 = first / BLOCK;
    let len = w.len();
    let blocks = len.div_ceil(BLOCK);
    let (sm, su) = (signed(), unsigned());
    let Q8Moments {
        m,
        m_absmax,
        v,
        v_absmax,
    } = q;
    m[first..first + len]
        .par_chunks_mut(BLOCK)
        .zip(v[first..first + len].par_chunks_mut(BLOCK))
        .zip(m_absmax[b0..b0 + blocks].par_iter_mut())
        .zip(v_absmax[b0..b0 + blocks].par_iter_mut())
        .zip(out.par_chunks_mut(BLOCK))
        .enumerate()
        .for_each(|(k, ((((mc, vc), am), av), o))| {
            let at = k * BLOCK;
            let (mut nm, mut nv) = ([0f32; BLOCK], [0f32; BLOCK]);
            let (mut mx_m, mut mx_v) = (0f32, 0f32);
            for i in 0..mc.len() {
                let gi = g[at + i] * gscale;
                let mi = b1 * sm.values[mc[i] as usize] * *am + (1.0 - b1) * gi;
                let vi = b2 * su.values[vc[i] as usize] * *av + (1.0 - b2) * gi * gi;
                o[i] = w[at + i] * decay - lr * (mi * ib1) / ((vi * ib2).sqrt() + eps);
                nm[i] = mi;
                nv[i] = vi;
                mx_m = mx_m.max(mi.abs());
                mx_v = mx_v.max(vi);
            }
            let (im, iv) = (
                if mx_m > 0.0 { 1.0 / mx_m } else { 0.0 },
                if mx_v > 0.0 { 1.0 / mx_v } else { 0.0 },
            );
            for i in 0..mc.len() {
                mc[i] = sm.encode((nm[i] * im).clamp(-1.0, 1.0));
                vc[i] = su.encode((nv[i] * iv).clamp(0.0, 1.0));
            }
            *am = mx_m;
            *av = mx_v;
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The unsigned map has bitsandbytes' shape: 0 and 1 at the ends, sorted, distinct
    /// positive entries from 1e-6 up; both maps encode every entry to itself and any value to
    /// its nearest entry.
    #[test]
    fn maps_are_sorted_and_encode_to_the_nearest_entry() {
        for (book, lo) in [(signed(), -1.0f32), (unsigned(), 0.0)] {
            let v = &book.values;
            assert!(v.windows(2).all(|w| w[0] <= w[1]));
            assert_eq!(v[255], 1.0);
            assert!(if lo < 0.0 { v[0] < -0.9 } else { v[0] == 0.0 });
            for (i, &x) in v.iter().enumerate() {
                if i == 0 || v[i - 1] != x {
                    assert_eq!(v[book.encode(x) as usize], x);
                }
            }
            let mut rng = crate::rng::Rng::new(3);
            for _ in 0..20_000 {
                let x = if lo < 0.0 {
                    rng.normal() as f32 / 3.0
                } else {
                    (rng.normal() as f32 / 3.0).abs()
                }
                .clamp(lo, 1.0)
                    * 10f32.powi(-(rng.below(6) as i32));
                let got = v[book.encode(x) as usize];
                let best = v.iter().map(|e| (e - x).abs()).fold(f32::INFINITY, f32::min);
                assert!((got - x).abs() <= best * (1.0 + 1e-6), "{x}: {got}");
            }
        }
        let u = &unsigned().values;
        assert_eq!(u.iter().filter(|&&x| x == 0.0).count(), 1);
        assert!(u.iter().filter(|&&x| x > 0.0).fold(1.0f32, |a, &b| a.min(b)) < 2e-6);
    }

    /// Quantized moments stay within a block's resolution of f32 AdamW over many steps, and
    /// the weights they move follow f32 AdamW's closely.
    #[test]
    fn eight_bit_steps_track_f32_adamw() {
        let n = 3 * BLOCK + 77;
        let mut rng = crate::rng::Rng::new(9);
        let w0: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
        let (mut w8, mut w32) = (w0.clone(), w0.clone());
        let mut q = Q8Moments::zeros(n);
        let (mut m, mut v) = (vec![0f32; n], vec![0f32; n]);
        let (b1, b2, eps, lr) = (0.9f32, 0.999f32, 1e-8f32, 1e-3f32);
        for t in 1..=20 {
            let g: Vec<f32> = (0..n).map(|i| rng.normal() as f32 * (1.0 + (i % 7) as f32)).collect();
            let (ib1, ib2) = (1.0 / (1.0 - b1.powi(t)), 1.0 / (1.0 - b2.powi(t)));
            let mut out = vec![0f32; n];
            update_slice(&w8, &g, &mut q, 0, &mut out, (b1, b2, eps), (ib1, ib2), (lr, 1.0, 1.0));
            w8 = out;
            for i in 0..n {
                m[i] = b1 * m[i] + (1.0 - b1) * g[i];
                v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
                w32[i] -= lr * (m[i] * ib1) / ((v[i] * ib2).sqrt() + eps);
            }
        }
        let (mq, vq) = q.dequantize();
        for i in 0..n {
            let (am, av) = (q.m_absmax[i / BLOCK], q.v_absmax[i / BLOCK]);
            // The dynamic map's coarsest step is under 5% of the block's maximum.
            assert!((mq[i] - m[i]).abs() <= 0.05 * am, "m[{i}]: {} vs {}", mq[i], m[i]);
            assert!((vq[i] - v[i]).abs() <= 0.05 * av, "v[{i}]: {} vs {}", vq[i], v[i]);
        }
        let moved: f32 = w32.iter().zip(&w0).map(|(a, b)| (a - b).abs()).sum();
        let off: f32 = w8.iter().zip(&w32).map(|(a, b)| (a - b).abs()).sum();
        assert!(
            off < 0.1 * moved,
            "8-bit AdamW strayed {off} against a movement of {moved}"
        );
    }
}
