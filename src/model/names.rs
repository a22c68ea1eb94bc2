//! Every tensor name strata reads or writes, in one table: the seven projections of a block
//! (the modules LoRA adapts) and the base tensors around them, each with its Hugging Face /
//! PEFT name and its GGUF name. Loaders, savers, merges, plans and memory estimates all read
//! names from here, so a new architecture's naming is added in one place.

use std::ops::{Index, IndexMut};

/// A projection of a decoder block, in the order PEFT and Hugging Face list them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proj {
    /// Query projection, `self_attn.q_proj`.
    Q,
    /// Key projection, `self_attn.k_proj`.
    K,
    /// Value projection, `self_attn.v_proj`.
    V,
    /// Attention output projection, `self_attn.o_proj`.
    O,
    /// MLP gate, `mlp.gate_proj`.
    Gate,
    /// MLP up projection, `mlp.up_proj`.
    Up,
    /// MLP down projection, `mlp.down_proj`.
    Down,
}

/// The names of one projection: (module name, parent module, GGUF name).
const PROJ_NAMES: [(&str, &str, &str); Proj::COUNT] = [
    ("q_proj", "self_attn", "attn_q"),
    ("k_proj", "self_attn", "attn_k"),
    ("v_proj", "self_attn", "attn_v"),
    ("o_proj", "self_attn", "attn_output"),
    ("gate_proj", "mlp", "ffn_gate"),
    ("up_proj", "mlp", "ffn_up"),
    ("down_proj", "mlp", "ffn_down"),
];

/// The seven projection module names, in [`Proj`] order (PEFT's `target_modules` vocabulary).
pub const MODULES: [&str; Proj::COUNT] = [
    PROJ_NAMES[0].0,
    PROJ_NAMES[1].0,
    PROJ_NAMES[2].0,
    PROJ_NAMES[3].0,
    PROJ_NAMES[4].0,
    PROJ_NAMES[5].0,
    PROJ_NAMES[6].0,
];

impl Proj {
    /// How many projections a block has.
    pub const COUNT: usize = 7;
    /// Every projection, in order.
    pub const ALL: [Proj; Proj::COUNT] = [Proj::Q, Proj::K, Proj::V, Proj::O, Proj::Gate, Proj::Up, Proj::Down];

    /// Position in [`Proj::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// The module name (`q_proj` ...).
    pub fn name(self) -> &'static str {
        PROJ_NAMES[self.index()].0
    }

    /// The module it sits under: `self_attn` or `mlp`.
    pub fn parent(self) -> &'static str {
        PROJ_NAMES[self.index()].1
    }

    /// The GGUF name (`attn_q` ...).
    pub fn gguf(self) -> &'static str {
        PROJ_NAMES[self.index()].2
    }

    /// The projection a module name (`q_proj` ...) names.
    pub fn from_name(name: &str) -> Option<Proj> {
        Proj::ALL.into_iter().find(|p| p.name() == name)
    }

    /// Whether Qwen2-style models give it a bias.
    pub fn has_qkv_bias(self) -> bool {
        matches!(self, Proj::Q | Proj::K | Proj::V)
    }

    /// The module path in layer `layer`: `model.layers.{layer}.self_attn.q_proj` (tensor names
    /// append `.weight` / `.bias`; PEFT's append `.lora_A.weight` ...).
    pub fn path(self, layer: usize) -> String {
        format!("{LAYERS}.{layer}.{}.{}", self.parent(), self.name())
    }
}

/// One value per projection, indexed by [`Proj`] (a block's projections, a layer's base
/// precisions or adapter ranks).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PerProj<T>(pub [T; Proj::COUNT]);

impl<T> PerProj<T> {
    /// Builds each entry from its projection.
    pub fn from_fn(f: impl FnMut(Proj) -> T) -> Self {
        PerProj(Proj::ALL.map(f))
    }

