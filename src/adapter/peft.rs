//! PEFT adapter directories: `adapter_config.json` + `adapter_model.safetensors`, readable by
//! Hugging Face PEFT (`PeftModel.from_pretrained`) with no missing or unexpected keys.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Var};
use serde_json::{json, Value};
use std::path::Path;

use super::plan::{pattern_match, peft_save_name, LoraPlan};
use crate::model::hf::{save_safetensors, SafetensorsSource};
use crate::model::{BaseDtype, Model};
use crate::model::{Lora, Proj, MODULES, SAVABLE};

/// Tensor name PEFT uses for an adapter matrix (`ab` is `A` or `B`).
pub fn peft_key(module: &str, ab: &str) -> String {
    format!("base_model.model.{module}.lora_{ab}.weight")
}

/// The `adapter_config.json` of a plan.
pub fn adapter_config(plan: &LoraPlan, base_model: &str) -> Value {
    let obj = |pairs: Vec<(String, Value)>| Value::Object(pairs.into_iter().collect());
    json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": plan.r,
        "lora_alpha": plan.alpha,
        "target_modules": plan.targets,
        "rank_pattern": obj(plan.rank_pattern.iter().map(|(k, v)| (k.clone(), json!(v))).collect()),
        "alpha_pattern": obj(plan.alpha_pattern.iter().map(|(k, v)| (k.clone(), json!(v))).collect()),
        // f32 -> shortest decimal, so 0.05 is written as 0.05 and not 0.0500000007.
        "lora_dropout": plan.dropout.to_string().parse::<f64>().unwrap_or(0.0),
        "bias": "none",
        "fan_in_fan_out": false,
        "use_rslora": plan.use_rslora,
        "use_dora": false,
        "layers_to_transform": plan.layers,
        "layers_pattern": plan.layers.as_ref().map(|_| "layers"),
        "modules_to_save": if plan.modules_to_save.is_empty() {
            Value::Null
        } else {
            json!(plan.modules_to_save.iter().map(|m| peft_save_name(m)).collect::<Vec<_>>())
        },
        "init_lora_weights": true,
        "inference_mode": true,
        "revision": null,
    })
}

/// Saves the model's adapters as a PEFT directory (files written atomically).
pub fn save(model: &Model, plan: &LoraPlan, dir: &Path, base_model: &str) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut tensors = Vec::new();
    for (name, l) in model.loras() {
        tensors.push((peft_key(&name, "A"), l.a.as_tensor().clone()));
        tensors.push((peft_key(&name, "B"), l.b.as_tensor().clone()));
    }
    if tensors.is_empty() {
        bail!("the model has no adapters to save");
    }
    for (name, t) in model.savable(&plan.modules_to_save)? {
        tensors.push((format!("base_model.model.{name}"), t.clone()));
    }
    save_safetensors(&dir.join("adapter_model.safetensors"), &tensors)?;
    let cfg = serde_json::to_string_pretty(&adapter_config(plan, base_model))?;
    crate::util::write_atomic(&dir.join("adapter_config.json"), cfg.as_bytes())?;
    let record = base_record(model);
    crate::util::write_atomic(
        &dir.join(BASE_RECORD),
        serde_json::to_string_pretty(&record)?.as_bytes(),
    )
}

/// The file beside a PEFT adapter that records the precision each base projection had during
/// training, so merge and eval can rebuild the base the adapter was trained against (an
/// adapter trained on NF4 corrects NF4's rounding, not the original weights). PEFT ignores it.
pub const BASE_RECORD: &str = "strata_base.json";

fn base_record(model: &Model) -> Value {
    let mut modules = serde_json::Map::new();
    for b in &model.blocks {
        for (m, p) in b.proj.iter() {
            modules.insert(m.path(b.index), json!(p.w.precision().name()));
        }
    }
    json!({"base_dtype": model.base.name(), "modules": modules})
}

/// The base precisions recorded beside an adapter (`None` when the adapter has no record, as
/// one made by PEFT): the overall base and each projection's by module name.
pub fn recorded_bases(dir: &Path) -> Result<Option<(BaseDtype, std::collections::HashMap<String, BaseDtype>)>> {
    let p = dir.join(BASE_RECORD);
    if !p.exists() {
        return Ok(None);
    }
    let bad = || {
        format!(
            "{}: malformed base record (delete it to load the adapter onto an f32 base)",
            p.display()
        )
    };
    let v: Value =
        serde_json::from_str(&crate::fsio::read_text(&p, crate::fsio::CONFIG_CAP, "base record").with_context(bad)?)
            .with_context(bad)?;
    let base = BaseDtype::parse(v["base_dtype"].as_str().with_context(bad)?).with_context(bad)?;
    let mut modules = std::collections::HashMap::new();
    for (k, d) in v["modules"].as_object().with_context(bad)? {
        modules.insert(
            k.clone(),
            BaseDtype::parse(d.as_str().with_context(bad)?).with_context(bad)?,
        );
    }
    Ok(Some((base, modules)))
}

