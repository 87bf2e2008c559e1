//! The config schema: one typed struct per component, loaded from TOML, overridden key by key.
//!
//! The embedded default (`configs/default.toml`) is the whole schema with every value set; a user
//! file or a `--set section.key=value` may only change keys that exist there. Unknown keys and
//! values of the wrong type are errors that name the key, never silently ignored.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fmt;
use std::path::Path;
use std::str::FromStr;

/// The embedded default recipe: synthetic audio-visual data and tiny models, no GPU, no network.
pub const DEFAULT_TOML: &str = include_str!("../../configs/default.toml");

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML: {message}")]
    Parse { path: String, message: String },
    #[error("unknown config key `{key}`")]
    UnknownKey { key: String },
    #[error("override `{arg}` is not of the form section.key=value")]
    BadOverride { arg: String },
    #[error("bad value for `{key}`: {message}")]
    BadValue { key: String, message: String },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub run: RunConfig,
    pub data: DataConfig,
    pub features: FeatureConfig,
    pub audio_model: ModelConfig,
    pub visual_model: ModelConfig,
    pub pretrain: TrainConfig,
    pub heuristic: HeuristicConfig,
    pub distill: DistillConfig,
    pub lora: LoraConfig,
    pub checkpoint: CheckpointConfig,
    pub collective: CollectiveConfig,
    pub control: ControlConfig,
    pub log: LogConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// Seed of everything random in training: initialisation, shuffles, question options.
    pub seed: u64,
    /// Run id; empty means one is generated from the time at start.
    pub run_id: String,
    /// Where datasets and pretrained stand-in models are cached between runs.
    pub cache_dir: String,
    /// `cpu`, `cuda` (the first GPU) or `cuda:N`; see `DeviceChoice`. `validate` checks the
    /// form; whether this binary can use CUDA is checked where that is known, at startup.
    pub device: String,
    /// Compute threads of each worker process `xkd run` starts; 0 = the machine's cores
    /// divided among them. A cluster's workers take `RAYON_NUM_THREADS` from their launcher.
    pub threads_per_worker: usize,
    /// Host memory each worker keeps for clips' features between uses (log-mel spectrograms,
    /// frames, Qwen2 processor outputs), in MiB; the least recently used go first. Bounds a
    /// rank's feature memory whatever the dataset's size (plus the batch in hand); 0 keeps
    /// only the current batch.
    pub feature_cache_mb: u64,
    /// Threads of each worker's clip loader: they decode the clips of the next steps and make
    /// their features (and Qwen2 processor outputs) while the current step computes, into
    /// `feature_cache_mb`. 1 to 256. Moves work between threads only: no result depends on it.
    pub loader_threads: usize,
}

impl RunConfig {
    /// `device` as a typed value. Panics only on a config that skipped `validate`, which
    /// `Config`'s constructors never hand out.
    pub fn device_choice(&self) -> DeviceChoice {
        self.device
            .parse()
            .expect("run.device was validated when the config was loaded")
    }
}

/// Where a worker runs its tensors: `cpu`, `cuda` (device 0) or `cuda:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    Cpu,
    /// A CUDA device by ordinal; `None` = the first one.
    Cuda(Option<usize>),
}

impl DeviceChoice {
    /// The accepted spellings, for error messages.
    pub const FORMS: &'static str = "`cpu`, `cuda` or `cuda:N` (N = 0, 1, ...)";
}

