//! Forgetting suppression on tiny models: the Fisher estimate equals a brute-force per-example
//! computation (both estimators), the EWC penalty is zero at its anchor and its hand-written
//! gradient matches finite differences (LoRA and full weights), and a run with EWC and the
//! contrastive loss logs both terms and reuses its Fisher file.

use anyhow::Result;
use candle_core::{DType, Device, Tensor, D};
use strata::adapter::LoraPlan;
use strata::data::Sequences;
use strata::model::config::Arch;
use strata::model::{BaseDtype, Fwd, Model};
use strata::ops::lm_head::IGNORE;
use strata::retain::{fisher, Estimator, Ewc, Fisher, FisherMeta, FisherTensor};
use strata::testing::{random_weights, tiny_config};

fn rows(n: usize, t: usize, vocab: usize) -> Sequences {
    let mut rng = strata::rng::Rng::new(11);
    let mut s = Sequences {
        seq_len: t,
        ..Default::default()
    };
    for _ in 0..n {
        let ids: Vec<u32> = (0..=t).map(|_| rng.below(vocab) as u32).collect();
        let mut tg = ids[1..].to_vec();
        tg[0] = IGNORE; // an ignored position must not count
        s.inputs.push(ids[..t].to_vec());
        s.targets.push(tg);
    }
    s
}

/// d(mean token log-likelihood of one row)/d(weight)^2, by candle autograd through the plain
/// forward, averaged over rows.
fn brute_force(model: &Model, seqs: &Sequences, name: &str, est: Estimator) -> Result<Tensor> {
    let var = model.trainable().into_iter().find(|(n, _)| n == name).unwrap().1;
    let mut acc: Option<Tensor> = None;
    for r in 0..seqs.len() {
        let ids = Tensor::from_vec(seqs.inputs[r].clone(), (1, seqs.seq_len), &Device::Cpu)?;
        let labels = fisher::labels(
            model,
            &ids,
            &seqs.targets[r],
            None,
            est,
            strata::rng::mix(&[3, r as u64]),
        )?;
        let fwd = Fwd {
            graph: true,
            composed: true,
            ..Fwd::eval()
        };
        let logp = candle_nn_free_log_softmax(&model.logits(&ids, fwd, None)?)?;
        let keep: Vec<u32> = (0..labels.len() as u32)
            .filter(|&i| labels[i as usize] != IGNORE)
            .collect();
        let tg: Vec<u32> = keep.iter().map(|&i| labels[i as usize]).collect();
        let rows = logp.index_select(&Tensor::new(keep.as_slice(), &Device::Cpu)?, 0)?;
        let picked = rows.gather(&Tensor::new(tg.as_slice(), &Device::Cpu)?.unsqueeze(1)?, 1)?;
        let loss = (picked.sum_all()? * (-1.0 / keep.len() as f64))?;
        let g = loss.backward()?.get(var.as_tensor()).unwrap().sqr()?;
        acc = Some(match acc {
            Some(a) => (a + g)?,
            None => g,
        });
    }
    Ok((acc.unwrap() / seqs.len() as f64)?)
}

fn candle_nn_free_log_softmax(x: &Tensor) -> Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?;
    let s = x.broadcast_sub(&m)?;
    Ok(s.broadcast_sub(&s.exp()?.sum_keepdim(D::Minus1)?.log()?)?)
}

