//! The run: config, hard-class heuristic, shard plans, rendezvous, health, and the order of
//! stages. The coordinator never touches tensors: it sees statistics, manifests and messages.

pub mod bars;
pub mod checkpoint;
pub mod decisions;
mod driver;
pub mod heuristic;
mod local;
pub mod metrics;
pub mod pictures;
pub mod report;
pub mod run;
pub mod server;
mod stages;
