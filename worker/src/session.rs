//! A worker process from join to shutdown: join the coordinator, open the gradient ring with
//! the peers it names, then run each task it orders and report back.

use crate::client::{self, LinkSender};
use crate::collective::RingListener;
use crate::data;
use crate::train::Rank;
use anyhow::{bail, Context, Result};
use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::time::Duration;
use xkd_protocol::config::Config;
use xkd_protocol::{
    CoordinatorMsg, DataSummary, Join, SplitClips, Task, TaskKind, TaskResult, WorkerMsg,
    PROTOCOL_VERSION,
};

pub struct WorkerArgs {
    pub coordinator: SocketAddr,
    /// The coordinator's certificate (DER), the only one this worker trusts.
    pub cert_der: Vec<u8>,
    pub token: String,
    /// Host to bind the gradient ring on; `None` = the address this host uses to reach the
    /// coordinator.
    pub collective_host: Option<String>,
}

/// Join, work, and return when the coordinator says shutdown.
pub async fn run(args: WorkerArgs) -> Result<()> {
    let host = match args.collective_host.clone() {
        Some(h) => h,
        None => route_to(args.coordinator)?,
    };
    let listener = RingListener::bind(&format!("{host}:0"))
        .with_context(|| format!("binding the gradient ring on {host}"))?;
    let join = Join {
        protocol_version: PROTOCOL_VERSION,
        token: args.token.clone(),
        collective_addr: listener.local_addr().to_string(),
        hostname: hostname(),
        pid: std::process::id(),
    };
    let (assignment, mut link) = client::join(args.coordinator, &args.cert_der, join).await?;
    let config = Config::from_toml(&assignment.config_toml)
        .context("the coordinator sent a config this worker cannot read")?;
    let (rank, world) = (assignment.rank, assignment.world_size);
    tracing::info!(rank, world, run_id = %assignment.run_id, "joined");
    let heartbeat = client::spawn_heartbeat(
        link.sender(),
        Duration::from_millis(config.control.heartbeat_ms),
    );
    let peers = assignment.peers.clone();
    let timeout = Duration::from_millis(config.control.heartbeat_timeout_ms.max(10_000));
    let ring =
        tokio::task::spawn_blocking(move || listener.connect(rank as usize, &peers, timeout))
            .await??;
    let mut state = Some(Rank::new(config, rank, world, Box::new(ring)));
    let sender = link.sender();
    while let Some(msg) = link.recv().await? {
        match msg {
            CoordinatorMsg::Task(task) => {
                let mut rank_state = state
                    .take()
                    .expect("rank state is returned after each task");
                let tx = sender.clone();
                let (back, outcome) = tokio::task::spawn_blocking(move || {
                    let outcome = execute(&mut rank_state, &task, &tx);
                    (rank_state, (task.id, outcome))
                })
                .await?;
                state = Some(back);
                let (task, outcome) = outcome;
                let reply = match outcome {
                    Ok(result) => WorkerMsg::Done { task, result },
                    Err(e) => {
                        tracing::error!(task, error = format!("{e:#}"), "task failed");
                        WorkerMsg::Failed {
                            task,
                            error: format!("{e:#}"),
                        }
                    }
                };
                sender.send(reply)?;
            }
            CoordinatorMsg::Shutdown { reason } => {
                tracing::info!(reason, "shutdown");
                break;
            }
            CoordinatorMsg::Assignment(_) | CoordinatorMsg::Reject(_) => {
                bail!("unexpected message after assignment: {msg:?}")
            }
        }
    }
    heartbeat.abort();
    Ok(())
}

fn execute(rank: &mut Rank, task: &Task, tx: &LinkSender) -> Result<TaskResult> {
    match &task.kind {
        TaskKind::PrepareData => prepare_data(rank).map(TaskResult::Data),
        TaskKind::Train(t) => {
            let tx = tx.clone();
            let summary = rank.train(task.id, t, move |msg| {
                // A lost report is not worth failing the step over; the link's own errors
                // surface on the next recv.
                let _ = tx.send(msg);
            })?;
            Ok(TaskResult::Trained(summary))
        }
        TaskKind::Evaluate(t) => rank.evaluate(t).map(TaskResult::Evaluated),
    }
}

/// Generate the synthetic set (rank 0 is ordered first; the others then find it complete) or
/// read a manifest, and describe its splits.
fn prepare_data(rank: &mut Rank) -> Result<DataSummary> {
    let cfg = &rank.config;
    let dir = dataset_dir(cfg);
    let manifest = if cfg.data.source == "synthetic" {
        data::ensure_dataset(&cfg.data, &dir)?
    } else {
        data::load_manifest(&dir)?
    };
    let summary = summarise(&manifest);
    rank.manifest = Some(manifest);
    Ok(summary)
}

/// Where the dataset lives: `data.dir`, or a cache folder keyed by the data section.
pub fn dataset_dir(cfg: &Config) -> PathBuf {
    if !cfg.data.dir.is_empty() {
        return PathBuf::from(&cfg.data.dir);
    }
    let key = xkd_protocol::config::section_digest(&(&cfg.data, data::GENERATOR_VERSION));
    PathBuf::from(&cfg.run.cache_dir).join(format!("data-{key}"))
}

fn summarise(manifest: &data::Manifest) -> DataSummary {
    let mut splits: Vec<SplitClips> = Vec::new();
    let mut push =
        |name: String, id: u32, label: u32| match splits.iter_mut().find(|s| s.name == name) {
            Some(s) => {
                s.clips.push(id);
                s.labels.push(label);
            }
            None => splits.push(SplitClips {
                name,
                clips: vec![id],
                labels: vec![label],
            }),
        };
    for clip in &manifest.clips {
        if clip.split == "pretrain" {
            for m in &clip.pretrain_for {
                push(format!("pretrain_{}", m.as_str()), clip.id, clip.label);
            }
        } else {
            push(clip.split.clone(), clip.id, clip.label);
        }
    }
    DataSummary {
        dir: manifest.dir.display().to_string(),
        classes: manifest.classes.clone(),
        splits,
    }
}

/// The local address this host would use to reach `addr` (no packet is sent).
fn route_to(addr: SocketAddr) -> Result<String> {
    let bind = if addr.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    };
    let socket = UdpSocket::bind(bind)?;
    socket
        .connect(addr)
        .with_context(|| format!("no route to the coordinator at {addr}"))?;
    Ok(socket.local_addr()?.ip().to_string())
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}