    /// `(projection, value)` in order.
    pub fn iter(&self) -> impl Iterator<Item = (Proj, &T)> {
        Proj::ALL.into_iter().zip(self.0.iter())
    }

    /// The values in order.
    pub fn values(&self) -> std::slice::Iter<'_, T> {
        self.0.iter()
    }

    /// The values in order, mutably.
    pub fn values_mut(&mut self) -> std::slice::IterMut<'_, T> {
        self.0.iter_mut()
    }
}

impl<T> Index<Proj> for PerProj<T> {
    type Output = T;
    fn index(&self, p: Proj) -> &T {
        &self.0[p.index()]
    }
}

impl<T> IndexMut<Proj> for PerProj<T> {
    fn index_mut(&mut self, p: Proj) -> &mut T {
        &mut self.0[p.index()]
    }
}

/// The prefix of every per-layer Hugging Face tensor.
pub const LAYERS: &str = "model.layers";

/// A base tensor that is not a projection: embeddings, norms, the LM head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BaseTensor {
    /// Token embeddings `[vocab, hidden]`.
    Embed,
    /// The untied LM head `[vocab, hidden]`.
    Head,
    /// The final RMSNorm.
    Norm,
    /// A block's pre-attention RMSNorm.
    AttnNorm,
    /// A block's pre-MLP RMSNorm.
    MlpNorm,
    /// Qwen3's per-head RMSNorm of the queries, `[head_dim]`.
    QNorm,
    /// Qwen3's per-head RMSNorm of the keys, `[head_dim]`.
    KNorm,
    /// Gemma 3's RMSNorm of the attention output, before the residual add.
    PostAttnNorm,
    /// Gemma 3's pre-MLP RMSNorm (its Hugging Face name differs from Llama's [`BaseTensor::MlpNorm`]).
    PreMlpNorm,
    /// Gemma 3's RMSNorm of the MLP output, before the residual add.
    PostMlpNorm,
}

/// (module name as PEFT's `modules_to_save` says it, HF tensor name or per-layer suffix, GGUF
/// name or per-layer suffix, per layer). Two families may give one name to different kinds
/// (Llama's pre-MLP norm is Gemma's `post_attention_layernorm`), so per-layer lookups take the
/// family's norms.
const BASE_NAMES: [(BaseTensor, &str, &str, &str, bool); 10] = [
    (
        BaseTensor::Embed,
        "embed_tokens",
        "model.embed_tokens.weight",
        "token_embd.weight",
        false,
    ),
    (BaseTensor::Head, "lm_head", "lm_head.weight", "output.weight", false),
    (
        BaseTensor::Norm,
        "norm",
        "model.norm.weight",
        "output_norm.weight",
        false,
    ),
    (
        BaseTensor::AttnNorm,
        "input_layernorm",
        "input_layernorm",
        "attn_norm",
        true,
    ),
    (
        BaseTensor::MlpNorm,
        "post_attention_layernorm",
        "post_attention_layernorm",
        "ffn_norm",
        true,
    ),
    (BaseTensor::QNorm, "q_norm", "self_attn.q_norm", "attn_q_norm", true),
    (BaseTensor::KNorm, "k_norm", "self_attn.k_norm", "attn_k_norm", true),
    (
        BaseTensor::PostAttnNorm,
        "post_attention_layernorm",
        "post_attention_layernorm",
        "post_attention_norm",
        true,
    ),
    (
        BaseTensor::PreMlpNorm,
        "pre_feedforward_layernorm",
        "pre_feedforward_layernorm",
        "ffn_norm",
        true,
    ),
    (
        BaseTensor::PostMlpNorm,
        "post_feedforward_layernorm",
        "post_feedforward_layernorm",
        "post_ffw_norm",
        true,
    ),
];

