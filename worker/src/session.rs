//! A worker process from join to shutdown: join the coordinator, form the gradient collective
//! its assignment names (the TCP ring with the peers it lists, or NCCL from rank 0's unique
//! id), then run each task it orders and report back.

use crate::client::{self, LinkSender};
use crate::progress::{failure_kind, Progress};
use crate::ring_host::RingHost;
use crate::train::{self, Rank};
use anyhow::{bail, Context, Result};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use xkd_collective::{Collective, RingKey};
use xkd_config::{Config, DataSource};
use xkd_data as data;
use xkd_protocol::transport::Trust;
use xkd_protocol::{
    CollectiveKind, CoordinatorMsg, DataSummary, FailureKind, Join, SplitClips, Task, TaskKind,
    TaskResult, WorkerMsg, PROTOCOL_VERSION,
};

pub struct WorkerArgs {
    pub coordinator: SocketAddr,
    /// The coordinator's certificate, or its fingerprint: the only one this worker trusts.
    pub trust: Trust,
    pub token: String,
    /// Where the gradient ring listens.
    pub ring_host: RingHost,
}

/// How a worker's session ended; `xkd worker` turns it into its exit status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// The coordinator said shutdown (or closed the link normally): exit 0.
    Finished,
    /// SIGTERM (preemption): a running training task was stopped and checkpointed first;
    /// exit 0.
    Terminated,
    /// The coordinator ended this generation: exit `EXIT_RESTART` so the launcher restarts
    /// the worker and it joins the next one.
    Restart,
}

/// How long a worker leaving on its own waits for its last report to be acknowledged.
const FINISH_LIMIT: Duration = Duration::from_secs(5);
/// How long a leaving worker waits for its connection's close to go out.
const CLOSE_LIMIT: Duration = Duration::from_secs(1);

