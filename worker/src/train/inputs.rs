//! What a model is asked: a batch of clips as features and prompts (stand-ins) or as each
//! family's processor prepares them (Qwen2), each clip's question, and the letter logits that
//! come back. `FeatureCache` keeps clips' features within `run.feature_cache_mb`.

use super::Rank;
use anyhow::{bail, Context as _, Result};
use candle_core::Tensor;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use xkd_config::{Config, Modality};
use xkd_data::features::LogMel;
use xkd_data::{self as data, Manifest};
use xkd_models::model::{self, Vocab, OPTIONS};
use xkd_models::net::Net;
use xkd_models::qwen::{Clip, Prepared, QwenModel};
use xkd_protocol::{ClipOutcome, Sample};

impl Rank {
    /// Features, prompts and answers of a batch of clips.
    pub(super) fn batch(
        &mut self,
        modality: Modality,
        samples: &[Sample],
        seed: u64,
    ) -> Result<Batch> {
        self.cache.begin_batch();
        let manifest = self.manifest.as_ref().context("dataset not loaded")?;
        let vocab = Vocab::new(manifest.classes.len());
        let mm_tokens = mm_tokens(&self.config, modality);
        let mut features = Vec::new();
        let mut prompts = Vec::new();
        let mut answers = Vec::new();
        let mut labels = Vec::new();
        for &Sample { clip, epoch } in samples {
            let record = clip_record(manifest, clip)?;
            features.extend_from_slice(self.cache.get(manifest, record, modality)?);
            let q = model::question(seed, clip, epoch, record.label, manifest.classes.len());
            prompts.extend(vocab.prompt(&q.options, mm_tokens));
            answers.push(q.answer as u32);
            labels.push((record.label, q.options));
        }
        let b = samples.len();
        let shape: Vec<usize> = match modality {
            Modality::Audio => {
                let mel = &self.cache.mel;
                let frames = mel.frames(self.config.clip_samples());
                vec![b, frames, mel.n_mels()]
            }
            Modality::Visual => {
                let (t, s) = (self.config.data.frames, self.config.data.frame_size);
                vec![b, t, 3, s, s]
            }
        };
        let seq = prompts.len() / b.max(1);
        Ok(Batch {
            features: Tensor::from_vec(features, shape, &self.device)?,
            prompts: Tensor::from_vec(prompts, (b, seq), &self.device)?,
            answer_idx: answers,
            labels,
        })
    }
}

/// What a loss or an evaluation asks of a model besides the ten letters' logits.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Ask {
    /// The answer's logits over the whole vocabulary instead of the ten letters
    /// (`kl_over = "vocab"`; stand-ins only).
    pub(super) full_vocab: bool,
    /// The caption's logits too, from the same forward (stand-ins only).
    pub(super) caption: bool,
}

/// A model's answers to a batch of clips, with what scoring them needs.
pub(super) struct Answers {
    /// `[B, 10]`: the option letters' logits; `[B, vocab]` where `Ask::full_vocab`.
    pub(super) logits: Tensor,
    /// `[B, vocab]`: the next-token logits right after the modality tokens, where
    /// `Ask::caption`.
    pub(super) caption: Option<Tensor>,
    pub(super) answer_idx: Vec<u32>,
    pub(super) labels: Vec<(u32, [u32; OPTIONS])>,
    /// Prompt tokens of the batch.
    pub(super) tokens: usize,
}

