//! `xkd-checkpoint`: checkpoints in an object store (local disk, S3-compatible, GCS, Azure),
//! chosen by URL.
//!
//! Layout: `<store>/<run_id>/ckpt/<step, 10 digits>/<object>`, where a checkpoint is any set of
//! named objects (`student.safetensors`, `optimizer.safetensors`, `state.json`, and whatever
//! else a caller adds) plus `MANIFEST.json`; and `<store>/<run_id>/run/<object>`, objects of
//! the run as a whole (what it decided once, for every later start to reuse), each put whole
//! in one request. The manifest is written last, with a create-only
//! put, and lists every object with its size and sha256: a checkpoint exists only when its
//! manifest exists and every object it lists verifies.
//!
//! Saving is `put_object` for each object, then `commit`. Resuming is `newest_verified`, then
//! `read_verified` for each object. `prune` keeps the newest K. This crate handles bytes, names
//! and hashes only; it never interprets tensors beyond the safetensors table the parameter
//! digest reads, and it never decides when to save.

mod client;
mod digest;
mod error;
mod location;
mod manifest;
mod store;
mod verify;

pub use client::{Env, Retry};
pub use digest::{digest_safetensors, digest_tensors, ParamDigest, TensorRef};
pub use error::{BadManifest, Error, Result};
pub use manifest::{
    check_object_name, check_run_id, check_step, sha256_hex, Manifest, ObjectEntry, FORMAT_VERSION,
};
pub use store::{local_copy, Fetched, Listed, Pruned, Store, StoreOptions};
pub use verify::{ObjectCheck, ObjectStatus, ResumePoint, Skipped, Verification};

/// Name of the manifest object, written last and create-only.
pub const MANIFEST: &str = "MANIFEST.json";
/// Trainable parameters (LoRA or full), safetensors: what the digest covers.
pub const STUDENT: &str = "student.safetensors";
/// Optimizer moments, safetensors.
pub const OPTIMIZER: &str = "optimizer.safetensors";
/// Step, epoch, data cursor, RNG, schedule, config digest, hard classes, world size (JSON).
pub const STATE: &str = "state.json";
/// Directory between the run and the step directories.
pub const CKPT_DIR: &str = "ckpt";
/// Directory of the run-level objects, beside `ckpt`.
pub const RUN_DIR: &str = "run";

/// A URL naming a run (`<store>/<run_id>`) or one checkpoint
/// (`<store>/<run_id>/ckpt/<step, 10 digits>`), opened: what `xkd checkpoint` commands take.
#[derive(Debug, Clone)]
pub struct Target {
    /// The store holding the run.
    pub store: Store,
    /// The run.
    pub run_id: String,
    /// The checkpoint's step, when the URL names one.
    pub step: Option<u64>,
}

impl Target {
    /// Splits `url` into store, run and step, and opens the store with `options`.
    pub fn open(url: &str, options: StoreOptions) -> Result<Target> {
        let (root, run_id, step) = location::split_target(url)?;
        Ok(Target {
            store: Store::at(root, options)?,
            run_id,
            step,
        })
    }

    /// The step the URL names, or else the newest committed checkpoint's (whether or not it
    /// verifies: inspecting commands look at what is there).
    pub async fn step_or_newest(&self) -> Result<u64> {
        if let Some(step) = self.step {
            return Ok(step);
        }
        match self.store.list(&self.run_id).await?.first() {
            Some(listed) => Ok(listed.step),
            None => Err(Error::NoCheckpoint {
                run_id: self.run_id.clone(),
                url: self.store.url(),
            }),
        }
    }
}
