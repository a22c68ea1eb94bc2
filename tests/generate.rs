//! Generation on a tiny model: samples drawn in lockstep with a batched KV cache are the
//! samples drawn one at a time, and greedy decoding follows the full forward's arg-max.

use anyhow::Result;
use candle_core::{Device, Tensor};
use strata::model::config::Arch;
use strata::model::generate::{generate, sample_many, Sampling};
use strata::model::{BaseDtype, Fwd, Model};
use strata::rng::Rng;
use strata::testing::{random_weights, tiny_config};

#[test]
fn batched_sampling_equals_one_at_a_time_and_greedy_follows_the_argmax() -> Result<()> {
    let cfg = tiny_config(Arch::Llama, 64, true);
    let model = Model::load(&cfg, &random_weights(&cfg, 4), BaseDtype::F32, false, &Device::Cpu)?;
    let prompt = [1u32, 7, 3];
    let s = Sampling {
        max_tokens: 12,
        temperature: 0.9,
        top_p: 0.95,
    };
    let mut rngs: Vec<Rng> = (0..5).map(|k| Rng::new(100 + k)).collect();
    let many = sample_many(&model, &prompt, s, None, Fwd::eval(), &mut rngs)?;
    assert_eq!(many.len(), 5);
    for (k, got) in many.iter().enumerate() {
        let mut rng = Rng::new(100 + k as u64);
        let one = generate(&model, &prompt, s, None, Fwd::eval(), &mut rng, |_| Ok(()))?;
        assert_eq!(got, &one, "sample {k}");
    }
    assert!(many.iter().any(|m| m != &many[0]), "different seeds, different samples");
    // Greedy: every token is the arg-max of a full forward over everything before it.
    let greedy = Sampling { temperature: 0.0, ..s };
    let out = generate(&model, &prompt, greedy, None, Fwd::eval(), &mut Rng::new(0), |_| Ok(()))?;
    let all: Vec<u32> = prompt.iter().chain(&out).copied().collect();
    let logits = model
        .logits(
            &Tensor::from_vec(all.clone(), (1, all.len()), &Device::Cpu)?,
            Fwd::eval(),
            None,
        )?
        .to_vec2::<f32>()?;
    for (k, &t) in out.iter().enumerate() {
        let row = &logits[prompt.len() - 1 + k];
        let best = (0..row.len()).max_by(|&a, &b| row[a].total_cmp(&row[b])).unwrap();
        assert_eq!(t as usize, best, "token {k}");
    }
    // An EOS ends a sample and is not part of it.
    let eos = out[3];
    let cut = generate(
        &model,
        &prompt,
        greedy,
        Some(eos),
        Fwd::eval(),
        &mut Rng::new(0),
        |_| Ok(()),
    )?;
    assert_eq!(cut, out[..out.iter().position(|&t| t == eos).unwrap()].to_vec());
    Ok(())
}