/// The base modules that can be trained in full beside adapters (PEFT's `modules_to_save`
/// vocabulary), in [`BaseTensor`] order.
pub const SAVABLE: [&str; 9] = [
    BASE_NAMES[0].1,
    BASE_NAMES[1].1,
    BASE_NAMES[2].1,
    BASE_NAMES[3].1,
    BASE_NAMES[4].1,
    BASE_NAMES[5].1,
    BASE_NAMES[6].1,
    BASE_NAMES[8].1,
    BASE_NAMES[9].1,
];

impl BaseTensor {
    /// Every base tensor kind (also the order of PEFT's `modules_to_save` vocabulary).
    pub const ALL: [BaseTensor; 10] = [
        BaseTensor::Embed,
        BaseTensor::Head,
        BaseTensor::Norm,
        BaseTensor::AttnNorm,
        BaseTensor::MlpNorm,
        BaseTensor::QNorm,
        BaseTensor::KNorm,
        BaseTensor::PostAttnNorm,
        BaseTensor::PreMlpNorm,
        BaseTensor::PostMlpNorm,
    ];

    fn row(self) -> &'static (BaseTensor, &'static str, &'static str, &'static str, bool) {
        &BASE_NAMES[self as usize]
    }

    /// The module name (`embed_tokens`, `lm_head`, `norm`, `input_layernorm`, ...).
    pub fn module(self) -> &'static str {
        self.row().1
    }

    /// The kind a module name names in a family whose per-layer norms are `norms`.
    pub fn from_module(m: &str, norms: &[BaseTensor]) -> Option<BaseTensor> {
        BaseTensor::ALL
            .into_iter()
            .find(|b| b.module() == m && (!b.per_layer() || norms.contains(b)))
    }

    /// Whether each block has its own (the norms inside blocks).
    pub fn per_layer(self) -> bool {
        self.row().4
    }

    /// The Hugging Face tensor name; `layer` is read for per-layer tensors only.
    pub fn hf(self, layer: usize) -> String {
        match self.per_layer() {
            true => format!("{LAYERS}.{layer}.{}.weight", self.row().2),
            false => self.row().2.to_string(),
        }
    }
}

/// The per-layer norm rows of a family (Llama's when `norms` is empty).
fn norm_rows(
    norms: &[BaseTensor],
) -> impl Iterator<Item = &'static (BaseTensor, &'static str, &'static str, &'static str, bool)> + '_ {
    const LLAMA: [BaseTensor; 4] = [
        BaseTensor::AttnNorm,
        BaseTensor::MlpNorm,
        BaseTensor::QNorm,
        BaseTensor::KNorm,
    ];
    let norms = if norms.is_empty() { &LLAMA[..] } else { norms };
    BASE_NAMES.iter().filter(move |r| r.4 && norms.contains(&r.0))
}

/// The GGUF name of a Hugging Face tensor name in a family whose per-layer norms are `norms`
/// (empty: Llama's) (`None`: not a tensor of the supported families).
pub fn hf_to_gguf(name: &str, norms: &[BaseTensor]) -> Option<String> {
    if let Some(r) = BASE_NAMES.iter().find(|r| !r.4 && r.2 == name) {
        return Some(r.3.to_string());
    }
    let rest = name.strip_prefix(LAYERS)?.strip_prefix('.')?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = rest.rsplit_once('.')?;
    let g = match norm_rows(norms).find(|r| r.2 == module) {
        Some(r) => r.3,
        None => Proj::ALL
            .into_iter()
            .find(|p| module.strip_prefix(p.parent()).and_then(|m| m.strip_prefix('.')) == Some(p.name()))?
            .gguf(),
    };
    Some(format!("blk.{layer}.{g}.{kind}"))
}

/// The projection a GGUF tensor (`blk.N.attn_q.weight` ...) belongs to, if any.
pub fn gguf_proj(name: &str) -> Option<Proj> {
    let module = name.strip_prefix("blk.")?.split('.').nth(1)?;
    Proj::ALL.into_iter().find(|p| p.gguf() == module)
}

