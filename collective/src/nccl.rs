//! The GPU collective: NCCL through cudarc's bindings (the `cuda` feature).
//!
//! Rank 0 creates the unique id ([`unique_id`]), the coordinator hands it to every rank
//! (`CollectiveKind::Nccl`), and each rank builds its communicator on the CUDA stream of the
//! rank's device (its own stream, not the per-thread default: `train::device`) in
//! [`Nccl::connect`], so the all-reduce is ordered after the backward kernels that produced
//! the gradients and before the optimizer kernels that read them, with no extra event.
//!
//! One step's buckets are summed in one NCCL group (`ncclSum`, into fresh buffers that become
//! the bucket tensors, divided by the world size after it; see `enqueue` for why not
//! `ncclAvg`). Nothing waits forever: communicator set-up runs under the caller's
//! timeout, and after each group the stream is polled until it drains or the collective
//! timeout passes, which fails the task with [`CollectiveError::Timeout`]; the coordinator then
//! restarts the generation and the dropped communicator is aborted.

use crate::{Collective, CollectiveError};
use candle_core::cuda_backend::cudarc::driver::sys;
use candle_core::cuda_backend::cudarc::nccl::{group_end, group_start, Comm, Id, ReduceOp};
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, Device, Storage, Tensor};
use std::time::{Duration, Instant};
use xkd_protocol::NCCL_UNIQUE_ID_BYTES;

/// How often a draining stream is polled: short next to a step, long next to a kernel launch.
const POLL: Duration = Duration::from_micros(200);

/// A new NCCL unique id as the bytes that cross the wire (rank 0 only). It also opens NCCL's
/// bootstrap listener on this host, which the other ranks reach while they connect.
pub fn unique_id() -> anyhow::Result<Vec<u8>> {
    let id = Id::new().map_err(|e| anyhow::anyhow!("ncclGetUniqueId failed: {e:?}"))?;
    Ok(id.internal().iter().map(|&c| c as u8).collect())
}

/// An NCCL communicator. cudarc's `Comm` holds a raw pointer and so is not `Send`; NCCL allows
/// a communicator to move between threads as long as two threads never use it at once, and
/// `Nccl` is only used through `&mut self`.
struct SendComm(Comm);

// SAFETY: see `SendComm`: the communicator is used by one thread at a time (`&mut self`).
unsafe impl Send for SendComm {}

pub struct Nccl {
    comm: SendComm,
    device: CudaDevice,
    rank: usize,
    world: usize,
    timeout: Duration,
    poisoned: bool,
}

impl Nccl {
    /// Joins the communicator of `world` ranks named by `id` on `device`'s stream. Blocks until
    /// every rank has joined (NCCL's bootstrap): run it where the caller can give up.
    pub fn connect(
        device: &Device,
        rank: usize,
        world: usize,
        id: &[u8],
        timeout: Duration,
    ) -> Result<Nccl, CollectiveError> {
        let config = |reason: String| CollectiveError::Config { rank, reason };
        let Device::Cuda(dev) = device else {
            return Err(config(format!("NCCL needs a CUDA device, not {device:?}")));
        };
        let internal: [std::ffi::c_char; NCCL_UNIQUE_ID_BYTES] = id
            .iter()
            .map(|&b| b as std::ffi::c_char)
            .collect::<Vec<_>>()
            .try_into()
            .map_err(|_| {
                config(format!(
                    "an NCCL unique id has {NCCL_UNIQUE_ID_BYTES} bytes, not {}",
                    id.len()
                ))
            })?;
        let stream = dev.cuda_stream();
        stream
            .context()
            .bind_to_thread()
            .map_err(|e| config(format!("binding the CUDA context: {e:?}")))?;
        let comm = Comm::from_rank(stream, rank, world, Id::uninit(internal))
            .map_err(|e| nccl(rank, "ncclCommInitRank", e))?;
        Ok(Nccl {
            comm: SendComm(comm),
            device: dev.clone(),
            rank,
            world,
            timeout,
            poisoned: false,
        })
    }

