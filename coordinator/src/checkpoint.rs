//! The coordinator's half of a checkpoint: rank 0 has put the tensors into the store and says
//! so (`WorkerMsg::Saved`); here `state.json` is added (where training stands: step, data
//! cursor, seeds, schedule, config digest, hard classes, world size), the checkpoint is
//! committed (manifest last, create-only) and older ones are pruned. This side never reads or
//! writes a tensor; the worker side never commits.
//!
//! A checkpoint that fails to commit is logged and skipped: training goes on, and the next one
//! is a full checkpoint of its own.

use crate::metrics::Metrics;
use anyhow::{bail, Context as _, Result};
use serde::{Deserialize, Serialize};
use xkd_checkpoint::{ObjectEntry, Store, STATE};
use xkd_config::{section_digest, Config};
use xkd_protocol::{SavedCheckpoint, TrainTask};

/// The run-level prefix the distilled student is uploaded under.
const STUDENT_PREFIX: &str = "student";

/// Version of `state.json`'s layout; a reader refuses versions it does not know.
pub const STATE_FORMAT: u32 = 1;

/// Where checkpoints of this run go and how many stay.
pub struct Checkpoints {
    store: Store,
    run_id: String,
    keep_last: usize,
    /// URL of the newest committed checkpoint.
    last: Option<String>,
    /// The task whose checkpoints are being committed.
    current: Option<Context>,
    /// Told of each commit (`count_commits`).
    metrics: Option<Metrics>,
}

/// What a checkpoint's state is computed from: the task as ordered, and the run around it.
pub struct Context {
    pub task_id: u64,
    pub task: TrainTask,
    pub world: usize,
    /// The classes distillation runs on (`distill.classes`; the heuristic's hard classes by
    /// default).
    pub hard_classes: Vec<String>,
    pub config_digest: String,
}

/// `state.json`: everything besides tensors that continuing the distillation needs. The data
/// order and the questions are pure functions of the seeds and the cursors, so no generator
/// state beyond them exists.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainState {
    pub format_version: u32,
    pub run_id: String,
    pub stage: String,
    /// Optimizer steps taken.
    pub step: u64,
    pub total_steps: u64,
    /// Epoch of the hard-class plan the next sample falls in.
    pub epoch: u64,
    /// Global hard-class samples consumed (over all ranks): where the next step starts.
    pub cursor: u64,
    /// Global replay samples consumed.
    pub replay_cursor: u64,
    pub rng: RngState,
    pub schedule: Schedule,
    /// Digest of the config sections that decide the numbers (data, features, models,
    /// pretraining, heuristic, distillation, seed), so a resume can refuse a changed recipe;
    /// control, logging and checkpoint settings are left out, so it may change world size.
    pub config_digest: String,
    /// The classes distilled on: the hard classes unless `distill.classes` says otherwise.
    pub hard_classes: Vec<String>,
    pub world_size: usize,
    /// Clips per step per rank, hard-class and replay.
    pub batch_per_rank: usize,
    pub replay_batch_per_rank: usize,
    /// Rank 0's loss at `step`: the run's final loss when it resumes after its last step.
    /// (Absent from checkpoints written before it was recorded.)
    #[serde(default)]
    pub loss: Option<f64>,
}

/// Seeds of everything random in the stage.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RngState {
    /// The run seed: initialisation and question options.
    pub seed: u64,
    /// Seed of the per-epoch permutation of the hard-class clips.
    pub plan_seed: u64,
    /// Seed of the replay clips' permutation, when there is replay.
    pub replay_seed: Option<u64>,
}

/// Learning-rate schedule: linear warm-up, then cosine to a tenth of the peak.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Schedule {
    pub peak_lr: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
    /// The schedule step the next update uses.
    pub next_step: u64,
}

/// A checkpoint a run continues from.
pub struct Resumed {
    pub url: String,
    pub state: TrainState,
}

