//! The layer plan: which modules get LoRA, and with which rank and alpha, per layer range.
//!
//! A plan is stored the way PEFT stores it (`r`, `lora_alpha`, `target_modules`, `rank_pattern`,
//! `alpha_pattern`) and resolved with PEFT's rule (`get_pattern_key`): the first pattern key `K`
//! (in file order) for which `re.match(r"(.*\.)?(K)$", module_name)` succeeds wins. Recipe rules
//! such as "layers 0-10: r=64" are compiled into such keys, so strata and PEFT agree on every
//! module by construction.

use anyhow::{bail, Context, Result};
use regex::Regex;
use serde::Deserialize;

use crate::model::BaseDtype;
use crate::model::{Lora, Model, ModuleLora, PerProj, Proj, MODULES};
use crate::rng::{mix, Rng};

/// A recipe rule: a rank and alpha for a range of layers (and optionally some modules).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PlanRule {
    /// Inclusive layer range, `"0-10"`, `"11-"` (to the last layer) or `"7"`.
    pub layers: String,
    /// Module names the rule applies to; all targeted modules when absent.
    #[serde(default)]
    pub modules: Option<Vec<String>>,
    /// Rank for these modules.
    pub r: usize,
    /// Alpha for these modules (defaults to twice the rank).
    #[serde(default)]
    pub alpha: Option<f64>,
    /// Storage of these modules' frozen base weights: f32, bf16, nf4, nf4-dq or as-stored
    /// (defaults to `model.base_dtype`).
    #[serde(default)]
    pub base: Option<BaseDtype>,
}

/// A resolved-by-pattern LoRA plan, in PEFT's terms.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraPlan {
    /// Default rank.
    pub r: usize,
    /// Default alpha.
    pub alpha: f64,
    /// Targeted module names (`q_proj` ...).
    pub targets: Vec<String>,
    /// Layers that get adapters (`None`: all).
    pub layers: Option<Vec<usize>>,
    /// Ordered `(pattern, rank)` overrides.
    pub rank_pattern: Vec<(String, usize)>,
    /// Ordered `(pattern, alpha)` overrides.
    pub alpha_pattern: Vec<(String, f64)>,
    /// Ordered `(pattern, base precision)` overrides (strata's own: PEFT has no such field and
    /// the adapter does not depend on it).
    pub base_pattern: Vec<(String, BaseDtype)>,
    /// Scale by `alpha / sqrt(r)` instead of `alpha / r`.
    pub use_rslora: bool,
    /// Dropout on the adapter input during training.
    pub dropout: f32,
    /// Base modules trained in full beside the adapters and saved with them (PEFT's
    /// `modules_to_save`): any of [`crate::model::SAVABLE`].
    pub modules_to_save: Vec<String>,
}

/// The name PEFT's `modules_to_save` gets (matched against module paths by suffix, so the final
/// norm is `model.norm`, which no layer norm ends with).
pub fn peft_save_name(m: &str) -> &str {
    if m == "norm" {
        "model.norm"
    } else {
        m
    }
}

/// PEFT's `get_pattern_key`: the first key whose `(.*\.)?(KEY)$` matches the whole name from its start.
/// Each pattern is compiled once per thread: plans ask about every (layer, module), and a
/// layered rule's pattern grows with the layer count, so compiling per call is quadratic.
pub fn pattern_match<'a, T>(patterns: &'a [(String, T)], name: &str) -> Result<Option<&'a T>> {
    thread_local! {
        static COMPILED: std::cell::RefCell<std::collections::HashMap<String, Regex>> = Default::default();
    }
    for (key, val) in patterns {
        let hit = COMPILED.with(|c| -> Result<bool> {
            let mut c = c.borrow_mut();
            if !c.contains_key(key) {
                // Bounded both ways: a plan has a handful of patterns, and an adapter file's
                // patterns are a stranger's (fuzzing found a cache of large ones reaching 1.4 GB).
                if c.len() >= 64 {
                    c.clear();
                }
                let re = regex::RegexBuilder::new(&format!(r"^(?:.*\.)?(?:{key})$"))
                    .size_limit(1 << 20)
                    .dfa_size_limit(1 << 20)
                    .build()
                    .with_context(|| format!("rank/alpha pattern `{key}` is not a valid regular expression (or compiles to more than 1 MB)"))?;
                c.insert(key.clone(), re);
            }
            Ok(c[key].is_match(name))
        })?;
        if hit {
            return Ok(Some(val));
        }
    }
    Ok(None)
}

