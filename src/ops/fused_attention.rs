//! Causal GQA attention with RoPE as one op with a hand-written backward (CPU).
//!
//! The composed version (`attention::causal_attention` after `Rope::apply`) is about twenty
//! candle ops per block, each allocating and each with its own backward; on a 2-core CPU that
//! bookkeeping costs more than the arithmetic. This op takes the projections as they come out
//! of the linears (`q [n, heads * d]`, `k, v [n, kv_heads * d]`, rows ordered batch-major),
//! applies rotate-half RoPE, attends causally and returns `[n, heads * d]`. The backward
//! recomputes the probabilities per head (nothing but the inputs is kept) and returns dq, dk, dv
//! through the inverse rotation. Work is split over (batch, key/value group) so each task owns
//! its dk and dv.
//!
//! With a [`Tree`], a row holds a shared trunk and branches after it: a position sees the
//! earlier positions of the trunk and of its own branch, at its own RoPE position, so that one
//! context is computed once for all the choices that continue it (scoring). With no trunk, each
//! branch a document, it is block-diagonal causal attention over packed documents with RoPE
//! restarting at each one. The backward honours it: a hidden position's probability is exactly
//! zero, so no gradient flows through it.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{cpu_f32, f32_view};

/// Shapes and tables of one call.
#[derive(Clone)]
pub struct FusedAttention {
    /// Batch rows.
    pub b: usize,
    /// Positions per row.
    pub t: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Head size.
    pub d: usize,
    /// `cos` table `[t, d/2]` for positions 0..t (with a tree: `[b * t, d/2]`, each position's own).
    pub cos: Vec<f32>,
    /// `sin` table, laid out as `cos`.
    pub sin: Vec<f32>,
    /// Trunk-and-branches visibility; `None`: plain causal rows.
    pub tree: Option<std::sync::Arc<Tree>>,
    /// Sliding window: a position sees itself and at most `window - 1` positions before it
    /// (counted in RoPE positions under a tree); `None`: every earlier position.
    pub window: Option<usize>,
}

/// Branch of every position, `[b * t]`: 0 is the trunk, seen by every later position of its row;
/// any other value is seen only by later positions of the same branch.
#[derive(Clone, Debug)]
pub struct Tree {
    /// Branch per position.
    pub branch: Vec<u32>,
    /// Sequence position of every position (what a sliding window counts), `[b * t]`.
    pub pos: Vec<usize>,
}

impl Tree {
    /// Whether position `j` is visible from position `i >= j` of row `bi` (`t` positions a row).
    fn visible(&self, bi: usize, t: usize, i: usize, j: usize) -> bool {
        let bj = self.branch[bi * t + j];
        bj == 0 || bj == self.branch[bi * t + i]
    }
}

/// Rows per causal block: scores are computed only for keys up to the block's last row.
const BLK: usize = 64;

fn mm(
    m: usize,
    n: usize,
    k: usize,
    a: (&[f32], usize, usize),
    b: (&[f32], usize, usize),
    c: (&mut [f32], usize),
    acc: bool,
) {
    super::sgemm_ld(m, n, k, a, b, c, acc, 1.0, false)
}

/// Row blocks `(r0, r1)` covering `0..t`.
fn blocks(t: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..t).step_by(BLK).map(move |r0| (r0, (r0 + BLK).min(t)))
}

impl FusedAttention {
    fn gather(&self, src: &[f32], width: usize, bi: usize, h: usize) -> Vec<f32> {
        let (t, d) = (self.t, self.d);
        let mut out = Vec::with_capacity(t * d);
        for p in 0..t {
            let row = (bi * t + p) * width + h * d;
            out.extend_from_slice(&src[row..row + d]);
        }
        out
    }

    /// Rotates row `bi`'s `[t, d]` in place; `inverse` applies the transpose (for gradients).
    fn rope(&self, x: &mut [f32], bi: usize, inverse: bool) {
        let (d, half) = (self.d, self.d / 2);
        let first = if self.tree.is_some() { bi * self.t } else { 0 };
        for p in 0..self.t {
            let r = &mut x[p * d..(p + 1) * d];
            let at = (first + p) * half;
            for i in 0..half {
                let (c, s) = (self.cos[at + i], self.sin[at + i]);
                let s = if inverse { -s } else { s };
                let (x1, x2) = (r[i], r[i + half]);
                r[i] = x1 * c - x2 * s;
                r[i + half] = x2 * c + x1 * s;
            }
        }
    }

