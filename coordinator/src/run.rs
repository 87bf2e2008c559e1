//! The job, stage by stage: dataset, pretrained stand-ins, probe, hard classes, distillation,
//! evaluation, report. Every stage is a task the workers run; this file only orders them,
//! watches them, and turns their outcomes into decisions and files.

use crate::checkpoint::{self, Checkpoints};
use crate::heuristic::{self, Decision};
use crate::report::{self, Report};
use crate::server::{Cluster, ControlServer, Event};
use anyhow::{anyhow, bail, Context, Result};
use rand::RngCore;
use std::collections::HashSet;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::signal::unix::{signal, Signal, SignalKind};
use xkd_protocol::config::{section_digest, Config, DeviceChoice, Modality};
use xkd_protocol::{
    Assignment, CheckpointOrder, ClipOutcome, CollectiveKind, CoordinatorMsg, DataSummary,
    EvalTask, Objective, ShardPlan, Task, TaskKind, TaskResult, TrainSummary, TrainTask, WorkerMsg,
};

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
    /// `--log-format` handed to the workers.
    pub log_format: String,
}

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub config: Config,
    pub out_dir: Option<PathBuf>,
    pub local: Option<LocalWorkers>,
    /// Stop once the hard classes are decided (`xkd hard-classes`).
    pub only_hard_classes: bool,
}

pub enum Outcome {
    Finished(Box<Report>),
    HardClasses(Decision),
    /// SIGTERM: the running distillation was stopped and checkpointed (if one was running);
    /// starting the run again with the same run id resumes it.
    Preempted,
}

/// The error a stage returns when the run was preempted; `run` turns it into
/// `Outcome::Preempted`.
#[derive(Debug)]
struct Preempted;

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
    let out_dir = opts
        .out_dir
        .unwrap_or_else(|| PathBuf::from("runs").join(&run_id));
    std::fs::create_dir_all(&out_dir)
        .with_context(|| format!("creating output directory {}", out_dir.display()))?;
    // Opened before any work, so a bad `checkpoint.url` or run id fails the run at once.
    let checkpoints = if opts.only_hard_classes {
        None
    } else {
        Some(Checkpoints::open(&config, &run_id, &out_dir)?)
    };
    let sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let token = join_token(opts.local.is_some())?;
    let listen: SocketAddr = config.control.listen.parse().with_context(|| {
        format!(
            "control.listen `{}` is not an address",
            config.control.listen
        )
    })?;
    let server = ControlServer::bind(listen, token.clone()).await?;
    let cert_path = out_dir.join("coordinator-cert.der");
    std::fs::write(&cert_path, server.cert_der())
        .with_context(|| format!("writing {}", cert_path.display()))?;
    let world = opts
        .local
        .as_ref()
        .map_or(config.control.workers, |l| l.count);
    tracing::info!(
        run_id,
        addr = %server.local_addr(),
        cert = %cert_path.display(),
        workers = world,
        out = %out_dir.display(),
        "coordinator listening"
    );
    let generations = Generations {
        server,
        world,
        local: opts.local,
        children: Vec::new(),
        cert_path,
        token,
        out_dir: out_dir.clone(),
        join_timeout: Duration::from_millis(config.control.join_timeout_ms),
        heartbeat_timeout: Duration::from_millis(config.control.heartbeat_timeout_ms),
    };
    let mut driver = Driver::start(generations, &config, &run_id, checkpoints, sigterm).await?;
    let result = stages(
        &mut driver,
        &config,
        &out_dir,
        opts.only_hard_classes,
        started,
    )
    .await;
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

