//! `strata generate`: sampling with a KV cache (greedy, temperature, top-p).

use anyhow::{Context, Result};
use candle_core::Tensor;
use std::io::Write;

use crate::data::chat::{render, Message};
use crate::model::Fwd;
use crate::rng::Rng;

/// Arguments of `strata generate`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The model and optional adapter.
    #[command(flatten)]
    pub model: super::ModelArgs,
    /// The prompt.
    #[arg(long)]
    pub prompt: String,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Nucleus sampling mass.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    /// Sampling seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Where the model runs: cpu, cuda or cuda:N (a build with the `cuda` feature).
    #[arg(long, default_value = "cpu")]
    pub device: String,
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
    p.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut kept = Vec::new();
    let mut mass = 0.0;
    for (i, w) in p {
        kept.push((i, w / z));
        mass += w / z;
        if mass >= top_p {
            break;
        }
    }
    let mut u = rng.next_f64() * mass;
    for (i, w) in &kept {
        if u < *w {
            return *i as u32;
        }
        u -= w;
    }
    kept.last().map(|k| k.0 as u32).unwrap_or(0)
}

/// Runs `strata generate`.
pub fn run(a: Args) -> Result<()> {
    let (src, model) = a.model.load("auto", &crate::util::device(&a.device)?, true)?;
    let tok = &src.tokenizer;
    let text = if a.chat {
        let tpl = tok
            .chat_template
            .as_deref()
            .context("--chat: the model has no chat template")?;
        render(
            tpl,
            &[Message {
                role: "user".into(),
                content: a.prompt.clone(),
            }],
            true,
            tok,
        )?
    } else {
        a.prompt.clone()
    };
    let mut ids = tok.encode(&text)?;
    if ids.is_empty() {
        anyhow::bail!("the prompt encodes to no tokens");
    }
    let mut caches = model.new_caches();
    let mut rng = Rng::new(a.seed);
    let mut input = ids.clone();
    let mut out = Vec::new();
    let mut printed = 0;
    print!("{}", if a.chat { String::new() } else { a.prompt.clone() });
    for _ in 0..a.max_tokens {
        if caches[0].len() + input.len() > model.cfg.max_position_embeddings {
            break;
        }
        let t = Tensor::from_vec(input.clone(), (1, input.len()), &model.device)?;
        let logits = model.logits(&t, Fwd::eval(), Some(&mut caches))?;
        let last = logits.get(input.len() - 1)?.to_vec1::<f32>()?;
        let next = sample(&last, a.temperature, a.top_p, &mut rng);
        if Some(next) == tok.eos {
            break;
        }
        out.push(next);
        ids.push(next);
        input = vec![next];
        let s = tok.decode(&out)?;
        if s.len() > printed && !s.ends_with('\u{fffd}') {
            print!("{}", &s[printed..]);
            printed = s.len();
            std::io::stdout().flush().ok();
        }
    }
    println!();
    Ok(())
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
}