impl FromStr for DeviceChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<DeviceChoice, String> {
        let refuse = || format!("`{s}` is not a device: expected {}", DeviceChoice::FORMS);
        match s {
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" => Ok(DeviceChoice::Cuda(None)),
            _ => {
                // Digits only: `usize::from_str` would also take `+1`.
                let n = s.strip_prefix("cuda:").ok_or_else(refuse)?;
                if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(refuse());
                }
                n.parse()
                    .map(|n| DeviceChoice::Cuda(Some(n)))
                    .map_err(|_| refuse())
            }
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceChoice::Cpu => f.write_str("cpu"),
            DeviceChoice::Cuda(None) => f.write_str("cuda"),
            DeviceChoice::Cuda(Some(n)) => write!(f, "cuda:{n}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// `synthetic`: generate the embedded visible-sound set; `manifest`: read `dir`/manifest.jsonl.
    pub source: DataSource,
    /// Dataset directory; empty means `<cache_dir>/data-<digest of this section>`. A prepared
    /// dataset (`manifest`) may also be an object-store URL (`s3://`, `gs://`, `az://`,
    /// `file://`): each node downloads it once into `<cache_dir>/data/remote-<digest of the
    /// URL>/`, as model directories.
    pub dir: String,
    pub seed: u64,
    pub sample_rate: u32,
    pub clip_seconds: f32,
    pub frames: usize,
    pub frame_size: usize,
    /// Clips per class in each split.
    pub pretrain_clips: usize,
    /// Clips per class a modality's pretraining split keeps of the classes it barely saw.
    pub pretrain_scarce_clips: usize,
    pub probe_clips: usize,
    pub distill_clips: usize,
    pub eval_clips: usize,
}

/// Where a run's clips come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DataSource {
    /// The embedded synthetic set, generated into the cache on first use.
    Synthetic,
    /// A prepared dataset in `data.dir`.
    Manifest,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureConfig {
    pub n_fft: usize,
    pub hop: usize,
    pub n_mels: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// `standin`: the tiny stand-in built from the keys below and pretrained by the run;
    /// `qwen2`: the Hugging Face model directory `dir` (Qwen2-Audio for audio_model, Qwen2-VL
    /// for visual_model), taken as pretrained; the keys below are then unused.
    pub family: ModelFamily,
    /// The model directory of a `qwen2` model: config.json, safetensors, tokenizer.json,
    /// preprocessor_config.json. Relative paths are taken from each process's working directory.
    pub dir: String,
    /// Width of the modality encoder.
    pub encoder_hidden: usize,
    pub encoder_layers: usize,
    pub encoder_heads: usize,
    /// Width of the decoder LM.
    pub lm_hidden: usize,
    pub lm_layers: usize,
    pub lm_heads: usize,
    pub lm_kv_heads: usize,
    pub lm_intermediate: usize,
    pub rope_theta: f32,
    /// Modality tokens handed to the LM after pooling / merging.
    pub modality_tokens: usize,
    /// Patch side in pixels (visual only).
    pub patch: usize,
    /// LM head shares the token embedding matrix (as the small Qwen2 models do).
    pub tie_embeddings: bool,
}

/// What kind of model a `[*_model]` section describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelFamily {
    /// The tiny stand-in of this repository, built from the section's sizes.
    Standin,
    /// A Hugging Face Qwen2-Audio or Qwen2-VL directory.
    Qwen2,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub steps: u64,
    /// Clips per step over all workers; each worker takes batch / workers.
    pub batch: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub warmup_steps: u64,
    /// Weight of the captioning loss (predict the class name right after the modality
    /// tokens) beside the answer loss; pretraining only.
    pub caption_weight: f64,
    /// Clip the global gradient norm to this; 0 = no clipping.
    pub grad_clip: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeuristicConfig {
    /// A class is hard when its score exceeds this (ignored when `top_k` > 0).
    pub threshold: f64,
    /// Take the k highest-scoring classes instead of thresholding; 0 = use the threshold.
    pub top_k: usize,
    /// A hard class also needs the teacher to be at least this accurate on it.
    pub teacher_floor: f64,
    /// Fit the coefficients on the probe split instead of using the defaults below.
    pub fit: bool,
    /// Logistic coefficients: bias, then student accuracy, student p(true), student entropy
    /// (normalised to [0, 1]), teacher accuracy, human prior.
    pub coefficients: Vec<f64>,
    /// Optional CSV `class,prior` with a per-class prior in [0, 1] that the student's modality
    /// perceives the class (e.g. human ears' accuracy); empty = 0.5 for every class.
    pub prior_csv: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DistillConfig {
    /// `visual_to_audio` (visual teacher, audio student) or `audio_to_visual`.
    pub direction: Direction,
    /// Which classes the teacher teaches: `hard` (the heuristic's pick), `all`, or `random`
    /// (as many as the heuristic picked, drawn from `run.seed`); the last two are the controls
    /// `xkd compare` sets beside `hard`.
    pub classes: DistillClasses,
    /// Weight of the teacher's KL term; 1 - alpha goes to cross-entropy on the labels.
    pub alpha: f64,
    pub temperature: f64,
    /// Cross-entropy target: `label` (ground truth) or `teacher` (teacher argmax, label-free).
    pub target: CeTarget,
    /// `options` (KL over the ten answer letters) or `vocab` (over the whole vocabulary).
    pub kl_over: KlOver,
    /// Share of each batch drawn from the classes the student knows (neither taught nor hard),
    /// so it does not forget them while it learns the taught ones (`replay_target` says what
    /// those rows are trained to).
    pub replay_fraction: f64,
    /// What the replay rows are trained to: `student` (the KL to the pretrained student's own
    /// answers and captions, frozen) or `label` (cross-entropy on each clip's true letter and,
    /// for a stand-in, its caption's class name: pretraining's own loss). `label` holds the
    /// answers, not the whole distribution, so the student can still move its features to
    /// learn the taught classes (issue 18's measurements, README); it needs labels, so not
    /// with `target = "teacher"`.
    pub replay_target: ReplayTarget,
    /// Rehearsal: the replay rows are drawn from the student's own pretraining split too (its
    /// clips of the replayed classes), not only from the distill split's. A wider pool
    /// anchors more of what the student saw before, so fewer of its other classes' answers
    /// drift while it learns the taught ones (issue 18's measurements, README).
    pub replay_pretrain: bool,
    /// Weight of the caption KL: the teacher's next-token distribution right after its
    /// modality tokens (which names the class it perceives) against the student's.
    pub caption_weight: f64,
    pub steps: u64,
    /// Clips per step over all workers.
    pub batch: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub warmup_steps: u64,
    pub grad_clip: f64,
    /// Where the teacher's answers come from: `online` (the teacher is loaded by every worker
    /// and answers each step) or `cached` (a stage before distillation runs it once over every
    /// question the steps will ask and stores its answers in the run's checkpoint store;
    /// distillation then reads them and never loads the teacher). Both give the same student
    /// bit for bit, so the key is outside the recipe digest (`DistillConfig::recipe`).
    pub teacher: TeacherSource,
    /// Steps of questions per shard of the teacher cache (a worker holds at most two shards
    /// while it distills). Layout only: outside the recipe digest.
    pub cache_shard_steps: u64,
    /// Clips a worker runs through the student per forward and backward pass; a step's
    /// gradients are the sum of its micro-batches' (each loss divided by the step's rows), so
    /// only one micro-batch's activations are alive at once. 0 = all of a worker's clips of a
    /// step in one pass. Part of the recipe where it is not 0: sums in another order round
    /// differently, and LoRA dropout draws its masks in another order.
    pub micro_batch: usize,
}

impl DistillConfig {
    /// What of this section decides the numbers a run computes: everything but `teacher` and
    /// `cache_shard_steps`, which only say where the teacher's answers come from. Serialises
    /// as the section did before those keys existed (`micro_batch` only where it is not 0,
    /// `replay_pretrain` only where it is true, `replay_target` only where it is `label`), so
    /// recipe digests keep their values.
    pub fn recipe(&self) -> impl Serialize + '_ {
        DistillRecipe {
            direction: self.direction,
            classes: self.classes,
            alpha: self.alpha,
            temperature: self.temperature,
            target: self.target,
            kl_over: self.kl_over,
            replay_fraction: self.replay_fraction,
            replay_target: self.replay_target,
            replay_pretrain: self.replay_pretrain,
            caption_weight: self.caption_weight,
            steps: self.steps,
            batch: self.batch,
            lr: self.lr,
            weight_decay: self.weight_decay,
            warmup_steps: self.warmup_steps,
            grad_clip: self.grad_clip,
            micro_batch: self.micro_batch,
        }
    }

    /// Clips one of `world` ranks takes per distillation step: (taught-class rows, replay
    /// rows). `batch` is split evenly over the ranks (the config checks it divides), and
    /// `replay_fraction` of a rank's share, rounded, are replay rows: the coordinator's plan
    /// (when the distill split has clips of other classes; without any, none are replayed)
    /// and `xkd plan`'s memory estimate both take it from here.
    pub fn rows_per_rank(&self, world: usize) -> (usize, usize) {
        let per_rank = self.batch / world.max(1);
        let replay = (per_rank as f64 * self.replay_fraction).round() as usize;
        (per_rank.saturating_sub(replay), replay.min(per_rank))
    }

    pub fn train(&self) -> TrainConfig {
        TrainConfig {
            steps: self.steps,
            batch: self.batch,
            lr: self.lr,
            weight_decay: self.weight_decay,
            warmup_steps: self.warmup_steps,
            caption_weight: 0.0,
            grad_clip: self.grad_clip,
        }
    }
}

/// `DistillConfig` less the keys that do not change a number (`DistillConfig::recipe`), in
/// the section's field order.
#[derive(Serialize)]
struct DistillRecipe {
    direction: Direction,
    classes: DistillClasses,
    alpha: f64,
    temperature: f64,
    target: CeTarget,
    kl_over: KlOver,
    replay_fraction: f64,
    /// Absent where `student`, so the recipes of configs from before the key keep their
    /// digests.
    #[serde(skip_serializing_if = "is_student")]
    replay_target: ReplayTarget,
    /// Absent where false, so the recipes of configs from before the key keep their digests.
    #[serde(skip_serializing_if = "is_false")]
    replay_pretrain: bool,
    caption_weight: f64,
    steps: u64,
    batch: usize,
    lr: f64,
    weight_decay: f64,
    warmup_steps: u64,
    grad_clip: f64,
    /// Absent where 0 (one pass a step), so the recipes of configs from before the key keep
    /// their digests.
    #[serde(skip_serializing_if = "is_zero")]
    micro_batch: usize,
}

fn is_student(t: &ReplayTarget) -> bool {
    *t == ReplayTarget::Student
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// Where distillation's teacher answers come from (`distill.teacher`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TeacherSource {
    /// Every worker loads the teacher and runs it on each step's questions.
    Online,
    /// The teacher cache stage answers every question once into the run's store; distillation
    /// reads the answers and never loads the teacher.
    Cached,
    /// The embedded default: `cached` where either model is a Qwen2 one (whose weights decide
    /// what fits a GPU), `online` for two stand-ins. Resolved as the config is read, so a
    /// resolved config never holds it.
    Auto,
}

impl TeacherSource {
    pub fn as_str(self) -> &'static str {
        match self {
            TeacherSource::Online => "online",
            TeacherSource::Cached => "cached",
            TeacherSource::Auto => "auto",
        }
    }
}

