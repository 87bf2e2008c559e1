//! The teacher cache (`distill.teacher = "cached"`): the frozen teacher's answers to every
//! question distillation asks, made once by the caching stage and read by distillation in
//! place of the teacher.
//!
//! A question is a pure function of (seed, clip, epoch), and the main plan's `g`-th draw fixes
//! both clip and epoch whatever the world size, so rows are keyed by the global sample index
//! `g` (`TeacherCache` says which shard and row). The caching stage asks the teacher exactly
//! the batches the online run's ranks would (rank r's rows of step s, for every r), so the
//! cached numbers are the online ones bit for bit. Shards live in the run's checkpoint store,
//! the only thing hosts share; each is followed by a `.sha256` object so that a caching stage
//! started again keeps every whole shard and makes again those that are missing or damaged.
//! Distillation holds at most two shards, whatever the run's length.
//!
//! The replay rows' anchors (the frozen pre-distillation student's answers, the other targets
//! of a distillation step) are pure functions of (seed, clip, epoch) too: the stage asks the
//! frozen student every rank's replay batch the same way, keyed by the replay plan's global
//! index, into the same shards. Distillation from the cache then runs neither frozen model.

use super::inputs::Ask;
use super::Rank;
use crate::saver::{self, RawTensor};
use anyhow::{bail, Context as _, Result};
use bytes::Bytes;
use candle_core::{Device, Tensor};
use xkd_checkpoint::{sha256_hex, Store};
use xkd_config::Modality;
use xkd_models::net::{self, Net};
use xkd_protocol::{
    CacheTask, CachedShard, CheckpointOrder, Objective, ShardPlan, TeacherCache, TeacherManifest,
    TrainTask,
};

const ANSWERS: &str = "answers";
const CAPTION: &str = "caption";
const ANCHORS: &str = "anchors";
const ANCHOR_CAPTION: &str = "anchor_caption";

/// A shard the store holds that does not match what its manifest or its digest says. Transient
/// on purpose: the coordinator restarts distillation, whose caching stage runs first and makes
/// the shard again.
#[derive(Debug, thiserror::Error)]
#[error("teacher cache shard {name} is damaged: {problem}")]
pub struct DamagedShard {
    pub name: String,
    pub problem: String,
}

/// What distillation asks the teacher (`Rank::distill_grads` asks the same): the letters, and
/// the captions where no model is a Qwen2 one.
pub(super) fn teacher_ask(rank: &Rank, task: &TrainTask) -> Result<Ask> {
    let Objective::Distill { full_vocab, .. } = task.objective else {
        bail!("the teacher cache needs a distillation task");
    };
    let config = &rank.config;
    let qwen2 =
        net::is_qwen2(config, task.modality) || net::is_qwen2(config, task.modality.other());
    Ok(Ask {
        full_vocab,
        caption: !qwen2,
    })
}

fn open_store(order: &Option<CheckpointOrder>) -> Result<(Store, String)> {
    let order = order
        .as_ref()
        .context("the teacher cache lives in the run's checkpoint store, and the task has none")?;
    let store = Store::open(&order.url)
        .with_context(|| format!("opening checkpoint store {}", order.url))?;
    Ok((store, order.run_id.clone()))
}

/// Reads run object `name`; `None` when absent.
fn get(store: &Store, run_id: &str, name: &str) -> Result<Option<Bytes>> {
    saver::on_own_runtime(|| async { Ok(store.get_run_object(run_id, name).await?) })
}

fn put(store: &Store, run_id: &str, name: &str, bytes: Bytes) -> Result<()> {
    saver::on_own_runtime(|| async {
        store.put_run_object(run_id, name, bytes).await?;
        Ok(())
    })
}

