//! What a model is asked: a batch of clips as features and prompts (stand-ins) or as each
//! family's processor prepares them (Qwen2), each clip's question, and the letter logits that
//! come back. Clips come through `Inputs`: a loader (`xkd_data::Loader`) that makes the next
//! steps' inputs on `run.loader_threads` threads of its own while the current step computes,
//! and keeps what was used within `run.feature_cache_mb`.

use super::Rank;
use anyhow::{bail, Context as _, Result};
use candle_core::Tensor;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use xkd_config::{Config, Modality};
use xkd_data::features::LogMel;
use xkd_data::{self as data, Loader, Manifest};
use xkd_models::model::{self, Vocab, OPTIONS};
use xkd_models::net::{self, Net};
use xkd_models::qwen::{Clip, Prepared, Processor, QwenModel};
use xkd_protocol::{ClipOutcome, Sample};

impl Rank {
    /// Features, prompts and answers of a batch of clips.
    pub(super) fn batch(
        &mut self,
        modality: Modality,
        samples: &[Sample],
        seed: u64,
    ) -> Result<Batch> {
        let manifest = self.manifest()?.clone();
        let vocab = Vocab::new(manifest.classes.len());
        let mm_tokens = mm_tokens(&self.config, modality);
        let inputs = self.inputs()?;
        let shape: Vec<usize> = match modality {
            Modality::Audio => {
                let mel = &inputs.source.mel;
                let frames = mel.frames(self.config.clip_samples());
                vec![samples.len(), frames, mel.n_mels()]
            }
            Modality::Visual => {
                let (t, s) = (self.config.data.frames, self.config.data.frame_size);
                vec![samples.len(), t, 3, s, s]
            }
        };
        let per_clip: usize = shape[1..].iter().product();
        let mut features = Vec::with_capacity(per_clip * samples.len());
        let mut prompts = Vec::new();
        let mut answers = Vec::new();
        let mut labels = Vec::new();
        for &Sample { clip, epoch } in samples {
            let record = clip_record(&manifest, clip)?;
            let input = inputs.get(clip, modality, false)?;
            let Input::Features(values) = &*input else {
                bail!("clip {clip}: the loader answered a stand-in with a Qwen2 input");
            };
            if values.len() != per_clip {
                bail!(
                    "clip {clip} makes {} {} values, not {per_clip}: its {} do not match \
                     data.clip_seconds, data.frames or data.frame_size",
                    values.len(),
                    modality.as_str(),
                    match modality {
                        Modality::Audio => format!("audio ({})", record.audio),
                        Modality::Visual => format!("frames ({})", record.frames.join(", ")),
                    }
                );
            }
            features.extend_from_slice(values);
            let q = model::question(seed, clip, epoch, record.label, manifest.classes.len());
            prompts.extend(vocab.prompt(&q.options, mm_tokens));
            answers.push(q.answer as u32);
            labels.push((record.label, q.options));
        }
        let b = samples.len();
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
        let manifest = self.manifest()?.clone();
        let n_classes = manifest.classes.len();
        let inputs = self.inputs()?;
        inputs.register(modality, qwen);
        let (mut answer_idx, mut labels, mut options) = (Vec::new(), Vec::new(), Vec::new());
        let mut prepared = Vec::with_capacity(samples.len());
        for &Sample { clip, epoch } in samples {
            let record = clip_record(&manifest, clip)?;
            prepared.push(inputs.get(clip, modality, true)?);
            let q = model::question(seed, clip, epoch, record.label, n_classes);
            options.push(
                q.options
                    .map(|c| manifest.classes[c as usize].as_str())
                    .to_vec(),
            );
            answer_idx.push(q.answer as u32);
            labels.push((record.label, q.options));
        }
        let clips: Vec<&Prepared> = prepared
            .iter()
            .zip(samples)
            .map(|(input, s)| match &**input {
                Input::Qwen(p) => Ok(p),
                Input::Features(_) => Err(anyhow::anyhow!(
                    "clip {}: the loader answered a Qwen2 model with stand-in features",
                    s.clip
                )),
            })
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

/// Which input of which clip: the stand-ins' features, or a Qwen2 processor's output, of one
/// modality. Every Qwen2 model of one modality in a run comes from that modality's one
/// directory, so one preparation serves them all (teacher, student, frozen student).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct Key {
    clip: u32,
    modality: Modality,
    qwen: bool,
}

/// One clip made into what a model takes.
pub(super) enum Input {
    /// A stand-in's features: log-mel `[frames, n_mels]`, or frames `[T, 3, S, S]` normalised.
    Features(Vec<f32>),
    /// As a Qwen2 model's processor prepared it.
    Qwen(Prepared),
}

impl Input {
    /// What the cache counts it as: its buffers and the cache's own bookkeeping of it.
    fn bytes(&self) -> u64 {
        const ENTRY: u64 = 128;
        ENTRY
            + match self {
                Input::Features(v) => (v.len() * std::mem::size_of::<f32>()) as u64,
                Input::Qwen(p) => p.bytes(),
            }
    }
}

/// Steps (or evaluation chunks) after the current one whose clips the loader makes ahead: the
/// window is the current step and these, so a rank holds at most `run.feature_cache_mb` plus
/// `PREFETCH_STEPS + 1` steps' inputs.
pub(crate) const PREFETCH_STEPS: u64 = 2;

/// How a rank reads its clips: files decoded and made into model inputs by `Source`, through a
/// `Loader` of `run.loader_threads` threads whose cache is `run.feature_cache_mb`. Made for
/// one loaded dataset; a new manifest gets a new one.
///
/// Invariant: per rank, inputs take at most `run.feature_cache_mb` plus the window's
/// (`PREFETCH_STEPS + 1` steps), whatever the dataset's size or the epochs; an input is the
/// same bits whichever thread made it and however often it was made again, so neither key is
/// part of the recipe.
pub(super) struct Inputs {
    source: Arc<Source>,
    loader: Loader<Key, Input>,
}

/// What makes an input out of a clip's files.
struct Source {
    manifest: Arc<Manifest>,
    /// The stand-ins' log-mel.
    mel: LogMel,
    /// `data.sample_rate`: every wav must be at this rate (`load_audio` refuses others).
    sample_rate: u32,
    /// The Qwen2 processor of each modality (audio, visual), once a Qwen2 model of it is
    /// loaded.
    processors: [OnceLock<Processor>; 2],
}

fn slot(modality: Modality) -> usize {
    match modality {
        Modality::Audio => 0,
        Modality::Visual => 1,
    }
}

impl Inputs {
    pub(super) fn new(config: &Config, manifest: Arc<Manifest>) -> Inputs {
        let f = &config.features;
        let source = Arc::new(Source {
            manifest,
            mel: LogMel::new(config.data.sample_rate, f.n_fft, f.hop, f.n_mels),
            sample_rate: config.data.sample_rate,
            processors: [OnceLock::new(), OnceLock::new()],
        });
        let loading = source.clone();
        let loader = Loader::new(
            config.run.loader_threads,
            config.run.feature_cache_mb.saturating_mul(1 << 20),
            move |key: &Key| loading.load(key),
            Input::bytes,
        );
        Inputs { source, loader }
    }

