//! Rank 0's half of a checkpoint: the model's tensors and the optimizer state, encoded as
//! safetensors on the training thread (a consistent snapshot, taken between two steps), then
//! put into the store on a background thread while training goes on. The coordinator hears
//! what was written and commits; a worker never commits.
//!
//! At most one upload runs at a time, and training never waits for one: the training loop
//! defers a save that comes due while the previous upload is still running (`busy`) to the
//! first step after it finished, and only the last save of a task is queued behind a running
//! upload (its thread waits for the previous one). So memory holds at most two snapshots and
//! the coordinator hears of checkpoints in step order.

use anyhow::{Context as _, Result};
use bytes::Bytes;
use candle_core::{DType, Tensor};
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;
use xkd_checkpoint::{digest_tensors, ParamDigest, Store, TensorRef, OPTIMIZER, STUDENT};
use xkd_protocol::{CheckpointOrder, SavedCheckpoint, SavedObject, WorkerMsg};

/// Where a rank's messages to the coordinator go (the control link, or nothing in tests).
pub type Sink = Arc<dyn Fn(WorkerMsg) + Send + Sync>;

/// A tensor as raw little-endian bytes, the way safetensors and the digest see it.
pub struct RawTensor {
    pub name: String,
    pub dtype: safetensors::Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl RawTensor {
    /// Copies `tensor` out (f32 and i64 only: what models and the optimizer hold).
    pub fn of(name: &str, tensor: &Tensor) -> Result<RawTensor> {
        let flat = tensor.flatten_all()?;
        let (dtype, data) = match tensor.dtype() {
            DType::F32 => (
                safetensors::Dtype::F32,
                flat.to_vec1::<f32>()?
                    .iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect(),
            ),
            DType::I64 => (
                safetensors::Dtype::I64,
                flat.to_vec1::<i64>()?
                    .iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect(),
            ),
            other => anyhow::bail!("tensor `{name}` is {other:?}; checkpoints hold f32 and i64"),
        };
        Ok(RawTensor {
            name: name.to_string(),
            dtype,
            shape: tensor.dims().to_vec(),
            data,
        })
    }
}

/// Copies every tensor out, in name order.
pub fn raw_tensors(tensors: &[(String, Tensor)]) -> Result<Vec<RawTensor>> {
    let mut raw: Vec<RawTensor> = tensors
        .iter()
        .map(|(name, t)| RawTensor::of(name, t))
        .collect::<Result<_>>()?;
    raw.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(raw)
}

/// The parameter digest of `tensors`, as `xkd checkpoint digest` computes it from a file.
pub fn digest(tensors: &[RawTensor]) -> ParamDigest {
    let dtypes: Vec<String> = tensors.iter().map(|t| t.dtype.to_string()).collect();
    digest_tensors(tensors.iter().zip(&dtypes).map(|(t, dtype)| TensorRef {
        name: &t.name,
        dtype,
        shape: &t.shape,
        data: &t.data,
    }))
}

/// `tensors` as one safetensors file.
pub fn encode(tensors: &[RawTensor]) -> Result<Bytes> {
    encode_with(tensors, None)
}

/// `tensors` as one safetensors file with the one entry `meta` in its header's
/// `__metadata__`. One entry, not a map: safetensors writes a map in its `HashMap`'s order,
/// which differs between processes, and the same tensors must always give the same bytes.
pub fn encode_with(tensors: &[RawTensor], meta: Option<(&str, String)>) -> Result<Bytes> {
    let views = tensors
        .iter()
        .map(|t| {
            let view = safetensors::tensor::TensorView::new(t.dtype, t.shape.clone(), &t.data)
                .with_context(|| format!("tensor `{}` does not match its shape", t.name))?;
            Ok((t.name.as_str(), view))
        })
        .collect::<Result<Vec<_>>>()?;
    let meta =
        meta.map(|(name, value)| std::collections::HashMap::from([(name.to_string(), value)]));
    let bytes = safetensors::serialize(views, meta).context("encoding safetensors")?;
    Ok(Bytes::from(bytes))
}

/// Reads `student.safetensors` and `optimizer.safetensors` of checkpoint `step` from the
/// store `order` names, each checked against the manifest (a mismatch is an error, never a
/// silent load). Runs on its own thread and runtime, so it works from any caller.
pub fn read_checkpoint(order: &CheckpointOrder, step: u64) -> Result<(Bytes, Bytes)> {
    on_own_runtime(|| async {
        let store = Store::open(&order.url)
            .with_context(|| format!("opening checkpoint store {}", order.url))?;
        let manifest = store.manifest(&order.run_id, step).await?;
        let student = store.read_verified(&manifest, STUDENT).await?;
        let optimizer = store.read_verified(&manifest, OPTIMIZER).await?;
        Ok((student, optimizer))
    })
}

/// `student.safetensors` of the checkpoint `url` names (`<store>/<run_id>/ckpt/<step>`),
/// checked against its manifest, or `None` when `url` names no checkpoint (a model file or
/// directory: `xkd eval` hands workers a checkpoint URL where a run hands them a path).
pub fn read_student(url: &str) -> Result<Option<Bytes>> {
    if !url.contains(&format!("/{}/", xkd_checkpoint::CKPT_DIR)) {
        return Ok(None);
    }
    let Ok(target) = xkd_checkpoint::Target::open(url, Default::default()) else {
        return Ok(None);
    };
    let Some(step) = target.step else {
        return Ok(None);
    };
    on_own_runtime(|| async {
        let manifest = target.store.manifest(&target.run_id, step).await?;
        Ok(target.store.read_verified(&manifest, STUDENT).await?)
    })
    .with_context(|| format!("reading the student of checkpoint {url}"))
    .map(Some)
}

/// Uploads every file under the local directory `dir` to the same relative names under the
/// store URL `url`, replacing what is there (a distilled student: the coordinator copies it
/// into its output directory, which need not be on this host).
pub fn publish(dir: &Path, url: &str) -> Result<()> {
    on_own_runtime(|| async {
        let store = Store::open(url)?;
        store.replace_prefix(dir).await?;
        Ok(())
    })
    .with_context(|| format!("uploading {} to {url}", dir.display()))
}

/// `work` on a thread and a runtime of its own, so that it works from any caller (the
/// compute thread, or inside the worker's async runtime).
pub(crate) fn on_own_runtime<T, F, Fut>(work: F) -> Result<T>
where
    T: Send,
    F: FnOnce() -> Fut + Send,
    Fut: std::future::Future<Output = Result<T>>,
{
    let read = || -> Result<T> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the checkpoint read runtime")?;
        runtime.block_on(work())
    };
    std::thread::scope(|s| {
        s.spawn(read)
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("the checkpoint read thread panicked")))
    })
}

