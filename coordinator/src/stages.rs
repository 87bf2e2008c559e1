//! The stages of a run as the driver carries them out: the dataset, the pretrained models, the
//! probe and hard classes, evaluation, distillation; `stages` puts them in order. What the
//! probe and the evaluation before distillation decide is stored once per run
//! (`decisions.rs`) and reused by every later start.

use crate::checkpoint::{self};
use crate::decisions::{self, RunDecisions};
use crate::driver::Driver;
use crate::heuristic::{self, Decision};
use crate::report::{self};
use crate::run::{one_summary, shuffled, write_json, Goal, Outcome};
use anyhow::{anyhow, bail, Context, Result};
use std::collections::HashSet;
use std::path::Path;
use std::time::Instant;
use xkd_config::{
    section_digest, CeTarget, Config, DataSource, DistillClasses, KlOver, Modality, ModelFamily,
    ReplayTarget, TeacherSource,
};
use xkd_protocol::{
    CacheTask, CheckpointOrder, ClipOutcome, DataSummary, EvalTask, Objective, ShardPlan, TaskKind,
    TaskResult, TeacherCache, TeacherManifest, TrainSummary, TrainTask,
};

pub(crate) async fn stages(
    d: &mut Driver,
    config: &Config,
    out_dir: &Path,
    goal: &Goal,
    started: Instant,
) -> Result<Outcome> {
    if let Goal::Evaluate { checkpoint } = goal {
        return evaluate_checkpoint(d, config, out_dir, checkpoint).await;
    }
    let only_hard = *goal == Goal::HardClasses;
    let data = d.prepare_data().await?;
    let student_m = config.student_modality();
    let teacher_m = config.teacher_modality();
    let teacher = d.pretrained(config, &data, teacher_m).await?;
    let student = d.pretrained(config, &data, student_m).await?;

    // A run started again reuses what its first start decided: probing again could flip a
    // borderline class under its checkpoints, and costs as much as a share of the training.
    let decided = match d.stored_decisions(config).await? {
        Some((stored, url)) => reuse(config, stored, &url, out_dir)?,
        None => {
            let decision = d.probe(config, &data, &teacher, &student, out_dir).await?;
            if only_hard {
                return Ok(Outcome::HardClasses(decision));
            }
            d.evaluate_before(config, &data, decision, &teacher, &student)
                .await?
        }
    };
    let taught = decided.taught_labels(&data.classes)?;
    let hard = decided.hard_labels(&data.classes)?;

    d.stage = "distill".into();
    let checkpoints = d
        .checkpoints
        .clone()
        .context("no checkpoint store was opened for this run")?;
    let upload = checkpoints.lock().await.student_url();
    let (summary, final_checkpoint) = d
        .distill(config, &data, (&taught, &hard), &teacher, &student, &upload)
        .await?;
    // Rank 0 uploaded the student (a stand-in whole, a Qwen2 student as its LoRA adapters in
    // PEFT's format); its copy in the output directory comes from the store.
    let names = checkpoints.lock().await.download_student(out_dir).await?;
    tracing::info!(url = upload, files = names.len(), out = %out_dir.display(), "distilled student saved");

    // Every rank evaluates the final checkpoint, which the store holds whatever host a rank
    // is on; `xkd eval --checkpoint` of it gives the same numbers.
    d.stage = "eval_after".into();
    let after_path = match &final_checkpoint {
        Some(url) => url.clone(),
        // This start committed none: the run had already taken its last step.
        None => checkpoints.lock().await.checkpoint_url(summary.steps),
    };
    let eval = split(&data, "eval")?;
    let after = d.evaluate(config, student_m, &after_path, eval).await?;
    let report = report::build(report::Inputs {
        run_id: &d.run_id,
        config,
        workers: d.world,
        classes: &data.classes,
        decision: &decided.decision,
        taught: &decided.taught,
        heuristic_check: heuristic_check(config, &data, &decided.decision),
        teacher: &decided.teacher,
        before: &decided.before,
        after: &after,
        distill: &summary,
        final_checkpoint,
        wall_seconds: started.elapsed().as_secs_f64(),
    });
    report::write(out_dir, &report)?;
    Ok(Outcome::Finished(Box::new(report)))
}

