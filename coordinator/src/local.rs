//! Generations of workers: each new set gathered after a restart, and the worker processes
//! `xkd run` starts itself on this machine.

use crate::run::LocalWorkers;
use crate::server::{Cluster, ControlServer};
use anyhow::{Context, Result};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use xkd_protocol::transport::Fingerprint;

/// The worker processes of the run: who they are, and how to replace them all.
pub(crate) struct Generations {
    pub(crate) server: ControlServer,
    pub(crate) world: usize,
    /// Workers `xkd run` starts itself; `None` for a cluster, whose workers join on their own.
    pub(crate) local: Option<LocalWorkers>,
    pub(crate) children: Vec<tokio::process::Child>,
    pub(crate) token: String,
    pub(crate) out_dir: PathBuf,
    pub(crate) join_timeout: Duration,
    pub(crate) heartbeat_timeout: Duration,
}

impl Generations {
    /// Starts (in `xkd run`) and gathers a new set of `world` workers; the previous local
    /// processes are killed first.
    pub(crate) async fn next(&mut self) -> Result<Cluster> {
        self.server.reopen();
        if let Some(local) = &self.local {
            for child in &mut self.children {
                let _ = child.kill().await;
            }
            self.children = spawn_workers(
                local,
                self.server.local_addr(),
                self.server.fingerprint(),
                &self.token,
                &self.out_dir,
            )?;
        }
        self.server
            .gather(self.world, self.join_timeout, self.heartbeat_timeout)
            .await
    }

    pub(crate) async fn wait_children(&mut self) {
        wait_children(&mut self.children).await
    }
}

pub(crate) fn spawn_workers(
    local: &LocalWorkers,
    addr: SocketAddr,
    fingerprint: Fingerprint,
    token: &str,
    out_dir: &Path,
) -> Result<Vec<tokio::process::Child>> {
    let logs = out_dir.join("logs");
    std::fs::create_dir_all(&logs)?;
    let threads = match local.threads {
        0 => {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            (cores / local.count).max(1)
        }
        n => n,
    };
    (0..local.count)
        .map(|i| {
            let log_path = logs.join(format!("worker-{i}.log"));
            // Appended to: a restarted worker of the same rank continues its log.
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log_path)
                .with_context(|| format!("opening {}", log_path.display()))?;
            let mut command = tokio::process::Command::new(&local.exe);
            command
                .arg("--log-format")
                .arg(&local.log_format)
                .arg("worker")
                .arg("--coordinator")
                .arg(addr.to_string())
                // The pin, not the certificate file: a given certificate need not name
                // `xkd-coordinator` nor be its own root, and nothing is read from disk.
                .env("XKD_COORDINATOR_FINGERPRINT", fingerprint.to_string())
                .env_remove("XKD_COORDINATOR_CERT")
                .env("XKD_JOIN_TOKEN", token)
                .env("XKD_LOCAL_RANK", i.to_string())
                .env("RAYON_NUM_THREADS", threads.to_string())
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .kill_on_drop(true);
            // A local worker must not outlive its coordinator: killed with SIGKILL, the
            // coordinator runs no drop, and an orphan would go on training and writing
            // checkpoint objects beside the run that resumes this one.
            // SAFETY: prctl is async-signal-safe and touches nothing of the parent's.
            #[cfg(target_os = "linux")]
            unsafe {
                command.pre_exec(|| {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                });
            }
            let child = command
                .spawn()
                .with_context(|| format!("starting worker {i} from {}", local.exe.display()))?;
            Ok(child)
        })
        .collect()
}

pub(crate) async fn wait_children(children: &mut [tokio::process::Child]) {
    for child in children.iter_mut() {
        match tokio::time::timeout(Duration::from_secs(10), child.wait()).await {
            Ok(Ok(status)) if !status.success() => tracing::warn!(%status, "worker exited"),
            Ok(_) => {}
            Err(_) => {
                tracing::warn!("worker did not exit after shutdown; killing it");
                let _ = child.kill().await;
            }
        }
    }
}