/// The Hugging Face name of a GGUF tensor name in a family whose per-layer norms are `norms`
/// (empty: Llama's) (`None`: a tensor strata does not model).
pub fn gguf_to_hf(name: &str, norms: &[BaseTensor]) -> Option<String> {
    if let Some(r) = BASE_NAMES.iter().find(|r| !r.4 && r.3 == name) {
        return Some(r.2.to_string());
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (module, kind) = rest.rsplit_once('.')?;
    let h = match norm_rows(norms).find(|r| r.3 == module) {
        Some(r) => r.2.to_string(),
        None => {
            let p = Proj::ALL.into_iter().find(|p| p.gguf() == module)?;
            format!("{}.{}", p.parent(), p.name())
        }
    };
    Some(format!("{LAYERS}.{layer}.{h}.{kind}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_between_hf_and_gguf() {
        for n in [
            "model.layers.3.self_attn.q_proj.weight",
            "model.layers.0.mlp.down_proj.weight",
            "lm_head.weight",
            "model.embed_tokens.weight",
            "model.norm.weight",
            "model.layers.2.self_attn.k_proj.bias",
            "model.layers.7.post_attention_layernorm.weight",
            "model.layers.5.self_attn.q_norm.weight",
            "model.layers.0.self_attn.k_norm.weight",
        ] {
            assert_eq!(gguf_to_hf(&hf_to_gguf(n, &[]).unwrap(), &[]).unwrap(), n);
        }
        // Gemma 3 gives `post_attention_layernorm` to the norm after attention.
        let gemma = [
            BaseTensor::AttnNorm,
            BaseTensor::PostAttnNorm,
            BaseTensor::PreMlpNorm,
            BaseTensor::PostMlpNorm,
            BaseTensor::QNorm,
            BaseTensor::KNorm,
        ];
        for (hf, gguf) in [
            (
                "model.layers.7.post_attention_layernorm.weight",
                "blk.7.post_attention_norm.weight",
            ),
            (
                "model.layers.7.pre_feedforward_layernorm.weight",
                "blk.7.ffn_norm.weight",
            ),
            (
                "model.layers.7.post_feedforward_layernorm.weight",
                "blk.7.post_ffw_norm.weight",
            ),
        ] {
            assert_eq!(hf_to_gguf(hf, &gemma).unwrap(), gguf);
            assert_eq!(gguf_to_hf(gguf, &gemma).unwrap(), hf);
        }
        assert_eq!(
            BaseTensor::from_module("post_attention_layernorm", &gemma),
            Some(BaseTensor::PostAttnNorm)
        );
        assert_eq!(
            BaseTensor::from_module("post_attention_layernorm", &[BaseTensor::AttnNorm, BaseTensor::MlpNorm]),
            Some(BaseTensor::MlpNorm)
        );
        assert_eq!(hf_to_gguf("model.layers.1.mlp.q_proj.weight", &[]), None);
        assert_eq!(
            hf_to_gguf("model.layers.1.input_layernorm.weight", &[]).unwrap(),
            "blk.1.attn_norm.weight"
        );
        assert_eq!(Proj::Down.path(4), "model.layers.4.mlp.down_proj");
        assert_eq!(gguf_proj("blk.3.attn_k.bias"), Some(Proj::K));
        assert_eq!(gguf_proj("blk.3.attn_norm.weight"), None);
        assert_eq!(gguf_proj("blk.3.attn_q_norm.weight"), None);
        assert_eq!(
            hf_to_gguf("model.layers.1.self_attn.k_norm.weight", &[]).unwrap(),
            "blk.1.attn_k_norm.weight"
        );
        assert_eq!(gguf_proj("token_embd.weight"), None);
        assert_eq!(
            BaseTensor::MlpNorm.hf(2),
            "model.layers.2.post_attention_layernorm.weight"
        );
        assert_eq!(MODULES[4], "gate_proj");
        assert!(Proj::ALL.iter().enumerate().all(|(i, p)| p.index() == i));
        assert!(BaseTensor::ALL.iter().all(|&b| b.row().0 == b));
    }
}
