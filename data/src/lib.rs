//! Datasets: what a clip is on disk, how a rank reads it, and the features the models take.
//!
//! - `manifest`: the dataset's index (`manifest.jsonl`, `classes.json`), checked row by row.
//! - `clip`: wav and png files both ways, and the loaders into model inputs.
//! - `features`: Whisper-style log-mel spectrograms.
//! - `cache`, `loader`: what a rank reads clips through: background threads
//!   (`run.loader_threads`) make the next steps' inputs while the current one computes, and
//!   what was used is kept within a byte budget (`run.feature_cache_mb`).
//! - `synth`: the embedded synthetic set the default job trains on (only that job uses it).
//! - `prior`: the heuristic's per-class human prior (`heuristic.prior_csv`), and making one
//!   from VGGSounder's labels.
//!
//! `ensure_dataset` is the one entry point a run uses: the configured dataset, generated first
//! when it is the synthetic one and not there yet.

pub mod cache;
pub mod clip;
pub mod features;
pub mod loader;
pub mod manifest;
pub mod prepare;
pub mod prior;
pub mod synth;

pub use cache::Lru;
pub use clip::{load_audio, load_frames, load_frames_rgb, CLIP_MEAN, CLIP_STD};
pub use loader::Loader;
pub use manifest::construction;
pub use manifest::{load_manifest, ClipRecord, Manifest, CLASSES_FILE, MANIFEST_FILE, SPLITS};
pub use synth::{class_table, ensure_dataset, ClassSpec, Cue, GENERATOR_VERSION};
