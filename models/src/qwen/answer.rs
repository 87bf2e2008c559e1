//! A Qwen2 model answering xkd's multiple-choice question about clips: each clip prepared as the
//! family's reference processor does (Whisper log-mel in the checkpoint's window with its valid
//! length; Qwen2-VL's resize and patches for a video), the question in the family's chat
//! format, and the logits of the ten option letters at the position after the prompt.
//!
//! A batch's prompts differ in length (the option names do), so they are right-padded with the
//! tokenizer's `<|endoftext|>`: under the causal mask a row's logits up to its last real token
//! do not see the padding, and each row is read at its own last token.

use std::path::Path;

use candle_core::{DType, Device, Result, Tensor};
use serde::Deserialize;

use super::weights::read_text;
use super::{ChatPrompt, Family, ImageProcessor, LoraAdapters, LoraConfig, Qwen2Audio, Qwen2Vl};
use super::{LoadError, VisionInput, Weights};
use xkd_data::features::LogMel;

/// One clip as it comes from the dataset.
pub enum Clip<'a> {
    /// Mono samples at the model's sampling rate.
    Audio(&'a [f32]),
    /// RGB frames, `h x w x 3` bytes each.
    Video {
        frames: &'a [Vec<u8>],
        h: usize,
        w: usize,
    },
}

/// WhisperFeatureExtractor's settings in `preprocessor_config.json`.
#[derive(Debug, Deserialize)]
struct AudioProcessor {
    feature_size: usize,
    sampling_rate: u32,
    hop_length: usize,
    n_fft: usize,
    n_samples: usize,
}

/// A clip as its model's processor prepared it.
pub enum Prepared {
    /// Log-mel `[frames, n_mels]` over the checkpoint's window, and how many frames hold audio.
    Audio { features: Vec<f32>, valid: usize },
    /// Flattened patches and the `[t, h, w]` patch grid.
    Video { patches: Vec<f32>, grid: [usize; 3] },
}

enum Model {
    Audio {
        model: Qwen2Audio,
        mel: LogMel,
        sampling_rate: u32,
        window: usize,
    },
    Vl {
        model: Qwen2Vl,
        processor: ImageProcessor,
    },
}

/// A family's processor without its model: what [`QwenModel::prepare`] runs, cheap to clone
/// and free to move to another thread; it prepares a clip exactly as the model does.
#[derive(Clone)]
pub enum Processor {
    /// Whisper log-mel over the checkpoint's window of `window` samples.
    Audio { mel: LogMel, window: usize },
    /// Qwen2-VL's resize, normalisation and patches.
    Vl(ImageProcessor),
}

impl Processor {
    /// `clip` as [`QwenModel::prepare`] prepares it for the model this came from.
    pub fn prepare(&self, clip: Clip) -> Result<Prepared> {
        match self {
            Processor::Audio { mel, window } => prepare_audio(mel, *window, clip),
            Processor::Vl(processor) => prepare_video(processor, clip),
        }
    }
}

fn prepare_audio(mel: &LogMel, window: usize, clip: Clip) -> Result<Prepared> {
    let Clip::Audio(wav) = clip else {
        candle_core::bail!("Qwen2-Audio takes audio clips");
    };
    let (features, valid) = mel.compute_window(wav, window);
    Ok(Prepared::Audio { features, valid })
}

fn prepare_video(processor: &ImageProcessor, clip: Clip) -> Result<Prepared> {
    let Clip::Video { frames, h, w } = clip else {
        candle_core::bail!("Qwen2-VL takes video clips");
    };
    let refs: Vec<&[u8]> = frames.iter().map(Vec::as_slice).collect();
    let (patches, grid) = processor.preprocess(&refs, h, w)?;
    Ok(Prepared::Video { patches, grid })
}

impl Prepared {
    /// Bytes its buffers hold.
    pub fn bytes(&self) -> u64 {
        let floats = match self {
            Prepared::Audio { features, .. } => features.len(),
            Prepared::Video { patches, .. } => patches.len(),
        };
        (floats * std::mem::size_of::<f32>()) as u64
    }
}