impl Rank {
    /// The caching stage on this rank: every shard `i` with `i % world == rank` that the store
    /// does not hold whole is made from the teacher (loaded only if one is missing) and put,
    /// then its digest. Returns this rank's shards.
    pub fn cache_teacher(&mut self, task: &CacheTask) -> Result<Vec<CachedShard>> {
        let (train, layout) = (&task.train, &task.cache);
        if layout.rows_per_step != self.world as u64 * train.batch as u64 {
            bail!(
                "the teacher cache has {} rows per step, but {} ranks of {} rows make {}",
                layout.rows_per_step,
                self.world,
                train.batch,
                self.world as u64 * train.batch as u64
            );
        }
        let replay = train.anchored_replay_rows(self.world as usize);
        if layout.replay_rows_per_step != replay {
            bail!(
                "the teacher cache has {} anchored replay rows per step, but this task's {} ranks \
                 anchor {replay}",
                layout.replay_rows_per_step,
                self.world,
            );
        }
        let (store, run_id) = open_store(&train.checkpoint)?;
        let mut out = Vec::new();
        let mut missing = Vec::new();
        for index in (0..layout.shards()).filter(|i| i % self.world as u64 == self.rank as u64) {
            let found = self
                .progress
                .waiting(|| whole_shard(&store, &run_id, layout, index))?;
            match found {
                Ok(shard) => out.push(shard),
                Err(reason) => {
                    tracing::info!(
                        rank = self.rank,
                        shard = index,
                        reason,
                        "teacher cache shard to make"
                    );
                    missing.push(index);
                }
            }
        }
        tracing::info!(
            rank = self.rank,
            reused = out.len(),
            to_make = missing.len(),
            "teacher cache: this rank's shards"
        );
        if missing.is_empty() {
            return Ok(out);
        }
        let Objective::Distill { teacher, .. } = &train.objective else {
            bail!("the teacher cache needs a distillation task");
        };
        let teacher = self.build_net(train.modality.other(), teacher, train.seed, true)?;
        self.progress.tick();
        // The replay rows' anchor: the pretrained student, frozen, as `Before::Copy` builds it
        // (a Qwen2 student's base with no adapters computes what its base with fresh adapters
        // switched off does).
        let anchor = match (&train.replay, layout.replay_rows_per_step) {
            (Some(_), 1..) => {
                let init = train
                    .init
                    .as_deref()
                    .context("distillation needs the pretrained student as `init`")?;
                let net = self.build_net(train.modality, init, train.seed, true)?;
                self.progress.tick();
                Some(net)
            }
            _ => None,
        };
        let inputs = self.inputs()?;
        inputs.register_net(train.modality.other(), &teacher);
        if let Some(net) = &anchor {
            inputs.register_net(train.modality, net);
        }
        let ask = teacher_ask(self, train)?;
        let models = Models {
            teacher: &teacher,
            anchor: anchor.as_ref(),
            ask,
        };
        for index in missing {
            let bytes = self.make_shard(&models, train, layout, index)?;
            let sha256 = sha256_hex(&bytes);
            let size = bytes.len() as u64;
            self.progress.waiting(|| {
                put(&store, &run_id, &layout.shard_name(index), bytes)?;
                put(
                    &store,
                    &run_id,
                    &layout.digest_name(index),
                    Bytes::from(sha256.clone()),
                )
            })?;
            tracing::info!(
                rank = self.rank,
                shard = index,
                size,
                "teacher cache shard made"
            );
            out.push(CachedShard {
                index,
                size,
                sha256,
                reused: false,
            });
        }
        inputs.prefetch(&self.config, &[]);
        Ok(out)
    }

    /// Shard `index`: for each of its steps, every rank's taught-class batch of that step (as
    /// the online run's ranks ask the teacher), rows in global sample order; and where there
    /// are replay rows, every rank's replay batch as the frozen student answers it, rows in the
    /// replay plan's global order.
    fn make_shard(
        &mut self,
        models: &Models,
        train: &TrainTask,
        layout: &TeacherCache,
        index: u64,
    ) -> Result<Bytes> {
        let world = self.world;
        let batches: Vec<(u32, u64)> = layout
            .shard_steps_of(index)
            .flat_map(|s| (0..world).map(move |r| (r, s)))
            .collect();
        let teacher = Part {
            net: models.teacher,
            modality: train.modality.other(),
            plan: &train.plan,
            batch: train.batch,
            first: index * layout.rows_per_shard(),
            names: (ANSWERS, CAPTION),
        };
        let mut tensors = self.answer_rows(&teacher, &batches, train.seed, models.ask)?;
        if let (Some(net), Some(plan)) = (models.anchor, &train.replay) {
            let anchor = Part {
                net,
                modality: train.modality,
                plan,
                batch: train.replay_batch,
                first: index * layout.replay_rows_per_shard(),
                names: (ANCHORS, ANCHOR_CAPTION),
            };
            tensors.extend(self.answer_rows(&anchor, &batches, train.seed, models.ask)?);
        }
        saver::encode_with(&tensors, Some((SHARD_META, shard_meta(&layout.key, index))))
    }