    /// Whether these are the inputs of `manifest` (the same loaded dataset).
    pub(super) fn serves(&self, manifest: &Arc<Manifest>) -> bool {
        Arc::ptr_eq(&self.source.manifest, manifest)
    }

    /// Keeps `qwen`'s processor for clips of `modality` (the first one a modality gets is
    /// its directory's, as every later one is).
    pub(super) fn register(&self, modality: Modality, qwen: &QwenModel) {
        self.source.processors[slot(modality)].get_or_init(|| qwen.processor());
    }

    /// Keeps the processor of `net` when it is a Qwen2 model.
    pub(super) fn register_net(&self, modality: Modality, net: &Net) {
        if let Net::Qwen(qwen) = net {
            self.register(modality, qwen);
        }
    }

    /// Clip `clip`'s input for a model of `modality` (`qwen`: a Qwen2 model's, else a
    /// stand-in's); an error names the clip, whichever thread loaded it.
    pub(super) fn get(&self, clip: u32, modality: Modality, qwen: bool) -> Result<Arc<Input>> {
        let key = Key {
            clip,
            modality,
            qwen,
        };
        self.loader
            .get(&key)
            .with_context(|| format!("loading clip {clip} ({} input)", modality.as_str()))
    }

    /// Names the clips the next calls of `get` ask for, in order, for `config`'s models of
    /// each modality; the loader's threads prepare them meanwhile. A Qwen2 modality whose
    /// processor is not known yet is left to `get`.
    pub(super) fn prefetch(&self, config: &Config, wanted: &[(Modality, Vec<Sample>)]) {
        let mut keys = Vec::new();
        for (modality, samples) in wanted {
            let qwen = net::is_qwen2(config, *modality);
            if qwen && self.source.processors[slot(*modality)].get().is_none() {
                continue;
            }
            keys.extend(samples.iter().map(|s| Key {
                clip: s.clip,
                modality: *modality,
                qwen,
            }));
        }
        self.loader.prefetch(keys);
    }