/// Each prompt's last position: where its answer's logits are.
fn last_positions(lens: &[usize]) -> Vec<usize> {
    lens.iter().map(|&len| len.saturating_sub(1)).collect()
}

/// A Qwen2-Audio or Qwen2-VL model with its tokenizer and processor.
pub struct QwenModel {
    model: Model,
    prompt: ChatPrompt,
    pad: u32,
    parameters: usize,
}

impl QwenModel {
    /// Loads a Hugging Face model directory: `config.json`, the weights (in `dtype`),
    /// `tokenizer.json` and `preprocessor_config.json`.
    pub fn load(
        dir: &Path,
        family: Family,
        dtype: DType,
        device: &Device,
    ) -> std::result::Result<Self, LoadError> {
        let weights = Weights::load(dir, dtype, device)?;
        let parameters = weights.tensors().map(Tensor::elem_count).sum();
        let (path, text) = read_text(dir, "preprocessor_config.json")?;
        let config_error = |message: String| LoadError::Config {
            path: path.clone(),
            message,
        };
        let (model, placeholder) = match family {
            Family::Audio => {
                let model = Qwen2Audio::load(dir, &weights)?;
                let p: AudioProcessor =
                    serde_json::from_str(&text).map_err(|e| config_error(e.to_string()))?;
                let id = model.config.audio_token_index;
                let mel = LogMel::new(p.sampling_rate, p.n_fft, p.hop_length, p.feature_size);
                let frames = mel.frames(p.n_samples);
                let want = model.encoder().window_frames();
                if frames != want {
                    return Err(config_error(format!(
                        "n_samples {} gives {frames} mel frames, but the encoder's window is {want}",
                        p.n_samples
                    )));
                }
                let model = Model::Audio {
                    model,
                    mel,
                    sampling_rate: p.sampling_rate,
                    window: p.n_samples,
                };
                (model, id)
            }
            Family::Vl => {
                let model = Qwen2Vl::load(dir, &weights)?;
                let processor = ImageProcessor::from_json(&text).map_err(config_error)?;
                let id = model.config.video_token_id;
                (Model::Vl { model, processor }, id)
            }
        };
        let prompt = ChatPrompt::load(dir, family, placeholder)?;
        let pad = prompt.token_id("<|endoftext|>").unwrap_or(0);
        Ok(Self {
            model,
            prompt,
            pad,
            parameters,
        })
    }

    /// Parameters of the checkpoint (adapters not counted).
    pub fn parameters(&self) -> usize {
        self.parameters
    }

    pub fn family(&self) -> Family {
        self.prompt.family()
    }

    /// The sampling rate an audio model's clips must have (`None` for Qwen2-VL).
    pub fn sampling_rate(&self) -> Option<u32> {
        match &self.model {
            Model::Audio { sampling_rate, .. } => Some(*sampling_rate),
            Model::Vl { .. } => None,
        }
    }

    /// Fresh LoRA adapters on the language model (`B = 0`: the logits do not change).
    pub fn init_lora(&mut self, lora: LoraConfig, seed: u64) -> Result<LoraAdapters> {
        match &mut self.model {
            Model::Audio { model, .. } => model.init_lora(lora, seed),
            Model::Vl { model, .. } => model.init_lora(lora, seed),
        }
    }

    /// Puts saved adapters on the language model.
    pub fn attach_lora(&mut self, adapters: &LoraAdapters) -> Result<()> {
        match &mut self.model {
            Model::Audio { model, .. } => model.attach_lora(adapters),
            Model::Vl { model, .. } => model.attach_lora(adapters),
        }
    }

    /// Training mode turns LoRA dropout on.
    pub fn set_training(&mut self, training: bool) {
        match &mut self.model {
            Model::Audio { model, .. } => model.set_training(training),
            Model::Vl { model, .. } => model.set_training(training),
        }
    }

