//! The engine: one optimizer step's mathematics, knowing nothing of recipes or runs. A
//! micro-batch's explicit forward and backward with recomputation ([`step`]), gradients
//! accumulated across micro-batches, and AdamW ([`optim`]).

pub mod adam8;
pub mod optim;
pub mod step;

pub use optim::AdamW;
pub use step::{forward_backward, forward_backward_with, Batch, Extra, ExtraTerm, GradAcc, Recompute, StepStats};