async fn stages(
    d: &mut Driver,
    config: &Config,
    out_dir: &Path,
    only_hard: bool,
    started: Instant,
) -> Result<Outcome> {
    let data = d.prepare_data().await?;
    let student_m = config.student_modality();
    let teacher_m = config.teacher_modality();
    let teacher = d.pretrained(config, &data, teacher_m).await?;
    let student = d.pretrained(config, &data, student_m).await?;

    d.stage = "probe".into();
    let probe = split(&data, "probe")?;
    let t_probe = d.evaluate(config, teacher_m, &teacher, probe).await?;
    let s_probe = d.evaluate(config, student_m, &student, probe).await?;
    let decision = heuristic::decide(&config.heuristic, &data.classes, &s_probe, &t_probe)?;
    write_json(&out_dir.join("hard_classes.json"), &decision)?;
    tracing::info!(hard = ?decision.hard_names(), "hard classes decided");
    if only_hard {
        return Ok(Outcome::HardClasses(decision));
    }
    if decision.hard_labels().is_empty() {
        bail!("the heuristic found no hard class: nothing to distill (see hard_classes.json)");
    }

    d.stage = "eval_before".into();
    let eval = split(&data, "eval")?;
    let t_eval = d.evaluate(config, teacher_m, &teacher, eval).await?;
    let before = d.evaluate(config, student_m, &student, eval).await?;

    d.stage = "distill".into();
    // A stand-in student is saved whole; a Qwen2 student as its LoRA adapters, in PEFT's format.
    let distilled = if config.model(student_m).family == "qwen2" {
        out_dir.join("student-lora")
    } else {
        out_dir.join("student.safetensors")
    };
    let (summary, final_checkpoint) = d
        .distill(config, &data, &decision, &teacher, &student, &distilled)
        .await?;

    d.stage = "eval_after".into();
    let after_path = distilled.display().to_string();
    let after = d.evaluate(config, student_m, &after_path, eval).await?;
    let report = report::build(report::Inputs {
        run_id: &d.run_id,
        config,
        workers: d.world,
        classes: &data.classes,
        decision: &decision,
        teacher: &t_eval,
        before: &before,
        after: &after,
        distill: &summary,
        final_checkpoint,
        wall_seconds: started.elapsed().as_secs_f64(),
    });
    report::write(out_dir, &report)?;
    Ok(Outcome::Finished(Box::new(report)))
}

fn split<'a>(data: &'a DataSummary, name: &str) -> Result<&'a xkd_protocol::SplitClips> {
    data.splits
        .iter()
        .find(|s| s.name == name)
        .ok_or_else(|| anyhow!("the dataset has no `{name}` split"))
}

/// The worker processes of the run: who they are, and how to replace them all.
struct Generations {
    server: ControlServer,
    world: usize,
    /// Workers `xkd run` starts itself; `None` for a cluster, whose workers join on their own.
    local: Option<LocalWorkers>,
    children: Vec<tokio::process::Child>,
    cert_path: PathBuf,
    token: String,
    out_dir: PathBuf,
    join_timeout: Duration,
    heartbeat_timeout: Duration,
}

impl Generations {
    /// Starts (in `xkd run`) and gathers a new set of `world` workers; the previous local
    /// processes are killed first.
    async fn next(&mut self) -> Result<Cluster> {
        self.server.reopen();
        if let Some(local) = &self.local {
            for child in &mut self.children {
                let _ = child.kill().await;
            }
            self.children = spawn_workers(
                local,
                self.server.local_addr(),
                &self.cert_path,
                &self.token,
                &self.out_dir,
            )?;
        }
        self.server
            .gather(self.world, self.join_timeout, self.heartbeat_timeout)
            .await
    }

    async fn wait_children(&mut self) {
        wait_children(&mut self.children).await
    }
}

/// Why a task did not come back with results.
enum Interrupt {
    /// A worker was lost or failed: restart the workers (counted in `control.max_restarts`).
    Failed(anyhow::Error),
    /// A worker was preempted on its own (its SIGTERM) and left in order, after every rank
    /// stopped at one step and that step's checkpoint was committed: restart the workers
    /// without counting it, since nothing failed and the run lost no step.
    Replaced(anyhow::Error),
    /// SIGTERM to the coordinator: stop the run (after a checkpoint, if one was running).
    Preempted,
    /// Something restarting will not mend (a file the coordinator cannot write).
    Fatal(anyhow::Error),
}

impl From<anyhow::Error> for Interrupt {
    fn from(e: anyhow::Error) -> Self {
        Interrupt::Fatal(e)
    }
}

/// Orders tasks to the cluster and collects what comes back; replaces the workers when one
/// is lost (up to `control.max_restarts` times).
struct Driver {
    cluster: Cluster,
    generations: Generations,
    world: usize,
    run_id: String,
    config: Config,
    next_task: u64,
    metrics: std::fs::File,
    stage: String,
    /// Commits the checkpoints of the task that saves them (distillation). Shared with the
    /// background commits (`queue_commit`).
    checkpoints: Option<Arc<tokio::sync::Mutex<Checkpoints>>>,
    /// The last commit queued; each waits for the one before, so commits keep step order.
    commits: Option<tokio::task::JoinHandle<()>>,
    restarts: u32,
    sigterm: Signal,
    /// SIGTERM was received: the run is winding down.
    terminating: bool,
}