/// `xkd eval`: the student of one checkpoint on the eval split, per class; hard and other
/// classes as the checkpoint's run decided them, when its store holds the run's decisions.
/// Writes `eval.json` into `out_dir`.
async fn evaluate_checkpoint(
    d: &mut Driver,
    config: &Config,
    out_dir: &Path,
    url: &str,
) -> Result<Outcome> {
    let target = xkd_checkpoint::Target::open(url, Default::default())?;
    let step = target.step_or_newest().await?;
    let checkpoint = target.store.checkpoint_url(&target.run_id, step);
    let decisions_url = target
        .store
        .run_object_url(&target.run_id, decisions::DECISIONS);
    let decided = match target
        .store
        .get_run_object(&target.run_id, decisions::DECISIONS)
        .await?
    {
        Some(bytes) => Some(RunDecisions::from_bytes(&bytes, &decisions_url)?),
        None => None,
    };
    match &decided {
        Some(dec) if dec.recipe_digest != checkpoint::recipe_digest(config) => tracing::warn!(
            url = decisions_url,
            "the checkpoint's run had another recipe than this config; its hard classes are \
             shown, but check that the config is the run's"
        ),
        Some(_) => {}
        None => tracing::info!(
            url = decisions_url,
            "no run decisions beside the checkpoint: no hard/other split"
        ),
    }
    tracing::info!(checkpoint, step, "evaluating a checkpoint's student");
    let data = d.prepare_data().await?;
    d.stage = "eval".into();
    let eval = split(&data, "eval")?;
    let student = config.student_modality();
    let outcomes = d.evaluate(config, student, &checkpoint, eval).await?;
    let hard = decided.as_ref().map(|dec| dec.decision.hard_names());
    let evaluation = report::evaluation(&checkpoint, step, config, &data.classes, hard, &outcomes);
    write_json(&out_dir.join("eval.json"), &evaluation)?;
    Ok(Outcome::Evaluated(Box::new(evaluation)))
}

/// Decisions an earlier start of the run stored, taken as this start's: `hard_classes.json`
/// is written from them as the probe would have.
fn reuse(config: &Config, stored: RunDecisions, url: &str, out_dir: &Path) -> Result<RunDecisions> {
    write_json(&out_dir.join("hard_classes.json"), &stored.decision)?;
    tracing::info!(
        hard = ?stored.decision.hard_names(),
        url,
        "reusing the run's decisions"
    );
    log_taught(config, &stored.taught);
    Ok(stored)
}

fn log_taught(config: &Config, taught: &[String]) {
    tracing::info!(
        classes = config.distill.classes.as_str(),
        taught = ?taught,
        "classes the teacher teaches"
    );
}

/// The labels distillation runs on, by `distill.classes`: the heuristic's hard classes, every
/// class, or as many classes as the heuristic picked drawn from `run.seed` (the controls that
/// show what the heuristic's choice is worth). Sorted.
pub(crate) fn taught_classes(config: &Config, decision: &Decision) -> Vec<u32> {
    let hard = decision.hard_labels();
    let n = decision.classes.len() as u32;
    let mut taught = match config.distill.classes {
        DistillClasses::Hard => hard,
        DistillClasses::All => (0..n).collect(),
        DistillClasses::Random => {
            // A partial Fisher-Yates shuffle of all labels; the first |hard| are the draw.
            let mut labels: Vec<u32> = (0..n).collect();
            let mut state = config.run.seed ^ 0x7a9e_c1a5_5e5d_0001;
            for i in 0..hard.len() {
                let left = (labels.len() - i) as u64;
                let j = i + (xkd_protocol::splitmix64(&mut state) % left) as usize;
                labels.swap(i, j);
            }
            labels.truncate(hard.len());
            labels
        }
    };
    taught.sort_unstable();
    taught
}

