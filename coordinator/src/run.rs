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
use std::time::{Duration, Instant};
use xkd_protocol::config::{section_digest, Config, Modality};
use xkd_protocol::{
    Assignment, CheckpointOrder, ClipOutcome, CoordinatorMsg, DataSummary, EvalTask, Objective,
    ShardPlan, Task, TaskKind, TaskResult, TrainSummary, TrainTask, WorkerMsg,
};

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
}

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
    let token = join_token(opts.local.is_some())?;
    let listen: SocketAddr = config.control.listen.parse().with_context(|| {
        format!(
            "control.listen `{}` is not an address",
            config.control.listen
        )
    })?;
    let mut server = ControlServer::bind(listen, token.clone()).await?;
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
    let mut children = match &opts.local {
        Some(local) => spawn_workers(local, server.local_addr(), &cert_path, &token, &out_dir)?,
        None => Vec::new(),
    };
    let cluster = server
        .gather(
            world,
            Duration::from_millis(config.control.join_timeout_ms),
            Duration::from_millis(config.control.heartbeat_timeout_ms),
        )
        .await?;
    let mut driver = Driver::new(cluster, &run_id, &out_dir, checkpoints)?;
    driver.assign(&config, &out_dir).await?;
    let result = stages(
        &mut driver,
        &config,
        &out_dir,
        opts.only_hard_classes,
        started,
    )
    .await;
    let reason = match &result {
        Ok(_) => "run finished".to_string(),
        Err(e) => format!("run failed: {e:#}"),
    };
    driver.shutdown(&reason).await;
    wait_children(&mut children).await;
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
    let distilled = out_dir.join("student.safetensors");
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

/// Orders tasks to the cluster and collects what comes back.
struct Driver {
    cluster: Cluster,
    world: usize,
    run_id: String,
    next_task: u64,
    metrics: std::fs::File,
    stage: String,
    /// Commits the checkpoints of the task that saves them (distillation).
    checkpoints: Option<Checkpoints>,
}

