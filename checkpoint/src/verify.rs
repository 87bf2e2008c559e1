//! Verification: every object a manifest lists, read back and checked for presence, size and
//! sha256; and the choice of checkpoint to resume from, which skips any that fail. Only content
//! problems make a checkpoint "bad": a store that cannot be reached is an error, never a
//! reason to skip a good checkpoint.

use crate::error::BadManifest;
use crate::manifest::{hex, Manifest, ObjectEntry};
use crate::store::Store;
use crate::{Error, Result};
use futures::StreamExt;
use object_store::ObjectStoreExt;
use sha2::{Digest as _, Sha256};

/// The state of one listed object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ObjectStatus {
    /// Present, with the listed size and sha256.
    Ok,
    /// Not in the store.
    Missing,
    /// Present with another size.
    SizeMismatch { expected: u64, found: u64 },
    /// Present with the listed size and other contents.
    Sha256Mismatch { expected: String, found: String },
}

impl std::fmt::Display for ObjectStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ObjectStatus::Ok => f.write_str("ok"),
            ObjectStatus::Missing => f.write_str("missing"),
            ObjectStatus::SizeMismatch { expected, found } => {
                write!(
                    f,
                    "size mismatch: manifest says {expected} bytes, found {found}"
                )
            }
            ObjectStatus::Sha256Mismatch { expected, found } => {
                write!(
                    f,
                    "sha256 mismatch: manifest says {expected}, found {found}"
                )
            }
        }
    }
}

/// One object's verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectCheck {
    /// The object's name in the checkpoint.
    pub name: String,
    /// Its size as the manifest lists it.
    pub size: u64,
    /// What was found.
    pub status: ObjectStatus,
}

/// A checkpoint's verification: its manifest and the state of every object it lists.
#[derive(Debug, Clone)]
pub struct Verification {
    /// The checkpoint's URL.
    pub url: String,
    /// Its manifest.
    pub manifest: Manifest,
    /// One check per listed object, in manifest order.
    pub objects: Vec<ObjectCheck>,
}

impl Verification {
    /// True when every listed object is present and matches.
    pub fn is_ok(&self) -> bool {
        self.objects.iter().all(|o| o.status == ObjectStatus::Ok)
    }

    /// The objects that are not ok.
    pub fn bad(&self) -> impl Iterator<Item = &ObjectCheck> {
        self.objects.iter().filter(|o| o.status != ObjectStatus::Ok)
    }

    /// One line naming every bad object and what is wrong with it (empty when ok).
    pub fn problems(&self) -> String {
        self.bad()
            .map(|o| format!("{}: {}", o.name, o.status))
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// A checkpoint `newest_verified` passed over, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// Its step.
    pub step: u64,
    /// Its URL.
    pub url: String,
    /// Why it cannot be resumed from, naming the bad objects.
    pub reason: String,
}

/// The checkpoint to resume from, and the newer ones that were passed over.
#[derive(Debug, Clone)]
pub struct ResumePoint {
    /// The newest committed checkpoint whose objects all verify, if any.
    pub checkpoint: Option<Manifest>,
    /// Newer committed checkpoints that failed verification, newest first.
    pub skipped: Vec<Skipped>,
}

impl Store {
    /// Reads back every object the manifest of `run_id`/`step` lists and checks it. A missing
    /// manifest is [`Error::NotCommitted`]; an untrustworthy one [`Error::BadManifest`]; a
    /// store that fails after its retries is [`Error::Store`]. Bad objects are not errors:
    /// they are reported in the result.
    pub async fn verify(&self, run_id: &str, step: u64) -> Result<Verification> {
        let manifest = self.manifest(run_id, step).await?;
        let mut objects = Vec::with_capacity(manifest.objects.len());
        for entry in &manifest.objects {
            objects.push(ObjectCheck {
                name: entry.name.clone(),
                size: entry.size,
                status: self.check(run_id, step, entry).await?,
            });
        }
        Ok(Verification {
            url: self.checkpoint_url(run_id, step),
            manifest,
            objects,
        })
    }

    /// The newest committed checkpoint of `run_id` that verifies, with every newer one that
    /// did not and why: what a resume uses. `checkpoint` is None when none verifies.
    pub async fn newest_verified(&self, run_id: &str) -> Result<ResumePoint> {
        let mut skipped = Vec::new();
        for listed in self.list(run_id).await? {
            let reason = match listed.manifest {
                Err(BadManifest { reason, .. }) => format!("manifest: {reason}"),
                Ok(_) => match self.verify(run_id, listed.step).await {
                    Ok(v) if v.is_ok() => {
                        return Ok(ResumePoint {
                            checkpoint: Some(v.manifest),
                            skipped,
                        })
                    }
                    Ok(v) => v.problems(),
                    Err(Error::BadManifest(bad)) => format!("manifest: {}", bad.reason),
                    Err(Error::NotCommitted { .. }) => "pruned while being checked".into(),
                    Err(e) => return Err(e),
                },
            };
            tracing::warn!(checkpoint = %listed.url, %reason, "skipping checkpoint that does not verify");
            skipped.push(Skipped {
                step: listed.step,
                url: listed.url,
                reason,
            });
        }
        Ok(ResumePoint {
            checkpoint: None,
            skipped,
        })
    }

    /// Streams one object and compares it with its entry; large objects are never held whole.
    async fn check(&self, run_id: &str, step: u64, entry: &ObjectEntry) -> Result<ObjectStatus> {
        let path = self.object_path(run_id, step, &entry.name);
        let got = match self.inner().get(&path).await {
            Ok(got) => got,
            Err(object_store::Error::NotFound { .. }) => return Ok(ObjectStatus::Missing),
            Err(e) => return Err(self.err("reading", &path, e)),
        };
        if got.meta.size != entry.size {
            return Ok(ObjectStatus::SizeMismatch {
                expected: entry.size,
                found: got.meta.size,
            });
        }
        let mut stream = got.into_stream();
        let (mut hasher, mut size) = (Sha256::new(), 0u64);
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| self.err("reading", &path, e))?;
            size += chunk.len() as u64;
            hasher.update(&chunk);
        }
        Ok(compare(entry, size, &hex(&hasher.finalize())).unwrap_or(ObjectStatus::Ok))
    }
}

/// What is wrong with an object of `size` bytes and hash `sha256` given its entry; None if
/// nothing.
pub(crate) fn compare(entry: &ObjectEntry, size: u64, sha256: &str) -> Option<ObjectStatus> {
    if size != entry.size {
        Some(ObjectStatus::SizeMismatch {
            expected: entry.size,
            found: size,
        })
    } else if sha256 != entry.sha256 {
        Some(ObjectStatus::Sha256Mismatch {
            expected: entry.sha256.clone(),
            found: sha256.to_string(),
        })
    } else {
        None
    }
}