    /// Causal softmax of `q k^T / sqrt(d)` for one head of row `bi`: `[t, t]`, zero above the
    /// diagonal (and, with a tree, wherever a position cannot see another).
    fn probs(&self, q: &[f32], k: &[f32], bi: usize) -> Vec<f32> {
        let (t, d) = (self.t, self.d);
        let mut s = vec![0f32; t * t];
        for (r0, r1) in blocks(t) {
            mm(
                r1 - r0,
                r1,
                d,
                (&q[r0 * d..], d, 1),
                (k, 1, d),
                (&mut s[r0 * t..], t),
                false,
            );
        }
        let scale = 1.0 / (d as f32).sqrt();
        let masked = self.tree.is_some() || self.window.is_some();
        for i in 0..t {
            let row = &mut s[i * t..(i + 1) * t];
            if let Some(tree) = &self.tree {
                for (j, x) in row[..i].iter_mut().enumerate() {
                    if !tree.visible(bi, t, i, j) {
                        *x = f32::NEG_INFINITY;
                    }
                }
            }
            if let Some(w) = self.window {
                for (j, x) in row[..i].iter_mut().enumerate() {
                    let dist = match &self.tree {
                        Some(tree) => tree.pos[bi * t + i].abs_diff(tree.pos[bi * t + j]),
                        None => i - j,
                    };
                    if dist >= w {
                        *x = f32::NEG_INFINITY;
                    }
                }
            }
            let mx = super::fast_exp::lane_max(&row[..=i]) * scale;
            row[..=i].iter_mut().for_each(|x| *x = *x * scale - mx);
            super::fast_exp::exp_in_place(&mut row[..=i]);
            if masked {
                // Hidden positions were -inf; make their weight exactly zero.
                row[..i].iter_mut().filter(|x| !x.is_finite()).for_each(|x| *x = 0.0);
            }
            let sum = super::fast_exp::lane_sum(&row[..=i]);
            let inv = 1.0 / sum;
            row[..=i].iter_mut().for_each(|x| *x *= inv);
            row[i + 1..].iter_mut().for_each(|x| *x = 0.0);
        }
        s
    }

    fn check(&self, q: &[f32], k: &[f32], v: &[f32]) -> Result<()> {
        let n = self.b * self.t;
        if q.len() != n * self.heads * self.d || k.len() != n * self.kv_heads * self.d || v.len() != k.len() {
            candle_core::bail!("fused attention: q/k/v sizes do not match the shapes");
        }
        let tables = if self.tree.is_some() { n } else { self.t };
        if !self.heads.is_multiple_of(self.kv_heads)
            || self.cos.len() < tables * self.d / 2
            || self.sin.len() != self.cos.len()
        {
            candle_core::bail!("fused attention: inconsistent heads or RoPE tables");
        }
        if self
            .tree
            .as_ref()
            .is_some_and(|tr| tr.branch.len() != n || tr.pos.len() != n)
        {
            candle_core::bail!(
                "fused attention: the tree has {} positions for {n}",
                self.tree.as_ref().map_or(0, |tr| tr.branch.len())
            );
        }
        if self.window == Some(0) {
            candle_core::bail!("fused attention: a window must hold at least one position");
        }
        Ok(())
    }