fn patterns<T>(v: Option<&Value>, conv: impl Fn(&Value) -> Option<T>, what: &str) -> Result<Vec<(String, T)>> {
    match v {
        None | Some(Value::Null) => Ok(vec![]),
        Some(Value::Object(m)) => m
            .iter()
            .map(|(k, v)| {
                Ok((
                    k.clone(),
                    conv(v).with_context(|| {
                        format!("{what}[{k}] is {v}: not a valid value (ranks 1 to 16384, alphas finite and positive)")
                    })?,
                ))
            })
            .collect(),
        Some(_) => bail!("{what} must be an object"),
    }
}

/// Reads a PEFT `adapter_config.json` into a plan (PEFT's defaults where keys are absent).
pub fn read_plan(dir: &Path, num_layers: usize) -> Result<LoraPlan> {
    let path = dir.join("adapter_config.json");
    if !path.exists() {
        bail!("{}: missing (is this a PEFT adapter directory?)", path.display());
    }
    let text = crate::fsio::read_text(&path, crate::fsio::CONFIG_CAP, "adapter_config.json")?;
    let v: Value = serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))?;
    let p = path.display();
    if v.get("peft_type").and_then(|x| x.as_str()) != Some("LORA") {
        bail!("{p}: peft_type must be \"LORA\"");
    }
    for (key, ok) in [("use_dora", Value::Bool(false)), ("lora_bias", Value::Bool(false))] {
        if let Some(x) = v.get(key) {
            if *x != ok && !x.is_null() {
                bail!("{p}: `{key}: {x}` is not supported by strata");
            }
        }
    }
    let mut modules_to_save = Vec::new();
    if let Some(m) = v.get("modules_to_save").and_then(|m| m.as_array()) {
        for x in m {
            let name = x.as_str().unwrap_or("");
            let short = SAVABLE
                .iter()
                .find(|s| peft_save_name(s) == name || **s == name)
                .with_context(|| {
                    format!("{p}: modules_to_save entry {x} is not one strata trains (choose from {SAVABLE:?})")
                })?;
            modules_to_save.push(short.to_string());
        }
    }
    if v.get("bias").and_then(|b| b.as_str()).unwrap_or("none") != "none" {
        bail!("{p}: only bias = \"none\" is supported");
    }
    let rank = |x: &Value| x.as_u64().filter(|r| (1..=1 << 14).contains(r)).map(|r| r as usize);
    let scale = |x: &Value| x.as_f64().filter(|a| a.is_finite() && *a > 0.0);
    let r = match v.get("r") {
        None | Some(Value::Null) => 8,
        Some(x) => rank(x).with_context(|| format!("{p}: `r` is {x}; it must be an integer from 1 to 16384"))?,
    };
    let alpha = match v.get("lora_alpha") {
        None | Some(Value::Null) => 8.0,
        Some(x) => {
            scale(x).with_context(|| format!("{p}: `lora_alpha` is {x}; it must be a finite positive number"))?
        }
    };
    let dropout = match v.get("lora_dropout") {
        None | Some(Value::Null) => 0.0,
        Some(x) => x
            .as_f64()
            .filter(|d| (0.0..1.0).contains(d))
            .with_context(|| format!("{p}: `lora_dropout` is {x}; it must be a number in [0, 1)"))?,
    };
    let targets: Vec<String> = match v.get("target_modules") {
        Some(Value::Array(a)) => a.iter().filter_map(|x| x.as_str().map(String::from)).collect(),
        Some(Value::String(s)) if s == "all-linear" => MODULES.iter().map(|s| s.to_string()).collect(),
        Some(Value::String(s)) => {
            let re = regex::RegexBuilder::new(&format!("^(?:{s})$"))
                .size_limit(1 << 20)
                .dfa_size_limit(1 << 20)
                .build()
                .with_context(|| {
                    format!("{p}: target_modules regex `{s}` is not valid (or compiles to more than 1 MB)")
                })?;
            Proj::ALL
                .into_iter()
                .filter(|m| (0..num_layers).any(|l| re.is_match(&m.path(l))))
                .map(|m| m.name().to_string())
                .collect()
        }
        _ => bail!("{p}: missing `target_modules`"),
    };
    for t in &targets {
        if !MODULES.contains(&t.as_str()) {
            bail!(
                "{p}: target module `{t}` is not a projection strata adapts ({})",
                MODULES.join(", ")
            );
        }
    }
    let layer = |x: &Value| {
        x.as_u64()
            .filter(|&l| (l as usize) < num_layers)
            .map(|l| l as usize)
            .with_context(|| {
                format!("{p}: layers_to_transform entry {x} is not a layer of this {num_layers}-layer model")
            })
    };
    let layers = match v.get("layers_to_transform") {
        None | Some(Value::Null) => None,
        Some(x @ Value::Number(_)) => Some(vec![layer(x)?]),
        Some(Value::Array(a)) => Some(a.iter().map(layer).collect::<Result<_>>()?),
        Some(_) => bail!("{p}: layers_to_transform must be an integer or a list"),
    };
    Ok(LoraPlan {
        r,
        alpha,
        targets,
        layers,
        rank_pattern: patterns(v.get("rank_pattern"), rank, "rank_pattern").with_context(|| p.to_string())?,
        alpha_pattern: patterns(v.get("alpha_pattern"), scale, "alpha_pattern").with_context(|| p.to_string())?,
        base_pattern: vec![],
        use_rslora: v.get("use_rslora").and_then(|x| x.as_bool()).unwrap_or(false),
        dropout: dropout as f32,
        modules_to_save,
    })
}