/// For a synthetic set whose directory this process can read: the heuristic's pick against the
/// classes the generator built subtle for the student. Only the report reads the construction.
fn heuristic_check(
    config: &Config,
    data: &DataSummary,
    decision: &Decision,
) -> Option<report::HeuristicCheck> {
    if config.data.source != DataSource::Synthetic {
        return None;
    }
    let rows = match xkd_data::construction(Path::new(&data.dir)) {
        Ok(rows) => rows,
        Err(e) => {
            tracing::info!(error = %format!("{e:#}"), "no construction to check the heuristic against");
            return None;
        }
    };
    let student = config.student_modality();
    let built = rows
        .into_iter()
        .filter(|(_, audio, visual)| {
            let cue = if student == Modality::Audio {
                audio
            } else {
                visual
            };
            *cue == xkd_data::Cue::Subtle
        })
        .map(|(name, _, _)| name)
        .collect();
    Some(report::HeuristicCheck::new(&decision.hard_names(), built))
}

fn names(classes: &[String], labels: &[u32]) -> Vec<String> {
    labels
        .iter()
        .map(|&l| classes[l as usize].clone())
        .collect()
}

pub(crate) fn split<'a>(data: &'a DataSummary, name: &str) -> Result<&'a xkd_protocol::SplitClips> {
    data.splits
        .iter()
        .find(|s| s.name == name)
        .ok_or_else(|| anyhow!("the dataset has no `{name}` split"))
}

/// The clips distillation draws from: the distill split's clips of the `taught` classes (the
/// teacher's rows) and the replay pool (the replay rows): the distill split's clips of the
/// classes the student knows, neither taught nor `hard`, and, with `distill.replay_pretrain`
/// (rehearsal), also the student's pretraining split's. A dataset without that split adds
/// nothing to the pool. The hard classes stay out of it where a control (`distill.classes`)
/// leaves some untaught: replayed, their labels would teach them outright, or an anchor would
/// hold them at the student's chance answers, and either would blur what the teacher did.
pub(crate) fn distill_pools(
    data: &DataSummary,
    (taught, hard): (&[u32], &[u32]),
    config: &Config,
) -> Result<(Vec<u32>, Vec<u32>)> {
    let taught: HashSet<u32> = taught.iter().copied().collect();
    let known = |label: &u32| !taught.contains(label) && !hard.contains(label);
    let pool = split(data, "distill")?;
    let (mut main, mut others) = (Vec::new(), Vec::new());
    for (&clip, label) in pool.clips.iter().zip(&pool.labels) {
        if taught.contains(label) {
            main.push(clip);
        } else if known(label) {
            others.push(clip);
        }
    }
    let pretrain = format!("pretrain_{}", config.student_modality().as_str());
    if let (true, Ok(pre)) = (config.distill.replay_pretrain, split(data, &pretrain)) {
        others.extend(
            pre.clips
                .iter()
                .zip(&pre.labels)
                .filter(|(_, label)| known(label))
                .map(|(&clip, _)| clip),
        );
    }
    Ok((main, others))
}

impl Driver {
    /// The decisions an earlier start of this run stored, with their URL; none for a run
    /// without a checkpoint store (`xkd hard-classes`).
    async fn stored_decisions(&self, config: &Config) -> Result<Option<(RunDecisions, String)>> {
        let Some(checkpoints) = self.checkpoints.clone() else {
            return Ok(None);
        };
        let checkpoints = checkpoints.lock().await;
        decisions::load(&checkpoints, &checkpoint::recipe_digest(config)).await
    }

