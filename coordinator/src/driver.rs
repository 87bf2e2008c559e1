//! The driver: orders tasks to the current generation of workers, collects what comes back,
//! commits checkpoints in step order, and survives a lost worker by restarting the generation
//! (up to `control.max_restarts` within `control.restart_window_s`) and resuming from the
//! newest checkpoint. A worker's permanent failure ends the run; a task whose compute thread
//! stops making progress (`control.stall_timeout_ms`) is ended like a lost worker.

use crate::checkpoint::Checkpoints;
use crate::local::Generations;
use crate::metrics::{Metrics, RestartKind};
use crate::run::{collective_kind, Preempted};
use crate::server::{Cluster, Event};
use anyhow::{anyhow, Context, Result};
use std::collections::{HashSet, VecDeque};
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::signal::unix::Signal;
use xkd_config::Config;
use xkd_protocol::{
    Assignment, CollectiveKind, CoordinatorMsg, FailureKind, Task, TaskKind, TaskResult, WorkerMsg,
};

/// Why a task did not come back with results.
pub(crate) enum Interrupt {
    /// A worker was lost, stalled or failed transiently: restart the workers (counted in
    /// `control.max_restarts`).
    Failed(anyhow::Error),
    /// A worker was preempted on its own (its SIGTERM) and left in order, after every rank
    /// stopped at one step and that step's checkpoint was committed: restart the workers
    /// without counting it, since nothing failed and the run lost no step.
    Replaced(anyhow::Error),
    /// SIGTERM to the coordinator: stop the run (after a checkpoint, if one was running).
    Preempted,
    /// Something restarting will not mend (a worker's permanent failure, a file the
    /// coordinator cannot write).
    Fatal(anyhow::Error),
}

impl From<anyhow::Error> for Interrupt {
    fn from(e: anyhow::Error) -> Self {
        Interrupt::Fatal(e)
    }
}

/// Orders tasks to the cluster and collects what comes back; replaces the workers when one
/// is lost (up to `control.max_restarts` times within `control.restart_window_s`).
pub(crate) struct Driver {
    pub(crate) cluster: Cluster,
    pub(crate) generations: Generations,
    pub(crate) world: usize,
    pub(crate) run_id: String,
    pub(crate) config: Config,
    pub(crate) next_task: u64,
    /// `metrics.jsonl`: every rank's step reports.
    pub(crate) metrics_file: std::fs::File,
    /// What `--metrics-listen` serves; fed from here, never waited on.
    pub(crate) metrics: Metrics,
    pub(crate) stage: String,
    /// Commits the checkpoints of the task that saves them (distillation). Shared with the
    /// background commits (`queue_commit`).
    pub(crate) checkpoints: Option<Arc<tokio::sync::Mutex<Checkpoints>>>,
    /// The last commit queued; each waits for the one before, so commits keep step order.
    pub(crate) commits: Option<tokio::task::JoinHandle<()>>,
    pub(crate) restarts: RestartBudget,
    pub(crate) sigterm: Signal,
    /// SIGTERM was received: the run is winding down.
    pub(crate) terminating: bool,
}

impl Driver {
    pub(crate) async fn start(
        mut generations: Generations,
        config: &Config,
        run_id: &str,
        checkpoints: Option<Checkpoints>,
        sigterm: Signal,
        metrics: Metrics,
    ) -> Result<Driver> {
        let path = generations.out_dir.join("metrics.jsonl");
        // Appended to: a resumed run adds to the curve of the run it continues.
        let metrics_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        metrics.enter_stage("setup");
        let cluster = generations.next().await?;
        let mut driver = Driver {
            world: generations.world,
            cluster,
            generations,
            run_id: run_id.to_string(),
            config: config.clone(),
            next_task: 0,
            metrics_file,
            metrics,
            stage: "setup".into(),
            checkpoints: checkpoints.map(|c| Arc::new(tokio::sync::Mutex::new(c))),
            commits: None,
            restarts: RestartBudget::new(
                config.control.max_restarts,
                Duration::from_secs(config.control.restart_window_s),
            ),
            sigterm,
            terminating: false,
        };
        driver.assign().await?;
        Ok(driver)
    }

