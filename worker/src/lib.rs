//! One rank of a run: the session with the coordinator, the control-plane client, the training
//! and evaluation steps with their losses, the optimizer and rank 0's checkpoint saver.
//! Datasets are `xkd-data`'s, models `xkd-models`', the gradient collective `xkd-collective`'s.
//!
//! A worker never decides membership and never commits a checkpoint: it does the work it is
//! ordered to do and reports what happened.

pub mod client;
pub mod hold;
pub mod optim;
pub mod plan;
pub mod progress;
pub mod ring_host;
pub mod saver;
pub mod session;
pub mod train;