    /// Both models on the probe split, and the heuristic's hard classes from them, written to
    /// `hard_classes.json`.
    async fn probe(
        &mut self,
        config: &Config,
        data: &DataSummary,
        teacher: &str,
        student: &str,
        out_dir: &Path,
    ) -> Result<Decision> {
        self.stage = "probe".into();
        let probe = split(data, "probe")?;
        let t_probe = self
            .evaluate(config, config.teacher_modality(), teacher, probe)
            .await?;
        let s_probe = self
            .evaluate(config, config.student_modality(), student, probe)
            .await?;
        let decision = heuristic::decide(&config.heuristic, &data.classes, &s_probe, &t_probe)?;
        write_json(&out_dir.join("hard_classes.json"), &decision)?;
        tracing::info!(hard = ?decision.hard_names(), "hard classes decided");
        Ok(decision)
    }

    /// The rest of what the run decides before it distills: the taught classes, and teacher
    /// and student on the eval split. Stored in the run's checkpoint store before the first
    /// distillation task is ordered, so that every later start reuses them; a store that
    /// cannot take them (after its retries) ends the run.
    async fn evaluate_before(
        &mut self,
        config: &Config,
        data: &DataSummary,
        decision: Decision,
        teacher: &str,
        student: &str,
    ) -> Result<RunDecisions> {
        if decision.hard_labels().is_empty() {
            bail!("the heuristic found no hard class: nothing to distill (see hard_classes.json)");
        }
        let taught = names(&data.classes, &taught_classes(config, &decision));
        log_taught(config, &taught);
        self.stage = "eval_before".into();
        let eval = split(data, "eval")?;
        let teacher_eval = self
            .evaluate(config, config.teacher_modality(), teacher, eval)
            .await?;
        let before = self
            .evaluate(config, config.student_modality(), student, eval)
            .await?;
        let decided = RunDecisions {
            recipe_digest: checkpoint::recipe_digest(config),
            decision,
            taught,
            teacher: teacher_eval,
            before,
        };
        if let Some(checkpoints) = self.checkpoints.clone() {
            let url = decisions::store(&*checkpoints.lock().await, &decided).await?;
            tracing::info!(url, "run decisions stored");
        }
        Ok(decided)
    }

