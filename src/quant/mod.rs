//! Quantized storage formats: bitsandbytes NF4 with double quantization.

pub mod nf4;