    pub(super) fn stats(&self) -> data::loader::Stats {
        self.loader.stats()
    }

    /// Bytes the cache holds (inputs used before and out of the window).
    pub(super) fn cache_bytes(&self) -> u64 {
        self.loader.cache_bytes()
    }
}

impl Source {
    /// Decodes `key`'s clip and makes it into the input: the stand-ins' log-mel or normalised
    /// frames, or what the modality's Qwen2 processor makes of it.
    fn load(&self, key: &Key) -> Result<Input> {
        let manifest = &self.manifest;
        let record = clip_record(manifest, key.clip)?;
        let audio = || data::load_audio(&manifest.dir.join(&record.audio), self.sample_rate);
        let frames: Vec<PathBuf> = match key.modality {
            Modality::Visual => manifest.frame_paths(record),
            Modality::Audio => Vec::new(),
        };
        if !key.qwen {
            return Ok(Input::Features(match key.modality {
                Modality::Audio => self.mel.compute(&audio()?),
                Modality::Visual => data::load_frames(&frames)?,
            }));
        }
        let processor = self.processors[slot(key.modality)]
            .get()
            .context("no Qwen2 model of this modality is loaded to prepare it")?;
        let prepared = match key.modality {
            Modality::Audio => processor.prepare(Clip::Audio(&audio()?))?,
            Modality::Visual => {
                let (h, w, frames) = data::load_frames_rgb(&frames)?;
                processor.prepare(Clip::Video {
                    frames: &frames,
                    h,
                    w,
                })?
            }
        };
        Ok(Input::Qwen(prepared))
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
    use std::time::{Duration, Instant};
    use xkd_collective::Solo;

    /// A small synthetic set on disk and its config, with two loader threads and a 1 MiB
    /// cache (about 20 visual clips: a batch of 8 fits, the set does not).
    fn setup() -> (tempfile::TempDir, Config, Arc<Manifest>) {
        let tmp = tempfile::tempdir().unwrap();
        let mut c = Config::embedded();
        c.data.pretrain_clips = 2;
        c.data.pretrain_scarce_clips = 1;
        c.data.probe_clips = 1;
        c.data.distill_clips = 1;
        c.data.eval_clips = 1;
        c.run.feature_cache_mb = 1;
        c.run.loader_threads = 2;
        c.data.dir = tmp.path().join("data").display().to_string();
        let manifest = data::ensure_dataset(&c.data, Path::new(&c.data.dir)).unwrap();
        (tmp, c, Arc::new(manifest))
    }

    fn rank(config: &Config, manifest: &Arc<Manifest>) -> Rank {
        let mut rank = Rank::new(config.clone(), 0, 1, Box::new(Solo)).unwrap();
        rank.manifest = Some(manifest.clone());
        rank
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        t.flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|x| x.to_bits())
            .collect()
    }