/// Refuses an adapter tensor holding NaN or infinity (a merge would write a non-finite model).
fn check_finite(t: &candle_core::Tensor, key: &str, file: &Path) -> Result<()> {
    let v = t.flatten_all()?.to_vec1::<f32>()?;
    if let Some(i) = v.iter().position(|x| !x.is_finite()) {
        bail!(
            "{}: `{key}` holds a non-finite value ({} at element {i}); the adapter is corrupt",
            file.display(),
            v[i]
        );
    }
    Ok(())
}

/// Loads a PEFT directory onto `model` (replacing any adapters); every expected tensor must be
/// present with the planned shape, and no tensor may be left over.
pub fn load(model: &mut Model, dir: &Path) -> Result<LoraPlan> {
    let plan = read_plan(dir, model.cfg.num_layers)?;
    // Touch the patterns once so an invalid regex is reported before any work.
    pattern_match(&plan.rank_pattern, "x")?;
    let file = dir.join("adapter_model.safetensors");
    if !file.exists() {
        bail!(
            "{}: no adapter_model.safetensors (legacy adapter_model.bin is not supported)",
            dir.display()
        );
    }
    let st = SafetensorsSource::open(std::slice::from_ref(&file))?;
    let mut unused: std::collections::BTreeSet<String> = crate::model::WeightSource::names(&st).into_iter().collect();
    let cfg = model.cfg.clone();
    let dev = model.device.clone();
    for block in &mut model.blocks {
        for m in Proj::ALL {
            block.proj[m].lora = None;
            let Some(ml) = plan.resolve(block.index, m)? else {
                continue;
            };
            let name = m.path(block.index);
            let (o, i) = cfg.linear_shape(m);
            let mut get = |ab: &str, shape: [usize; 2]| -> Result<Var> {
                let key = peft_key(&name, ab);
                if !unused.remove(&key) {
                    bail!("{}: missing tensor `{key}`", file.display());
                }
                let t = st.raw(&key)?.to_dtype(DType::F32)?;
                check_finite(&t, &key, &file)?;
                let t = t.to_device(&dev)?;
                if t.dims() != shape {
                    bail!(
                        "{}: `{key}` has shape {:?}, expected {:?} (rank {} from the config)",
                        file.display(),
                        t.dims(),
                        shape,
                        ml.r
                    );
                }
                Ok(Var::from_tensor(&t)?)
            };
            let a = get("A", [ml.r, i])?;
            let b = get("B", [o, ml.r])?;
            block.proj[m].lora = Some(Lora {
                a,
                b,
                r: ml.r,
                alpha: ml.alpha,
                scale: ml.scale,
                dropout: plan.dropout,
            });
        }
    }
    let saved: Vec<String> = model
        .savable(&plan.modules_to_save)?
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    for name in saved {
        let key = format!("base_model.model.{name}");
        if !unused.remove(&key) {
            bail!("{}: missing tensor `{key}` (listed in modules_to_save)", file.display());
        }
        let t = st.raw(&key)?.to_dtype(DType::F32)?;
        check_finite(&t, &key, &file)?;
        model
            .set_base(&name, t.to_device(&dev)?)
            .with_context(|| format!("{}: `{key}`", file.display()))?;
    }
    if let Some(extra) = unused.iter().next() {
        bail!(
            "{}: unexpected tensor `{extra}` ({} unused in all); does the adapter belong to this model?",
            file.display(),
            unused.len()
        );
    }
    Ok(plan)
}