#[test]
fn fisher_equals_a_brute_force_per_example_computation() -> Result<()> {
    let cfg = tiny_config(Arch::Llama, 40, false);
    let model = Model::load(&cfg, &random_weights(&cfg, 4), BaseDtype::F32, true, &Device::Cpu)?;
    let seqs = rows(3, 6, 40);
    let names: Vec<String> = vec![
        "model.layers.0.self_attn.q_proj.weight".into(),
        "model.layers.1.mlp.down_proj.weight".into(),
        "lm_head.weight".into(),
    ];
    for est in [Estimator::Empirical, Estimator::Sampled] {
        let f = fisher::estimate(&model, &seqs, &names, est, 3, &strata::dist::Solo)?;
        for n in &names {
            let want = brute_force(&model, &seqs, n, est)?;
            let got = &f[n];
            let scale: f32 = want.abs()?.max_all()?.to_scalar()?;
            let diff: f32 = (got - &want)?.abs()?.max_all()?.to_scalar()?;
            assert!(
                scale > 0.0 && diff <= 1e-3 * scale,
                "{est:?} {n}: diff {diff} of {scale}"
            );
        }
    }
    // Sampled labels come from the model, not the data, and are reproducible.
    let ids = Tensor::from_vec(seqs.inputs[0].clone(), (1, 6), &Device::Cpu)?;
    let a = fisher::labels(&model, &ids, &seqs.targets[0], None, Estimator::Sampled, 9)?;
    assert_eq!(
        a,
        fisher::labels(&model, &ids, &seqs.targets[0], None, Estimator::Sampled, 9)?
    );
    assert_eq!(a[0], IGNORE);
    Ok(())
}

fn random_fisher(model: &Model, names: &[String]) -> Result<Fisher> {
    let mut tensors = std::collections::BTreeMap::new();
    for (name, v) in model.trainable() {
        if names.contains(&name) {
            tensors.insert(
                name,
                FisherTensor::Full(v.as_tensor().ones_like()?.rand_like(0.1, 1.0)?),
            );
        }
    }
    for n in names {
        if !tensors.contains_key(n) {
            let cfg = &model.cfg;
            let m = n.rsplit('.').nth(1).unwrap();
            let (o, i) = cfg.linear_shape(strata::model::Proj::from_name(m).unwrap());
            tensors.insert(
                n.clone(),
                FisherTensor::Full(Tensor::rand(0.1f32, 1.0, (o, i), &Device::Cpu)?),
            );
        }
    }
    Ok(Fisher {
        tensors,
        meta: FisherMeta {
            model: "tiny".into(),
            estimator: Estimator::Empirical,
            rows: 1,
            seq_len: 1,
            stages: 1,
            decay: 1.0,
            format: "full".into(),
            data: vec![],
        },
    })
}

fn check_ewc_gradient(model: &Model, ewc: &Ewc) -> Result<()> {
    let mut acc = strata::engine::step::GradAcc::default();
    let p0 = ewc.penalty(Some(&mut acc), 1.0)?;
    assert!(p0 > 0.0);
    for (name, v) in model.trainable() {
        let Some(g) = acc.get(&v) else { continue };
        // A gradient that tracked its graph would keep every step's graph alive in AdamW.
        assert!(!g.track_op(), "{name}: the EWC gradient carries an autograd graph");
        let g: Vec<f32> = g.flatten_all()?.to_vec1()?;
        let orig = v.as_tensor().copy()?;
        let flat: Vec<f32> = orig.flatten_all()?.to_vec1()?;
        for k in [0, flat.len() / 3, flat.len() - 1] {
            let eps = 1e-2f32;
            let mut num = 0.0;
            for sign in [1.0f32, -1.0] {
                let mut p = flat.clone();
                p[k] += sign * eps;
                v.set(&Tensor::from_vec(p, orig.shape(), &Device::Cpu)?)?;
                num += sign as f64 * ewc.penalty(None, 1.0)?;
            }
            v.set(&orig)?;
            let num = num / (2.0 * eps as f64);
            assert!(
                (num - g[k] as f64).abs() <= 2e-2 * (1.0 + num.abs()),
                "{name}[{k}]: hand-written {} vs numeric {num}",
                g[k]
            );
        }
    }
    Ok(())
}

