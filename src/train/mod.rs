//! Training runs: recipes and the typed plan they resolve to, the run itself in named phases,
//! learning-rate schedules, callbacks (data mix, memory monitor), checkpoints and the memory
//! predictor. One optimizer step's mathematics is the [`crate::engine`]'s.

pub mod callback;
pub mod checkpoint;
pub mod fisher;
pub mod memory;
pub mod recipe;
pub mod schedule;
pub mod tensorboard;
pub mod trainer;