impl Driver {
    async fn start(
        mut generations: Generations,
        config: &Config,
        run_id: &str,
        checkpoints: Option<Checkpoints>,
        sigterm: Signal,
    ) -> Result<Driver> {
        let path = generations.out_dir.join("metrics.jsonl");
        // Appended to: a resumed run adds to the curve of the run it continues.
        let metrics = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        let cluster = generations.next().await?;
        let mut driver = Driver {
            world: generations.world,
            cluster,
            generations,
            run_id: run_id.to_string(),
            config: config.clone(),
            next_task: 0,
            metrics,
            stage: "setup".into(),
            checkpoints: checkpoints.map(|c| Arc::new(tokio::sync::Mutex::new(c))),
            commits: None,
            restarts: 0,
            sigterm,
            terminating: false,
        };
        driver.assign().await?;
        Ok(driver)
    }

    async fn assign(&mut self) -> Result<()> {
        let peers: Vec<String> = self
            .cluster
            .members()
            .iter()
            .map(|m| m.join.collective_addr.clone())
            .collect();
        let config = &self.config;
        let (toml, digest) = (config.to_toml(), config.digest());
        let out_dir = self.generations.out_dir.display().to_string();
        let collective = collective_kind(config);
        for rank in 0..self.world as u32 {
            let msg = CoordinatorMsg::Assignment(Assignment {
                run_id: self.run_id.clone(),
                rank,
                world_size: self.world as u32,
                peers: peers.clone(),
                collective,
                config_toml: toml.clone(),
                config_digest: digest.clone(),
                out_dir: out_dir.clone(),
            });
            self.cluster.send(rank, &msg).await?;
        }
        if collective == CollectiveKind::Nccl {
            let wait = Duration::from_millis(self.config.control.join_timeout_ms);
            self.cluster.hand_off_collective_id(wait).await?;
        }
        Ok(())
    }

    async fn shutdown(&mut self, reason: &str) {
        if let Err(e) = self.cluster.shutdown(reason).await {
            tracing::warn!(
                error = format!("{e:#}"),
                "could not tell every worker to stop"
            );
        }
    }

    /// Send `kind` to `ranks` and wait until each has answered; returns results by rank. A
    /// lost or failed worker restarts the workers and the task runs again from its start:
    /// only for tasks that are safe to repeat (all but checkpointed training, which
    /// `distill` resumes itself).
    async fn order(&mut self, ranks: &[u32], kind: TaskKind) -> Result<Vec<TaskResult>> {
        loop {
            match self.try_order(ranks, kind.clone()).await {
                Ok(results) => return Ok(results),
                Err(interrupt) => self.recover(interrupt).await?,
            }
        }
    }