impl Rank {
    /// `net`'s answers for `samples` of `modality`, each asked its question: a stand-in from
    /// the clips' features and the prompt, a Qwen2 model from the clips as its own processor
    /// prepares them. This is the one way every loss and every evaluation calls a model.
    pub(super) fn answers(
        &mut self,
        net: &Net,
        modality: Modality,
        samples: &[Sample],
        seed: u64,
        ask: Ask,
    ) -> Result<Answers> {
        let qwen = match net {
            Net::StandIn(model) => {
                let b = self.batch(modality, samples, seed)?;
                // The answer and the caption come from one forward when both are asked.
                let (answer, caption) = if ask.caption {
                    let (answer, caption) = model.forward_with_caption(&b.features, &b.prompts)?;
                    (answer, Some(caption))
                } else {
                    (model.forward(&b.features, &b.prompts)?, None)
                };
                let logits = if ask.full_vocab {
                    answer
                } else {
                    letter_logits(&answer, &model.vocab)?
                };
                return Ok(Answers {
                    logits,
                    caption,
                    tokens: b.prompts.elem_count(),
                    answer_idx: b.answer_idx,
                    labels: b.labels,
                });
            }
            Net::Qwen(qwen) => qwen,
        };
        if ask.full_vocab || ask.caption {
            // The config refuses both with a Qwen2 model; this names a caller that did not.
            bail!("a Qwen2 model answers with the option letters only");
        }
        self.cache.begin_batch();
        let manifest = self.manifest.as_ref().context("dataset not loaded")?;
        let n_classes = manifest.classes.len();
        let (mut answer_idx, mut labels, mut options) = (Vec::new(), Vec::new(), Vec::new());
        for &Sample { clip, epoch } in samples {
            let record = clip_record(manifest, clip)?;
            self.cache.prepare(manifest, record, modality, qwen)?;
            let q = model::question(seed, clip, epoch, record.label, n_classes);
            options.push(
                q.options
                    .map(|c| manifest.classes[c as usize].as_str())
                    .to_vec(),
            );
            answer_idx.push(q.answer as u32);
            labels.push((record.label, q.options));
        }
        let clips: Vec<&Prepared> = samples
            .iter()
            .map(|s| self.cache.prepared(s.clip, modality))
            .collect::<Result<_>>()?;
        let (logits, tokens) = qwen.letter_logits(&clips, &options, &self.device)?;
        Ok(Answers {
            logits,
            caption: None,
            answer_idx,
            labels,
            tokens,
        })
    }
}

pub(super) fn clip_record(manifest: &Manifest, clip: u32) -> Result<&data::ClipRecord> {
    manifest
        .clip(clip)
        .with_context(|| format!("clip {clip} is not in the manifest"))
}

/// Modality tokens a model of `modality` hands its LM under `config`.
pub(super) fn mm_tokens(config: &Config, modality: Modality) -> usize {
    let m = config.model(modality);
    match modality {
        Modality::Audio => m.modality_tokens,
        Modality::Visual => {
            let grid = config.data.frame_size / m.patch.max(1);
            (config.data.frames / model::TEMPORAL_PATCH) * grid * grid / 4
        }
    }
}

pub(super) struct Batch {
    pub(super) features: Tensor,
    pub(super) prompts: Tensor,
    /// Index of the true option.
    pub(super) answer_idx: Vec<u32>,
    pub(super) labels: Vec<(u32, [u32; OPTIONS])>,
}

/// What a cache entry holds, by the model that reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    /// A stand-in's features: log-mel, or normalised frames.
    Features(Modality),
    /// A Qwen2 model's processor output.
    Qwen(Modality),
}

enum Value {
    Features(Vec<f32>),
    Prepared(Prepared),
}

impl Value {
    fn bytes(&self) -> usize {
        let floats = match self {
            Value::Features(v) => v.len(),
            Value::Prepared(Prepared::Audio { features, .. }) => features.len(),
            Value::Prepared(Prepared::Video { patches, .. }) => patches.len(),
        };
        floats * std::mem::size_of::<f32>()
    }
}

struct Entry {
    value: Value,
    bytes: usize,
    /// `FeatureCache::tick` when last used: the key of `order`.
    used: u64,
    /// The batch that last used it: entries of the batch in hand are never evicted.
    batch: u64,
}

/// Clips' features, made on first use and kept while they fit `run.feature_cache_mb`: the
/// stand-ins' features, and the clips as a Qwen2 model's own processor prepares them. The
/// least recently used go first, except those of the batch in hand (`begin_batch`), so a
/// rank's feature memory is the budget plus one batch, whatever the dataset's size.
pub(super) struct FeatureCache {
    mel: LogMel,
    /// `data.sample_rate`: every wav must be at this rate (`load_audio` refuses others).
    sample_rate: u32,
    budget: usize,
    held: usize,
    tick: u64,
    batch: u64,
    entries: HashMap<(Kind, u32), Entry>,
    /// Last use -> key, oldest first.
    order: BTreeMap<u64, (Kind, u32)>,
}