    /// Rank 0 generates the dataset first; the others then load what it wrote.
    pub(crate) async fn prepare_data(&mut self) -> Result<DataSummary> {
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
    pub(crate) async fn pretrained(
        &mut self,
        config: &Config,
        data: &DataSummary,
        modality: Modality,
    ) -> Result<String> {
        let model = config.model(modality);
        if model.family == ModelFamily::Qwen2 {
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
        // A path in each rank's own cache: every rank keeps a copy, so hosts need not share
        // the cache, and the ranks decide together whether the copies are there.
        let path = Path::new(&config.run.cache_dir)
            .join("models")
            .join(format!("{}-{key}.safetensors", modality.as_str()));
        let shown = path.display().to_string();
        self.stage = format!("pretrain_{}", modality.as_str());
        let clips = split(data, &self.stage)?.clips.clone();
        let p = &config.pretrain;
        let task = TrainTask {
            modality,
            objective: Objective::Supervised,
            init: None,
            save: shown.clone(),
            keep_saved: true,
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
            teacher_cache: None,
        };
        let summary = self.train(task).await?;
        if summary.reused {
            tracing::info!(
                model = shown,
                "reusing pretrained {} model",
                modality.as_str()
            );
        } else {
            tracing::info!(model = shown, loss = summary.final_loss, "pretrained");
        }
        Ok(shown)
    }

    pub(crate) async fn train(&mut self, task: TrainTask) -> Result<TrainSummary> {
        let all = self.all();
        let results = self.order(&all, TaskKind::Train(Box::new(task))).await?;
        one_summary(results)
    }

    pub(crate) async fn evaluate(
        &mut self,
        config: &Config,
        modality: Modality,
        model: &str,
        clips: &xkd_protocol::SplitClips,
    ) -> Result<Vec<ClipOutcome>> {
        let task = EvalTask {
            modality,
            model: model.to_string(),
            plan: ShardPlan::in_order(clips.clips.clone(), config.run.seed),
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

    pub(crate) async fn distill(
        &mut self,
        config: &Config,
        data: &DataSummary,
        (taught, hard): (&[u32], &[u32]),
        teacher: &str,
        student: &str,
        save: &str,
    ) -> Result<(TrainSummary, Option<String>)> {
        let (main, others) = distill_pools(data, (taught, hard), config)?;
        if main.is_empty() {
            bail!(
                "the distill split has no clip of the classes the teacher teaches ({}): \
                 nothing to distill (data.distill_clips, distill.classes)",
                names(&data.classes, taught).join(", ")
            );
        }
        let dc = &config.distill;
        let (taught_rows, replay_rows) = dc.rows_per_rank(self.world);
        let replay_batch = if others.is_empty() { 0 } else { replay_rows };
        let per_worker = taught_rows + replay_rows;
        let mut task = TrainTask {
            modality: config.student_modality(),
            objective: Objective::Distill {
                teacher: teacher.to_string(),
                alpha: dc.alpha,
                temperature: dc.temperature,
                label_free: dc.target == CeTarget::Teacher,
                full_vocab: dc.kl_over == KlOver::Vocab,
                caption_weight: dc.caption_weight,
                replay_labels: dc.replay_target == ReplayTarget::Label,
                micro_batch: dc.micro_batch,
            },
            init: Some(student.to_string()),
            save: save.to_string(),
            keep_saved: false,
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
            teacher_cache: None,
        };
        if task.batch == 0 {
            bail!("distill.replay_fraction leaves no taught-class clips in a worker's batch");
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
        let taught_names = names(&data.classes, taught);
        // Each pass starts (or, after a restart, resumes) from the newest checkpoint that
        // verifies; a failed generation is restarted by `recover` and the loop goes on.
        loop {
            if config.distill.teacher == TeacherSource::Cached {
                // Every pass: a shard found damaged while distilling (a transient failure)
                // is made again here before the next pass reads it.
                task.teacher_cache = Some(self.cache_teacher(config, &task).await?);
                self.stage = "distill".into();
            }
            let mut attempt = task.clone();
            // The loss at the checkpoint's step: the final loss when no step is left to take.
            let mut resumed_loss = None;
            let resumed = checkpoints
                .lock()
                .await
                .resume_point(&recipe, &taught_names)
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
                hard_classes: taught_names.clone(),
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

impl Driver {
    /// The teacher cache stage (`distill.teacher = "cached"`): every rank makes the shards of
    /// its share that the store lacks or holds damaged (`task`'s questions from its first
    /// step), then the manifest listing them all goes into the run's store. Returns the cache
    /// distillation reads.
    async fn cache_teacher(&mut self, config: &Config, task: &TrainTask) -> Result<TeacherCache> {
        self.stage = "teacher_cache".into();
        let Objective::Distill { teacher, .. } = &task.objective else {
            bail!("the teacher cache needs a distillation task");
        };
        let rows_per_step = (task.batch * self.world) as u64;
        let replay_rows_per_step = task.anchored_replay_rows(self.world);
        let shard_steps = config.distill.cache_shard_steps;
        // Everything the answers depend on. The global batch is in it, not the world size:
        // the same global batch on another number of workers asks the same questions. The
        // pretrained student and the replay plan decide the anchors.
        let key = section_digest(&(
            TeacherCache::FORMAT,
            checkpoint::recipe_digest(config),
            teacher,
            task.modality,
            &task.plan.clips,
            task.plan.seed,
            task.seed,
            rows_per_step,
            task.steps,
            shard_steps,
            (
                &task.init,
                task.replay.as_ref().map(|p| (&p.clips, p.seed)),
                replay_rows_per_step,
            ),
        ));
        let layout = TeacherCache {
            key,
            shard_steps,
            rows_per_step,
            replay_rows_per_step,
            steps: task.steps,
        };
        let mut train = task.clone();
        train.plan.cursor = 0;
        if let Some(replay) = &mut train.replay {
            replay.cursor = 0;
        }
        train.resume_from = None;
        let order = CacheTask {
            train,
            cache: layout.clone(),
        };
        let all = self.all();
        let mut shards = Vec::new();
        for result in self
            .order(&all, TaskKind::CacheTeacher(Box::new(order)))
            .await?
        {
            match result {
                TaskResult::Cached(s) => shards.extend(s),
                other => bail!("a worker answered CacheTeacher with {other:?}"),
            }
        }
        shards.sort_by_key(|s| s.index);
        let listed: Vec<u64> = shards.iter().map(|s| s.index).collect();
        if listed != (0..layout.shards()).collect::<Vec<u64>>() {
            bail!(
                "the workers cached shards {listed:?} of the teacher cache's {}",
                layout.shards()
            );
        }
        let reused = shards.iter().filter(|s| s.reused).count();
        let manifest = TeacherManifest {
            format_version: TeacherCache::FORMAT,
            layout: layout.clone(),
            shards,
        };
        let checkpoints = self
            .checkpoints
            .clone()
            .context("no checkpoint store was opened for this run")?;
        let checkpoints = checkpoints.lock().await;
        let name = layout.manifest_name();
        let bytes = serde_json::to_vec_pretty(&manifest).context("encoding the cache manifest")?;
        checkpoints.put_run_object(&name, bytes.into()).await?;
        tracing::info!(
            url = checkpoints.run_object_url(&name),
            shards = layout.shards(),
            reused,
            made = layout.shards() as usize - reused,
            "teacher cache ready"
        );
        Ok(layout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use xkd_protocol::SplitClips;

    fn data() -> DataSummary {
        let split = |name: &str, clips: &[u32], labels: &[u32]| SplitClips {
            name: name.into(),
            clips: clips.to_vec(),
            labels: labels.to_vec(),
        };
        DataSummary {
            dir: "d".into(),
            classes: vec!["a".into(), "b".into(), "c".into()],
            splits: vec![
                split("distill", &[10, 11, 12, 13], &[0, 1, 2, 0]),
                split("pretrain_audio", &[20, 21, 22], &[0, 1, 2]),
                split("pretrain_visual", &[30, 31], &[1, 2]),
            ],
        }
    }

    fn config(sets: &[&str]) -> Config {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        Config::resolve(None, &sets).unwrap()
    }

    #[test]
    fn rehearsal_adds_the_students_pretraining_clips_of_the_other_classes() {
        // The default student hears (visual_to_audio): class 0 taught.
        let plain = config(&["distill.replay_pretrain=false"]);
        let (main, others) = distill_pools(&data(), (&[0], &[0]), &plain).unwrap();
        assert_eq!((main, others), (vec![10, 13], vec![11, 12]));
        let rehearse = config(&["distill.replay_pretrain=true"]);
        let (main, others) = distill_pools(&data(), (&[0], &[0]), &rehearse).unwrap();
        assert_eq!((main, others), (vec![10, 13], vec![11, 12, 21, 22]));
        // The visual student rehearses its own pretraining split.
        let visual = config(&[
            "distill.replay_pretrain=true",
            "distill.direction=\"audio_to_visual\"",
        ]);
        let (_, others) = distill_pools(&data(), (&[2], &[2]), &visual).unwrap();
        assert_eq!(others, vec![10, 11, 13, 30]);
        // A dataset without the student's pretraining split rehearses nothing more.
        let mut bare = data();
        bare.splits.retain(|s| s.name == "distill");
        let (_, others) = distill_pools(&bare, (&[0], &[0]), &rehearse).unwrap();
        assert_eq!(others, vec![11, 12]);
        // A control teaching class 1 while class 0 is the hard one replays neither.
        let (main, others) = distill_pools(&data(), (&[1], &[0]), &rehearse).unwrap();
        assert_eq!((main, others), (vec![11], vec![12, 22]));
    }
}