    /// `part`'s model's answers to each (rank, step) batch of its plan, as tensors named
    /// `part.names` (answers, and captions where asked), rows by global index from
    /// `part.first`.
    fn answer_rows(
        &mut self,
        part: &Part,
        batches: &[(u32, u64)],
        seed: u64,
        ask: Ask,
    ) -> Result<Vec<RawTensor>> {
        let inputs = self.inputs()?;
        let world = self.world;
        let rows = batches.len() * part.batch;
        let mut answers: Vec<Option<Tensor>> = vec![None; rows];
        let mut captions: Vec<Option<Tensor>> = vec![None; rows];
        for (i, &(r, s)) in batches.iter().enumerate() {
            let coming: Vec<_> = batches[i..(i + 3).min(batches.len())]
                .iter()
                .map(|&(r, s)| (part.modality, part.plan.samples(r, world, s, part.batch)))
                .collect();
            inputs.prefetch(&self.config, &coming);
            let samples = part.plan.samples(r, world, s, part.batch);
            let a = self.answers(part.net, part.modality, &samples, seed, ask)?;
            for (k, g) in part
                .plan
                .globals(r, world, s, part.batch)
                .into_iter()
                .enumerate()
            {
                let row = g
                    .checked_sub(part.first)
                    .filter(|&row| row < rows as u64)
                    .with_context(|| format!("global sample {g} lies outside its shard"))?;
                answers[row as usize] = Some(a.logits.get(k)?);
                captions[row as usize] = a.caption.as_ref().map(|c| c.get(k)).transpose()?;
            }
            self.progress.tick();
        }
        let stack = |rows: Vec<Option<Tensor>>| -> Result<Option<Tensor>> {
            let rows: Option<Vec<Tensor>> = rows.into_iter().collect();
            Ok(match rows {
                Some(rows) => Some(Tensor::stack(&rows, 0)?),
                None => None,
            })
        };
        let (answers_name, caption_name) = part.names;
        let mut tensors = vec![RawTensor::of(
            answers_name,
            &stack(answers)?.context("a shard row the batches did not fill")?,
        )?];
        if let Some(caption) = stack(captions)? {
            tensors.push(RawTensor::of(caption_name, &caption)?);
        }
        Ok(tensors)
    }
}

/// The frozen models the caching stage asks, and what it asks them.
struct Models<'a> {
    teacher: &'a Net,
    /// The pretrained student, where there are replay rows.
    anchor: Option<&'a Net>,
    ask: Ask,
}

/// One model's share of a shard: whose answers to which plan's batches, and where they go.
struct Part<'a> {
    net: &'a Net,
    modality: Modality,
    plan: &'a ShardPlan,
    batch: usize,
    /// The global index of the shard's first row of this plan.
    first: u64,
    /// The tensors' names: answers, captions.
    names: (&'static str, &'static str),
}

/// Shard `index` as the store holds it, when whole: its bytes, its digest object equal to
/// their sha256, and its metadata naming this cache and index. `Err(reason)` otherwise.
fn whole_shard(
    store: &Store,
    run_id: &str,
    layout: &TeacherCache,
    index: u64,
) -> Result<std::result::Result<CachedShard, String>> {
    let Some(bytes) = get(store, run_id, &layout.shard_name(index))? else {
        return Ok(Err("absent".into()));
    };
    let Some(digest) = get(store, run_id, &layout.digest_name(index))? else {
        return Ok(Err("no digest (its caching was interrupted)".into()));
    };
    let sha256 = sha256_hex(&bytes);
    if digest.as_ref() != sha256.as_bytes() {
        return Ok(Err(format!(
            "damaged: sha256 {sha256}, its digest object says {}",
            String::from_utf8_lossy(&digest)
        )));
    }
    if let Err(e) = check_meta(&bytes, layout, index) {
        return Ok(Err(format!("{e:#}")));
    }
    Ok(Ok(CachedShard {
        index,
        size: bytes.len() as u64,
        sha256,
        reused: true,
    }))
}