impl FeatureCache {
    pub(super) fn new(mel: LogMel, sample_rate: u32, budget_mb: u64) -> Self {
        Self {
            mel,
            sample_rate,
            budget: (budget_mb as usize).saturating_mul(1 << 20),
            held: 0,
            tick: 0,
            batch: 0,
            entries: HashMap::new(),
            order: BTreeMap::new(),
        }
    }

    /// Starts a batch: what it uses stays until the next one starts.
    pub(super) fn begin_batch(&mut self) {
        self.batch += 1;
    }

    /// Bytes of features held now.
    #[cfg(test)]
    pub(super) fn held(&self) -> usize {
        self.held
    }

    /// The entry for `key`, made by `make` when it is not there; marks it used.
    fn entry(
        &mut self,
        key: (Kind, u32),
        make: impl FnOnce(&LogMel, u32) -> Result<Value>,
    ) -> Result<&Value> {
        self.tick += 1;
        let (tick, batch) = (self.tick, self.batch);
        if let Some(e) = self.entries.get_mut(&key) {
            self.order.remove(&e.used);
            e.used = tick;
            e.batch = batch;
            self.order.insert(tick, key);
        } else {
            let value = make(&self.mel, self.sample_rate)?;
            let bytes = value.bytes();
            self.held += bytes;
            self.entries.insert(
                key,
                Entry {
                    value,
                    bytes,
                    used: tick,
                    batch,
                },
            );
            self.order.insert(tick, key);
            self.evict();
        }
        Ok(&self.entries[&key].value)
    }

    /// Drops the least recently used entries until the budget holds, sparing the batch's.
    fn evict(&mut self) {
        let mut spared = Vec::new();
        while self.held > self.budget {
            let Some((used, key)) = self.order.pop_first() else {
                break;
            };
            let e = &self.entries[&key];
            if e.batch == self.batch {
                spared.push((used, key));
                continue;
            }
            self.held -= e.bytes;
            self.entries.remove(&key);
        }
        self.order.extend(spared);
    }

    /// Prepares clip `record` for `qwen` if it is not held: decoded, then through the model's
    /// processor (Whisper log-mel, Qwen2-VL resize and patches): host work, 3,000 FFT frames
    /// and a 128-band filterbank per clip at Qwen2-Audio's 30-s window, that would otherwise
    /// run for the teacher, the student and the frozen student on every step. Every Qwen2
    /// model of one modality in a run comes from that modality's one directory, so one
    /// preparation serves them all.
    pub(super) fn prepare(
        &mut self,
        manifest: &Manifest,
        record: &data::ClipRecord,
        modality: Modality,
        qwen: &QwenModel,
    ) -> Result<()> {
        let dir = &manifest.dir;
        self.entry((Kind::Qwen(modality), record.id), |_, rate| {
            let prepared = match modality {
                Modality::Audio => {
                    let wav = data::load_audio(&dir.join(&record.audio), rate)?;
                    qwen.prepare(Clip::Audio(&wav))?
                }
                Modality::Visual => {
                    let paths: Vec<PathBuf> = record.frames.iter().map(|f| dir.join(f)).collect();
                    let (h, w, frames) = data::load_frames_rgb(&paths)?;
                    qwen.prepare(Clip::Video {
                        frames: &frames,
                        h,
                        w,
                    })?
                }
            };
            Ok(Value::Prepared(prepared))
        })?;
        Ok(())
    }

    /// A clip `prepare` has prepared for this batch.
    pub(super) fn prepared(&self, clip: u32, modality: Modality) -> Result<&Prepared> {
        match self.entries.get(&(Kind::Qwen(modality), clip)) {
            Some(Entry {
                value: Value::Prepared(p),
                ..
            }) => Ok(p),
            _ => bail!("clip {clip} was not prepared"),
        }
    }

