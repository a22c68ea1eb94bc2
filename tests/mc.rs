//! Multiple-choice scoring on a tiny model: the batched, padded scores equal a plain full
//! forward of context + choice, and the evaluation file round trip works.

use anyhow::Result;
use candle_core::{Device, Tensor};
use strata::data::mc::{load_items, McItem};
use strata::eval::mc::{score_item, score_items};
use strata::model::config::Arch;
use strata::model::tokenizer::{tiny_vocab, tokenizer_json_from_gguf, Tok};
use strata::model::{BaseDtype, Fwd, Model};
use strata::testing::{random_weights, tiny_config};

/// log p(choice | context) from one uncached forward over context + choice.
fn oracle(model: &Model, tok: &Tok, context: &str, choice: &str) -> Result<f64> {
    let ctx = tok.encode(context)?;
    let ch = tok.encode(choice)?;
    let all: Vec<u32> = ctx.iter().chain(&ch).copied().collect();
    let logits = model
        .logits(
            &Tensor::from_vec(all.clone(), (1, all.len()), &Device::Cpu)?,
            Fwd::eval(),
            None,
        )?
        .to_vec2::<f32>()?;
    let mut lp = 0.0;
    for (k, &t) in ch.iter().enumerate() {
        let row = &logits[ctx.len() - 1 + k];
        let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let z: f64 = row.iter().map(|&x| (x as f64 - m).exp()).sum();
        lp += row[t as usize] as f64 - m - z.ln();
    }
    Ok(lp)
}

#[test]
fn batched_scores_equal_a_full_forward_and_pick_the_likeliest() -> Result<()> {
    let vocab = tiny_vocab();
    let tok = Tok::from_json(tokenizer_json_from_gguf(&vocab, "t")?, Some(0), None, None)?;
    let mut cfg = tiny_config(Arch::Llama, 0, true);
    cfg.vocab_size = vocab.tokens.len();
    let model = Model::load(&cfg, &random_weights(&cfg, 2), BaseDtype::F32, false, &Device::Cpu)?;
    let item = McItem {
        context: "Definition: a small domestic animal. Term:".into(),
        choices: vec!["cat".into(), "the tax".into(), "x".into(), "thesis 42".into()],
        answer: 0,
    };
    let s = score_item(&model, &tok, &item, Fwd::eval())?;
    for (c, lp) in item.choices.iter().zip(&s.logprobs) {
        let direct = oracle(&model, &tok, "Definition: a small domestic animal. Term:", c)?;
        assert!((lp - direct).abs() < 1e-3, "choice {c}: batched {lp} vs full {direct}");
    }
    // A trailing space of the context moves to the choice: " cat" continues "...Term:".
    let spaced = McItem {
        context: format!("{} ", item.context),
        ..item.clone()
    };
    let s2 = score_item(&model, &tok, &spaced, Fwd::eval())?;
    for (c, lp) in spaced.choices.iter().zip(&s2.logprobs) {
        let direct = oracle(&model, &tok, &item.context, &format!(" {c}"))?;
        assert!(
            (lp - direct).abs() < 1e-3,
            "choice ' {c}': batched {lp} vs full {direct}"
        );
    }
    // Several items of different lengths in one padded batch score as each does alone.
    let long = McItem {
        context: "Definition: a thing the cat and the dog and the tax all share. Term:".into(),
        ..item.clone()
    };
    let batch = score_items(&model, &tok, &[item.clone(), long.clone(), spaced.clone()], Fwd::eval())?;
    for (it, sc) in [&item, &long, &spaced].iter().zip(&batch.scores) {
        let alone = score_item(&model, &tok, it, Fwd::eval())?;
        for (a, b) in alone.logprobs.iter().zip(&sc.logprobs) {
            assert!((a - b).abs() < 1e-3, "padded {b} vs alone {a}");
        }
    }
    // The CPU scores each item as one row, its context shared by the choices; the composed path
    // (what a GPU runs) scores one row per choice. Both give the full forward's numbers.
    let composed = Fwd {
        composed: true,
        ..Fwd::eval()
    };
    let flat = score_items(&model, &tok, &[item.clone(), long.clone(), spaced.clone()], composed)?;
    for (f, sc) in flat.scores.iter().zip(&batch.scores) {
        for (a, b) in f.logprobs.iter().zip(&sc.logprobs) {
            assert!((a - b).abs() < 1e-3, "one row per choice {a} vs shared context {b}");
        }
    }
    let direct = oracle(&model, &tok, &long.context, "thesis 42")?;
    assert!((batch.scores[1].logprobs[3] - direct).abs() < 1e-3);
    // The answer is right exactly when it has the highest summed log-likelihood.
    let best = s
        .logprobs
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .unwrap()
        .0;
    assert_eq!(s.correct, best == 0);
    // An item whose answer is the likeliest choice is scored right.
    let item2 = McItem {
        answer: best,
        ..item.clone()
    };
    assert!(score_item(&model, &tok, &item2, Fwd::eval())?.correct);

    let dir = std::env::temp_dir().join(format!("strata-mc-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let f = dir.join("mc.jsonl");
    std::fs::write(
        &f,
        format!(
            "{}\n\n{}\n",
            serde_json::to_string(&item)?,
            serde_json::to_string(&item2)?
        ),
    )?;
    let items = load_items(&f)?;
    let r = score_items(&model, &tok, &items, Fwd::eval())?;
    assert_eq!(r.items, 2);
    assert!(r.acc >= 0.5);
    std::fs::write(&f, r#"{"context": "a", "choices": ["b"], "answer": 0}"#)?;
    assert!(load_items(&f).unwrap_err().to_string().contains("at least two choices"));
    std::fs::write(&f, r#"{"question": "a"}"#)?;
    assert!(load_items(&f).unwrap_err().to_string().contains("mc.jsonl:1"));
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
