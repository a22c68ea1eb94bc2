//! The fine-tuning policies strata's benchmarks and `strata inspect` set side by side: full
//! fine-tuning, LoRA, QLoRA and the brief's layered policy, each a plan the memory predictor
//! reads.

use crate::engine::Recompute;
use crate::model::config::ModelConfig;
use crate::model::{BaseDtype, PerProj, Proj, MODULES};
use crate::train::memory::{predict, ranks, Prediction, RunShape};

/// A named way of fine-tuning, for side-by-side planning (`strata inspect`) and the memory
/// benchmarks.
pub struct Policy {
    /// `full`, `lora`, `qlora` or `layered`.
    pub name: &'static str,
    /// Base precision outside the plan's per-layer choices.
    pub base: BaseDtype,
    /// Adapters and per-layer bases (`None` for full fine-tuning).
    pub plan: Option<crate::adapter::LoraPlan>,
}

/// The policies strata compares: full fine-tuning (f32), LoRA r=16 on a bf16 base, QLoRA r=16
/// on NF4 with double quantization, and the brief's layered policy (lower third of the layers
/// bf16 with r=64, the rest NF4 with r=16). Adapters on all seven projections.
pub fn policies(cfg: &ModelConfig) -> anyhow::Result<Vec<Policy>> {
    use crate::adapter::{LoraPlan, PlanRule};
    let lower = (cfg.num_layers / 3).max(1);
    let layered = LoraPlan::uniform(16, 32.0, &MODULES).with_rules(
        &[
            PlanRule {
                layers: format!("0-{}", lower - 1),
                modules: None,
                r: 64,
                alpha: Some(128.0),
                base: Some(crate::model::BaseDtype::Bf16),
            },
            PlanRule {
                layers: format!("{lower}-"),
                modules: None,
                r: 16,
                alpha: Some(32.0),
                base: Some(crate::model::BaseDtype::Nf4Dq),
            },
        ],
        cfg.num_layers,
    )?;
    Ok(vec![
        Policy {
            name: "full",
            base: BaseDtype::F32,
            plan: None,
        },
        Policy {
            name: "lora",
            base: BaseDtype::Bf16,
            plan: Some(LoraPlan::uniform(16, 32.0, &MODULES)),
        },
        Policy {
            name: "qlora",
            base: BaseDtype::Nf4Dq,
            plan: Some(LoraPlan::uniform(16, 32.0, &MODULES)),
        },
        Policy {
            name: "layered",
            base: BaseDtype::Nf4Dq,
            plan: Some(layered),
        },
    ])
}

impl Policy {
    /// A one-line description for tables.
    pub fn label(&self, cfg: &ModelConfig) -> String {
        match self.name {
            // As `train.precision = "auto"` runs it here: bf16 copies where the CPU has AVX512-BF16.
            "full" if crate::ops::bf16_gemm::available() => "full fine-tuning (bf16 mixed, AdamW)".into(),
            "full" => "full fine-tuning (f32, AdamW)".into(),
            "lora" => "LoRA r=16, bf16 base".into(),
            "qlora" => "QLoRA r=16, NF4 + double quant".into(),
            _ => format!(
                "layered: layers 0-{} bf16 r=64, rest NF4 r=16",
                (cfg.num_layers / 3).max(1) - 1
            ),
        }
    }

    /// Base precision of every projection.
    pub fn bases(&self, cfg: &ModelConfig) -> anyhow::Result<Vec<PerProj<BaseDtype>>> {
        match &self.plan {
            Some(p) => p.base_table(cfg.num_layers, self.base),
            None => Ok(vec![PerProj([self.base; Proj::COUNT]); cfg.num_layers]),
        }
    }