    pub(super) fn get(
        &mut self,
        manifest: &Manifest,
        record: &data::ClipRecord,
        modality: Modality,
    ) -> Result<&[f32]> {
        let dir = &manifest.dir;
        let value = self.entry((Kind::Features(modality), record.id), |mel, rate| {
            Ok(Value::Features(match modality {
                Modality::Audio => mel.compute(&data::load_audio(&dir.join(&record.audio), rate)?),
                Modality::Visual => {
                    let paths: Vec<PathBuf> = record.frames.iter().map(|f| dir.join(f)).collect();
                    data::load_frames(&paths)?
                }
            }))
        })?;
        match value {
            Value::Features(v) => Ok(v),
            Value::Prepared(_) => bail!("clip {} holds processor output, not features", record.id),
        }
    }
}

/// Letter logits `[B, 10]` out of full-vocabulary logits.
pub(super) fn letter_logits(logits: &Tensor, vocab: &Vocab) -> Result<Tensor> {
    let idx = Tensor::new(vocab.letters().as_slice(), logits.device())?;
    Ok(logits.index_select(&idx, 1)?)
}

pub(super) fn outcome(clip: u32, b: &Answers, i: usize, p: &[f32]) -> ClipOutcome {
    let (label, options) = b.labels[i];
    let best = p
        .iter()
        .enumerate()
        .fold(0, |best, (k, &v)| if v > p[best] { k } else { best });
    let entropy = -p
        .iter()
        .filter(|&&v| v > 0.0)
        .map(|&v| v as f64 * (v as f64).ln())
        .sum::<f64>();
    ClipOutcome {
        clip,
        label,
        predicted: options[best],
        p_true: p[b.answer_idx[i] as usize] as f64,
        entropy,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KIB: usize = 1 << 10;

    fn cache(budget_mb: u64) -> FeatureCache {
        FeatureCache::new(LogMel::new(16000, 400, 160, 40), 16000, budget_mb)
    }

    /// Puts clip `id` (256 KiB of features) in as one batch; counts the makes.
    fn put(c: &mut FeatureCache, id: u32, made: &mut usize) {
        c.begin_batch();
        c.entry((Kind::Features(Modality::Audio), id), |_, _| {
            *made += 1;
            Ok(Value::Features(vec![id as f32; 64 * KIB]))
        })
        .unwrap();
    }

    #[test]
    fn the_cache_keeps_within_its_budget_dropping_the_least_recently_used() {
        let mut c = cache(1);
        let mut made = 0;
        for id in 0..10 {
            put(&mut c, id, &mut made);
            assert!(
                c.held() <= 1 << 20,
                "{} bytes held after clip {id}",
                c.held()
            );
        }
        assert_eq!(made, 10);
        // Clip 6 used again becomes the newest: clip 7, the oldest, goes for clip 10.
        put(&mut c, 6, &mut made);
        put(&mut c, 10, &mut made);
        assert_eq!(made, 11, "clip 6 was still held");
        put(&mut c, 6, &mut made);
        assert_eq!(made, 11, "clip 6 survived as recently used");
        put(&mut c, 7, &mut made);
        assert_eq!(made, 12, "clip 7 was dropped");
        let held: Vec<u32> = (0..11)
            .filter(|&id| {
                c.entries
                    .contains_key(&(Kind::Features(Modality::Audio), id))
            })
            .collect();
        assert_eq!(held, [6, 7, 9, 10]);
    }

    #[test]
    fn a_batch_keeps_its_own_clips_even_over_the_budget() {
        let mut c = cache(0);
        let mut made = 0;
        c.begin_batch();
        for id in 0..3 {
            c.entry((Kind::Features(Modality::Visual), id), |_, _| {
                made += 1;
                Ok(Value::Features(vec![1.0; 16 * KIB]))
            })
            .unwrap();
        }
        assert_eq!(c.held(), 3 * 64 * KIB, "the batch in hand is held whole");
        put(&mut c, 9, &mut made);
        assert_eq!(c.held(), 256 * KIB, "the previous batch is dropped");
    }
}
