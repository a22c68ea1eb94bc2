//! Training: the explicit forward/backward step, AdamW, schedules, the trainer loop, recipes.

pub mod callback;
pub mod checkpoint;
pub mod memory;
pub mod optim;
pub mod recipe;
pub mod schedule;
pub mod step;
pub mod trainer;

pub use step::{forward_backward, Batch, GradAcc, Recompute, StepStats};