/// The digest `state.json` carries: the sections that decide the trained numbers.
pub fn recipe_digest(config: &Config) -> String {
    section_digest(&(
        &config.data,
        &config.features,
        &config.audio_model,
        &config.visual_model,
        &config.pretrain,
        &config.heuristic,
        // Without `distill.teacher`: a cached run equals the online one, and may resume it.
        config.distill.recipe(),
        config.run.seed,
    ))
}

impl TrainState {
    /// The state after `step` steps of `cx.task` (counted from the first step of the stage:
    /// a resumed task starts at `resume_from`, its plans' cursors where that step left them).
    pub fn after(run_id: &str, step: u64, loss: f64, cx: &Context) -> TrainState {
        let t = &cx.task;
        let world = cx.world as u64;
        let taken = step - t.resume_from.unwrap_or(0).min(step);
        let cursor = t.plan.cursor + taken * world * t.batch as u64;
        let replay_cursor = t
            .replay
            .as_ref()
            .map_or(0, |r| r.cursor + taken * world * t.replay_batch as u64);
        TrainState {
            format_version: STATE_FORMAT,
            run_id: run_id.to_string(),
            stage: "distill".into(),
            step,
            total_steps: t.steps,
            epoch: cursor / t.plan.len().max(1) as u64,
            cursor,
            replay_cursor,
            rng: RngState {
                seed: t.seed,
                plan_seed: t.plan.seed,
                replay_seed: t.replay.as_ref().map(|r| r.seed),
            },
            schedule: Schedule {
                peak_lr: t.lr,
                warmup_steps: t.warmup_steps,
                total_steps: t.steps,
                next_step: step,
            },
            config_digest: cx.config_digest.clone(),
            hard_classes: cx.hard_classes.clone(),
            world_size: cx.world,
            batch_per_rank: t.batch,
            replay_batch_per_rank: t.replay_batch,
            loss: Some(loss).filter(|l| l.is_finite()),
        }
    }
}

impl Checkpoints {
    /// The store `config.checkpoint.url` names, or `file://<out_dir>/checkpoints`.
    pub fn open(config: &Config, run_id: &str, out_dir: &std::path::Path) -> Result<Checkpoints> {
        let url = store_url(config, out_dir)?;
        let store = Store::open(&url).with_context(|| format!("checkpoint.url `{url}`"))?;
        xkd_checkpoint::check_run_id(run_id).with_context(|| format!("run.run_id `{run_id}`"))?;
        Ok(Checkpoints {
            store,
            run_id: run_id.to_string(),
            keep_last: config.checkpoint.keep_last,
            last: None,
            current: None,
            metrics: None,
        })
    }

    /// The newest checkpoint of this run that verifies, with its state, if any: where a
    /// (re)started distillation continues. Newer checkpoints that do not verify are reported
    /// and discarded, so the run can commit those steps again. A checkpoint of another recipe
    /// or other hard classes is refused, not resumed from.
    pub async fn resume_point(
        &self,
        recipe: &str,
        hard_classes: &[String],
    ) -> Result<Option<Resumed>> {
        let point = self
            .store
            .newest_verified(&self.run_id)
            .await
            .with_context(|| format!("looking for checkpoints of run {}", self.run_id))?;
        for bad in &point.skipped {
            tracing::warn!(
                step = bad.step,
                checkpoint = %bad.url,
                reason = %bad.reason,
                "checkpoint does not verify: skipped, and discarded so this step can be saved again"
            );
            self.store
                .discard(&self.run_id, bad.step)
                .await
                .with_context(|| format!("discarding {}", bad.url))?;
        }
        let Some(manifest) = point.checkpoint else {
            return Ok(None);
        };
        let url = as_url(self.store.checkpoint_url(&self.run_id, manifest.step));
        let bytes = self.store.read_verified(&manifest, STATE).await?;
        let state: TrainState =
            serde_json::from_slice(&bytes).with_context(|| format!("reading {STATE} of {url}"))?;
        if state.format_version != STATE_FORMAT {
            bail!(
                "{url}: {STATE} has format version {}; this xkd reads {STATE_FORMAT}",
                state.format_version
            );
        }
        if state.step != manifest.step {
            bail!(
                "{url}: {STATE} says step {}, the manifest {}",
                state.step,
                manifest.step
            );
        }
        if state.config_digest != recipe {
            bail!(
                "{url} was made by another recipe (config digest {}, this run {recipe}): \
                 resuming would silently train something else; use a new run.run_id",
                state.config_digest
            );
        }
        if state.hard_classes != hard_classes {
            bail!(
                "{url} distilled the classes {:?}, this run teaches {:?}: use a new run.run_id",
                state.hard_classes,
                hard_classes
            );
        }
        Ok(Some(Resumed { url, state }))
    }