/// Layers of an inclusive range spec: `"0-10"`, `"11-"` (to the last layer) or `"7"`.
pub fn parse_range(spec: &str, num_layers: usize) -> Result<Vec<usize>> {
    let bad = || format!("layer range `{spec}`: expected `A-B`, `A-` or `A` with layers below {num_layers}");
    let (a, b) = match spec.split_once('-') {
        Some((a, "")) => (
            a.trim().parse::<usize>().with_context(bad)?,
            num_layers.saturating_sub(1),
        ),
        Some((a, b)) => (
            a.trim().parse::<usize>().with_context(bad)?,
            b.trim().parse::<usize>().with_context(bad)?,
        ),
        None => {
            let a = spec.trim().parse::<usize>().with_context(bad)?;
            (a, a)
        }
    };
    if a > b || b >= num_layers {
        bail!(bad());
    }
    Ok((a..=b).collect())
}

impl LoraPlan {
    /// A uniform plan over `targets`.
    pub fn uniform(r: usize, alpha: f64, targets: &[&str]) -> Self {
        Self {
            r,
            alpha,
            targets: targets.iter().map(|s| s.to_string()).collect(),
            layers: None,
            rank_pattern: vec![],
            alpha_pattern: vec![],
            base_pattern: vec![],
            use_rslora: false,
            dropout: 0.0,
            modules_to_save: vec![],
        }
    }

    /// Adds recipe rules as PEFT patterns; earlier rules win where ranges overlap, as in PEFT.
    pub fn with_rules(mut self, rules: &[PlanRule], num_layers: usize) -> Result<Self> {
        for t in &self.targets {
            if !MODULES.contains(&t.as_str()) {
                bail!("unknown LoRA target module `{t}`; choose from {}", MODULES.join(", "));
            }
        }
        for rule in rules {
            if rule.r == 0 {
                bail!("layer rule `{}`: rank must be at least 1", rule.layers);
            }
            let layers = parse_range(&rule.layers, num_layers)?;
            let mods = rule.modules.clone().unwrap_or_else(|| self.targets.clone());
            for m in &mods {
                if !MODULES.contains(&m.as_str()) {
                    bail!(
                        "layer rule `{}`: unknown module `{m}`; choose from {}",
                        rule.layers,
                        MODULES.join(", ")
                    );
                }
            }
            let layer_alt = layers.iter().map(|l| l.to_string()).collect::<Vec<_>>().join("|");
            let mod_alt = mods.join("|");
            let key = format!(
                r"{}\.({layer_alt})\.(self_attn|mlp)\.({mod_alt})",
                regex::escape(crate::model::names::LAYERS)
            );
            if let Some(b) = rule.base {
                self.base_pattern.push((key.clone(), b));
            }
            self.rank_pattern.push((key.clone(), rule.r));
            self.alpha_pattern
                .push((key, rule.alpha.unwrap_or(2.0 * rule.r as f64)));
        }
        Ok(self)
    }

    /// Base precision of every projection, by layer: the first rule naming it,
    /// else `default`.
    pub fn base_table(&self, num_layers: usize, default: BaseDtype) -> Result<Vec<PerProj<BaseDtype>>> {
        (0..num_layers)
            .map(|l| {
                let mut row = PerProj([default; Proj::COUNT]);
                for p in Proj::ALL {
                    if let Some(b) = pattern_match(&self.base_pattern, &p.path(l))? {
                        row[p] = *b;
                    }
                }
                Ok(row)
            })
            .collect()
    }

    /// Attaches fresh adapters (PEFT init) to every projection of `model` this plan targets;
    /// each adapter's initial values are a function of `seed` and where it sits.
    pub fn attach(&self, model: &mut Model, seed: u64) -> Result<()> {
        let dev = model.device.clone();
        for block in &mut model.blocks {
            for p in Proj::ALL {
                if let Some(ml) = self.resolve(block.index, p)? {
                    let (o, inp) = model.cfg.linear_shape(p);
                    let mut rng = Rng::new(mix(&[seed, block.index as u64, p.index() as u64]));
                    block.proj[p].lora = Some(Lora::init(o, inp, ml, self.dropout, &mut rng, &dev)?);
                }
            }
        }
        Ok(())
    }