/// Join, work, and return when the coordinator says shutdown or restart, or on SIGTERM.
///
/// While a task runs on its blocking thread the control link is still read, so `Stop`
/// (preemption ordered by the coordinator), `Shutdown` and `Restart` act at once; SIGTERM
/// stops a training task the same way, and the worker leaves after answering it. On
/// `Shutdown`/`Restart` during a task the caller must not wait for the task's thread (see
/// `xkd worker`, which exits without joining it).
pub async fn run(args: WorkerArgs) -> Result<Exit> {
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let listener = args.ring_host.bind(args.coordinator)?;
    let join = Join {
        protocol_version: PROTOCOL_VERSION,
        token: args.token.clone(),
        collective_addr: listener.local_addr().to_string(),
        hostname: hostname(),
        pid: std::process::id(),
    };
    let (assignment, mut link) = client::join(args.coordinator, &args.trust, join).await?;
    let config = Config::from_toml(&assignment.config_toml)
        .context("the coordinator sent a config this worker cannot read")?;
    let (rank, world) = (assignment.rank, assignment.world_size);
    tracing::info!(
        rank,
        world,
        run_id = %assignment.run_id,
        threads = candle_core::utils::get_num_threads(),
        ring = %listener.local_addr(),
        "joined"
    );
    let progress = Arc::new(Progress::default());
    let heartbeat = client::spawn_heartbeat(
        link.sender(),
        Duration::from_millis(config.control.heartbeat_ms),
        progress.clone(),
    );
    let timeout = Duration::from_millis(config.control.collective_timeout_ms);
    let device = train::device(config.run.device_choice())?;
    let collective: Box<dyn Collective> = match assignment.collective {
        CollectiveKind::TcpRing => {
            let peers = assignment.peers.clone();
            // Ring connections prove the join token to each other (the ring's handshake).
            let key = RingKey::from_token(&args.token);
            let connect = move || listener.connect(rank as usize, &peers, timeout, &key);
            Box::new(tokio::task::spawn_blocking(connect).await??)
        }
        CollectiveKind::Nccl => {
            drop(listener);
            let setup = Duration::from_millis(config.control.join_timeout_ms);
            let ranks = (rank, world);
            nccl_collective(&mut link, &device, ranks, timeout, setup).await?
        }
    };
    let mut rank_state = Rank::with_device(config, rank, world, device, collective);
    rank_state.progress = progress;
    let mut state = Some(rank_state);
    let sender = link.sender();
    let exit = loop {
        let msg = tokio::select! {
            msg = link.recv() => msg?,
            _ = sigterm.recv() => {
                tracing::info!("SIGTERM between tasks: leaving");
                link.finish(FINISH_LIMIT).await;
                break Exit::Terminated;
            }
        };
        let Some(msg) = msg else {
            break Exit::Finished;
        };
        match msg {
            CoordinatorMsg::Task(task) => {
                let mut rank_state = state
                    .take()
                    .expect("rank state is returned after each task");
                let stop = rank_state.stop.clone();
                stop.store(false, Ordering::Relaxed);
                let id = task.id;
                let tx = sender.clone();
                reset_peak_rss();
                let mut running = tokio::task::spawn_blocking(move || {
                    let outcome = execute(&mut rank_state, &task, &tx);
                    (rank_state, outcome)
                });
                let mut terminating = false;
                let finished = loop {
                    tokio::select! {
                        done = &mut running => break Some(done),
                        msg = link.recv() => match msg? {
                            Some(CoordinatorMsg::Stop { task }) if task == id => {
                                tracing::info!(task, "stop ordered: finishing the current step");
                                stop.store(true, Ordering::Relaxed);
                            }
                            Some(CoordinatorMsg::Stop { .. }) => {}
                            Some(CoordinatorMsg::Shutdown { reason }) => {
                                tracing::info!(reason, "shutdown during a task");
                                break None;
                            }
                            Some(CoordinatorMsg::Restart { reason }) => {
                                tracing::warn!(reason, "restart ordered during a task");
                                heartbeat.abort();
                                link.close(CLOSE_LIMIT).await;
                                return Ok(Exit::Restart);
                            }
                            Some(other) => bail!("unexpected message during a task: {other:?}"),
                            None => bail!("the coordinator closed the link during task {id}"),
                        },
                        _ = sigterm.recv(), if !terminating => {
                            tracing::info!(task = id, "SIGTERM: stopping after the current step");
                            terminating = true;
                            stop.store(true, Ordering::Relaxed);
                        }
                    }
                };
                let Some(finished) = finished else {
                    break Exit::Finished;
                };
                let (back, outcome) = match finished {
                    Ok(done) => done,
                    Err(joined) => {
                        // The rank's state went with the panic: report it, and leave.
                        let error =
                            format!("rank {rank} panicked in task {id}: {}", panic_text(joined));
                        tracing::error!(task = id, error, "task panicked");
                        sender.send(WorkerMsg::Failed {
                            task: id,
                            error: error.clone(),
                            kind: FailureKind::Permanent,
                        })?;
                        heartbeat.abort();
                        link.finish(FINISH_LIMIT).await;
                        bail!(error);
                    }
                };
                state = Some(back);
                if let Some(peak) = peak_rss() {
                    // The task's own peak (reset as it started): what `xkd plan` predicts for
                    // its phase, measured; tests/plan.rs reads it.
                    tracing::info!(rank, task = id, peak_rss_mib = peak >> 20, "memory");
                }
                let reply = match outcome {
                    Ok(result) => WorkerMsg::Done { task: id, result },
                    Err(e) => {
                        let kind = failure_kind(&e);
                        let error = format!("{e:#}");
                        tracing::error!(task = id, error, ?kind, "task failed");
                        WorkerMsg::Failed {
                            task: id,
                            error,
                            kind,
                        }
                    }
                };
                sender.send(reply)?;
                if terminating {
                    link.finish(FINISH_LIMIT).await;
                    break Exit::Terminated;
                }
            }
            // The task it names is already over.
            CoordinatorMsg::Stop { .. } => {}
            CoordinatorMsg::Shutdown { reason } => {
                tracing::info!(reason, "shutdown");
                break Exit::Finished;
            }
            CoordinatorMsg::Restart { reason } => {
                tracing::warn!(reason, "restart ordered");
                break Exit::Restart;
            }
            CoordinatorMsg::Assignment(_)
            | CoordinatorMsg::Reject(_)
            | CoordinatorMsg::CollectiveId { .. } => {
                bail!("unexpected message after assignment: {msg:?}")
            }
        }
    };
    heartbeat.abort();
    link.close(CLOSE_LIMIT).await;
    Ok(exit)
}

