//! Forgetting suppression: Fisher information on general data, EWC on the weights that move,
//! and the contrastive retention loss.

pub mod contrastive;
pub mod ewc;
pub mod fisher;

pub use ewc::Ewc;
pub use fisher::{Estimator, Fisher, FisherFormat, FisherMeta, FisherTensor};