/// The classes distillation runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DistillClasses {
    /// The classes the heuristic predicts hard for the student.
    Hard,
    /// Every class: the teacher everywhere, no replay rows.
    All,
    /// As many classes as the heuristic picked, drawn uniformly from `run.seed`.
    Random,
}

impl DistillClasses {
    pub const ALL: [DistillClasses; 3] = [
        DistillClasses::Hard,
        DistillClasses::All,
        DistillClasses::Random,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DistillClasses::Hard => "hard",
            DistillClasses::All => "all",
            DistillClasses::Random => "random",
        }
    }
}

/// The cross-entropy target of distillation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CeTarget {
    /// The true class's letter.
    Label,
    /// The teacher's argmax (label-free distillation).
    Teacher,
}

/// What distillation trains the replay rows (the classes not taught) to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplayTarget {
    /// The pretrained student's own answers (and captions), frozen: a KL anchor.
    Student,
    /// The clip's true letter (and class name): cross-entropy, as in pretraining.
    Label,
}

/// What the distillation KL runs over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KlOver {
    /// The ten option letters.
    Options,
    /// The whole (shared) vocabulary at the answer position; stand-ins only.
    Vocab,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    VisualToAudio,
    AudioToVisual,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::VisualToAudio => "visual_to_audio",
            Direction::AudioToVisual => "audio_to_visual",
        }
    }
}

