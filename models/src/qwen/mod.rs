//! The real model families, Qwen2-Audio and Qwen2-VL, loaded from Hugging Face model
//! directories under the checkpoints' own parameter names, and built only from differentiable
//! candle ops (`crate::nn`), so any parameter can be trained.
//!
//! Checked number for number against transformers by `models/tests/qwen2_reference.rs`, on the
//! tiny random checkpoints and inputs that `tests/reference/make_qwen2_fixtures.py` writes.

pub mod answer;
pub mod audio;
pub mod config;
pub mod decoder;
pub mod lora;
pub mod prompt;
pub mod resize;
pub mod vision;
pub mod weights;

pub use answer::{Clip, Prepared, Processor, QwenModel};
pub use audio::Qwen2Audio;
pub use config::{Qwen2AudioConfig, Qwen2VlConfig, TextConfig};
pub use lora::{LoraAdapters, LoraConfig, LoraTarget};
pub use prompt::{ChatPrompt, Family};
pub use vision::{ImageProcessor, Qwen2Vl, VisionInput};
pub use weights::{LoadError, Weights};
