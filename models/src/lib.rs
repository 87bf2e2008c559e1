//! The models: the layers both kinds share, the tiny stand-ins of both families, the real
//! Qwen2-Audio and Qwen2-VL with their processors and LoRA, and what a rank holds of either.
//!
//! - `nn`: layers built only from differentiable ops (norms, softmax in f32, activations by
//!   their Hugging Face names, causal mask, the k3 conv, rotary helpers).
//! - `model`: the stand-ins, the shared vocabulary and prompt, and `question` (a clip's options
//!   as a pure function of seed, clip and epoch).
//! - `qwen`: the real families from their Hugging Face directories, LoRA in PEFT's format.
//! - `net`: `Net` (a stand-in or a Qwen2 model) and `Params` (what a student trains), their
//!   checkpoint tensors and saving, and the per-node copy of a model directory given by URL.

pub mod model;
pub mod net;
pub mod nn;
pub mod qwen;