/// The projections of a Qwen2 decoder layer that can take LoRA adapters, in PEFT's names.
pub const LORA_PROJECTIONS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// LoRA on the student's language model during distillation (`qwen2` students only): the
/// `[lora]` section, and the settings a set of adapters carries (`xkd-models` reads and writes
/// them as PEFT's `adapter_config.json`). The one definition of LoRA settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraConfig {
    /// Adapter rank `r` of `B A`; in the config, 0 trains every parameter of the student
    /// (stand-ins only).
    pub r: usize,
    /// The update is scaled by `alpha / r`.
    pub alpha: f64,
    /// Dropout on the adapter's input, in training mode only.
    pub dropout: f64,
    /// Projection names out of `LORA_PROJECTIONS`, e.g. `["q_proj", "v_proj"]`.
    pub target_modules: Vec<String>,
}

impl LoraConfig {
    pub fn scale(&self) -> f64 {
        self.alpha / self.r as f64
    }

    /// Whether `projection` takes an adapter.
    pub fn targets(&self, projection: &str) -> bool {
        self.target_modules.iter().any(|m| m == projection)
    }

    /// What adapters need: a rank, a dropout in [0, 1), known projections. The message names
    /// the field (`r`, `dropout`, `target_modules`) first.
    pub fn validate(&self) -> Result<(), String> {
        if self.r == 0 {
            return Err("r: the LoRA rank must be at least 1".into());
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err(format!(
                "alpha: must be a finite number above 0, got {}",
                self.alpha
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(format!("dropout: {} is not in [0, 1)", self.dropout));
        }
        if self.target_modules.is_empty() {
            return Err("target_modules: must name at least one projection".into());
        }
        match self
            .target_modules
            .iter()
            .find(|m| !LORA_PROJECTIONS.contains(&m.as_str()))
        {
            Some(m) => Err(format!(
                "target_modules: {m:?} is none of {LORA_PROJECTIONS:?}"
            )),
            None => Ok(()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointConfig {
    /// Store URL (`file:///path`, `s3://bucket/prefix`, `gs://...`, `az://...`); checkpoints go
    /// under `<url>/<run_id>/ckpt/<step>/`. Empty = `file://<out dir>/checkpoints`.
    /// Credentials come from the environment, never from here.
    pub url: String,
    /// Save every this many distillation steps (0 = only at the end), and at the end.
    pub every_steps: u64,
    /// Committed checkpoints kept; older ones are pruned after a newer one commits.
    pub keep_last: usize,
}

/// The gradient all-reduce between workers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CollectiveConfig {
    /// Largest gradient bucket in MiB (PyTorch DDP's `bucket_cap_mb`); a parameter larger
    /// than this gets a bucket of its own. Changes the summation order, not the mean.
    pub bucket_mb: f64,
}

impl CollectiveConfig {
    /// `bucket_mb` in bytes (at least one f32).
    pub fn bucket_bytes(&self) -> usize {
        ((self.bucket_mb * 1024.0 * 1024.0) as usize).max(4)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlConfig {
    /// Address the coordinator listens on (QUIC).
    pub listen: String,
    /// Address (IP:port) the coordinator serves Prometheus metrics on, at `/metrics` over
    /// HTTP; port 0 takes a free port (logged as `metrics listening`); empty serves none.
    /// `--metrics-listen` overrides it.
    pub metrics_listen: String,
    /// Workers the coordinator waits for before starting.
    pub workers: usize,
    pub heartbeat_ms: u64,
    /// A worker silent for this long is declared dead.
    pub heartbeat_timeout_ms: u64,
    /// How long the coordinator waits for all workers to join; also the limit of the barrier
    /// every rank passes once its models are loaded, before the first step.
    pub join_timeout_ms: u64,
    /// A collective (a step's gradient all-reduce, a barrier) that has not finished within
    /// this fails the task as transient: a rank is gone or stuck.
    pub collective_timeout_ms: u64,
    /// A task whose compute thread reports no progress for this long, outside a collective,
    /// is ended and the workers restart (a read hung on a dead filesystem, a hung device call).
    pub stall_timeout_ms: u64,
    /// Times a run may restart its workers after a transient failure within any
    /// `restart_window_s` before it gives up; each restart resumes distillation from the
    /// newest verified checkpoint.
    pub max_restarts: u32,
    pub restart_window_s: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// Progress line (pretty) / step record (json) every N steps.
    pub every: u64,
}

impl Config {
    /// The embedded default.
    pub fn embedded() -> Config {
        Config::resolve(None, &[]).expect("embedded default config is valid")
    }

    /// Default, then the user's file over it, then each `section.key=value` override.
    pub fn resolve(file: Option<&Path>, overrides: &[String]) -> Result<Config, ConfigError> {
        let user = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.display().to_string(),
                    source,
                })?;
                Some((text, path.display().to_string()))
            }
            None => None,
        };
        let user = user
            .as_ref()
            .map(|(text, path)| (text.as_str(), path.as_str()));
        Config::resolve_text(user, overrides)
    }

    /// `resolve` on a user file's text (with the name its errors give it) instead of its path:
    /// everything `resolve` does after reading the file. The config fuzzer enters here.
    pub fn resolve_text(
        user: Option<(&str, &str)>,
        overrides: &[String],
    ) -> Result<Config, ConfigError> {
        let mut table = parse_table(DEFAULT_TOML, "<embedded default>")?;
        if let Some((text, path)) = user {
            merge(&mut table, parse_table(text, path)?, "")?;
        }
        for arg in overrides {
            apply_override(&mut table, arg)?;
        }
        from_table(table)
    }

    /// Parse a config that has already been resolved (as sent to workers).
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        from_table(parse_table(text, "<resolved>")?)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("config serialises to TOML")
    }

    /// sha256 over the resolved TOML: equal digests mean equal configs.
    pub fn digest(&self) -> String {
        hex(&Sha256::digest(self.to_toml().as_bytes()))
    }

    pub fn student_modality(&self) -> Modality {
        match self.distill.direction {
            Direction::VisualToAudio => Modality::Audio,
            Direction::AudioToVisual => Modality::Visual,
        }
    }

    pub fn teacher_modality(&self) -> Modality {
        self.student_modality().other()
    }

    /// Samples per clip: `data.sample_rate` times `data.clip_seconds`, rounded.
    pub fn clip_samples(&self) -> usize {
        (self.data.sample_rate as f32 * self.data.clip_seconds).round() as usize
    }

    pub fn model(&self, modality: Modality) -> &ModelConfig {
        match modality {
            Modality::Audio => &self.audio_model,
            Modality::Visual => &self.visual_model,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Modality {
    Audio,
    Visual,
}

impl Modality {
    pub fn other(self) -> Modality {
        match self {
            Modality::Audio => Modality::Visual,
            Modality::Visual => Modality::Audio,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Modality::Audio => "audio",
            Modality::Visual => "visual",
        }
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Short sha256 of any serialisable value (a section, or a tuple of them), for cache keys.
pub fn section_digest<T: Serialize>(section: &T) -> String {
    let bytes = bincode::serde::encode_to_vec(section, bincode::config::standard())
        .expect("config values serialise");
    hex(&Sha256::digest(&bytes))[..16].to_string()
}

fn parse_table(text: &str, path: &str) -> Result<toml::Table, ConfigError> {
    text.parse::<toml::Table>().map_err(|e| ConfigError::Parse {
        path: path.to_string(),
        message: e.to_string(),
    })
}

fn from_table(table: toml::Table) -> Result<Config, ConfigError> {
    let mut config: Config =
        toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::BadValue {
                key: "<config>".into(),
                message: e.to_string(),
            })?;
    if config.distill.teacher == TeacherSource::Auto {
        let qwen2 = [&config.audio_model, &config.visual_model]
            .iter()
            .any(|m| m.family == ModelFamily::Qwen2);
        config.distill.teacher = match qwen2 {
            true => TeacherSource::Cached,
            false => TeacherSource::Online,
        };
    }
    config.validate()?;
    Ok(config)
}

/// Lay `user` over `base`; every key of `user` must exist in `base`, with a value of its type.
fn merge(base: &mut toml::Table, user: toml::Table, prefix: &str) -> Result<(), ConfigError> {
    for (key, value) in user {
        let path = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        let Some(slot) = base.get_mut(&key) else {
            return Err(ConfigError::UnknownKey { key: path });
        };
        match (slot, value) {
            (toml::Value::Table(b), toml::Value::Table(u)) => merge(b, u, &path)?,
            (slot, value) => set_checked(slot, value, &path)?,
        }
    }
    Ok(())
}

fn apply_override(table: &mut toml::Table, arg: &str) -> Result<(), ConfigError> {
    let (key, raw) = arg
        .split_once('=')
        .ok_or_else(|| ConfigError::BadOverride {
            arg: arg.to_string(),
        })?;
    let key = key.trim();
    if key.is_empty() {
        return Err(ConfigError::BadOverride {
            arg: arg.to_string(),
        });
    }
    let mut node = table;
    let parts: Vec<&str> = key.split('.').collect();
    let (last, sections) = parts.split_last().expect("split yields one part");
    for section in sections {
        node = match node.get_mut(*section) {
            Some(toml::Value::Table(t)) => t,
            _ => return Err(ConfigError::UnknownKey { key: key.into() }),
        };
    }
    let Some(slot) = node.get_mut(*last) else {
        return Err(ConfigError::UnknownKey { key: key.into() });
    };
    if slot.is_table() {
        return Err(ConfigError::BadValue {
            key: key.into(),
            message: "is a section, not a value".into(),
        });
    }
    let value = parse_value(raw.trim(), slot).ok_or_else(|| ConfigError::BadValue {
        key: key.into(),
        message: format!("`{}` is more than one value", raw.trim()),
    })?;
    set_checked(slot, value, key)
}

/// A value as TOML if it parses, else as a bare string (`--set distill.direction=audio_to_visual`).
/// `None` when the text is a value and more TOML after it (`0.5\nrun.seed=3`): one override
/// sets one key, and what follows would otherwise be dropped without a word.
fn parse_value(raw: &str, like: &toml::Value) -> Option<toml::Value> {
    match format!("v = {raw}").parse::<toml::Table>() {
        Ok(table) if table.len() > 1 => None,
        Ok(mut table) => table.remove("v"),
        Err(_) if like.is_str() || !raw.is_empty() => Some(toml::Value::String(raw.to_string())),
        Err(_) => Some(toml::Value::String(String::new())),
    }
}

fn set_checked(slot: &mut toml::Value, value: toml::Value, key: &str) -> Result<(), ConfigError> {
    let value = match (&*slot, value) {
        (toml::Value::Float(_), toml::Value::Integer(i)) => toml::Value::Float(i as f64),
        (_, v) => v,
    };
    if slot.type_str() != value.type_str() {
        return Err(ConfigError::BadValue {
            key: key.into(),
            message: format!(
                "expected {}, got {} `{value}`",
                slot.type_str(),
                value.type_str()
            ),
        });
    }
    *slot = value;
    Ok(())
}

mod validate;

#[cfg(test)]
mod tests;