    /// Restarts the workers after `Interrupt::Failed` (counting restarts; a restart that
    /// fails counts too) or `Interrupt::Replaced` (not counted); any other interrupt ends the
    /// run.
    async fn recover(&mut self, interrupt: Interrupt) -> Result<()> {
        let mut counted = true;
        let mut error = match interrupt {
            // After SIGTERM nothing is restarted: the run is winding down.
            Interrupt::Failed(e) | Interrupt::Replaced(e) if self.terminating => {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "a worker failed while the run stops"
                );
                return Err(Preempted.into());
            }
            Interrupt::Failed(e) => e,
            Interrupt::Replaced(e) => {
                counted = false;
                e
            }
            Interrupt::Preempted => return Err(Preempted.into()),
            Interrupt::Fatal(e) => return Err(e),
        };
        loop {
            let max = self.config.control.max_restarts;
            if counted && self.restarts >= max {
                return Err(error.context(format!(
                    "{} failed and the run has used its {max} restarts (control.max_restarts)",
                    self.stage
                )));
            }
            if counted {
                self.restarts += 1;
            }
            tracing::warn!(
                stage = %self.stage,
                restart = self.restarts,
                max_restarts = max,
                counted,
                error = format!("{error:#}"),
                "restarting the workers"
            );
            counted = true;
            match self.regroup(&format!("{error:#}")).await {
                Ok(()) => return Ok(()),
                Err(Interrupt::Failed(e)) => error = e,
                Err(Interrupt::Replaced(e)) => {
                    counted = false;
                    error = e;
                }
                Err(Interrupt::Preempted) => return Err(Preempted.into()),
                Err(Interrupt::Fatal(e)) => return Err(e),
            }
        }
    }

    /// Ends the current generation and starts the next: new workers, the same world, the
    /// dataset loaded again on every rank.
    async fn regroup(&mut self, reason: &str) -> Result<(), Interrupt> {
        self.cluster.restart(reason).await;
        self.cluster = self.generations.next().await.map_err(Interrupt::Failed)?;
        self.assign().await.map_err(Interrupt::Failed)?;
        let stage = std::mem::replace(&mut self.stage, "restart".into());
        let all = self.all();
        let loaded = self.try_order(&all, TaskKind::PrepareData).await;
        self.stage = stage;
        loaded.map(|_| ())
    }

    /// Send `kind` to `ranks` and wait until each has answered, or until a worker is lost or
    /// fails, or SIGTERM comes. On SIGTERM a checkpointed training task is told to stop and
    /// its last checkpoint is committed before this returns `Preempted`. Whatever the outcome,
    /// every checkpoint the task saved is committed (or has failed to) before this returns.
    async fn try_order(
        &mut self,
        ranks: &[u32],
        kind: TaskKind,
    ) -> Result<Vec<TaskResult>, Interrupt> {
        let outcome = self.order_and_wait(ranks, kind).await;
        if let Some(commits) = self.commits.take() {
            if let Err(e) = commits.await {
                tracing::error!(error = %e, "a checkpoint commit panicked");
            }
        }
        outcome
    }

    /// Commits `saved` in the background, after every commit queued before it: the event loop
    /// goes on logging steps, watching workers and taking SIGTERM while the store is slow or
    /// down (a commit retries for up to the store's retry window).
    fn queue_commit(
        &mut self,
        checkpoints: Arc<tokio::sync::Mutex<Checkpoints>>,
        saved: xkd_protocol::SavedCheckpoint,
    ) {
        let before = self.commits.take();
        self.commits = Some(tokio::spawn(async move {
            if let Some(before) = before {
                let _ = before.await;
            }
            checkpoints.lock().await.commit(&saved).await;
        }));
    }

    async fn order_and_wait(
        &mut self,
        ranks: &[u32],
        kind: TaskKind,
    ) -> Result<Vec<TaskResult>, Interrupt> {
        self.next_task += 1;
        let id = self.next_task;
        let checkpointed = matches!(&kind, TaskKind::Train(t) if t.checkpoint.is_some());
        let task = CoordinatorMsg::Task(Task { id, kind });
        for &r in ranks {
            if let Err(e) = self.cluster.send(r, &task).await {
                return Err(Interrupt::Failed(e));
            }
        }
        let mut results: Vec<Option<TaskResult>> = vec![None; self.world];
        let mut waiting: HashSet<u32> = ranks.iter().copied().collect();
        // Ranks that left after answering (a worker preempted by its own SIGTERM): the task
        // still completes; the generation is replaced afterwards.
        let mut departed = Vec::new();
        while !waiting.is_empty() {
            let event = tokio::select! {
                event = self.cluster.next_event() => event,
                _ = self.sigterm.recv(), if !self.terminating => {
                    self.terminating = true;
                    if !checkpointed {
                        tracing::info!(stage = %self.stage, "SIGTERM: stopping");
                        return Err(Interrupt::Preempted);
                    }
                    tracing::info!(stage = %self.stage, "SIGTERM: stopping training at the next step and checkpointing it");
                    if let Err(e) = self.cluster.broadcast(&CoordinatorMsg::Stop { task: id }).await {
                        return Err(Interrupt::Failed(e));
                    }
                    continue;
                }
            };
            let Some(event) = event else {
                return Err(Interrupt::Failed(anyhow!("every worker connection closed")));
            };
            match event {
                Event::Lost { rank, reason } if results[rank as usize].is_some() => {
                    departed.push(format!("worker {rank} left after answering: {reason}"));
                }
                Event::Lost { rank, reason } => {
                    return Err(Interrupt::Failed(anyhow!(
                        "worker {rank} lost during {}: {reason}",
                        self.stage
                    )))
                }
                Event::Msg { rank, msg } => match msg {
                    WorkerMsg::Done { task, result } if task == id => {
                        waiting.remove(&rank);
                        results[rank as usize] = Some(result);
                    }
                    WorkerMsg::Failed { task, error } if task == id => {
                        return Err(Interrupt::Failed(anyhow!(
                            "worker {rank} failed in {}: {error}",
                            self.stage
                        )))
                    }
                    WorkerMsg::Step(report) => self.log_step(&report)?,
                    WorkerMsg::Saved(saved) if rank == 0 => match self.checkpoints.clone() {
                        Some(c) => self.queue_commit(c, saved),
                        None => tracing::warn!(step = saved.step, "unordered checkpoint ignored"),
                    },
                    WorkerMsg::SaveFailed { step, error, .. } => {
                        tracing::warn!(
                            rank,
                            step,
                            error,
                            "checkpoint not saved; the next one retries"
                        )
                    }
                    WorkerMsg::Heartbeat { .. } => {}
                    other => tracing::warn!(rank, ?other, "unexpected message"),
                },
            }
        }
        if self.terminating {
            return Err(Interrupt::Preempted);
        }
        let results: Vec<TaskResult> = ranks
            .iter()
            .map(|&r| results[r as usize].take().expect("answered"))
            .collect();
        // A worker that got SIGTERM itself stops the task early and then leaves.
        if let Some(step) = results.iter().find_map(|r| match r {
            TaskResult::Trained(s) if s.stopped => Some(s.steps),
            _ => None,
        }) {
            return Err(Interrupt::Replaced(anyhow!(
                "a worker was preempted during {}; training stopped at step {step}",
                self.stage
            )));
        }
        if !departed.is_empty() {
            return Err(Interrupt::Replaced(anyhow!("{}", departed.join("; "))));
        }
        Ok(results)
    }

    fn log_step(&mut self, r: &xkd_protocol::StepReport) -> Result<()> {
        let line = serde_json::json!({
            "run_id": self.run_id, "stage": self.stage, "rank": r.rank, "step": r.step,
            "loss": r.loss, "kl": r.kl, "ce": r.ce, "lr": r.lr, "grad_norm": r.grad_norm,
            "samples_per_s": r.samples_per_s, "tokens_per_s": r.tokens_per_s,
            "ms_teacher": r.ms_teacher,
            "ms_student": r.ms_student, "ms_loss": r.ms_loss, "ms_allreduce": r.ms_allreduce,
            "ms_optimizer": r.ms_optimizer,
        });
        writeln!(self.metrics, "{line}")?;
        if r.rank == 0 {
            tracing::info!(
                run_id = %self.run_id,
                stage = %self.stage,
                step = r.step,
                loss = format!("{:.4}", r.loss),
                kl = format!("{:.4}", r.kl),
                ce = format!("{:.4}", r.ce),
                lr = format!("{:.2e}", r.lr),
                grad_norm = format!("{:.3}", r.grad_norm),
                samples_per_s = format!("{:.0}", r.samples_per_s),
                ms_teacher = format!("{:.1}", r.ms_teacher),
                ms_student = format!("{:.1}", r.ms_student),
                ms_loss = format!("{:.2}", r.ms_loss),
                ms_allreduce = format!("{:.2}", r.ms_allreduce),
                ms_optimizer = format!("{:.2}", r.ms_optimizer),
                "step"
            );
        }
        Ok(())
    }

    fn all(&self) -> Vec<u32> {
        (0..self.world as u32).collect()
    }

    /// Rank 0 generates the dataset first; the others then load what it wrote.
    async fn prepare_data(&mut self) -> Result<DataSummary> {
        self.stage = "data".into();
        let first = self.order(&[0], TaskKind::PrepareData).await?;
        let rest: Vec<u32> = (1..self.world as u32).collect();
        if !rest.is_empty() {
            self.order(&rest, TaskKind::PrepareData).await?;
        }
        match first.into_iter().next() {
            Some(TaskResult::Data(d)) => {
                tracing::info!(dir = d.dir, classes = d.classes.len(), "dataset ready");
                Ok(d)
            }
            other => bail!("rank 0 answered PrepareData with {other:?}"),
        }
    }

    /// The stand-in model of `modality` pretrained on its own pretraining split, from the
    /// cache when a model of the same recipe is there; a Qwen2 model's directory as given.
    async fn pretrained(
        &mut self,
        config: &Config,
        data: &DataSummary,
        modality: Modality,
    ) -> Result<String> {
        let model = config.model(modality);
        if model.family == "qwen2" {
            tracing::info!(
                model = model.dir,
                "{} model: the given Qwen2 checkpoint",
                modality.as_str()
            );
            return Ok(model.dir.clone());
        }
        let key = section_digest(&(
            &data.dir,
            &config.data,
            &config.features,
            config.model(modality),
            &config.pretrain,
            config.run.seed,
            modality,
        ));
        let path = Path::new(&config.run.cache_dir)
            .join("models")
            .join(format!("{}-{key}.safetensors", modality.as_str()));
        let shown = path.display().to_string();
        if path.exists() {
            tracing::info!(
                model = shown,
                "reusing pretrained {} model",
                modality.as_str()
            );
            return Ok(shown);
        }
        self.stage = format!("pretrain_{}", modality.as_str());
        let clips = split(data, &self.stage)?.clips.clone();
        let p = &config.pretrain;
        let task = TrainTask {
            modality,
            objective: Objective::Supervised,
            init: None,
            save: shown.clone(),
            plan: shuffled(clips, config.run.seed),
            replay: None,
            steps: p.steps,
            batch: p.batch / self.world,
            replay_batch: 0,
            lr: p.lr,
            weight_decay: p.weight_decay,
            warmup_steps: p.warmup_steps,
            caption_weight: p.caption_weight,
            grad_clip: p.grad_clip,
            seed: config.run.seed,
            checkpoint: None,
            resume_from: None,
        };
        let summary = self.train(task).await?;
        tracing::info!(model = shown, loss = summary.final_loss, "pretrained");
        Ok(shown)
    }

    async fn train(&mut self, task: TrainTask) -> Result<TrainSummary> {
        let all = self.all();
        let results = self.order(&all, TaskKind::Train(Box::new(task))).await?;
        one_summary(results)
    }

    async fn evaluate(
        &mut self,
        config: &Config,
        modality: Modality,
        model: &str,
        clips: &xkd_protocol::SplitClips,
    ) -> Result<Vec<ClipOutcome>> {
        let task = EvalTask {
            modality,
            model: model.to_string(),
            plan: ShardPlan {
                clips: clips.clips.clone(),
                seed: config.run.seed,
                cursor: 0,
                shuffle: false,
            },
            seed: config.run.seed,
        };
        let all = self.all();
        let mut out = Vec::new();
        for result in self.order(&all, TaskKind::Evaluate(task)).await? {
            match result {
                TaskResult::Evaluated(o) => out.extend(o),
                other => bail!("a worker answered Evaluate with {other:?}"),
            }
        }
        out.sort_by_key(|o| o.clip);
        if out.len() != clips.clips.len() {
            bail!(
                "evaluation covered {} of {} clips",
                out.len(),
                clips.clips.len()
            );
        }
        Ok(out)
    }

    async fn distill(
        &mut self,
        config: &Config,
        data: &DataSummary,
        decision: &Decision,
        teacher: &str,
        student: &str,
        save: &Path,
    ) -> Result<(TrainSummary, Option<String>)> {
        let hard: HashSet<u32> = decision.hard_labels().into_iter().collect();
        let pool = split(data, "distill")?;
        let (mut main, mut others) = (Vec::new(), Vec::new());
        for (&clip, label) in pool.clips.iter().zip(&pool.labels) {
            if hard.contains(label) {
                main.push(clip);
            } else {
                others.push(clip);
            }
        }
        let dc = &config.distill;
        let per_worker = dc.batch / self.world;
        let replay_batch = if others.is_empty() {
            0
        } else {
            (per_worker as f64 * dc.replay_fraction).round() as usize
        };
        let mut task = TrainTask {
            modality: config.student_modality(),
            objective: Objective::Distill {
                teacher: teacher.to_string(),
                alpha: dc.alpha,
                temperature: dc.temperature,
                label_free: dc.target == "teacher",
                full_vocab: dc.kl_over == "vocab",
                caption_weight: dc.caption_weight,
            },
            init: Some(student.to_string()),
            save: save.display().to_string(),
            plan: shuffled(main, config.run.seed ^ 0x5eed),
            replay: (replay_batch > 0).then(|| shuffled(others, config.run.seed ^ 0x7e91)),
            steps: dc.steps,
            batch: per_worker - replay_batch,
            replay_batch,
            lr: dc.lr,
            weight_decay: dc.weight_decay,
            warmup_steps: dc.warmup_steps,
            caption_weight: 0.0,
            grad_clip: dc.grad_clip,
            seed: config.run.seed,
            checkpoint: None,
            resume_from: None,
        };
        if task.batch == 0 {
            bail!("distill.replay_fraction leaves no hard-class clips in a worker's batch");
        }
        let checkpoints = self
            .checkpoints
            .clone()
            .context("no checkpoint store was opened for this run")?;
        task.checkpoint = Some(CheckpointOrder {
            url: checkpoints.lock().await.url(),
            run_id: self.run_id.clone(),
            every_steps: config.checkpoint.every_steps,
        });
        let recipe = checkpoint::recipe_digest(config);
        let hard_classes = decision.hard_names();
        // Each pass starts (or, after a restart, resumes) from the newest checkpoint that
        // verifies; a failed generation is restarted by `recover` and the loop goes on.
        loop {
            let mut attempt = task.clone();
            // The loss at the checkpoint's step: the final loss when no step is left to take.
            let mut resumed_loss = None;
            let resumed = checkpoints
                .lock()
                .await
                .resume_point(&recipe, &hard_classes)
                .await?;
            if let Some(resumed) = resumed {
                let s = &resumed.state;
                let global = attempt.batch * self.world;
                if s.batch_per_rank * s.world_size != global
                    || s.replay_batch_per_rank * s.world_size != attempt.replay_batch * self.world
                {
                    bail!(
                        "checkpoint {} was made with a global batch of {} (+{} replay) on {} workers; \
                         {} workers make {} (+{}): choose a worker count that divides distill.batch \
                         the same way",
                        resumed.url,
                        s.batch_per_rank * s.world_size,
                        s.replay_batch_per_rank * s.world_size,
                        s.world_size,
                        self.world,
                        global,
                        attempt.replay_batch * self.world
                    );
                }
                tracing::info!(
                    step = s.step,
                    checkpoint = %resumed.url,
                    saved_by_workers = s.world_size,
                    workers = self.world,
                    "resuming distillation from checkpoint"
                );
                attempt.resume_from = Some(s.step);
                resumed_loss = s.loss;
                attempt.plan.cursor = s.cursor;
                if let Some(replay) = attempt.replay.as_mut() {
                    replay.cursor = s.replay_cursor;
                }
            }
            checkpoints.lock().await.begin(checkpoint::Context {
                // `try_order` numbers the task it sends next.
                task_id: self.next_task + 1,
                task: attempt.clone(),
                world: self.world,
                hard_classes: hard_classes.clone(),
                config_digest: recipe.clone(),
            });
            let all = self.all();
            let outcome = self
                .try_order(&all, TaskKind::Train(Box::new(attempt)))
                .await;
            let last = checkpoints.lock().await.end();
            match outcome {
                Ok(results) => {
                    let mut summary = one_summary(results)?;
                    if let (false, Some(loss)) = (summary.final_loss.is_finite(), resumed_loss) {
                        summary.final_loss = loss;
                    }
                    return Ok((summary, last));
                }
                Err(interrupt) => self.recover(interrupt).await?,
            }
        }
    }
}