    /// The prediction for this policy at `rows x seq_len` tokens a micro-batch under
    /// `recompute`.
    pub fn predict(
        &self,
        cfg: &ModelConfig,
        rows: usize,
        seq_len: usize,
        pack: bool,
        recompute: Recompute,
        runtime: u64,
    ) -> anyhow::Result<Prediction> {
        let bases = self.bases(cfg)?;
        Ok(predict(&RunShape {
            cfg,
            base: self.base,
            bases: &bases,
            full: self.plan.is_none(),
            pack,
            mixed: pack && crate::ops::bf16_gemm::available(),
            adam8: false,
            saved: &[],
            rows,
            seq_len,
            recompute,
            ranks: &ranks(cfg, self.plan.as_ref())?,
            stored_bytes: &|_| None,
            mapped: 0,
            runtime,
            ewc_fisher: 0,
            distill: false,
            base_copy: false,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::memory::{choose_recompute, keep_ranks};

    /// `auto` takes the fastest mode whose prediction fits: no recomputation, selective in
    /// every layer, in fewer layers (the NF4 ones first under the layered policy), per block.
    #[test]
    fn auto_recompute_picks_the_fastest_mode_that_fits() -> anyhow::Result<()> {
        let cfg = crate::cli::bench::smollm2_shape();
        let all = policies(&cfg)?;
        let layered = all.iter().find(|p| p.name == "layered").expect("layered policy");
        // The plan's tables once (resolving PEFT patterns is the slow part of a prediction).
        let (bases, rank_table) = (layered.bases(&cfg)?, ranks(&cfg, layered.plan.as_ref())?);
        let at = |recompute| -> anyhow::Result<Prediction> {
            Ok(predict(&RunShape {
                cfg: &cfg,
                base: layered.base,
                bases: &bases,
                full: false,
                pack: false,
                mixed: false,
                adam8: false,
                saved: &[],
                rows: 4,
                seq_len: 256,
                recompute,
                ranks: &rank_table,
                stored_bytes: &|_| None,
                mapped: 0,
                runtime: 0,
                ewc_fisher: 0,
                distill: false,
                base_copy: false,
            }))
        };
        let total = |r| at(r).map(|p| p.total());
        let (off, sel, blocks) = (
            total(Recompute::Off)?,
            total(Recompute::Selective)?,
            total(Recompute::Blocks)?,
        );
        assert!(off > sel && sel > blocks, "off {off}, selective {sel}, blocks {blocks}");
        let mut last = blocks;
        for k in 1..cfg.num_layers {
            let t = total(Recompute::Partial(k))?;
            assert!(t > last && t < sel, "selective:{k} predicts {t}");
            last = t;
        }
        let l = cfg.num_layers;
        for (budget, want) in [
            (off, Recompute::Off),
            (off - 1, Recompute::Selective),
            (total(Recompute::Partial(7))?, Recompute::Partial(7)),
            (total(Recompute::Partial(7))? + 1, Recompute::Partial(7)),
            (total(Recompute::Partial(1))? - 1, Recompute::Blocks),
            (0, Recompute::Blocks),
        ] {
            let (got, p) = choose_recompute(l, false, budget, at)?;
            assert_eq!(got, want, "budget {budget}");
            assert_eq!(p.total(), total(want)?);
        }
        // Full fine-tuning keeps no products: off or blocks.
        let full = all.iter().find(|p| p.name == "full").expect("full policy");
        let f = |r| full.predict(&cfg, 4, 256, false, r, 0);
        let f_off = f(Recompute::Off)?.total();
        assert_eq!(choose_recompute(l, true, f_off - 1, f)?.0, Recompute::Blocks);
        // The layered policy's NF4 layers (10-29) keep their products before the bf16 ones.
        let ranks = keep_ranks(&rank_table, &bases);
        let kept = Recompute::Partial(7).kept(&ranks);
        let want: Vec<bool> = (0..l).map(|i| (10..17).contains(&i)).collect();
        assert_eq!(kept, want);
        assert_eq!(Recompute::Partial(25).kept(&ranks).iter().filter(|&&k| k).count(), 25);
        assert!(Recompute::Partial(25).kept(&ranks)[..5].iter().all(|&k| k));
        Ok(())
    }
}