fn check_meta(bytes: &[u8], layout: &TeacherCache, index: u64) -> Result<()> {
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|e| anyhow::anyhow!("not a safetensors file: {e}"))?;
    let info = meta.metadata().clone().unwrap_or_default();
    let names = info.get(SHARD_META);
    let expected = shard_meta(&layout.key, index);
    if names != Some(&expected) {
        bail!("its metadata names {names:?} under `{SHARD_META}`, not {expected:?}");
    }
    Ok(())
}

/// The one `__metadata__` entry of a shard: which cache and which shard of it the file is.
const SHARD_META: &str = "xkd.teacher_cache";

fn shard_meta(key: &str, index: u64) -> String {
    format!("cache {key} shard {index}")
}

/// One decoded shard: `[rows, letters]` answers, and `[rows, vocab]` captions when cached;
/// the same of the replay rows' anchors where the run has replay rows.
struct Shard {
    index: u64,
    teacher: Rows,
    anchors: Option<Rows>,
}

/// One model's rows of a shard.
struct Rows {
    answers: Tensor,
    caption: Option<Tensor>,
}

/// Whose cached answers to read: the teacher's (taught rows) or the anchors (replay rows).
#[derive(Debug, Clone, Copy)]
enum Whose {
    Teacher,
    Anchor,
}

/// Distillation's teacher in cached mode: answers read from the store by global sample
/// index, shard by shard, each checked against the manifest; at most two shards in memory.
pub(super) struct CachedTeacher {
    store: Store,
    run_id: String,
    manifest: TeacherManifest,
    held: Vec<Shard>,
    device: Device,
}

/// The targets of a batch's rows (the teacher's, or the frozen student's): what `Answers`
/// would carry from the model itself.
pub(super) struct Targets {
    pub(super) logits: Tensor,
    pub(super) caption: Option<Tensor>,
}

impl From<super::inputs::Answers> for Targets {
    fn from(a: super::inputs::Answers) -> Targets {
        Targets {
            logits: a.logits,
            caption: a.caption,
        }
    }
}

impl CachedTeacher {
    /// Opens the cache `task.teacher_cache` names: its manifest must be there and describe it.
    pub(super) fn open(task: &TrainTask, device: &Device) -> Result<CachedTeacher> {
        let layout = task
            .teacher_cache
            .as_ref()
            .context("the task names no teacher cache")?;
        let (store, run_id) = open_store(&task.checkpoint)?;
        let name = layout.manifest_name();
        let bytes = get(&store, &run_id, &name)?.with_context(|| {
            format!(
                "the teacher cache's manifest {} is not in the store",
                store.run_object_url(&run_id, &name)
            )
        })?;
        let manifest: TeacherManifest = serde_json::from_slice(&bytes)
            .with_context(|| format!("reading {}", store.run_object_url(&run_id, &name)))?;
        if manifest.format_version != TeacherCache::FORMAT || &manifest.layout != layout {
            bail!(
                "{} describes another cache ({:?}, format {}) than the task's ({layout:?})",
                store.run_object_url(&run_id, &name),
                manifest.layout,
                manifest.format_version
            );
        }
        if manifest.shards.len() as u64 != layout.shards()
            || manifest
                .shards
                .iter()
                .enumerate()
                .any(|(i, s)| s.index != i as u64)
        {
            bail!("the teacher cache's manifest does not list every shard once, in order");
        }
        Ok(CachedTeacher {
            store,
            run_id,
            manifest,
            held: Vec::new(),
            device: device.clone(),
        })
    }

