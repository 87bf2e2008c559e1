//! What the compute thread has done, for the coordinator's progress watchdog, and what a
//! failed task's error says about retrying it.
//!
//! Heartbeats come from the control link's own task: they say the process is alive, not that
//! its compute thread moves. A rank stuck in a read on a dead network filesystem, or in a hung
//! device call, would heartbeat forever. So the compute thread counts each unit of work it
//! finishes here (a step, an evaluation batch, a model loaded, the dataset loaded), and each
//! heartbeat carries the count; the coordinator ends a task whose count stops moving for
//! `control.stall_timeout_ms`. While the thread waits on something that has a deadline of its
//! own (a collective, the checkpoint store's retries) it says so, and the watchdog leaves that
//! wait to that deadline.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use xkd_collective::CollectiveError;
use xkd_protocol::FailureKind;

#[derive(Debug, Default)]
pub struct Progress {
    done: AtomicU64,
    waiting: AtomicBool,
}

impl Progress {
    /// One more unit of work finished.
    pub fn tick(&self) {
        self.done.fetch_add(1, Ordering::Relaxed);
    }

    /// Runs `wait` (a collective, an upload being waited for) marked as waiting on a deadline
    /// of its own, and counts it as progress once it returns.
    pub fn waiting<T>(&self, wait: impl FnOnce() -> T) -> T {
        self.waiting.store(true, Ordering::Relaxed);
        let out = wait();
        self.waiting.store(false, Ordering::Relaxed);
        self.tick();
        out
    }

    /// Units done so far, and whether the thread is waiting on a deadline of its own now.
    pub fn read(&self) -> (u64, bool) {
        (
            self.done.load(Ordering::Relaxed),
            self.waiting.load(Ordering::Relaxed),
        )
    }
}

/// Whether restarting the workers can mend `error`: transient when something outside the task
/// went away (a peer or the network, the store, a collective's deadline), permanent otherwise
/// (what the same inputs would do again: a bad model directory, a shape the recipe makes, a
/// diverged loss). An error nothing here recognises is permanent: retrying it would reload the
/// models `max_restarts` times to fail the same way.
pub fn failure_kind(error: &anyhow::Error) -> FailureKind {
    for cause in error.chain() {
        // The distillation attempt that follows the restart runs the caching stage first,
        // which makes the shard again.
        if cause.is::<crate::train::teacher_cache::DamagedShard>() {
            return FailureKind::Transient;
        }
        if let Some(e) = cause.downcast_ref::<CollectiveError>() {
            return match e {
                // The recipe's or the code's doing: ranks disagree on what to reduce.
                CollectiveError::Config { .. }
                | CollectiveError::Tensor { .. }
                | CollectiveError::Desync { .. } => FailureKind::Permanent,
                _ => FailureKind::Transient,
            };
        }
        if let Some(e) = cause.downcast_ref::<xkd_checkpoint::Error>() {
            return match e {
                xkd_checkpoint::Error::Store { source, .. } => match source {
                    object_store::Error::NotFound { .. } => FailureKind::Permanent,
                    _ => FailureKind::Transient,
                },
                // Bytes changed after the coordinator verified them: on restart it verifies
                // again and skips that checkpoint.
                xkd_checkpoint::Error::Corrupt { .. } => FailureKind::Transient,
                _ => FailureKind::Permanent,
            };
        }
        if let Some(e) = cause.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::*;
            if matches!(
                e.kind(),
                ConnectionReset
                    | ConnectionAborted
                    | ConnectionRefused
                    | BrokenPipe
                    | TimedOut
                    | NotConnected
                    | HostUnreachable
                    | NetworkUnreachable
                    | NetworkDown
                    | Interrupted
            ) {
                return FailureKind::Transient;
            }
        }
    }
    FailureKind::Permanent
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context as _;

    #[test]
    fn waiting_is_marked_and_counted() {
        let p = Progress::default();
        p.tick();
        let inside = p.waiting(|| p.read());
        assert_eq!(inside, (1, true));
        assert_eq!(p.read(), (2, false));
    }

    #[test]
    fn lost_peers_and_stores_are_transient_and_the_rest_permanent() {
        let peer_gone = anyhow::Error::new(CollectiveError::Recv {
            rank: 0,
            peer: 1,
            step: 3,
            source: std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "eof"),
        })
        .context("step 7");
        assert_eq!(failure_kind(&peer_gone), FailureKind::Transient);
        let desync = anyhow::Error::new(CollectiveError::Desync {
            rank: 0,
            peer: 1,
            expected_step: 1,
            expected_len: 4,
            got_step: 1,
            got_len: 8,
        });
        assert_eq!(failure_kind(&desync), FailureKind::Permanent);
        let store_down = anyhow::Error::new(xkd_checkpoint::Error::Store {
            op: "get",
            path: "s3://b/r/ckpt/0000000020/student.safetensors".into(),
            source: object_store::Error::Generic {
                store: "S3",
                source: "connection refused".into(),
            },
        });
        assert_eq!(failure_kind(&store_down), FailureKind::Transient);
        let missing = anyhow::Error::new(xkd_checkpoint::Error::Store {
            op: "get",
            path: "s3://b/models/config.json".into(),
            source: object_store::Error::NotFound {
                path: "models/config.json".into(),
                source: "404".into(),
            },
        });
        assert_eq!(failure_kind(&missing), FailureKind::Permanent);
        let reset: anyhow::Result<()> =
            Err(std::io::Error::from(std::io::ErrorKind::ConnectionReset)).context("reading");
        assert_eq!(failure_kind(&reset.unwrap_err()), FailureKind::Transient);
        let no_dir: anyhow::Result<()> =
            Err(std::io::Error::from(std::io::ErrorKind::NotFound)).context("/models/qwen");
        assert_eq!(failure_kind(&no_dir.unwrap_err()), FailureKind::Permanent);
        let diverged = anyhow::anyhow!("loss is NaN at step 3: training diverged");
        assert_eq!(failure_kind(&diverged), FailureKind::Permanent);
    }
}
