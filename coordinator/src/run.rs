//! The job, stage by stage: dataset, pretrained stand-ins, probe, hard classes, distillation,
//! evaluation, report. Every stage is a task the workers run; this file only orders them,
//! watches them, and turns their outcomes into decisions and files.

use crate::checkpoint::Checkpoints;
use crate::driver::Driver;
use crate::heuristic::Decision;
use crate::local::Generations;
use crate::metrics::{Metrics, MetricsServer};
use crate::report::{Evaluation, Report};
use crate::server::ControlServer;
use crate::stages::stages;
use anyhow::{anyhow, bail, Context, Result};
use rand::RngCore;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::signal::unix::{signal, SignalKind};
use xkd_config::{Config, DeviceChoice};
use xkd_protocol::transport::ServerIdentity;
use xkd_protocol::{CollectiveKind, ShardPlan, TaskResult, TrainSummary};

/// The collective a run's ranks form: NCCL when they train on GPUs, else the TCP ring.
pub fn collective_kind(config: &Config) -> CollectiveKind {
    match config.run.device_choice() {
        DeviceChoice::Cpu => CollectiveKind::TcpRing,
        DeviceChoice::Cuda(_) => CollectiveKind::Nccl,
    }
}

/// Worker processes the coordinator starts itself (`xkd run`).
#[derive(Debug, Clone)]
pub struct LocalWorkers {
    /// The `xkd` executable to start as `xkd worker ...`.
    pub exe: PathBuf,
    pub count: usize,
    /// Compute threads of each (`run.threads_per_worker`); 0 divides the machine's cores
    /// among them.
    pub threads: usize,
    /// `--log-format` handed to the workers.
    pub log_format: String,
}

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub config: Config,
    pub out_dir: Option<PathBuf>,
    pub local: Option<LocalWorkers>,
    /// What the run is for.
    pub goal: Goal,
    /// The certificate and key to present (`--tls-cert`/`--tls-key`); `None` makes a fresh
    /// self-signed one.
    pub identity: Option<ServerIdentity>,
}

/// What a run does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Goal {
    /// Every stage, up to `report.json` (`xkd run`).
    Report,
    /// Stop once the hard classes are decided (`xkd hard-classes`).
    HardClasses,
    /// Only evaluate the student of one checkpoint on the eval split (`xkd eval`): a URL of a
    /// checkpoint (`<store>/<run_id>/ckpt/<step>`) or of a run (its newest checkpoint).
    Evaluate { checkpoint: String },
}

pub enum Outcome {
    Finished(Box<Report>),
    HardClasses(Decision),
    Evaluated(Box<Evaluation>),
    /// SIGTERM: the running distillation was stopped and checkpointed (if one was running);
    /// starting the run again with the same run id resumes it.
    Preempted,
}

/// The error a stage returns when the run was preempted; `run` turns it into
/// `Outcome::Preempted`.
#[derive(Debug)]
pub(crate) struct Preempted;

impl std::fmt::Display for Preempted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "preempted (SIGTERM)")
    }
}

impl std::error::Error for Preempted {}

/// Run the whole job (or up to the heuristic) and write its files.
pub async fn run(opts: RunOptions) -> Result<Outcome> {
    let started = Instant::now();
    let config = opts.config;
    let run_id = if config.run.run_id.is_empty() {
        generated_run_id()
    } else {
        config.run.run_id.clone()
    };
    let world = opts
        .local
        .as_ref()
        .map_or(config.control.workers, |l| l.count);
    let metrics = Metrics::new(&run_id, world);
    // Served until this function returns; bound first, so a taken port fails the run before
    // it makes its output directory or starts a worker.
    let _metrics_server = serve_metrics(&config, &run_id, &metrics).await?;
    let out_dir = opts
        .out_dir
        .unwrap_or_else(|| PathBuf::from("runs").join(&run_id));
    std::fs::create_dir_all(&out_dir)
        .with_context(|| format!("creating output directory {}", out_dir.display()))?;
    // Opened before any work, so a bad `checkpoint.url` or run id fails the run at once.
    let mut checkpoints = match opts.goal {
        Goal::Report => Some(Checkpoints::open(&config, &run_id, &out_dir)?),
        Goal::HardClasses | Goal::Evaluate { .. } => None,
    };
    let sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let token = join_token(opts.local.is_some())?;
    let listen: SocketAddr = config.control.listen.parse().with_context(|| {
        format!(
            "control.listen `{}` is not an address",
            config.control.listen
        )
    })?;
    let mut server = match opts.identity {
        Some(identity) => ControlServer::bind_as(listen, token.clone(), identity).await?,
        None => ControlServer::bind(listen, token.clone()).await?,
    };
    server.count_alive(metrics.workers_alive());
    if let Some(checkpoints) = checkpoints.as_mut() {
        checkpoints.count_commits(metrics.clone());
    }
    let cert_path = out_dir.join("coordinator-cert.der");
    write_whole(&cert_path, server.cert_der())?;
    tracing::info!(
        run_id,
        addr = %server.local_addr(),
        cert = %cert_path.display(),
        fingerprint = %server.fingerprint(),
        workers = world,
        out = %out_dir.display(),
        "coordinator listening"
    );
    let generations = Generations {
        server,
        world,
        local: opts.local,
        children: Vec::new(),
        token,
        out_dir: out_dir.clone(),
        join_timeout: Duration::from_millis(config.control.join_timeout_ms),
        heartbeat_timeout: Duration::from_millis(config.control.heartbeat_timeout_ms),
    };
    let mut driver =
        Driver::start(generations, &config, &run_id, checkpoints, sigterm, metrics).await?;
    let result = stages(&mut driver, &config, &out_dir, &opts.goal, started).await;
    let result = match result {
        Err(e) if e.is::<Preempted>() => {
            tracing::info!(
                run_id,
                "run preempted; start it again with the same run id to resume"
            );
            Ok(Outcome::Preempted)
        }
        other => other,
    };
    let reason = match &result {
        Ok(Outcome::Preempted) => "run preempted".to_string(),
        Ok(_) => "run finished".to_string(),
        Err(e) => format!("run failed: {e:#}"),
    };
    driver.shutdown(&reason).await;
    driver.generations.wait_children().await;
    result
}