    /// Forward on slices: returns `[n, heads * d]`.
    pub fn forward_slices(&self, q: &[f32], k: &[f32], v: &[f32]) -> Result<Vec<f32>> {
        self.check(q, k, v)?;
        let (t, d, hq, hkv) = (self.t, self.d, self.heads, self.kv_heads);
        let rep = hq / hkv;
        let parts: Vec<(usize, usize, Vec<f32>)> = (0..self.b * hkv)
            .into_par_iter()
            .flat_map_iter(|task| {
                let (bi, g) = (task / hkv, task % hkv);
                let mut kr = self.gather(k, hkv * d, bi, g);
                self.rope(&mut kr, bi, false);
                let vh = self.gather(v, hkv * d, bi, g);
                (0..rep)
                    .map(|r| {
                        let h = g * rep + r;
                        let mut qr = self.gather(q, hq * d, bi, h);
                        self.rope(&mut qr, bi, false);
                        let p = self.probs(&qr, &kr, bi);
                        let mut o = vec![0f32; t * d];
                        for (r0, r1) in blocks(t) {
                            mm(
                                r1 - r0,
                                d,
                                r1,
                                (&p[r0 * t..], t, 1),
                                (&vh, d, 1),
                                (&mut o[r0 * d..], d),
                                false,
                            );
                        }
                        (bi, h, o)
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        let mut out = vec![0f32; q.len()];
        for (bi, h, o) in parts {
            for p in 0..t {
                let row = (bi * t + p) * hq * d + h * d;
                out[row..row + d].copy_from_slice(&o[p * d..(p + 1) * d]);
            }
        }
        Ok(out)
    }

    /// Backward on slices: `(dq, dk, dv)` for the output gradient `go [n, heads * d]`.
    pub fn backward_slices(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        go: &[f32],
    ) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        self.check(q, k, v)?;
        let (t, d, hq, hkv) = (self.t, self.d, self.heads, self.kv_heads);
        let rep = hq / hkv;
        let scale = 1.0 / (d as f32).sqrt();
        type Part = (usize, usize, Vec<Vec<f32>>, Vec<f32>, Vec<f32>);
        let parts: Vec<Part> = (0..self.b * hkv)
            .into_par_iter()
            .map(|task| {
                let (bi, g) = (task / hkv, task % hkv);
                let mut kr = self.gather(k, hkv * d, bi, g);
                self.rope(&mut kr, bi, false);
                let vh = self.gather(v, hkv * d, bi, g);
                let mut dk = vec![0f32; t * d];
                let mut dv = vec![0f32; t * d];
                let mut dqs = Vec::with_capacity(rep);
                for r in 0..rep {
                    let h = g * rep + r;
                    let mut qr = self.gather(q, hq * d, bi, h);
                    self.rope(&mut qr, bi, false);
                    let p = self.probs(&qr, &kr, bi);
                    let gh = self.gather(go, hq * d, bi, h);
                    // dV += P^T dO; dP = dO V^T.
                    let mut dp = vec![0f32; t * t];
                    for (r0, r1) in blocks(t) {
                        let rows = r1 - r0;
                        mm(
                            r1,
                            d,
                            rows,
                            (&p[r0 * t..], 1, t),
                            (&gh[r0 * d..], d, 1),
                            (&mut dv, d),
                            true,
                        );
                        mm(
                            rows,
                            r1,
                            d,
                            (&gh[r0 * d..], d, 1),
                            (&vh, 1, d),
                            (&mut dp[r0 * t..], t),
                            false,
                        );
                    }
                    // dS = P * (dP - rowsum(P * dP)) * scale, causal rows only.
                    for i in 0..t {
                        let (pr, dr) = (&p[i * t..i * t + i + 1], &mut dp[i * t..(i + 1) * t]);
                        let dot: f32 = pr.iter().zip(dr.iter()).map(|(a, b)| a * b).sum();
                        for j in 0..=i {
                            dr[j] = pr[j] * (dr[j] - dot) * scale;
                        }
                        dr[i + 1..].iter_mut().for_each(|x| *x = 0.0);
                    }
                    let mut dq = vec![0f32; t * d];
                    for (r0, r1) in blocks(t) {
                        let rows = r1 - r0;
                        mm(
                            rows,
                            d,
                            r1,
                            (&dp[r0 * t..], t, 1),
                            (&kr, d, 1),
                            (&mut dq[r0 * d..], d),
                            false,
                        );
                        mm(
                            r1,
                            d,
                            rows,
                            (&dp[r0 * t..], 1, t),
                            (&qr[r0 * d..], d, 1),
                            (&mut dk, d),
                            true,
                        );
                    }
                    self.rope(&mut dq, bi, true);
                    dqs.push(dq);
                }
                self.rope(&mut dk, bi, true);
                (bi, g, dqs, dk, dv)
            })
            .collect();
        let (mut dq, mut dk, mut dv) = (vec![0f32; q.len()], vec![0f32; k.len()], vec![0f32; v.len()]);
        for (bi, g, dqs, dkh, dvh) in parts {
            for p in 0..t {
                let kv_row = (bi * t + p) * hkv * d + g * d;
                dk[kv_row..kv_row + d].copy_from_slice(&dkh[p * d..(p + 1) * d]);
                dv[kv_row..kv_row + d].copy_from_slice(&dvh[p * d..(p + 1) * d]);
                for (r, dqh) in dqs.iter().enumerate() {
                    let row = (bi * t + p) * hq * d + (g * rep + r) * d;
                    dq[row..row + d].copy_from_slice(&dqh[p * d..(p + 1) * d]);
                }
            }
        }
        Ok((dq, dk, dv))
    }
}

impl CustomOp3 for FusedAttention {
    fn name(&self) -> &'static str {
        "fused-rope-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = self.forward_slices(
            cpu_f32(s1, l1, "fused attention")?,
            cpu_f32(s2, l2, "fused attention")?,
            cpu_f32(s3, l3, "fused attention")?,
        )?;
        Ok((
            CpuStorage::F32(out),
            Shape::from((self.b * self.t, self.heads * self.d)),
        ))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (qv, kv, vv, gv) = (f32_view(q)?, f32_view(k)?, f32_view(v)?, f32_view(g)?);
        let (dq, dk, dv) = self.backward_slices(qv.get(), kv.get(), vv.get(), gv.get())?;
        let dev = q.device();
        Ok((
            Some(Tensor::from_vec(dq, q.shape(), dev)?),
            Some(Tensor::from_vec(dk, k.shape(), dev)?),
            Some(Tensor::from_vec(dv, v.shape(), dev)?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::attention::{causal_attention, repeat_kv};
    use crate::ops::rope::Rope;
    use candle_core::{DType, Device, Var};

    /// The fused op equals RoPE + composed attention, forward and all three gradients, with
    /// and without a sliding window.
    #[test]
    fn matches_the_composed_ops() -> Result<()> {
        for window in [None, Some(9), Some(64)] {
            matches_the_composed_ops_with(window)?;
        }
        Ok(())
    }

    fn matches_the_composed_ops_with(window: Option<usize>) -> Result<()> {
        let dev = Device::Cpu;
        let (b, t, hq, hkv, d) = (2, 70, 4, 2, 8);
        let inv: Vec<f64> = (0..d / 2)
            .map(|i| 1.0 / 10_000f64.powf(2.0 * i as f64 / d as f64))
            .collect();
        let rope = Rope::new(d, &inv, 128, DType::F32, &dev)?;
        let q = Var::from_tensor(&Tensor::randn(0f32, 1., (b * t, hq * d), &dev)?)?;
        let k = Var::from_tensor(&Tensor::randn(0f32, 1., (b * t, hkv * d), &dev)?)?;
        let v = Var::from_tensor(&Tensor::randn(0f32, 1., (b * t, hkv * d), &dev)?)?;
        let probe = Tensor::randn(0f32, 1., (b * t, hq * d), &dev)?;
        let heads = |x: &Tensor, n: usize| x.reshape((b, t, n, d))?.transpose(1, 2)?.contiguous();
        let qr = rope.apply(&heads(q.as_tensor(), hq)?, 0)?;
        let kr = repeat_kv(&rope.apply(&heads(k.as_tensor(), hkv)?, 0)?, hq / hkv)?.contiguous()?;
        let vr = repeat_kv(&heads(v.as_tensor(), hkv)?, hq / hkv)?.contiguous()?;
        let want = causal_attention(&qr, &kr, &vr, window)?
            .transpose(1, 2)?
            .reshape((b * t, hq * d))?;
        let op = FusedAttention {
            b,
            t,
            heads: hq,
            kv_heads: hkv,
            d,
            cos: rope.half_table(true, t)?,
            sin: rope.half_table(false, t)?,
            tree: None,
            window,
        };
        let got = q.as_tensor().apply_op3(k.as_tensor(), v.as_tensor(), op)?;
        let diff = |a: &Tensor, b: &Tensor| -> Result<f32> { (a - b)?.abs()?.max_all()?.to_scalar::<f32>() };
        assert!(diff(&want, &got)? < 1e-5);
        let gw = want.mul(&probe)?.sum_all()?.backward()?;
        let gg = got.mul(&probe)?.sum_all()?.backward()?;
        for (name, x) in [("q", &q), ("k", &k), ("v", &v)] {
            let d = diff(gw.get(x.as_tensor()).unwrap(), gg.get(x.as_tensor()).unwrap())?;
            assert!(d < 1e-4, "d{name} differs by {d}");
        }
        Ok(())
    }

    /// Packed documents (each a branch, no trunk, RoPE restarting at each): forward and all
    /// three gradients equal each document run alone through RoPE + composed attention.
    #[test]
    fn packed_documents_attend_only_within_themselves() -> Result<()> {
        let dev = Device::Cpu;
        let (t, hq, hkv, d) = (40, 4, 2, 8);
        let docs: [&[usize]; 2] = [&[15, 25], &[7, 1, 32]];
        let b = docs.len();
        let inv: Vec<f64> = (0..d / 2)
            .map(|i| 1.0 / 10_000f64.powf(2.0 * i as f64 / d as f64))
            .collect();
        let rope = Rope::new(d, &inv, 128, DType::F32, &dev)?;
        let (mut branch, mut positions) = (Vec::new(), Vec::new());
        for row in docs {
            for (k, &len) in row.iter().enumerate() {
                branch.extend(std::iter::repeat_n(k as u32 + 1, len));
                positions.extend(0..len);
            }
        }
        let q = Var::from_tensor(&Tensor::randn(0f32, 1., (b * t, hq * d), &dev)?)?;
        let k = Var::from_tensor(&Tensor::randn(0f32, 1., (b * t, hkv * d), &dev)?)?;
        let v = Var::from_tensor(&Tensor::randn(0f32, 1., (b * t, hkv * d), &dev)?)?;
        let probe = Tensor::randn(0f32, 1., (b * t, hq * d), &dev)?;
        // Each document alone: its rows of q, k, v as a batch of one.
        let mut pieces = Vec::new();
        let mut at = 0;
        for row in docs {
            for &len in row {
                let part = |x: &Var, n: usize| -> Result<Tensor> {
                    x.as_tensor()
                        .narrow(0, at, len)?
                        .reshape((1, len, n, d))?
                        .transpose(1, 2)?
                        .contiguous()
                };
                let qr = rope.apply(&part(&q, hq)?, 0)?;
                let kr = repeat_kv(&rope.apply(&part(&k, hkv)?, 0)?, hq / hkv)?.contiguous()?;
                let vr = repeat_kv(&part(&v, hkv)?, hq / hkv)?.contiguous()?;
                pieces.push(
                    causal_attention(&qr, &kr, &vr, None)?
                        .transpose(1, 2)?
                        .reshape((len, hq * d))?,
                );
                at += len;
            }
        }
        let want = Tensor::cat(&pieces, 0)?;
        let op = FusedAttention {
            b,
            t,
            heads: hq,
            kv_heads: hkv,
            d,
            cos: rope.half_table_at(true, &positions)?,
            sin: rope.half_table_at(false, &positions)?,
            tree: Some(std::sync::Arc::new(Tree {
                branch,
                pos: positions.clone(),
            })),
            window: None,
        };
        let got = q.as_tensor().apply_op3(k.as_tensor(), v.as_tensor(), op)?;
        let diff = |a: &Tensor, b: &Tensor| -> Result<f32> { (a - b)?.abs()?.max_all()?.to_scalar::<f32>() };
        assert!(diff(&want, &got)? < 1e-5, "forward differs by {}", diff(&want, &got)?);
        let gw = want.mul(&probe)?.sum_all()?.backward()?;
        let gg = got.mul(&probe)?.sum_all()?.backward()?;
        for (name, x) in [("q", &q), ("k", &k), ("v", &v)] {
            let d = diff(gw.get(x.as_tensor()).unwrap(), gg.get(x.as_tensor()).unwrap())?;
            assert!(d < 1e-4, "d{name} differs by {d}");
        }
        Ok(())
    }
}