/// The one summary of a data-parallel training task, once every rank is seen to end with
/// the same parameters (data parallelism's invariant).
fn one_summary(results: Vec<TaskResult>) -> Result<TrainSummary> {
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

fn shuffled(clips: Vec<u32>, seed: u64) -> ShardPlan {
    ShardPlan {
        clips,
        seed,
        cursor: 0,
        shuffle: true,
    }
}

fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))
}

fn generated_run_id() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!("run-{secs}-{}", std::process::id())
}

/// `XKD_JOIN_TOKEN` from the environment; a local run makes one up when it is not set.
fn join_token(local: bool) -> Result<String> {
    match std::env::var("XKD_JOIN_TOKEN") {
        Ok(t) if !t.is_empty() => Ok(t),
        _ if local => {
            let mut bytes = [0u8; 24];
            rand::rng().fill_bytes(&mut bytes);
            Ok(xkd_protocol::config::hex(&bytes))
        }
        _ => bail!("XKD_JOIN_TOKEN is not set: a cluster coordinator needs the run's join token"),
    }
}

fn spawn_workers(
    local: &LocalWorkers,
    addr: SocketAddr,
    cert: &Path,
    token: &str,
    out_dir: &Path,
) -> Result<Vec<tokio::process::Child>> {
    let logs = out_dir.join("logs");
    std::fs::create_dir_all(&logs)?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = (cores / local.count).max(1);
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
                .arg("--cert")
                .arg(cert)
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

async fn wait_children(children: &mut [tokio::process::Child]) {
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
