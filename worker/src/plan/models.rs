//! The models of a plan: their architectures (a model directory's `config.json` through
//! `xkd_models`' own reader, a known architecture when the directory is not here, or the
//! stand-ins' settings), the tokens a question gives each, and the bytes of a clip's input.

use std::path::{Path, PathBuf};

use xkd_config::{Config, ConfigError, DataSource, Modality, ModelFamily};
use xkd_data::features::LogMel;
use xkd_models::qwen::config::{AudioEncoderConfig, TextConfig, VisionConfig};
use xkd_models::qwen::{ChatPrompt, Family, ImageProcessor, Qwen2Audio, Qwen2Vl};

use super::arch::{self, Adapters, Bytes, F32};
use super::Options;

/// Architectures of model directories that need not be on this machine: the paper's pair,
/// as their Hub repositories' `config.json` set them (configs/arch/make_arch_configs.py).
const KNOWN: [(&str, &str); 2] = [
    (
        "Qwen2-Audio-7B-Instruct",
        include_str!("../../../configs/arch/Qwen2-Audio-7B-Instruct/config.json"),
    ),
    (
        "Qwen2-VL-7B-Instruct",
        include_str!("../../../configs/arch/Qwen2-VL-7B-Instruct/config.json"),
    ),
];

/// A model's architecture and its inputs.
#[derive(Debug, Clone)]
pub(super) struct Arch {
    pub(super) modality: Modality,
    pub(super) family: &'static str,
    /// The LM's shape (the stand-ins' as a Qwen2 decoder).
    pub(super) text: TextConfig,
    pub(super) tower: Tower,
    pub(super) params: u64,
    pub(super) clip_tokens: usize,
    pub(super) prompt_tokens: usize,
    pub(super) prompt_source: String,
    pub(super) source: String,
    /// f32 bytes of one clip as the loader holds it.
    pub(super) input_bytes: u64,
    /// Bytes of the safetensors files in the model directory (none when it is not here).
    pub(super) files: Vec<u64>,
    pub(super) qwen: bool,
}

#[derive(Debug, Clone)]
pub(super) enum Tower {
    Audio(AudioEncoderConfig),
    Vision {
        cfg: VisionConfig,
        patches: u64,
        group: u64,
    },
    /// A stand-in's tower: `layers` of width `hidden` over `positions`.
    StandIn {
        hidden: u64,
        layers: u64,
        heads: u64,
        positions: u64,
    },
}

impl Arch {
    /// Layers whose tensors a trained student keeps: the LM's, and a stand-in's tower's.
    pub(super) fn layers(&self) -> u64 {
        let tower = match self.tower {
            Tower::StandIn { layers, .. } => layers,
            _ => 0,
        };
        self.text.num_hidden_layers as u64 + tower
    }

    pub(super) fn tokens(&self) -> u64 {
        (self.clip_tokens + self.prompt_tokens) as u64
    }

    /// The most a frozen forward over `clips` clips holds at once.
    pub(super) fn frozen_peak(&self, clips: u64, b: Bytes) -> u64 {
        let s = self.tokens();
        let lm = clips * s * arch::text_frozen_token_bytes(&self.text, s, b);
        let tower = match &self.tower {
            Tower::Audio(a) => arch::audio_encoder_peak(a, clips, b),
            Tower::Vision {
                cfg,
                patches,
                group,
            } => arch::vision_peak(cfg, clips, *patches, *group, b),
            Tower::StandIn { .. } => 0,
        };
        clips * self.input_bytes + lm.max(tower)
    }

    /// Bytes the LM keeps per clip for the backward pass (or, in evaluation with
    /// `backward = false`, for as long as the logits live).
    pub(super) fn graph_per_clip(&self, b: Bytes, lora: Option<&Adapters>, backward: bool) -> u64 {
        let s = self.tokens();
        let layers = self.text.num_hidden_layers as u64;
        let mut n = layers * s * arch::text_layer_token_bytes(&self.text, s, b, lora, backward);
        if let Tower::StandIn {
            hidden,
            layers,
            heads,
            positions,
        } = self.tower
        {
            // A stand-in is trained whole: its tower's activations are kept too.
            let t = TextConfig {
                hidden_size: hidden as usize,
                intermediate_size: 4 * hidden as usize,
                num_attention_heads: heads as usize,
                num_key_value_heads: heads as usize,
                num_hidden_layers: layers as usize,
                ..self.text.clone()
            };
            n +=
                layers * positions * arch::text_layer_token_bytes(&t, positions, b, None, backward);
        }
        n
    }
}