/// The metrics endpoint `control.metrics_listen` asks for, serving `metrics`; none when it is
/// empty. Logs the address it bound (the port chosen, when 0 was asked).
async fn serve_metrics(
    config: &Config,
    run_id: &str,
    metrics: &Metrics,
) -> Result<Option<MetricsServer>> {
    let asked = &config.control.metrics_listen;
    if asked.is_empty() {
        return Ok(None);
    }
    let listen: SocketAddr = asked
        .parse()
        .with_context(|| format!("control.metrics_listen `{asked}` is not an address"))?;
    let server = MetricsServer::start(listen, metrics.clone()).await?;
    let addr = server.local_addr();
    tracing::info!(
        run_id,
        %addr,
        url = format!("http://{addr}/metrics"),
        "metrics listening"
    );
    Ok(Some(server))
}

/// The one summary of a data-parallel training task, once every rank is seen to end with
/// the same parameters (data parallelism's invariant).
pub(crate) fn one_summary(results: Vec<TaskResult>) -> Result<TrainSummary> {
    let summaries: Vec<TrainSummary> = results
        .into_iter()
        .map(|r| match r {
            TaskResult::Trained(s) => Ok(s),
            other => Err(anyhow!("a worker answered Train with {other:?}")),
        })
        .collect::<Result<_>>()?;
    if summaries.iter().any(|s| s.digest != summaries[0].digest) {
        bail!("ranks disagree on the trained parameters (digests differ)");
    }
    summaries
        .into_iter()
        .next()
        .context("a training task with no ranks")
}

pub(crate) fn shuffled(clips: Vec<u32>, seed: u64) -> ShardPlan {
    ShardPlan::shuffled(clips, seed)
}

pub(crate) fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    write_whole(path, (text + "\n").as_bytes())
}

/// Writes `bytes` to a temporary sibling of `path`, flushes it and renames it into place, so a
/// reader (a worker polling for the coordinator's certificate, a launcher reading a report)
/// sees the old file or the whole new one, never a part. The sibling is removed on failure.
pub(crate) fn write_whole(path: &Path, bytes: &[u8]) -> Result<()> {
    let name = path
        .file_name()
        .with_context(|| format!("{} names no file", path.display()))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let written = write_synced(&tmp, bytes).and_then(|()| {
        std::fs::rename(&tmp, path).with_context(|| format!("renaming into {}", path.display()))
    });
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut file =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", path.display()))
}

pub(crate) fn generated_run_id() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!("run-{secs}-{}", std::process::id())
}

/// `XKD_JOIN_TOKEN` from the environment; a local run makes one up when it is not set.
pub(crate) fn join_token(local: bool) -> Result<String> {
    match std::env::var("XKD_JOIN_TOKEN") {
        Ok(t) if !t.is_empty() => Ok(t),
        _ if local => {
            let mut bytes = [0u8; 24];
            rand::rng().fill_bytes(&mut bytes);
            Ok(xkd_config::hex(&bytes))
        }
        _ => bail!("XKD_JOIN_TOKEN is not set: a cluster coordinator needs the run's join token"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn the_certificate_is_written_whole_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("coordinator-cert.der");
        let id = xkd_protocol::transport::ServerIdentity::generate().unwrap();
        std::fs::write(&path, b"a half-written older file").unwrap();
        write_whole(&path, &id.cert_der).unwrap();
        let read = std::fs::read(&path).unwrap();
        assert_eq!(read, id.cert_der);
        xkd_protocol::transport::check_certificate(&read).unwrap();
        assert_eq!(names(dir.path()), ["coordinator-cert.der"]);
    }

    #[test]
    fn a_failed_write_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        // A directory where the file should go: the rename fails.
        let path = dir.path().join("taken");
        std::fs::create_dir(&path).unwrap();
        std::fs::write(path.join("inside"), b"x").unwrap();
        assert!(write_whole(&path, b"bytes").is_err());
        assert_eq!(names(dir.path()), ["taken"]);
    }
}