    /// The URL of the run-level object `name` (`<store>/<run_id>/run/<name>`).
    pub fn run_object_url(&self, name: &str) -> String {
        as_url(self.store.run_object_url(&self.run_id, name))
    }

    /// The run-level object `name`, or `None` when the store has none. (The store's errors
    /// name the object.)
    pub async fn get_run_object(&self, name: &str) -> Result<Option<bytes::Bytes>> {
        Ok(self.store.get_run_object(&self.run_id, name).await?)
    }

    /// Puts the run-level object `name`, replacing one of the same name.
    pub async fn put_run_object(&self, name: &str, bytes: bytes::Bytes) -> Result<()> {
        self.store.put_run_object(&self.run_id, name, bytes).await?;
        Ok(())
    }

    /// Where rank 0 uploads the distilled student (`<store>/<run_id>/run/student`): the
    /// coordinator's output directory need not be on a worker's host.
    pub fn student_url(&self) -> String {
        self.run_object_url(STUDENT_PREFIX)
    }

    /// Copies what is under `student_url` into `out_dir` (`student.safetensors` or
    /// `student-lora/`), each entry replacing its namesake there once all are down.
    pub async fn download_student(&self, out_dir: &std::path::Path) -> Result<Vec<String>> {
        let url = self.student_url();
        let tmp = out_dir.join(".student.partial");
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)?;
        }
        let names = Store::open(&url)?.download_prefix(&tmp).await?;
        if names.is_empty() {
            bail!("no trained student under {url}");
        }
        for entry in std::fs::read_dir(&tmp)? {
            let from = entry?.path();
            let to = out_dir.join(from.file_name().context("an entry without a name")?);
            if to.is_dir() {
                std::fs::remove_dir_all(&to)?;
            }
            std::fs::rename(&from, &to)
                .with_context(|| format!("moving the student into {}", to.display()))?;
        }
        std::fs::remove_dir_all(&tmp)?;
        Ok(names)
    }

    /// The URL of checkpoint `step` of this run.
    pub fn checkpoint_url(&self, step: u64) -> String {
        as_url(self.store.checkpoint_url(&self.run_id, step))
    }

    /// Tells `metrics` of every commit from now on, as it happens (before it is logged).
    pub fn count_commits(&mut self, metrics: Metrics) {
        self.metrics = Some(metrics);
    }

    /// From now on, checkpoints belong to the task `cx` describes.
    pub fn begin(&mut self, cx: Context) {
        self.current = Some(cx);
    }

    /// The task's checkpoints are over (later `Saved` messages are ignored); returns the URL
    /// of the newest committed one.
    pub fn end(&mut self) -> Option<String> {
        self.current = None;
        self.last.clone()
    }

    /// The store's URL, as workers are told it.
    pub fn url(&self) -> String {
        self.store.url()
    }

    /// URL of the newest checkpoint committed so far.
    pub fn last(&self) -> Option<&str> {
        self.last.as_deref()
    }

    /// Adds `state.json` to what rank 0 saved, commits, prunes. Failures are logged, never
    /// returned: a lost checkpoint does not stop training.
    pub async fn commit(&mut self, saved: &SavedCheckpoint) {
        let step = saved.step;
        let Some(cx) = self.current.as_ref() else {
            tracing::warn!(step, "a checkpoint while no task saves any; ignored");
            return;
        };
        if saved.task != cx.task_id {
            tracing::warn!(
                step,
                task = saved.task,
                "a checkpoint of another task; ignored"
            );
            return;
        }
        match self.try_commit(saved, cx).await {
            Ok((url, bytes)) => {
                if let Some(metrics) = &self.metrics {
                    metrics.committed(step);
                }
                tracing::info!(step, url, bytes, "checkpoint committed");
                self.last = Some(url);
                if let Err(e) = self.store.prune(&self.run_id, self.keep_last).await {
                    tracing::warn!(step, error = %e, "pruning old checkpoints failed");
                }
            }
            Err(e) => tracing::warn!(
                step,
                error = format!("{e:#}"),
                "checkpoint not committed; training goes on"
            ),
        }
    }

    async fn try_commit(&self, saved: &SavedCheckpoint, cx: &Context) -> Result<(String, u64)> {
        let state = TrainState::after(&self.run_id, saved.step, saved.loss, cx);
        let json = serde_json::to_vec_pretty(&state)?;
        let mut objects: Vec<ObjectEntry> = saved
            .objects
            .iter()
            .map(|o| ObjectEntry {
                name: o.name.clone(),
                size: o.size,
                sha256: o.sha256.clone(),
            })
            .collect();
        let entry = self
            .store
            .put_object(&self.run_id, saved.step, STATE, json.into())
            .await?;
        objects.push(entry);
        let manifest = self
            .store
            .commit(&self.run_id, saved.step, &objects)
            .await?;
        let url = as_url(self.store.checkpoint_url(&self.run_id, saved.step));
        Ok((url, manifest.total_size()))
    }
}

