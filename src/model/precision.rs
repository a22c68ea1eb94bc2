//! The precisions a frozen base can be held in (`model.base_dtype`, per-layer `base`): every
//! choice strata offers, in one place.

use anyhow::{bail, Result};
use candle_core::DType;

/// Storage precision of the frozen base.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BaseDtype {
    /// 32-bit floats.
    F32,
    /// bfloat16 storage (strata's AVX512-BF16 kernel where the CPU has it, candle elsewhere).
    Bf16,
    /// Projections kept in the file's own quantization (GGUF Q4_0/Q4_1/Q8_0/K-quants),
    /// dequantized inside the op; unquantized tensors stay f32.
    AsStored,
    /// Projections quantized to NF4 at load (bitsandbytes' format, blocks of 64).
    Nf4,
    /// NF4 with double-quantized block scales (`bnb_4bit_use_double_quant`).
    Nf4Dq,
}

crate::parsed_from_str!(BaseDtype);

impl BaseDtype {
    /// Parses `f32`, `bf16`, `nf4`, `nf4-dq` or `as-stored`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(Self::F32),
            "bf16" => Ok(Self::Bf16),
            "as-stored" => Ok(Self::AsStored),
            "nf4" => Ok(Self::Nf4),
            "nf4-dq" => Ok(Self::Nf4Dq),
            o => bail!("base precision `{o}` is not supported; choose f32, bf16, nf4, nf4-dq or as-stored"),
        }
    }

    /// The name recipes use.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
            Self::AsStored => "as-stored",
            Self::Nf4 => "nf4",
            Self::Nf4Dq => "nf4-dq",
        }
    }

    /// The dense dtype a projection of this precision is stored in (f32 for the quantized
    /// ones, whose dense fallbacks are f32).
    pub fn dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::Bf16 => DType::BF16,
            Self::AsStored | Self::Nf4 | Self::Nf4Dq => DType::F32,
        }
    }
}

/// How a layer ranks for keeping its frozen products under selective recomputation, from the
/// bases of its adapted projections: 0 for quantized bases (a re-run decodes them before the
/// GEMM), 1 for 16-bit, 2 for f32 (kept at twice the bytes), the best of them; 3 with no
/// adapted projection (nothing to keep).
pub fn keep_rank(adapted_bases: impl IntoIterator<Item = BaseDtype>) -> u8 {
    adapted_bases
        .into_iter()
        .map(|b| match b {
            BaseDtype::F32 => 2,
            BaseDtype::Bf16 => 1,
            _ => 0,
        })
        .min()
        .unwrap_or(3)
}