/// Forms this rank's NCCL communicator: the unique id goes through the coordinator
/// (`ControlLink::collective_id`), then NCCL's bootstrap runs on a blocking thread under
/// `setup`, so a rank that never arrives fails this worker instead of hanging it (an
/// abandoned bootstrap thread is not waited for at exit).
#[cfg(feature = "cuda")]
async fn nccl_collective(
    link: &mut client::ControlLink,
    device: &candle_core::Device,
    (rank, world): (u32, u32),
    timeout: Duration,
    setup: Duration,
) -> Result<Box<dyn Collective>> {
    let id = link
        .collective_id(rank, xkd_collective::nccl::unique_id)
        .await?;
    let device = device.clone();
    let connect = tokio::task::spawn_blocking(move || {
        xkd_collective::nccl::Nccl::connect(&device, rank as usize, world as usize, &id, timeout)
    });
    let nccl = tokio::time::timeout(setup, connect)
        .await
        .map_err(|_| anyhow::anyhow!("the NCCL communicator did not form within {setup:?}"))???;
    tracing::info!(rank, world, "NCCL communicator formed");
    Ok(Box::new(nccl))
}

#[cfg(not(feature = "cuda"))]
async fn nccl_collective(
    _link: &mut client::ControlLink,
    _device: &candle_core::Device,
    _ranks: (u32, u32),
    _timeout: Duration,
    _setup: Duration,
) -> Result<Box<dyn Collective>> {
    bail!("the coordinator asked for NCCL (a CUDA run.device), but this worker was built without the `cuda` feature")
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
        TaskKind::CacheTeacher(t) => rank.cache_teacher(t).map(TaskResult::Cached),
    }
}

/// Starts this process's peak resident memory (`VmHWM`) again from what it holds now (Linux
/// 4.0 and later: `5` to `/proc/self/clear_refs`), so each task's peak is its own. Best
/// effort: elsewhere the peak is the process's.
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// This process's peak resident memory, bytes (`VmHWM`; Linux only).
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb << 10)
}

/// What a panicking task said, from its join error.
fn panic_text(joined: tokio::task::JoinError) -> String {
    if !joined.is_panic() {
        return format!("{joined}");
    }
    let payload = joined.into_panic();
    if let Some(s) = payload.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".into()
    }
}

/// Generate the synthetic set (rank 0 is ordered first; the others then find it complete) or
/// read a manifest, and describe its splits.
fn prepare_data(rank: &mut Rank) -> Result<DataSummary> {
    let cfg = &rank.config;
    let dir = dataset_dir(cfg)?;
    let manifest = if cfg.data.source == DataSource::Synthetic {
        data::ensure_dataset(&cfg.data, &dir)?
    } else {
        data::load_manifest(&dir)?
    };
    let summary = summarise(&manifest);
    rank.manifest = Some(std::sync::Arc::new(manifest));
    rank.progress.tick();
    Ok(summary)
}

/// Where the dataset lives: `data.dir`; the node's copy of it when it is an object-store URL
/// (downloaded here once per node, `xkd_checkpoint::local_copy`); or a cache folder keyed by
/// the data section (the synthetic set).
pub fn dataset_dir(cfg: &Config) -> Result<PathBuf> {
    let dir = &cfg.data.dir;
    if dir.contains("://") {
        let local = PathBuf::from(&cfg.run.cache_dir)
            .join("data")
            .join(format!("remote-{}", xkd_config::section_digest(dir)));
        let fetched = xkd_checkpoint::local_copy(dir, &local)
            .with_context(|| format!("downloading the dataset {dir}"))?;
        if fetched == xkd_checkpoint::Fetched::Cached {
            tracing::info!(url = dir, to = %local.display(), "dataset found in the node's cache");
        }
        return Ok(local);
    }
    if !dir.is_empty() {
        return Ok(PathBuf::from(dir));
    }
    let key = xkd_config::section_digest(&(&cfg.data, data::GENERATOR_VERSION));
    Ok(PathBuf::from(&cfg.run.cache_dir).join(format!("data-{key}")))
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

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}