    /// The adapter of projection `p` in `layer`, or `None` when the plan leaves it untouched.
    pub fn resolve(&self, layer: usize, p: Proj) -> Result<Option<ModuleLora>> {
        if !self.targets.iter().any(|t| t == p.name()) {
            return Ok(None);
        }
        if let Some(ls) = &self.layers {
            if !ls.contains(&layer) {
                return Ok(None);
            }
        }
        let name = p.path(layer);
        let r = *pattern_match(&self.rank_pattern, &name)?.unwrap_or(&self.r);
        let alpha = *pattern_match(&self.alpha_pattern, &name)?.unwrap_or(&self.alpha);
        if r == 0 {
            bail!("LoRA rank for {name} is 0");
        }
        let scale = if self.use_rslora {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        };
        Ok(Some(ModuleLora { r, alpha, scale }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layered_rules_resolve_like_peft() -> Result<()> {
        let rules = vec![
            PlanRule {
                layers: "0-10".into(),
                modules: None,
                r: 64,
                alpha: Some(128.0),
                base: Some(crate::model::BaseDtype::Bf16),
            },
            PlanRule {
                layers: "11-".into(),
                modules: Some(vec!["q_proj".into()]),
                r: 8,
                alpha: None,
                base: Some(crate::model::BaseDtype::Nf4),
            },
        ];
        let plan = LoraPlan::uniform(16, 32.0, &MODULES).with_rules(&rules, 30)?;
        assert_eq!(plan.resolve(0, crate::model::Proj::Q)?.unwrap().r, 64);
        assert_eq!(plan.resolve(10, crate::model::Proj::Down)?.unwrap().scale, 2.0);
        // Layer 1 must not match layer 10..19 patterns and vice versa: the pattern ends at the dot.
        assert_eq!(plan.resolve(1, crate::model::Proj::Q)?.unwrap().r, 64);
        assert_eq!(plan.resolve(11, crate::model::Proj::K)?.unwrap().r, 16);
        let q = plan.resolve(29, crate::model::Proj::Q)?.unwrap();
        assert_eq!((q.r, q.alpha), (8, 16.0));
        let mut rs = plan.clone();
        rs.use_rslora = true;
        assert_eq!(
            rs.resolve(29, crate::model::Proj::Q)?.unwrap().scale,
            16.0 / 8f64.sqrt()
        );
        let table = plan.base_table(30, BaseDtype::F32)?;
        assert_eq!(table[10], PerProj([BaseDtype::Bf16; Proj::COUNT]));
        assert_eq!(table[11][Proj::Q], BaseDtype::Nf4);
        assert_eq!(table[11][Proj::K], BaseDtype::F32);
        let partial = LoraPlan::uniform(4, 8.0, &["q_proj"]);
        assert!(partial.resolve(0, crate::model::Proj::V)?.is_none());
        Ok(())
    }

    #[test]
    fn peft_pattern_key_semantics() -> Result<()> {
        // A bare module key matches as a suffix after a dot, never in the middle of a name.
        let pats = vec![
            ("q_proj".to_string(), 1usize),
            (r"layers\.1\.self_attn\.k_proj".to_string(), 2),
        ];
        assert_eq!(pattern_match(&pats, "model.layers.3.self_attn.q_proj")?, Some(&1));
        assert_eq!(pattern_match(&pats, "model.layers.1.self_attn.k_proj")?, Some(&2));
        assert_eq!(pattern_match(&pats, "model.layers.11.self_attn.k_proj")?, None);
        assert_eq!(pattern_match(&pats, "model.layers.3.self_attn.xq_proj")?, None);
        Ok(())
    }

    #[test]
    fn bad_rules_are_explained() {
        let plan = LoraPlan::uniform(16, 32.0, &MODULES);
        let e = plan.clone().with_rules(
            &[PlanRule {
                layers: "5-40".into(),
                modules: None,
                r: 4,
                alpha: None,
                base: None,
            }],
            30,
        );
        assert!(e.unwrap_err().to_string().contains("layer range"));
        let e = plan.with_rules(
            &[PlanRule {
                layers: "1".into(),
                modules: Some(vec!["wq".into()]),
                r: 4,
                alpha: None,
                base: None,
            }],
            30,
        );
        assert!(e.unwrap_err().to_string().contains("unknown module"));
    }
}