    pub(crate) async fn assign(&mut self) -> Result<()> {
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

    pub(crate) async fn shutdown(&mut self, reason: &str) {
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
    pub(crate) async fn order(&mut self, ranks: &[u32], kind: TaskKind) -> Result<Vec<TaskResult>> {
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
    pub(crate) async fn recover(&mut self, interrupt: Interrupt) -> Result<()> {
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
            if counted && !self.restarts.take(Instant::now()) {
                return Err(error.context(format!(
                    "{} failed and the run has used its {max} restarts within {} s \
                     (control.max_restarts, control.restart_window_s)",
                    self.stage, self.config.control.restart_window_s
                )));
            }
            tracing::warn!(
                stage = %self.stage,
                restart = self.restarts.used(),
                max_restarts = max,
                counted,
                error = format!("{error:#}"),
                "restarting the workers"
            );
            self.metrics.restarted(if counted {
                RestartKind::Failure
            } else {
                RestartKind::Preemption
            });
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
    pub(crate) async fn regroup(&mut self, reason: &str) -> Result<(), Interrupt> {
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
    pub(crate) async fn try_order(
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
    pub(crate) fn queue_commit(
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

    pub(crate) async fn order_and_wait(
        &mut self,
        ranks: &[u32],
        kind: TaskKind,
    ) -> Result<Vec<TaskResult>, Interrupt> {
        self.next_task += 1;
        let id = self.next_task;
        let checkpointed = matches!(&kind, TaskKind::Train(t) if t.checkpoint.is_some());
        self.metrics.enter_stage(&self.stage);
        if let TaskKind::Train(t) = &kind {
            self.metrics.plan_steps(&self.stage, t.steps);
        }
        let bar = match &kind {
            TaskKind::Train(t) => {
                crate::bars::Stage::start(&self.stage, Some(t.steps), t.resume_from.unwrap_or(0))
            }
            _ => crate::bars::Stage::start(&self.stage, None, 0),
        };
        let task = CoordinatorMsg::Task(Task { id, kind });
        for &r in ranks {
            if let Err(e) = self.cluster.send(r, &task).await {
                return Err(Interrupt::Failed(e));
            }
        }
        let mut results: Vec<Option<TaskResult>> = vec![None; self.world];
        let mut waiting: HashSet<u32> = ranks.iter().copied().collect();
        let stall = Duration::from_millis(self.config.control.stall_timeout_ms);
        let mut watch = Watchdog::new(self.world, stall);
        let mut checks = tokio::time::interval((stall / 4).min(Duration::from_secs(1)));
        // Ranks that left after answering (a worker preempted by its own SIGTERM): the task
        // still completes; the generation is replaced afterwards.
        let mut departed = Vec::new();
        while !waiting.is_empty() {
            let event = tokio::select! {
                event = self.cluster.next_event() => event,
                _ = checks.tick() => {
                    match watch.stalled(&waiting) {
                        Some(stalled) => return Err(Interrupt::Failed(anyhow!(
                            "{stalled} during {} (control.stall_timeout_ms)",
                            self.stage
                        ))),
                        None => continue,
                    }
                }
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
                    WorkerMsg::Failed { task, error, kind } if task == id => {
                        let e = anyhow!("worker {rank} failed in {}: {error}", self.stage);
                        return Err(match kind {
                            FailureKind::Transient => Interrupt::Failed(e),
                            FailureKind::Permanent => Interrupt::Fatal(e.context(
                                "a permanent failure (restarting would fail the same way)",
                            )),
                        });
                    }
                    WorkerMsg::Step(report) => {
                        if report.rank == 0 {
                            bar.set(report.step);
                        }
                        self.log_step(&report)?
                    }
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
                    WorkerMsg::Heartbeat {
                        progress, waiting, ..
                    } => watch.beat(rank, progress, waiting),
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

    pub(crate) fn log_step(&mut self, r: &xkd_protocol::StepReport) -> Result<()> {
        let line = serde_json::json!({
            "run_id": self.run_id, "stage": self.stage, "rank": r.rank, "step": r.step,
            "loss": r.loss, "kl": r.kl, "ce": r.ce, "lr": r.lr, "grad_norm": r.grad_norm,
            "samples_per_s": r.samples_per_s, "tokens_per_s": r.tokens_per_s,
            "ms_teacher": r.ms_teacher,
            "ms_student": r.ms_student, "ms_loss": r.ms_loss, "ms_allreduce": r.ms_allreduce,
            "ms_optimizer": r.ms_optimizer,
        });
        writeln!(self.metrics_file, "{line}")?;
        self.metrics.step(&self.stage, r);
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

    pub(crate) fn all(&self) -> Vec<u32> {
        (0..self.world as u32).collect()
    }
}

/// The progress watchdog of one task: when each rank's compute thread last reported new
/// progress on its heartbeat, and whether it now waits on a deadline of its own (a
/// collective, the store's retries), which the watchdog leaves to that deadline.
struct Watchdog {
    limit: Duration,
    /// Per rank: the last progress count heard, when it last changed (or the task started),
    /// and the last `waiting` flag.
    ranks: Vec<(Option<u64>, Instant, bool)>,
}

impl Watchdog {
    fn new(world: usize, limit: Duration) -> Watchdog {
        Watchdog {
            limit,
            ranks: vec![(None, Instant::now(), false); world],
        }
    }

    fn beat(&mut self, rank: u32, progress: u64, waiting: bool) {
        if let Some(r) = self.ranks.get_mut(rank as usize) {
            if r.0 != Some(progress) {
                *r = (Some(progress), Instant::now(), waiting);
            } else {
                r.2 = waiting;
            }
        }
    }

    /// Which of the ranks still running the task made no progress for the limit outside a
    /// wait of their own, with the ranks waiting on them, as a sentence; `None` when none did.
    fn stalled(&self, running: &HashSet<u32>) -> Option<String> {
        let mut running: Vec<u32> = running.iter().copied().collect();
        running.sort_unstable();
        let stuck: Vec<String> = running
            .iter()
            .filter(|&&r| {
                let (_, since, waiting) = self.ranks[r as usize];
                !waiting && since.elapsed() >= self.limit
            })
            .map(|r| r.to_string())
            .collect();
        if stuck.is_empty() {
            return None;
        }
        let waiting: Vec<String> = running
            .iter()
            .filter(|&&r| self.ranks[r as usize].2)
            .map(|r| r.to_string())
            .collect();
        let mut sentence = format!(
            "worker {} made no progress for {:?}",
            stuck.join(", "),
            self.limit
        );
        if !waiting.is_empty() {
            sentence.push_str(&format!(" (worker {} waiting on it)", waiting.join(", ")));
        }
        Some(sentence)
    }
}

/// `max` restarts within any `window`, as elastic launchers count them: a long run that meets
/// a transient failure now and then is not ended by their sum.
pub(crate) struct RestartBudget {
    max: u32,
    window: Duration,
    /// When each counted restart happened, oldest first, within the last `window`.
    taken: VecDeque<Instant>,
}

impl RestartBudget {
    pub(crate) fn new(max: u32, window: Duration) -> RestartBudget {
        RestartBudget {
            max,
            window,
            taken: VecDeque::new(),
        }
    }

    /// Takes one restart at `now` if the window has one left.
    pub(crate) fn take(&mut self, now: Instant) -> bool {
        while self
            .taken
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) >= self.window)
        {
            self.taken.pop_front();
        }
        if self.taken.len() >= self.max as usize {
            return false;
        }
        self.taken.push_back(now);
        true
    }

    /// Restarts counted within the window, as of the last `take`.
    pub(crate) fn used(&self) -> usize {
        self.taken.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restarts_are_counted_within_a_sliding_window() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut budget = RestartBudget::new(2, Duration::from_secs(3600));
        assert!(budget.take(at(0)));
        assert!(budget.take(at(1000)));
        assert!(!budget.take(at(2000)), "a third within the hour");
        // The first has left the window: one is free again, and only one.
        assert!(budget.take(at(3600)));
        assert!(!budget.take(at(3700)));
        assert!(budget.take(at(4600)));
        assert_eq!(budget.used(), 2);
        assert!(!RestartBudget::new(0, Duration::from_secs(1)).take(at(0)));
    }

    #[test]
    fn the_watchdog_names_a_rank_without_progress_and_not_one_waiting() {
        let limit = Duration::from_millis(50);
        let mut watch = Watchdog::new(3, limit);
        let running: HashSet<u32> = [0, 1, 2].into();
        watch.beat(0, 1, true);
        watch.beat(1, 5, false);
        watch.beat(2, 9, false);
        assert_eq!(watch.stalled(&running), None);
        std::thread::sleep(limit * 2);
        // Rank 2 moved on; rank 0 waits in a collective; rank 1 has not moved.
        watch.beat(2, 10, false);
        watch.beat(1, 5, false);
        assert_eq!(
            watch.stalled(&running).as_deref(),
            Some("worker 1 made no progress for 50ms (worker 0 waiting on it)")
        );
        let done: HashSet<u32> = [0, 2].into();
        assert_eq!(watch.stalled(&done), None, "rank 1 has answered");
    }
}