/// Rank 0's checkpoint writer for one training task.
pub struct Saver {
    order: CheckpointOrder,
    task: u64,
    store: Store,
    runtime: Arc<tokio::runtime::Runtime>,
    sink: Sink,
    pending: Option<JoinHandle<()>>,
}

impl Saver {
    /// Opens the store the order names (nothing is written yet); a bad URL fails the task
    /// here, before any step is taken.
    pub fn new(task: u64, order: &CheckpointOrder, sink: Sink) -> Result<Saver> {
        // The uploads get their own runtime: training runs on a blocking thread and must not
        // depend on the control link's runtime being free.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .thread_name("xkd-ckpt-upload")
            .build()
            .context("starting the checkpoint upload runtime")?;
        let store = Store::open(&order.url)
            .with_context(|| format!("opening checkpoint store {}", order.url))?;
        Ok(Saver {
            order: order.clone(),
            task,
            store,
            runtime: Arc::new(runtime),
            sink,
            pending: None,
        })
    }

    /// Whether a checkpoint is due once `done` of `total` steps are taken.
    pub fn due(&self, done: u64, total: u64) -> bool {
        self.order.due(done, total)
    }

    /// Whether the previous upload is still running.
    pub fn busy(&self) -> bool {
        self.pending.as_ref().is_some_and(|h| !h.is_finished())
    }

    /// Uploads checkpoint `step` on a thread of its own, which first waits for the previous
    /// upload (if still running): this returns at once.
    pub fn save(&mut self, step: u64, loss: f64, student: Bytes, optimizer: Bytes) {
        let previous = self.pending.take();
        let (store, runtime, sink) = (self.store.clone(), self.runtime.clone(), self.sink.clone());
        let (run_id, task) = (self.order.run_id.clone(), self.task);
        let upload = move || {
            if let Some(previous) = previous {
                if previous.join().is_err() {
                    tracing::error!("the checkpoint upload thread panicked");
                }
            }
            let put: xkd_checkpoint::Result<Vec<_>> = runtime.block_on(async {
                let s = store.put_object(&run_id, step, STUDENT, student).await?;
                let o = store
                    .put_object(&run_id, step, OPTIMIZER, optimizer)
                    .await?;
                Ok(vec![s, o])
            });
            let msg = match put {
                Ok(entries) => WorkerMsg::Saved(SavedCheckpoint {
                    task,
                    step,
                    loss,
                    objects: entries
                        .into_iter()
                        .map(|e| SavedObject {
                            name: e.name,
                            size: e.size,
                            sha256: e.sha256,
                        })
                        .collect(),
                }),
                Err(e) => {
                    let error = e.to_string();
                    tracing::warn!(step, error, "checkpoint save failed; the next one retries");
                    WorkerMsg::SaveFailed { task, step, error }
                }
            };
            sink(msg);
        };
        match std::thread::Builder::new()
            .name(format!("xkd-ckpt-{step}"))
            .spawn(upload)
        {
            Ok(handle) => self.pending = Some(handle),
            Err(e) => {
                let error = format!("starting the upload thread: {e}");
                tracing::warn!(step, error, "checkpoint save failed; the next one retries");
                (self.sink)(WorkerMsg::SaveFailed { task, step, error });
            }
        }
    }

    /// Waits for the upload in flight, if any.
    pub fn wait(&mut self) {
        if let Some(handle) = self.pending.take() {
            if handle.join().is_err() {
                tracing::error!("the checkpoint upload thread panicked");
            }
        }
    }
}

impl Drop for Saver {
    fn drop(&mut self) {
        self.wait();
    }
}
