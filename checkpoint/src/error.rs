//! The crate's one error type. Every variant names the input or the object that failed, so a
//! message is enough to act on without a debugger. No variant carries a credential: store URLs
//! are kept without user info or query, and object_store's own errors name paths, not keys.

/// What went wrong in a store operation, naming the URL, run, step or object involved.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The store URL cannot be used: unknown scheme, missing bucket, no run id, bad step.
    #[error("bad store URL {url:?}: {reason}")]
    BadUrl { url: String, reason: String },
    /// A run id that would not make a single, safe path segment.
    #[error("bad run id {run_id:?}: {reason}")]
    BadRunId { run_id: String, reason: String },
    /// An object name that is reserved or would not make a single, safe path segment.
    #[error("bad object name {name:?}: {reason}")]
    BadObjectName { name: String, reason: String },
    /// A step that does not fit the 10-digit directory name.
    #[error("step {step} does not fit in 10 digits")]
    BadStep { step: u64 },
    /// The store could not be set up from its URL and settings.
    #[error("opening store {url}: {source}")]
    Open {
        url: String,
        #[source]
        source: object_store::Error,
    },
    /// A store request failed (after the configured retries, for HTTP stores).
    #[error("{op} {path}: {source}")]
    Store {
        op: &'static str,
        path: String,
        #[source]
        source: object_store::Error,
    },
    /// `commit` found a different manifest already in place; it is never overwritten.
    #[error("checkpoint {path} is already committed with different objects; manifests are never overwritten")]
    AlreadyCommitted { path: String },
    /// `commit` was given objects that are not in the store as described.
    #[error("cannot commit {path}: object {name}: {reason}")]
    CommitMismatch {
        path: String,
        name: String,
        reason: String,
    },
    /// The checkpoint has no manifest: it was never committed, or it was pruned.
    #[error("no committed checkpoint at {path} (no MANIFEST.json)")]
    NotCommitted { path: String },
    /// The run has no committed checkpoint at all.
    #[error("no committed checkpoint in run {run_id} at {url}")]
    NoCheckpoint { run_id: String, url: String },
    /// A manifest that does not parse or does not describe the checkpoint it sits in.
    #[error(transparent)]
    BadManifest(#[from] BadManifest),
    /// An object that is not listed in the checkpoint's manifest.
    #[error("{name} is not listed in the manifest of {path}")]
    NotInManifest { path: String, name: String },
    /// An object whose bytes do not match its manifest entry.
    #[error("{path}: {problem}")]
    Corrupt { path: String, problem: String },
    /// `student.safetensors` (or the bytes given) is not a safetensors file.
    #[error("{what} is not a valid safetensors file: {reason}")]
    BadSafetensors { what: String, reason: String },
    /// A local file given to `put_file` could not be read.
    #[error("reading {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// A downloaded object could not be written to a local file.
    #[error("writing {path}: {source}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// `prune` was asked to keep nothing, which would leave no checkpoint to resume from.
    #[error("prune must keep at least one committed checkpoint (keep = 0 given)")]
    KeepNothing,
}

impl Error {
    /// True when the caller's input was wrong (a usage error, exit status 2 on the command
    /// line), as opposed to the store or its contents.
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            Error::BadUrl { .. }
                | Error::BadRunId { .. }
                | Error::BadObjectName { .. }
                | Error::BadStep { .. }
                | Error::KeepNothing
        )
    }

    /// True when the store request failed for a reason a later attempt may not hit (network,
    /// server, timeout), as opposed to a definite answer (not found, already exists, bad input).
    /// Part of the contract for callers that retry whole operations on top of the built-in retry.
    pub fn is_transient(&self) -> bool {
        use object_store::Error as E;
        match self {
            Error::Store { source, .. } => {
                matches!(source, E::Generic { .. } | E::JoinError { .. })
            }
            _ => false,
        }
    }
}

/// A manifest that cannot be trusted: unreadable JSON, unknown format version, or contents that
/// do not match where it was found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("manifest {path} is not valid: {reason}")]
pub struct BadManifest {
    /// Where the manifest was read from.
    pub path: String,
    /// What is wrong with it.
    pub reason: String,
}

/// Result of this crate's operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;