/// The store shows a local checkpoint as a path; report.json promises a URL.
fn as_url(location: String) -> String {
    if location.starts_with('/') {
        format!("file://{location}")
    } else {
        location
    }
}

/// `checkpoint.url`, or a `file://` URL of `<out_dir>/checkpoints` (made absolute).
fn store_url(config: &Config, out_dir: &std::path::Path) -> Result<String> {
    if !config.checkpoint.url.is_empty() {
        return Ok(config.checkpoint.url.clone());
    }
    let dir = std::path::absolute(out_dir.join("checkpoints"))
        .with_context(|| format!("resolving {}", out_dir.display()))?;
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(format!("file://{}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use xkd_protocol::{Objective, ShardPlan};

    fn task() -> TrainTask {
        let plan = |seed| ShardPlan::shuffled((0..50).collect(), seed);
        TrainTask {
            modality: xkd_config::Modality::Audio,
            objective: Objective::Supervised,
            init: None,
            save: String::new(),
            keep_saved: false,
            plan: plan(1),
            replay: Some(plan(2)),
            steps: 400,
            batch: 8,
            replay_batch: 8,
            lr: 2e-3,
            weight_decay: 0.0,
            warmup_steps: 20,
            caption_weight: 0.0,
            grad_clip: 1.0,
            seed: 17,
            checkpoint: None,
            resume_from: None,
            teacher_cache: None,
        }
    }

    #[test]
    fn state_counts_global_samples_over_all_ranks() {
        let cx = Context {
            task_id: 3,
            task: task(),
            world: 2,
            hard_classes: vec!["owl".to_string()],
            config_digest: "abc".into(),
        };
        let s = TrainState::after("r", 100, 0.5, &cx);
        assert_eq!(s.cursor, 100 * 2 * 8);
        assert_eq!(s.replay_cursor, 100 * 2 * 8);
        assert_eq!(s.epoch, 1600 / 50);
        assert_eq!(s.schedule.next_step, 100);
        assert_eq!(s.rng.replay_seed, Some(2));
        assert_eq!(s.world_size, 2);
    }

    /// The feature cache's budget and the loader's threads move work and memory, not numbers:
    /// a run resumed with other values continues the same recipe.
    #[test]
    fn memory_and_loader_keys_leave_the_recipe_digest_alone() {
        let base = Config::embedded();
        let mut other = base.clone();
        other.run.feature_cache_mb = 0;
        other.run.loader_threads = 7;
        assert_eq!(recipe_digest(&base), recipe_digest(&other));
        other.run.seed += 1;
        assert_ne!(recipe_digest(&base), recipe_digest(&other));
    }
}