    /// Waits for the loader's threads to have loaded `n` clips; fails after a minute.
    fn prefetched(inputs: &Inputs, n: u64) {
        let start = Instant::now();
        while inputs.stats().prefetched < n {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "{:?}",
                inputs.stats()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    use std::path::Path;

    /// A silent 16-bit mono wav of `n` samples at `rate`.
    fn pcm16_wav(rate: u32, n: usize) -> Vec<u8> {
        let data = (n * 2) as u32;
        let mut w = Vec::new();
        w.extend_from_slice(b"RIFF");
        w.extend_from_slice(&(36 + data).to_le_bytes());
        w.extend_from_slice(b"WAVEfmt ");
        w.extend_from_slice(&16u32.to_le_bytes());
        w.extend_from_slice(&1u16.to_le_bytes()); // PCM
        w.extend_from_slice(&1u16.to_le_bytes()); // mono
        w.extend_from_slice(&rate.to_le_bytes());
        w.extend_from_slice(&(rate * 2).to_le_bytes());
        w.extend_from_slice(&2u16.to_le_bytes());
        w.extend_from_slice(&16u16.to_le_bytes());
        w.extend_from_slice(b"data");
        w.extend_from_slice(&data.to_le_bytes());
        w.resize(w.len() + n * 2, 0);
        w
    }

    #[test]
    fn a_prefetched_batch_equals_a_synchronous_one() {
        let (_tmp, config, manifest) = setup();
        let samples: Vec<Sample> = manifest
            .clips
            .iter()
            .rev()
            .take(8)
            .map(|c| Sample {
                clip: c.id,
                epoch: 1,
            })
            .collect();
        for modality in [Modality::Audio, Modality::Visual] {
            let mut ahead = rank(&config, &manifest);
            // Never told what comes: makes every clip on the training thread.
            let mut sync = rank(&config, &manifest);
            let inputs = ahead.inputs().unwrap();
            inputs.prefetch(&config, &[(modality, samples.clone())]);
            prefetched(&inputs, 8);
            let a = ahead.batch(modality, &samples, 5).unwrap();
            let b = sync.batch(modality, &samples, 5).unwrap();
            assert_eq!(a.features.dims(), b.features.dims());
            assert_eq!(bits(&a.features), bits(&b.features), "{modality:?}");
            assert_eq!(
                a.prompts.flatten_all().unwrap().to_vec1::<u32>().unwrap(),
                b.prompts.flatten_all().unwrap().to_vec1::<u32>().unwrap()
            );
            assert_eq!((a.answer_idx, a.labels), (b.answer_idx, b.labels));
            // Every clip came from the loader's threads, none from the training thread.
            let stats = inputs.stats();
            assert_eq!(stats.misses, 0, "{modality:?}: {stats:?}");
            assert_eq!(sync.inputs().unwrap().stats().misses, 8);
        }
    }

    #[test]
    fn a_clip_that_fails_in_the_background_is_named_on_the_training_thread() {
        let (_tmp, config, manifest) = setup();
        let broken = &manifest.clips[3];
        let wav = manifest.audio_path(broken);
        std::fs::write(&wav, b"RIFF not a wav").unwrap();
        let samples: Vec<Sample> = manifest.clips[..6]
            .iter()
            .map(|c| Sample {
                clip: c.id,
                epoch: 0,
            })
            .collect();
        let mut ahead = rank(&config, &manifest);
        let inputs = ahead.inputs().unwrap();
        inputs.prefetch(&config, &[(Modality::Audio, samples.clone())]);
        prefetched(&inputs, 6);
        let Err(e) = ahead.batch(Modality::Audio, &samples, 5) else {
            panic!("a batch with a broken wav was built");
        };
        let e = format!("{e:#}");
        assert!(
            e.contains(&format!("clip {}", broken.id)) && e.contains(&wav.display().to_string()),
            "{e}"
        );
    }

    #[test]
    fn a_clip_of_the_wrong_length_is_named() {
        let (_tmp, config, manifest) = setup();
        let clip = &manifest.clips[0];
        // Twice the configured length: the features would not fit the batch's shape.
        let wav = pcm16_wav(config.data.sample_rate, config.clip_samples() * 2);
        std::fs::write(manifest.audio_path(clip), wav).unwrap();
        let samples = [Sample {
            clip: clip.id,
            epoch: 0,
        }];
        let Err(e) = rank(&config, &manifest).batch(Modality::Audio, &samples, 5) else {
            panic!("a batch with a clip twice too long was built");
        };
        let e = format!("{e:#}");
        assert!(
            e.contains(&format!("clip {}", clip.id)) && e.contains(&clip.audio),
            "{e}"
        );
    }
}
