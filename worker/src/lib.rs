//! One rank of a run: data loading, features, models, the training and evaluation steps, the
//! gradient collective, and the control-plane client that takes orders from the coordinator.
//!
//! A worker never decides membership and never commits a checkpoint: it does the work it is
//! ordered to do and reports what happened.

pub mod buckets;
pub mod client;
pub mod collective;
pub mod data;
pub mod features;
pub mod hold;
pub mod model;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod net;
pub mod nn;
pub mod optim;
pub mod qwen;
pub mod saver;
pub mod session;
pub mod train;
