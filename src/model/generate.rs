//! Sampling continuations with a KV cache: greedy (temperature 0), temperature and nucleus (top-p).
//! `strata generate` streams with it; the experiment uses it for the base model's own answers
//! (chat retention) and for self-generated replay text.

use anyhow::{bail, Result};
use candle_core::Tensor;

use super::{Fwd, Model};
use crate::rng::Rng;

/// How tokens are drawn.
#[derive(Clone, Copy, Debug)]
pub struct Sampling {
    /// Tokens to generate at most.
    pub max_tokens: usize,
    /// Temperature (0: greedy).
    pub temperature: f64,
    /// Nucleus mass kept when sampling.
    pub top_p: f64,
}

/// Picks the next token from `logits` (greedy at temperature 0, else top-p sampling).
pub fn sample(logits: &[f32], temperature: f64, top_p: f64, rng: &mut Rng) -> u32 {
    if temperature <= 0.0 {
        return logits
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i as u32)
            .unwrap_or(0);
    }
    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let mut p: Vec<(usize, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i, ((l as f64 - m) / temperature).exp()))
        .collect();
    let z: f64 = p.iter().map(|x| x.1).sum();
    let (kept, mass) = nucleus(&mut p, z, top_p);
    let mut u = rng.next_f64() * mass;
    for (i, w) in &kept {
        if u < *w {
            return *i as u32;
        }
        u -= w;
    }
    kept.last().map(|k| k.0 as u32).unwrap_or(0)
}

/// The most probable tokens, most probable first (ties by index), with their probabilities
/// `w / z`, up to the first prefix whose mass reaches `top_p`, and that mass. A nucleus is mostly
/// tens to hundreds of a vocabulary of tens of thousands, so only a top slice is selected and
/// sorted, grown until it holds the nucleus: the same tokens in the same order, and the same sums,
/// as a stable sort of the whole vocabulary, which took an eighth of generation's CPU time, on
/// the main thread while the pool waited.
fn nucleus(p: &mut [(usize, f64)], z: f64, top_p: f64) -> (Vec<(usize, f64)>, f64) {
    let before = |a: &(usize, f64), b: &(usize, f64)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    let mut k = p.len().min(64);
    loop {
        if k < p.len() {
            p.select_nth_unstable_by(k - 1, before);
        }
        p[..k].sort_unstable_by(before);
        let mut kept = Vec::with_capacity(k);
        let mut mass = 0.0;
        for &(i, w) in &p[..k] {
            kept.push((i, w / z));
            mass += w / z;
            if mass >= top_p {
                return (kept, mass);
            }
        }
        if k == p.len() {
            return (kept, mass);
        }
        k = p.len().min(k * 8);
    }
}

/// Continues `prompt` until `eos`, `max_tokens` or the model's context length; returns the new
/// tokens (without the EOS). `on_token` sees the tokens so far after each one (for streaming).
pub fn generate(
    model: &Model,
    prompt: &[u32],
    s: Sampling,
    eos: Option<u32>,
    fwd: Fwd,
    rng: &mut Rng,
    mut on_token: impl FnMut(&[u32]) -> Result<()>,
) -> Result<Vec<u32>> {
    if prompt.is_empty() {
        bail!("the prompt encodes to no tokens");
    }
    let mut caches = model.new_caches();
    let mut input = prompt.to_vec();
    let mut out = Vec::new();
    for _ in 0..s.max_tokens {
        if caches[0].len() + input.len() > model.cfg.context() {
            break;
        }
        let t = Tensor::from_vec(input.clone(), (1, input.len()), &model.device)?;
        let logits = model.logits(&t, fwd, Some(&mut caches))?;
        let last = logits.get(input.len() - 1)?.to_vec1::<f32>()?;
        let next = sample(&last, s.temperature, s.top_p, rng);
        if Some(next) == eos {
            break;
        }
        out.push(next);
        on_token(&out)?;
        input = vec![next];
    }
    Ok(out)
}