/// The class names questions are made of, when this machine can read them.
pub(super) fn class_names(config: &Config) -> Option<Vec<String>> {
    if config.data.source == DataSource::Synthetic {
        let names = xkd_data::synth::class_table().iter().map(|c| c.name);
        return Some(names.map(str::to_string).collect());
    }
    let text = std::fs::read_to_string(Path::new(&config.data.dir).join("classes.json")).ok()?;
    let value: serde_json::Value = serde_json::from_str(&text).ok()?;
    let names = value.get("classes")?.as_array()?;
    names
        .iter()
        .map(|n| n.as_str().map(str::to_string))
        .collect()
}

/// The ten longest class names: the longest question a clip can be asked.
pub(super) fn longest_options(config: &Config) -> (Vec<String>, String) {
    match class_names(config) {
        Some(mut names) if !names.is_empty() => {
            names.sort_by_key(|n| std::cmp::Reverse(n.len()));
            names.truncate(10);
            (names, "the ten longest class names".into())
        }
        _ => (
            vec!["x".repeat(40); 10],
            "ten 40-character class names (the classes are not readable here)".into(),
        ),
    }
}

fn bad(key: String, message: String) -> ConfigError {
    ConfigError::BadValue { key, message }
}

pub(super) fn model_arch(
    config: &Config,
    modality: Modality,
    options: &Options,
) -> Result<Arch, ConfigError> {
    match config.model(modality).family {
        ModelFamily::Standin => standin_arch(config, modality),
        ModelFamily::Qwen2 => qwen_arch(config, modality, options),
    }
}

fn section(modality: Modality) -> &'static str {
    match modality {
        Modality::Audio => "audio_model",
        Modality::Visual => "visual_model",
    }
}

fn standin_arch(config: &Config, modality: Modality) -> Result<Arch, ConfigError> {
    use candle_nn::{VarBuilder, VarMap};
    use xkd_models::model::{InputShape, Model, Vocab};
    let n_classes = class_names(config).map_or(0, |c| c.len());
    if n_classes == 0 {
        return Err(bad(
            "data.dir".into(),
            format!(
                "the plan of a stand-in needs the class count: no readable classes.json in {:?}",
                config.data.dir
            ),
        ));
    }
    let cfg = config.model(modality);
    let input = InputShape {
        n_mels: config.features.n_mels,
        frames: config.data.frames,
        frame_size: config.data.frame_size,
    };
    // The model built on the CPU with fresh parameters, only to count them.
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, candle_core::DType::F32, &candle_core::Device::Cpu);
    let vocab = Vocab::new(n_classes);
    let model = Model::new(modality, cfg, input, vocab.clone(), vb).map_err(|e| {
        bad(
            format!("{}.family", section(modality)),
            format!("building the stand-in to count its parameters: {e}"),
        )
    })?;
    let params: u64 = varmap
        .all_vars()
        .iter()
        .map(|v| v.elem_count() as u64)
        .sum();
    let prompt = vocab.prompt(&[0; 10], model.mm_tokens).len() - model.mm_tokens;
    let (input_bytes, positions) = match modality {
        Modality::Audio => {
            let f = &config.features;
            let mel = LogMel::new(config.data.sample_rate, f.n_fft, f.hop, f.n_mels);
            let frames = mel.frames(config.clip_samples());
            ((frames * f.n_mels) as u64 * F32, frames as u64)
        }
        Modality::Visual => {
            let (t, s) = (config.data.frames, config.data.frame_size);
            let grid = s / cfg.patch.max(1);
            ((t * 3 * s * s) as u64 * F32, (t / 2 * grid * grid) as u64)
        }
    };
    Ok(Arch {
        modality,
        family: "stand-in",
        text: TextConfig {
            vocab_size: vocab.size(),
            hidden_size: cfg.lm_hidden,
            intermediate_size: cfg.lm_intermediate,
            num_hidden_layers: cfg.lm_layers,
            num_attention_heads: cfg.lm_heads,
            num_key_value_heads: cfg.lm_kv_heads,
            hidden_act: "silu".into(),
            rms_norm_eps: 1e-6,
            rope_theta: cfg.rope_theta as f64,
            tie_word_embeddings: cfg.tie_embeddings,
            mrope_section: None,
        },
        tower: Tower::StandIn {
            hidden: cfg.encoder_hidden as u64,
            layers: cfg.encoder_layers as u64,
            heads: cfg.encoder_heads as u64,
            positions,
        },
        params,
        clip_tokens: model.mm_tokens,
        prompt_tokens: prompt,
        prompt_source: "the stand-ins' prompt".into(),
        source: "the config's stand-in settings".into(),
        input_bytes,
        files: vec![],
        qwen: false,
    })
}