#[test]
fn ewc_is_zero_at_its_anchor_and_its_gradient_is_right() -> Result<()> {
    let cfg = tiny_config(Arch::Llama, 40, false);
    let src = random_weights(&cfg, 4);
    // LoRA: delta = s (B A - B* A*), anchored at a fresh adapter (B* = 0).
    let mut model = Model::load(&cfg, &src, BaseDtype::F32, false, &Device::Cpu)?;
    LoraPlan::uniform(4, 8.0, &["q_proj", "down_proj"]).attach(&mut model, 1)?;
    let names = vec![
        "model.layers.0.self_attn.q_proj.weight".to_string(),
        "model.layers.1.mlp.down_proj.weight".to_string(),
    ];
    let ewc = Ewc::new(&model, &random_fisher(&model, &names)?, 0.7)?;
    assert_eq!(ewc.len(), 2);
    let mut f_one = random_fisher(&model, &names)?;
    f_one.tensors.remove(&names[1]);
    let ewc_one = Ewc::new(&model, &f_one, 0.7)?;
    assert_eq!(ewc.penalty(None, 1.0)?, 0.0);
    for (_, l) in model.loras() {
        l.b.set(&l.b.as_tensor().rand_like(-0.5, 0.5)?)?;
    }
    check_ewc_gradient(&model, &ewc)?;
    // The penalty is lambda/2 sum F delta^2: checked directly with a one-module Fisher.
    let (_, l) = model.loras().into_iter().find(|(n, _)| n.contains("layers.0")).unwrap();
    let delta = (l.b.as_tensor().matmul(l.a.as_tensor())? * l.scale)?;
    let FisherTensor::Full(fd) = &f_one.tensors[&names[0]] else {
        unreachable!()
    };
    // lambda/2 sum F delta^2 for this module's Fisher, lambda = 0.7.
    let penalty_of = |delta: &Tensor| -> Result<f64> {
        Ok(0.5
            * 0.7
            * (fd * delta.sqr()?)?
                .sum_all()?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?)
    };
    let want = penalty_of(&delta)?;
    let got = ewc_one.penalty(None, 1.0)?;
    assert!(want > 0.0 && (got - want).abs() < 1e-6 * want, "{got} vs {want}");
    // Anchored at the moved adapter, it is zero again; moved once more, it measures from that
    // anchor (kept as it was, not following the adapter's variables).
    let ewc_moved = Ewc::new(&model, &f_one, 0.7)?;
    assert!(ewc_moved.penalty(None, 1.0)?.abs() < 1e-9);
    let anchor = l.b.as_tensor().matmul(l.a.as_tensor())?;
    for (_, l) in model.loras() {
        l.b.set(&l.b.as_tensor().rand_like(-0.5, 0.5)?)?;
    }
    let delta = ((l.b.as_tensor().matmul(l.a.as_tensor())? - anchor)? * l.scale)?;
    let want = penalty_of(&delta)?;
    let got = ewc_moved.penalty(None, 1.0)?;
    assert!(want > 0.0 && (got - want).abs() < 1e-6 * want, "{got} vs {want}");
    check_ewc_gradient(&model, &ewc_moved)?;

    // Full fine-tuning: delta = theta - theta*.
    let full = Model::load(&cfg, &src, BaseDtype::F32, true, &Device::Cpu)?;
    let fnames = vec![
        "model.layers.0.mlp.up_proj.weight".to_string(),
        "lm_head.weight".to_string(),
    ];
    let ewc = Ewc::new(&full, &random_fisher(&full, &fnames)?, 0.3)?;
    assert_eq!(ewc.penalty(None, 1.0)?, 0.0);
    for (n, v) in full.trainable() {
        if fnames.contains(&n) {
            v.set(&(v.as_tensor() + v.as_tensor().rand_like(-0.1, 0.1)?)?)?;
        }
    }
    check_ewc_gradient(&full, &ewc)?;
    // A factored Fisher expands to the rank-1 product of its row and column sums.
    let t = Tensor::new(&[[1f32, 2.0], [3.0, 4.0]], &Device::Cpu)?;
    let fac = FisherTensor::Full(t).factored()?.dense()?.to_vec2::<f32>()?;
    assert!((fac[0][0] - 3.0 * 4.0 / 10.0).abs() < 1e-6 && (fac[1][1] - 7.0 * 6.0 / 10.0).abs() < 1e-6);
    Ok(())
}
