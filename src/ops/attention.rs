//! Causal grouped-query attention from differentiable candle primitives.

use candle_core::{Result, Tensor, D};

/// Softmax over the last dimension. The row maximum is detached: softmax is shift invariant, so
/// its gradient through the maximum is exactly zero and need not be computed.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&m)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// Repeats each key/value head `rep` times: `[b, kv, t, d] -> [b, kv * rep, t, d]`.
pub fn repeat_kv(x: &Tensor, rep: usize) -> Result<Tensor> {
    if rep == 1 {
        return Ok(x.clone());
    }
    let (b, kv, t, d) = x.dims4()?;
    x.unsqueeze(2)?
        .broadcast_as((b, kv, rep, t, d))?
        .reshape((b, kv * rep, t, d))
}

/// `softmax(q k^T / sqrt(d) + causal) v` for `q [b, h, tq, d]`, `k, v [b, h, tk, d]`, where the
/// queries are the last `tq` positions of the `tk` keys (so a KV cache works unchanged); with a
/// `window`, a query sees itself and at most `window - 1` keys before it.
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, window: Option<usize>) -> Result<Tensor> {
    let (_, _, tq, d) = q.dims4()?;
    let tk = k.dim(2)?;
    let scale = 1.0 / (d as f64).sqrt();
    let scores = (q.matmul(&k.t()?)? * scale)?;
    let w = window.unwrap_or(usize::MAX);
    let scores = if tq > 1 || tk > w {
        let past = tk - tq;
        let mask: Vec<f32> = (0..tq)
            .flat_map(|i| {
                (0..tk).map(move |j| {
                    if j > past + i || past + i - j >= w {
                        f32::NEG_INFINITY
                    } else {
                        0.0
                    }
                })
            })
            .collect();
        let mask = Tensor::from_vec(mask, (tq, tk), q.device())?.to_dtype(q.dtype())?;
        scores.broadcast_add(&mask)?
    } else {
        scores
    };
    softmax_last(&scores)?.matmul(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::check_grad;
    use candle_core::{Device, Tensor};

    #[test]
    fn attention_gradients_and_causality() -> Result<()> {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f64, 1., (1, 2, 4, 6), &dev)?;
        let k = Tensor::randn(0f64, 1., (1, 2, 4, 6), &dev)?;
        let v = Tensor::randn(0f64, 1., (1, 2, 4, 6), &dev)?;
        let probe = Tensor::randn(0f64, 1., (1, 2, 4, 6), &dev)?;
        check_grad(&q, |q| causal_attention(q, &k, &v, None)?.mul(&probe)?.sum_all(), 1e-6)?;
        check_grad(&k, |k| causal_attention(&q, k, &v, None)?.mul(&probe)?.sum_all(), 1e-6)?;
        check_grad(&v, |v| causal_attention(&q, &k, v, None)?.mul(&probe)?.sum_all(), 1e-6)?;
        // Changing the last key/value must not change earlier outputs.
        let y = causal_attention(&q, &k, &v, None)?;
        let v2 = Tensor::cat(&[&v.narrow(2, 0, 3)?, &(v.narrow(2, 3, 1)? + 5.0)?], 2)?;
        let y2 = causal_attention(&q, &k, &v2, None)?;
        let d = (y.narrow(2, 0, 3)? - y2.narrow(2, 0, 3)?)?
            .abs()?
            .max_all()?
            .to_scalar::<f64>()?;
        assert!(d < 1e-12);
        // One query against a cache equals the last row of the full computation.
        let y_last = causal_attention(&q.narrow(2, 3, 1)?, &k, &v, None)?;
        let d = (y_last - y.narrow(2, 3, 1)?)?.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(d < 1e-12);
        // A window of 2: the last query sees keys 2 and 3 only, alone or against a cache.
        let yw = causal_attention(&q, &k, &v, Some(2))?;
        let v3 = Tensor::cat(&[&(v.narrow(2, 0, 2)? + 7.0)?, &v.narrow(2, 2, 2)?], 2)?;
        let yw3 = causal_attention(&q, &k, &v3, Some(2))?;
        let d = (yw.narrow(2, 3, 1)? - yw3.narrow(2, 3, 1)?)?
            .abs()?
            .max_all()?
            .to_scalar::<f64>()?;
        assert!(d < 1e-12);
        let yw_last = causal_attention(&q.narrow(2, 3, 1)?, &k, &v, Some(2))?;
        let d = (yw_last - yw.narrow(2, 3, 1)?)?.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(d < 1e-12);
        check_grad(
            &q,
            |q| causal_attention(q, &k, &v, Some(2))?.mul(&probe)?.sum_all(),
            1e-6,
        )?;
        Ok(())
    }

    #[test]
    fn repeat_kv_groups_heads() -> Result<()> {
        let x = Tensor::arange(0f32, 4., &Device::Cpu)?.reshape((1, 2, 2, 1))?;
        let y = repeat_kv(&x, 2)?.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(y, vec![0., 1., 0., 1., 2., 3., 2., 3.]);
        Ok(())
    }
}