/// Where a Qwen2 model's `config.json` is read: the directory, or a known architecture of the
/// same name when the directory is not on this machine.
fn qwen_config_dir(config: &Config, modality: Modality) -> Result<(PathBuf, String), ConfigError> {
    let dir = &config.model(modality).dir;
    let local = Path::new(dir);
    if local.join("config.json").is_file() {
        return Ok((local.to_path_buf(), format!("{dir}/config.json")));
    }
    let name = dir.trim_end_matches('/').rsplit('/').next().unwrap_or("");
    match KNOWN.iter().find(|(known, _)| *known == name) {
        Some((known, _)) => Ok((
            PathBuf::from(format!("<known>/{known}")),
            format!("configs/arch/{known}/config.json (the Hub's; {dir} is not on this machine)"),
        )),
        None => Err(bad(
            format!("{}.dir", section(modality)),
            format!(
                "{dir:?} has no config.json here, and its name is none of the architectures \
                 xkd plan knows ({})",
                KNOWN.map(|(k, _)| k).join(", ")
            ),
        )),
    }
}

fn known_config(dir: &Path) -> Option<&'static str> {
    let name = dir.to_str()?.strip_prefix("<known>/")?;
    KNOWN
        .iter()
        .find(|(k, _)| *k == name)
        .map(|(_, text)| *text)
}