    /// The teacher's cached answers to global samples `globals` of the main plan, in order.
    pub(super) fn targets(&mut self, globals: &[u64]) -> Result<Targets> {
        self.rows(Whose::Teacher, globals)
    }

    /// Whether the cache holds the replay rows' anchors.
    pub(super) fn has_anchors(&self) -> bool {
        self.manifest.layout.replay_rows_per_step > 0
    }

    /// The frozen student's cached answers to global samples `globals` of the replay plan.
    pub(super) fn anchor_targets(&mut self, globals: &[u64]) -> Result<Targets> {
        self.rows(Whose::Anchor, globals)
    }

    fn rows(&mut self, whose: Whose, globals: &[u64]) -> Result<Targets> {
        let layout = &self.manifest.layout;
        let per_shard = match whose {
            Whose::Teacher => layout.rows_per_shard(),
            Whose::Anchor => layout.replay_rows_per_shard(),
        };
        if per_shard == 0 {
            bail!("the teacher cache holds no {whose:?} rows");
        }
        let mut answers = Vec::with_capacity(globals.len());
        let mut captions = Vec::with_capacity(globals.len());
        for &g in globals {
            let shard = self.shard(g / per_shard)?;
            let rows = match whose {
                Whose::Teacher => Some(&shard.teacher),
                Whose::Anchor => shard.anchors.as_ref(),
            }
            .with_context(|| format!("teacher cache shard {} holds no anchors", shard.index))?;
            let row = (g % per_shard) as usize;
            if row >= rows.answers.dim(0)? {
                bail!("global sample {g} lies past the teacher cache's last step");
            }
            answers.push(rows.answers.narrow(0, row, 1)?);
            captions.push(
                rows.caption
                    .as_ref()
                    .map(|c| c.narrow(0, row, 1))
                    .transpose()?,
            );
        }
        let captions: Option<Vec<Tensor>> = captions.into_iter().collect();
        Ok(Targets {
            logits: Tensor::cat(&answers, 0)?,
            caption: captions.map(|c| Tensor::cat(&c, 0)).transpose()?,
        })
    }

    /// Shard `index`, from memory or the store (which drops the older of two held shards).
    fn shard(&mut self, index: u64) -> Result<&Shard> {
        if let Some(pos) = self.held.iter().position(|s| s.index == index) {
            return Ok(&self.held[pos]);
        }
        let entry = self
            .manifest
            .shards
            .get(index as usize)
            .with_context(|| format!("the teacher cache has no shard {index}"))?
            .clone();
        let layout = &self.manifest.layout;
        let name = layout.shard_name(index);
        let bytes = get(&self.store, &self.run_id, &name)?;
        let damaged = |problem: String| DamagedShard {
            name: self.store.run_object_url(&self.run_id, &name),
            problem,
        };
        let bytes = bytes.ok_or_else(|| damaged("absent".into()))?;
        let sha256 = sha256_hex(&bytes);
        if sha256 != entry.sha256 {
            return Err(damaged(format!(
                "sha256 {sha256}, the manifest says {}",
                entry.sha256
            ))
            .into());
        }
        check_meta(&bytes, layout, index).map_err(|e| damaged(format!("{e:#}")))?;
        let mut tensors = candle_core::safetensors::load_buffer(&bytes, &self.device)
            .with_context(|| format!("decoding {name}"))?;
        let answers = tensors
            .remove(ANSWERS)
            .with_context(|| format!("{name} holds no `{ANSWERS}`"))?;
        let teacher = Rows {
            answers,
            caption: tensors.remove(CAPTION),
        };
        let anchors = match tensors.remove(ANCHORS) {
            Some(answers) => Some(Rows {
                answers,
                caption: tensors.remove(ANCHOR_CAPTION),
            }),
            None if layout.replay_rows_per_step > 0 => {
                return Err(damaged(format!("it holds no `{ANCHORS}`")).into())
            }
            None => None,
        };
        if self.held.len() >= 2 {
            self.held.remove(0);
        }
        tracing::debug!(shard = index, "teacher cache shard read");
        self.held.push(Shard {
            index,
            teacher,
            anchors,
        });
        Ok(self.held.last().expect("just pushed"))
    }
}
