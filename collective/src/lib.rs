//! The gradient collective: every rank hands in its local gradients and gets back the mean over
//! all ranks.
//!
//! On GPUs it is NCCL (`crate::nccl`, the `cuda` feature); on CPU a ring all-reduce over TCP
//! stands in (see DESIGN.md, "Control plane and data plane"). Both sit behind [`Collective`] so
//! the training step does not care which one it talks to.
//!
//! The CPU ring is the classic bandwidth-optimal one: the buffer is split into W chunks, a
//! reduce-scatter of W-1 steps leaves each rank owning one fully summed chunk, the owner divides
//! it by W, and an all-gather of W-1 steps copies the owner's bytes to everyone. Because each
//! chunk is summed in a fixed ring order and only the owner divides, every rank ends with
//! bit-identical values and a run repeats bit-for-bit.
//!
//! `buckets` packs a model's gradients into the flat buffers these all-reduce. The ring lives in
//! `ring.rs`, NCCL in `nccl.rs` (the `cuda` feature).

pub mod buckets;
#[cfg(feature = "cuda")]
pub mod nccl;
mod ring;

pub use buckets::Buckets;
pub use ring::{RingKey, RingListener, TcpRing};

use candle_core::Tensor;
use std::io;
use std::time::Duration;

pub trait Collective: Send {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Replace `data` on every rank by the elementwise mean over ranks. Every rank ends with
    /// bit-identical values, and the result is a deterministic function of the inputs.
    fn all_reduce_mean(&mut self, data: &mut [f32]) -> Result<(), CollectiveError>;
    /// Replace each of `buckets` (flat f32 tensors of the same lengths on every rank) by its
    /// elementwise mean over ranks, on the bucket's device, with the guarantees of
    /// `all_reduce_mean`. This default goes through host memory one bucket at a time (the CPU
    /// ring); the NCCL collective averages on the GPU, all buckets in one NCCL group.
    fn all_reduce_buckets(&mut self, buckets: &mut [Tensor]) -> Result<(), CollectiveError> {
        let rank = self.rank();
        let tensor = |source| CollectiveError::Tensor { rank, source };
        for bucket in buckets.iter_mut() {
            let mut host = bucket.to_vec1::<f32>().map_err(tensor)?;
            self.all_reduce_mean(&mut host)?;
            let n = host.len();
            *bucket = Tensor::from_vec(host, n, bucket.device()).map_err(tensor)?;
        }
        Ok(())
    }
    /// Block until every rank has called barrier.
    fn barrier(&mut self) -> Result<(), CollectiveError>;
    /// `barrier` under its own deadline instead of the collective timeout: ranks reach the
    /// first barrier after loading their models, which may take far longer on one rank than
    /// on another, and that wait says nothing about a step's health. The collective timeout
    /// applies again afterwards.
    fn barrier_within(&mut self, limit: Duration) -> Result<(), CollectiveError>;
}

/// Everything that can go wrong in the collective; each variant names who failed and at what.
#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    #[error("invalid collective configuration for rank {rank}: {reason}")]
    Config { rank: usize, reason: String },
    #[error("cannot bind the collective listener on {addr}: {source}")]
    Bind { addr: String, source: io::Error },
    #[error("rank {rank} could not connect to rank {peer} at {addr} before the timeout: {source}")]
    Connect {
        rank: usize,
        peer: usize,
        addr: String,
        source: io::Error,
    },
    #[error("rank {rank} did not get a connection from rank {peer}: {source}")]
    Accept {
        rank: usize,
        peer: usize,
        source: io::Error,
    },
    #[error("rank {rank}: socket {action} with rank {peer} failed: {source}")]
    Socket {
        rank: usize,
        peer: usize,
        action: &'static str,
        source: io::Error,
    },
    #[error("rank {rank}: handshake with expected rank {peer} failed: {reason}")]
    Handshake {
        rank: usize,
        peer: usize,
        reason: String,
    },
    #[error("rank {rank}: sending step {step} to rank {peer} failed: {source}")]
    Send {
        rank: usize,
        peer: usize,
        step: u32,
        source: io::Error,
    },
    #[error("rank {rank}: receiving step {step} from rank {peer} failed: {source}")]
    Recv {
        rank: usize,
        peer: usize,
        step: u32,
        source: io::Error,
    },
    #[error(
        "rank {rank}: rank {peer} is out of step: expected step {expected_step} with \
         {expected_len} bytes, got step {got_step} with {got_len} bytes"
    )]
    Desync {
        rank: usize,
        peer: usize,
        expected_step: u32,
        expected_len: usize,
        got_step: u32,
        got_len: usize,
    },
    #[error("rank {rank}: the thread sending to rank {peer} panicked")]
    SenderPanicked { rank: usize, peer: usize },
    #[error("rank {rank}: an earlier collective failed, the collective is no longer usable")]
    Poisoned { rank: usize },
    #[error("rank {rank}: moving a gradient bucket: {source}")]
    Tensor {
        rank: usize,
        source: candle_core::Error,
    },
    #[error("rank {rank}: NCCL {op} failed: {detail}")]
    Nccl {
        rank: usize,
        op: &'static str,
        detail: String,
    },
    #[error(
        "rank {rank}: the NCCL all-reduce did not finish within {timeout:?} (a rank is gone or \
         stuck); the communicator was aborted"
    )]
    Timeout { rank: usize, timeout: Duration },
}

/// World size 1: nothing to talk to, so the mean is the data itself.
#[derive(Debug, Default, Clone, Copy)]
pub struct Solo;

impl Collective for Solo {
    fn rank(&self) -> usize {
        0
    }

    fn world_size(&self) -> usize {
        1
    }

    fn all_reduce_mean(&mut self, _data: &mut [f32]) -> Result<(), CollectiveError> {
        Ok(())
    }

    fn all_reduce_buckets(&mut self, _buckets: &mut [Tensor]) -> Result<(), CollectiveError> {
        Ok(())
    }

    fn barrier(&mut self) -> Result<(), CollectiveError> {
        Ok(())
    }

    fn barrier_within(&mut self, _limit: Duration) -> Result<(), CollectiveError> {
        Ok(())
    }
}
