//! LoRA adapters: the per-layer plan, attaching adapters to a model, PEFT directories, merging
//! and llama.cpp LoRA files. (The adapter weights themselves, [`Lora`], are part of the model.)

pub mod llama_lora;
pub mod merge;
pub mod peft;
pub mod plan;

pub use plan::{LoraPlan, PlanRule};

use crate::model::{BaseDtype, LoadSpec, Model, ModelSource, Proj};

/// Opens a model and builds it frozen, with an optional PEFT adapter applied. `base` `None`
/// rebuilds the base the adapter was trained against (its `strata_base.json`: NF4 where
/// training had NF4), f32 without a record; `Some` is a precision for every projection. `pack`
/// packs bf16 weights for the bf16 kernel (faster forwards, a second copy of each): for running
/// the model, not for writing it out.
pub fn open_adapted(
    path: &std::path::Path,
    adapter: Option<&std::path::Path>,
    base: Option<BaseDtype>,
    dev: &candle_core::Device,
    pack: bool,
) -> anyhow::Result<(ModelSource, Model)> {
    let src = crate::model::open(path)?;
    let recorded = match (adapter, base) {
        (Some(a), None) => peft::recorded_bases(a)?,
        _ => None,
    };
    let (base, per_module) = match (base, recorded) {
        (None, Some((b, m))) => (b, m),
        (None, None) => (BaseDtype::F32, Default::default()),
        (Some(b), _) => (b, Default::default()),
    };
    let per = |l: usize, m: Proj| per_module.get(&m.path(l)).copied().unwrap_or(base);
    let spec = LoadSpec {
        base,
        per: &per,
        full: false,
        pack,
        device_nf4: false,
    };
    let mut m = Model::load_with(&src.config, src.weights.as_ref(), &spec, dev)?;
    if let Some(a) = adapter {
        peft::load(&mut m, a)?;
    }
    Ok((src, m))
}