    /// Enqueues the sum of `bucket` over ranks into a new buffer (inside the open group). Not
    /// `ncclAvg`: on one rank, NCCL 2.28.9 (PyTorch's wheel on the H200 machine) leaves the
    /// last `count % 4` elements of an out-of-place `ncclAvg` of a long buffer unwritten (a
    /// CuPy check on the same library: tests/gpu/RESULTS.md); `ncclSum` writes them all. The
    /// sum is divided by the world size after the group.
    fn enqueue(&self, bucket: &Tensor) -> Result<Tensor, CollectiveError> {
        let rank = self.rank;
        let tensor = |source| CollectiveError::Tensor { rank, source };
        let bucket = bucket.contiguous().map_err(tensor)?;
        let (storage, layout) = bucket.storage_and_layout();
        let Storage::Cuda(cuda) = &*storage else {
            return Err(CollectiveError::Config {
                rank,
                reason: "a gradient bucket is not on the GPU".into(),
            });
        };
        let (start, end) = layout.contiguous_offsets().expect("made contiguous above");
        let src = cuda
            .as_cuda_slice::<f32>()
            .map_err(tensor)?
            .slice(start..end);
        // SAFETY: every element is written by the all-reduce before the tensor is read, and
        // reads are ordered after it on the same stream.
        let mut dst = unsafe { self.device.alloc::<f32>(end - start) }.map_err(tensor)?;
        self.comm
            .0
            .all_reduce(&src, &mut dst, &ReduceOp::Sum)
            .map_err(|e| nccl(rank, "ncclAllReduce", e))?;
        drop(storage);
        Ok(Tensor::from_storage(
            Storage::Cuda(CudaStorage::wrap_cuda_slice(dst, self.device.clone())),
            bucket.shape().clone(),
            BackpropOp::none(),
            false,
        ))
    }

    /// Waits until the stream has run everything enqueued so far, or the timeout passes.
    fn drain(&self) -> Result<(), CollectiveError> {
        let stream = self.comm.0.stream();
        let deadline = Instant::now() + self.timeout;
        loop {
            // SAFETY: the stream handle is alive (held by `stream`).
            match unsafe { sys::cuStreamQuery(stream.cu_stream()) } {
                sys::CUresult::CUDA_SUCCESS => return Ok(()),
                sys::CUresult::CUDA_ERROR_NOT_READY if Instant::now() < deadline => {
                    std::thread::sleep(POLL)
                }
                sys::CUresult::CUDA_ERROR_NOT_READY => {
                    return Err(CollectiveError::Timeout {
                        rank: self.rank,
                        timeout: self.timeout,
                    })
                }
                other => {
                    return Err(CollectiveError::Nccl {
                        rank: self.rank,
                        op: "the all-reduce's stream",
                        detail: format!("{other:?}"),
                    })
                }
            }
        }
    }

    fn all_reduce_group(&mut self, buckets: &mut [Tensor]) -> Result<(), CollectiveError> {
        let rank = self.rank;
        group_start().map_err(|e| nccl(rank, "ncclGroupStart", e))?;
        let enqueued: Result<Vec<Tensor>, CollectiveError> =
            buckets.iter().map(|b| self.enqueue(b)).collect();
        // The group is closed whatever happened inside it, so NCCL's state stays consistent.
        let ended = group_end().map_err(|e| nccl(rank, "ncclGroupEnd", e));
        let sums = enqueued?;
        ended?;
        self.drain()?;
        let tensor = |source| CollectiveError::Tensor { rank, source };
        for (bucket, sum) in buckets.iter_mut().zip(sums) {
            *bucket = if self.world > 1 {
                sum.affine(1.0 / self.world as f64, 0.0).map_err(tensor)?
            } else {
                sum
            };
        }
        Ok(())
    }
}

fn nccl(rank: usize, op: &'static str, e: impl std::fmt::Debug) -> CollectiveError {
    CollectiveError::Nccl {
        rank,
        op,
        detail: format!("{e:?}"),
    }
}

impl Collective for Nccl {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_mean(&mut self, data: &mut [f32]) -> Result<(), CollectiveError> {
        let rank = self.rank;
        let tensor = |source| CollectiveError::Tensor { rank, source };
        let device = Device::Cuda(self.device.clone());
        let mut bucket = [Tensor::from_slice(data, data.len(), &device).map_err(tensor)?];
        self.all_reduce_buckets(&mut bucket)?;
        data.copy_from_slice(&bucket[0].to_vec1::<f32>().map_err(tensor)?);
        Ok(())
    }

    fn all_reduce_buckets(&mut self, buckets: &mut [Tensor]) -> Result<(), CollectiveError> {
        if self.poisoned {
            return Err(CollectiveError::Poisoned { rank: self.rank });
        }
        let result = self.all_reduce_group(buckets);
        self.poisoned = result.is_err();
        result
    }

    fn barrier(&mut self) -> Result<(), CollectiveError> {
        self.all_reduce_mean(&mut [0.0])
    }

    fn barrier_within(&mut self, limit: Duration) -> Result<(), CollectiveError> {
        let timeout = std::mem::replace(&mut self.timeout, limit);
        let waited = self.barrier();
        self.timeout = timeout;
        waited
    }
}