impl Driver {
    fn new(
        cluster: Cluster,
        run_id: &str,
        out_dir: &Path,
        checkpoints: Option<Checkpoints>,
    ) -> Result<Driver> {
        let path = out_dir.join("metrics.jsonl");
        let metrics =
            std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Driver {
            world: cluster.members().len(),
            cluster,
            run_id: run_id.to_string(),
            next_task: 0,
            metrics,
            stage: "setup".into(),
            checkpoints,
        })
    }

    async fn assign(&mut self, config: &Config, out_dir: &Path) -> Result<()> {
        let peers: Vec<String> = self
            .cluster
            .members()
            .iter()
            .map(|m| m.join.collective_addr.clone())
            .collect();
        let (toml, digest) = (config.to_toml(), config.digest());
        for rank in 0..self.world as u32 {
            let msg = CoordinatorMsg::Assignment(Assignment {
                run_id: self.run_id.clone(),
                rank,
                world_size: self.world as u32,
                peers: peers.clone(),
                config_toml: toml.clone(),
                config_digest: digest.clone(),
                out_dir: out_dir.display().to_string(),
            });
            self.cluster.send(rank, &msg).await?;
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

    /// Send `kind` to `ranks` and wait until each has answered; returns results by rank.
    async fn order(&mut self, ranks: &[u32], kind: TaskKind) -> Result<Vec<TaskResult>> {
        self.next_task += 1;
        let id = self.next_task;
        let task = CoordinatorMsg::Task(Task { id, kind });
        for &r in ranks {
            self.cluster.send(r, &task).await?;
        }
        let mut results: Vec<Option<TaskResult>> = vec![None; self.world];
        let mut waiting: HashSet<u32> = ranks.iter().copied().collect();
        while !waiting.is_empty() {
            let event = self
                .cluster
                .next_event()
                .await
                .ok_or_else(|| anyhow!("every worker connection closed"))?;
            match event {
                Event::Lost { rank, reason } => {
                    bail!("worker {rank} lost during {}: {reason}", self.stage)
                }
                Event::Msg { rank, msg } => match msg {
                    WorkerMsg::Done { task, result } if task == id => {
                        waiting.remove(&rank);
                        results[rank as usize] = Some(result);
                    }
                    WorkerMsg::Failed { task, error } if task == id => {
                        bail!("worker {rank} failed in {}: {error}", self.stage)
                    }
                    WorkerMsg::Step(report) => self.log_step(&report)?,
                    WorkerMsg::Saved(saved) if rank == 0 => match self.checkpoints.as_mut() {
                        Some(c) => c.commit(&saved).await,
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
        Ok(ranks
            .iter()
            .map(|&r| results[r as usize].take().expect("answered"))
            .collect())
    }

    fn log_step(&mut self, r: &xkd_protocol::StepReport) -> Result<()> {
        let line = serde_json::json!({
            "run_id": self.run_id, "stage": self.stage, "rank": r.rank, "step": r.step,
            "loss": r.loss, "kl": r.kl, "ce": r.ce, "lr": r.lr, "grad_norm": r.grad_norm,
            "samples_per_s": r.samples_per_s, "ms_teacher": r.ms_teacher,
            "ms_student": r.ms_student, "ms_allreduce": r.ms_allreduce,
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
    /// cache when a model of the same recipe is there.
    async fn pretrained(
        &mut self,
        config: &Config,
        data: &DataSummary,
        modality: Modality,
    ) -> Result<String> {
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
        };
        let summary = self.train(task).await?;
        tracing::info!(model = shown, loss = summary.final_loss, "pretrained");
        Ok(shown)
    }

    async fn train(&mut self, task: TrainTask) -> Result<TrainSummary> {
        let all = self.all();
        let results = self.order(&all, TaskKind::Train(Box::new(task))).await?;
        let summaries: Vec<TrainSummary> = results
            .into_iter()
            .map(|r| match r {
                TaskResult::Trained(s) => Ok(s),
                other => Err(anyhow!("a worker answered Train with {other:?}")),
            })
            .collect::<Result<_>>()?;
        // Data parallelism's invariant: every rank ends with the same parameters.
        if summaries.iter().any(|s| s.digest != summaries[0].digest) {
            bail!("ranks disagree on the trained parameters (digests differ)");
        }
        Ok(summaries.into_iter().next().expect("world >= 1"))
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
        };
        if task.batch == 0 {
            bail!("distill.replay_fraction leaves no hard-class clips in a worker's batch");
        }
        let world = self.world;
        let next_task = self.next_task + 1;
        let checkpoints = self
            .checkpoints
            .as_mut()
            .context("no checkpoint store was opened for this run")?;
        task.checkpoint = Some(CheckpointOrder {
            url: checkpoints.url(),
            run_id: self.run_id.clone(),
            every_steps: config.checkpoint.every_steps,
        });
        checkpoints.begin(checkpoint::Context {
            // `order` numbers the task it sends next.
            task_id: next_task,
            task: task.clone(),
            world,
            hard_classes: decision.hard_names(),
            config_digest: checkpoint::recipe_digest(config),
        });
        let summary = self.train(task).await;
        let last = self.checkpoints.as_mut().and_then(|c| c.end());
        Ok((summary?, last))
    }
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
            let log = std::fs::File::create(&log_path)
                .with_context(|| format!("creating {}", log_path.display()))?;
            let child = tokio::process::Command::new(&local.exe)
                .arg("--log-format")
                .arg(&local.log_format)
                .arg("worker")
                .arg("--coordinator")
                .arg(addr.to_string())
                .arg("--cert")
                .arg(cert)
                .env("XKD_JOIN_TOKEN", token)
                .env("RAYON_NUM_THREADS", threads.to_string())
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .kill_on_drop(true)
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