fn qwen_arch(config: &Config, modality: Modality, options: &Options) -> Result<Arch, ConfigError> {
    let (dir, source) = qwen_config_dir(config, modality)?;
    let key = format!("{}.dir", section(modality));
    let family = xkd_models::net::family(modality);
    let read = |e: String| bad(key.clone(), e);
    let (options_text, prompt_source) = longest_options(config);
    let options_ref: Vec<&str> = options_text.iter().map(String::as_str).collect();
    let files = safetensors_sizes(&dir);
    let preprocessor = std::fs::read_to_string(dir.join("preprocessor_config.json")).ok();
    let (text, tower, params, clip_tokens, input_bytes, placeholder) = match family {
        Family::Audio => {
            let cfg = match known_config(&dir) {
                Some(json) => xkd_models::qwen::Qwen2AudioConfig::from_json(json).map_err(read)?,
                None => Qwen2Audio::read_config(&dir).map_err(|e| read(e.to_string()))?,
            };
            let params = arch::text_params(&cfg.text)
                + arch::audio_encoder_params(&cfg.audio, cfg.text.hidden_size as u64);
            let hop = preprocessor
                .as_deref()
                .and_then(|t| serde_json::from_str::<serde_json::Value>(t).ok())
                .and_then(|v| v.get("hop_length")?.as_u64())
                .unwrap_or(160) as usize;
            let window = 2 * cfg.audio.max_source_positions;
            let valid = config.clip_samples().min(window * hop).div_ceil(hop);
            let tokens = xkd_models::qwen::audio::output_lengths(valid).1;
            let bytes = (window * cfg.audio.num_mel_bins) as u64 * F32;
            let id = cfg.audio_token_index;
            (
                cfg.text.clone(),
                Tower::Audio(cfg.audio),
                params,
                tokens,
                bytes,
                id,
            )
        }
        Family::Vl => {
            let cfg = match known_config(&dir) {
                Some(json) => xkd_models::qwen::Qwen2VlConfig::from_json(json).map_err(read)?,
                None => Qwen2Vl::read_config(&dir).map_err(|e| read(e.to_string()))?,
            };
            let params = arch::text_params(&cfg.text) + arch::vision_params(&cfg.vision);
            let processor = match preprocessor.as_deref() {
                Some(t) => ImageProcessor::from_json(t).map_err(read)?,
                None => ImageProcessor::default(),
            };
            let (frames, (h, w)) = video_frames(config, options)?;
            let (rh, rw) = processor
                .smart_resize(h, w)
                .map_err(|e| bad("--frame-size".into(), format!("{h}x{w}: {e}")))?;
            let p = cfg.vision.patch_size;
            let grid = [
                frames.div_ceil(cfg.vision.temporal_patch_size),
                rh / p,
                rw / p,
            ];
            let m = cfg.vision.spatial_merge_size;
            let patches = (grid[0] * grid[1] * grid[2]) as u64;
            let tokens = grid[0] * grid[1] * grid[2] / (m * m);
            let bytes = patches * cfg.vision.patch_len() as u64 * F32;
            let tower = Tower::Vision {
                cfg: cfg.vision.clone(),
                patches,
                group: (grid[1] * grid[2]) as u64,
            };
            (
                cfg.text.clone(),
                tower,
                params,
                tokens,
                bytes,
                cfg.video_token_id,
            )
        }
    };
    let (prompt_tokens, prompt_how) = match ChatPrompt::load(&dir, family, placeholder) {
        Ok(prompt) => {
            let ids = prompt
                .encode(&options_ref, 1)
                .map_err(|e| read(e.to_string()))?;
            (
                ids.len() - 1,
                format!("{prompt_source}, tokenized by its tokenizer.json"),
            )
        }
        Err(_) => {
            let chars = ChatPrompt::question(&options_ref).len() + 100;
            (
                chars.div_ceil(3),
                format!(
                    "{prompt_source}, estimated at 3 characters a token with the chat \
                     template (no tokenizer.json here)"
                ),
            )
        }
    };
    Ok(Arch {
        modality,
        family: match family {
            Family::Audio => "Qwen2-Audio",
            Family::Vl => "Qwen2-VL",
        },
        text,
        tower,
        params,
        clip_tokens,
        prompt_tokens,
        prompt_source: prompt_how,
        source,
        input_bytes,
        files,
        qwen: true,
    })
}

/// A clip's frames for Qwen2-VL and their size: the synthetic set's squares, or what
/// `xkd data prepare` keeps of a `--frame-size` source (2 a second, an even count, multiples
/// of 28 under its pixel cap).
fn video_frames(
    config: &Config,
    options: &Options,
) -> Result<(usize, (usize, usize)), ConfigError> {
    let d = &config.data;
    if d.source == DataSource::Synthetic {
        return Ok((d.frames, (d.frame_size, d.frame_size)));
    }
    use xkd_data::prepare::{qwen2_vl_size, QWEN2_VL_FPS, QWEN2_VL_MAX_PIXELS};
    let count = (((d.clip_seconds as f64 * QWEN2_VL_FPS).floor() as usize) / 2 * 2).max(2);
    let (h, w) = options.frame_size;
    let size = qwen2_vl_size(h, w, QWEN2_VL_MAX_PIXELS).ok_or_else(|| {
        bad(
            "--frame-size".into(),
            format!("{h}x{w} is smaller than 28 pixels a side"),
        )
    })?;
    Ok((count, size))
}

/// Sizes of the safetensors files of a local model directory.
fn safetensors_sizes(dir: &Path) -> Vec<u64> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return vec![];
    };
    entries
        .filter_map(Result::ok)
        .filter(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
        .filter_map(|e| e.metadata().ok().map(|m| m.len()))
        .collect()
}