    /// `clip` as this model's processor prepares it: what [`QwenModel::letter_logits`] takes.
    /// A clip's preparation does not depend on its question, so a caller can keep it.
    pub fn prepare(&self, clip: Clip) -> Result<Prepared> {
        match &self.model {
            Model::Audio { mel, window, .. } => prepare_audio(mel, *window, clip),
            Model::Vl { processor, .. } => prepare_video(processor, clip),
        }
    }

    /// This model's processor alone, to prepare clips away from the model (a loader thread).
    pub fn processor(&self) -> Processor {
        match &self.model {
            Model::Audio { mel, window, .. } => Processor::Audio {
                mel: mel.clone(),
                window: *window,
            },
            Model::Vl { processor, .. } => Processor::Vl(processor.clone()),
        }
    }

    /// The option letters' logits `[B, 10]` (f32) for `clips` (from [`QwenModel::prepare`])
    /// and their questions (`options[i]`: the ten option names of clip i), and the number of
    /// prompt tokens.
    pub fn letter_logits(
        &self,
        clips: &[&Prepared],
        options: &[Vec<&str>],
        device: &Device,
    ) -> Result<(Tensor, usize)> {
        if clips.len() != options.len() {
            candle_core::bail!("{} clips but {} questions", clips.len(), options.len());
        }
        let (rows, logits) = match &self.model {
            Model::Audio {
                model, mel, window, ..
            } => {
                let (mut features, mut valid) = (Vec::new(), Vec::new());
                for clip in clips {
                    let Prepared::Audio {
                        features: f,
                        valid: v,
                    } = clip
                    else {
                        candle_core::bail!("Qwen2-Audio takes audio clips");
                    };
                    features.extend_from_slice(f);
                    valid.push(*v);
                }
                let n = mel.frames(*window);
                let features = Tensor::from_vec(features, (clips.len(), n, mel.n_mels()), device)?
                    .transpose(1, 2)?
                    .contiguous()?;
                let tokens: Vec<usize> = valid
                    .iter()
                    .map(|&v| super::audio::output_lengths(v).1)
                    .collect();
                let (rows, ids) = self.prompts(options, &tokens, device)?;
                let last = last_positions(&rows);
                (
                    rows,
                    model.forward_at(&ids, &features, &valid, Some(&last))?,
                )
            }
            Model::Vl { model, .. } => {
                let (mut patches, mut grids) = (Vec::new(), Vec::new());
                for clip in clips {
                    let Prepared::Video { patches: p, grid } = clip else {
                        candle_core::bail!("Qwen2-VL takes video clips");
                    };
                    patches.extend_from_slice(p);
                    grids.push(*grid);
                }
                let len = model.config.vision.patch_len();
                let n = patches.len() / len;
                let videos = VisionInput {
                    patches: Tensor::from_vec(patches, (n, len), device)?,
                    grids: grids.clone(),
                };
                let tokens: Vec<usize> = grids.iter().map(|&g| model.tokens_for(g)).collect();
                let (rows, ids) = self.prompts(options, &tokens, device)?;
                let last = last_positions(&rows);
                (
                    rows,
                    model.forward_at(&ids, None, Some(&videos), Some(&last))?,
                )
            }
        };
        let letters = Tensor::new(self.prompt.letters(), device)?;
        let out = logits.index_select(&letters, 1)?;
        Ok((out, rows.iter().sum()))
    }

    /// The prompts right-padded into `[B, S]`, and each one's length.
    fn prompts(
        &self,
        options: &[Vec<&str>],
        clip_tokens: &[usize],
        device: &Device,
    ) -> Result<(Vec<usize>, Tensor)> {
        let encoded: Vec<Vec<u32>> = options
            .iter()
            .zip(clip_tokens)
            .map(|(o, &n)| self.prompt.encode(o, n))
            .collect::<Result<_>>()?;
        let s = encoded.iter().map(Vec::len).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(encoded.len() * s);
        for row in &encoded {
            ids.extend(row);
            ids.extend(std::iter::repeat_n(self.pad, s - row.len()));
        }
        let lens = encoded.iter().map(Vec::len).collect();
        Ok((lens, Tensor::from_vec(ids, (encoded.len(), s), device)?))
    }
}