/// Draws `rngs.len()` continuations of one prompt in lockstep, one batched forward per token
/// (a KV cache of that many rows); each ends at its first EOS, `max_tokens` or the context
/// length. Sample `k` draws from `rngs[k]`.
pub fn sample_many(
    model: &Model,
    prompt: &[u32],
    s: Sampling,
    eos: Option<u32>,
    fwd: Fwd,
    rngs: &mut [Rng],
) -> Result<Vec<Vec<u32>>> {
    if prompt.is_empty() {
        bail!("the prompt encodes to no tokens");
    }
    let n = rngs.len();
    let mut caches = model.new_caches();
    let mut input: Vec<u32> = prompt.iter().copied().cycle().take(n * prompt.len()).collect();
    let mut width = prompt.len();
    let mut out = vec![Vec::new(); n];
    let mut done = vec![false; n];
    for _ in 0..s.max_tokens {
        if done.iter().all(|&d| d) || caches[0].len() + width > model.cfg.context() {
            break;
        }
        let t = Tensor::from_vec(input.clone(), (n, width), &model.device)?;
        let logits = model.logits(&t, fwd, Some(&mut caches))?;
        let mut next = Vec::with_capacity(n);
        for (k, rng) in rngs.iter_mut().enumerate() {
            let last = logits.get(k * width + width - 1)?.to_vec1::<f32>()?;
            let id = sample(&last, s.temperature, s.top_p, rng);
            if !done[k] {
                if Some(id) == eos {
                    done[k] = true;
                } else {
                    out[k].push(id);
                }
            }
            next.push(id);
        }
        input = next;
        width = 1;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_and_top_p_sampling() {
        let mut rng = Rng::new(0);
        assert_eq!(sample(&[0.1, 3.0, 2.0], 0.0, 1.0, &mut rng), 1);
        // With a tiny nucleus only the best token survives.
        for _ in 0..20 {
            assert_eq!(sample(&[0.1, 3.0, 2.0], 1.0, 0.1, &mut rng), 1);
        }
        let mut seen = [0; 3];
        for _ in 0..300 {
            seen[sample(&[1.0, 1.0, 1.0], 1.0, 1.0, &mut rng) as usize] += 1;
        }
        assert!(seen.iter().all(|&c| c > 50), "{seen:?}");
    }

    /// The nucleus as a stable sort of the whole vocabulary gives it (the sampler's first form).
    fn nucleus_by_full_sort(p: &[(usize, f64)], z: f64, top_p: f64) -> (Vec<(usize, f64)>, f64) {
        let mut p = p.to_vec();
        p.sort_by(|a, b| b.1.total_cmp(&a.1));
        let (mut kept, mut mass) = (Vec::new(), 0.0);
        for (i, w) in p {
            kept.push((i, w / z));
            mass += w / z;
            if mass >= top_p {
                break;
            }
        }
        (kept, mass)
    }

    /// Selecting a growing top slice keeps the same tokens, order and mass as the full sort:
    /// peaked and flat distributions (a nucleus past every slice size), ties, and top_p 1.
    #[test]
    fn nucleus_matches_a_full_stable_sort() {
        for case in 0..60 {
            let n = [3, 64, 65, 700, 5000][case % 5];
            let spread = [0.05, 1.0, 6.0][case % 3];
            let p: Vec<(usize, f64)> = (0..n)
                .map(|i| {
                    // Every fourth weight repeats its neighbour's: ties must keep index order.
                    let x = if i % 4 == 3 { (i - 1) as f64 } else { i as f64 };
                    (i, ((x * 0.618_034 * 97.0).sin() * spread).exp())
                })
                .collect();
            let z: f64 = p.iter().map(|x| x.1).sum();
            for top_p in [0.1, 0.5, 0.95, 0.999, 1.0] {
                let want = nucleus_by_full_sort(&p, z, top_p);
                let got = nucleus(&mut p.clone(), z, top_p);
                assert_eq!(got.0, want.0, "n {n} spread {spread} top_p {top_p}");
                assert_eq!(got.1.to_bits(), want.1.to_bits());
            }
        }
    }
}
