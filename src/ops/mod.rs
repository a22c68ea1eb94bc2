//! Differentiable building blocks of the decoder.
//!
//! candle's fused ops (`candle_nn::ops::rms_norm`, `softmax_last_dim`, `rotary_emb`) have no
//! backward and silently cut the gradient (DESIGN pitfall 2), and its matmul backward computes a
//! gradient for frozen weights (pitfall 1). Everything here either has its own backward or is a
//! composition of candle primitives whose backward is correct.

pub mod attention;
pub mod bf16_gemm;
pub mod frozen_linear;
pub mod fused_attention;
pub mod lm_head;
pub mod norm;
pub mod rope;
pub mod swiglu;

pub use frozen_linear::{frozen_linear, frozen_matmul};
