//! Qwen2-Audio: a Whisper-style encoder over 128-bin log-mel (conv k3, conv k3 stride 2, both
//! with exact GELU; the learned-shape position table; pre-LN layers; average pool by 2; final
//! LayerNorm), a linear projector into the LM, and the Qwen2 decoder. Audio tokens replace the
//! expanded `<|AUDIO|>` placeholders of the prompt.
//!
//! The encoder runs over the whole padded window (`2 * max_source_positions` mel frames, 30 s
//! in the real model) with padded frames masked out as keys, then keeps each clip's valid
//! tokens: exactly what transformers does, so the last tokens, whose convolutions see the
//! padding, agree too.

use std::path::Path;

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Linear, VarBuilder};

use super::config::{AudioEncoderConfig, Qwen2AudioConfig};
use super::decoder::{scatter_placeholders, sequential_positions, Decoder};
use super::lora::{LoraAdapters, LoraConfig, LoraTarget};
use super::weights::{read_config, LoadError, Weights};
use crate::nn::{activation, conv1d_k3, softmax, LayerNorm};

/// Whisper's LayerNorm epsilon (PyTorch's default).
const LN_EPS: f64 = 1e-5;
/// Where the language model sits in the checkpoint (and in PEFT's module paths).
const LM_PREFIX: &str = "language_model.";

/// Encoder frames and LM tokens of a clip with `mel_frames` valid log-mel frames (transformers'
/// `_get_feat_extract_output_lengths`): the stride-2 conv, then the pool by 2.
pub fn output_lengths(mel_frames: usize) -> (usize, usize) {
    let frames = (mel_frames.max(1) - 1) / 2 + 1;
    let tokens = (frames.max(2) - 2) / 2 + 1;
    (frames, tokens)
}

/// Expands each single placeholder `token` of `prompt` (a clip's: `<|AUDIO|>`, `<|video_pad|>`)
/// into as many as its clip gives the language model.
pub fn expand_placeholders(
    prompt: &[u32],
    token: u32,
    tokens_per_clip: &[usize],
) -> Result<Vec<u32>> {
    let mut clips = tokens_per_clip.iter();
    let mut out = Vec::with_capacity(prompt.len() + tokens_per_clip.iter().sum::<usize>());
    for &id in prompt {
        if id == token {
            let Some(&n) = clips.next() else {
                candle_core::bail!(
                    "more placeholders {token} than the {} clips",
                    tokens_per_clip.len()
                );
            };
            out.extend(std::iter::repeat_n(token, n));
        } else {
            out.push(id);
        }
    }
    if clips.next().is_some() {
        candle_core::bail!(
            "fewer placeholders {token} than the {} clips",
            tokens_per_clip.len()
        );
    }
    Ok(out)
}

#[derive(Debug, Clone)]
struct EncoderAttention {
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    heads: usize,
}

impl EncoderAttention {
    fn new(d: usize, heads: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            q: candle_nn::linear(d, d, vb.pp("q_proj"))?,
            // Whisper's key projection has no bias.
            k: candle_nn::linear_no_bias(d, d, vb.pp("k_proj"))?,
            v: candle_nn::linear(d, d, vb.pp("v_proj"))?,
            out: candle_nn::linear(d, d, vb.pp("out_proj"))?,
            heads,
        })
    }

    fn heads_first(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        x.reshape((b, t, self.heads, d / self.heads))?
            .transpose(1, 2)?
            .contiguous()
    }

    /// `mask`: `[B, 1, 1, T]` additive, hiding padded frames as keys.
    fn forward(&self, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        let scale = 1.0 / ((d / self.heads) as f64).sqrt();
        let q = self.heads_first(&(self.q.forward(x)? * scale)?)?;
        let k = self.heads_first(&self.k.forward(x)?)?;
        let v = self.heads_first(&self.v.forward(x)?)?;
        let scores = q.matmul(&k.t()?)?.broadcast_add(mask)?;
        let out = softmax(&scores)?.matmul(&v)?;
        self.out.forward(&out.transpose(1, 2)?.reshape((b, t, d))?)
    }
}

#[derive(Debug, Clone)]
struct EncoderLayer {
    attn_norm: LayerNorm,
    attn: EncoderAttention,
    mlp_norm: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    act: String,
}

impl EncoderLayer {
    fn new(cfg: &AudioEncoderConfig, vb: VarBuilder) -> Result<Self> {
        let (d, f) = (cfg.d_model, cfg.encoder_ffn_dim);
        Ok(Self {
            attn_norm: LayerNorm::new(d, LN_EPS, vb.pp("self_attn_layer_norm"))?,
            attn: EncoderAttention::new(d, cfg.encoder_attention_heads, vb.pp("self_attn"))?,
            mlp_norm: LayerNorm::new(d, LN_EPS, vb.pp("final_layer_norm"))?,
            fc1: candle_nn::linear(d, f, vb.pp("fc1"))?,
            fc2: candle_nn::linear(f, d, vb.pp("fc2"))?,
            act: cfg.activation_function.clone(),
        })
    }

    fn forward(&self, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let h = (x + self.attn.forward(&self.attn_norm.forward(x)?, mask)?)?;
        let m = activation(&self.act, &self.fc1.forward(&self.mlp_norm.forward(&h)?)?)?;
        h + self.fc2.forward(&m)?
    }
}

/// The audio tower (`audio_tower.*`).
#[derive(Debug, Clone)]
pub struct AudioEncoder {
    conv1: (Tensor, Tensor),
    conv2: (Tensor, Tensor),
    positions: Tensor,
    layers: Vec<EncoderLayer>,
    norm: LayerNorm,
    act: String,
    max_source_positions: usize,
}

impl AudioEncoder {
    pub fn new(cfg: &AudioEncoderConfig, vb: VarBuilder) -> Result<Self> {
        let (d, mels) = (cfg.d_model, cfg.num_mel_bins);
        let conv = |cin: usize, name: &str| -> Result<(Tensor, Tensor)> {
            Ok((
                vb.pp(name).get((d, cin, 3), "weight")?,
                vb.pp(name).get(d, "bias")?,
            ))
        };
        Ok(Self {
            conv1: conv(mels, "conv1")?,
            conv2: conv(d, "conv2")?,
            positions: vb.get((cfg.max_source_positions, d), "embed_positions.weight")?,
            layers: (0..cfg.encoder_layers)
                .map(|i| EncoderLayer::new(cfg, vb.pp(format!("layers.{i}"))))
                .collect::<Result<_>>()?,
            norm: LayerNorm::new(d, LN_EPS, vb.pp("layer_norm"))?,
            act: cfg.activation_function.clone(),
            max_source_positions: cfg.max_source_positions,
        })
    }

    /// Mel frames of the padded window the encoder expects.
    pub fn window_frames(&self) -> usize {
        2 * self.max_source_positions
    }

    /// `features`: `[N, mels, window_frames]` log-mel (transformers' layout); `valid`: each
    /// clip's number of real frames. Returns `[N, max_source_positions / 2, d_model]`, every
    /// pooled frame (the caller keeps the valid ones).
    pub fn forward(&self, features: &Tensor, valid: &[usize]) -> Result<Tensor> {
        let (n, _, frames) = features.dims3()?;
        if frames != self.window_frames() || valid.len() != n {
            candle_core::bail!(
                "audio encoder wants [N, mels, {}] and N lengths, got {frames} frames, {} lengths",
                self.window_frames(),
                valid.len()
            );
        }
        let x = features.transpose(1, 2)?; // [N, frames, mels]
        let x = activation(&self.act, &conv1d_k3(&x, &self.conv1.0, &self.conv1.1, 1)?)?;
        let x = activation(&self.act, &conv1d_k3(&x, &self.conv2.0, &self.conv2.1, 2)?)?;
        let t = x.dim(1)?;
        let mut x = x.broadcast_add(&self.positions)?;
        let mask = key_padding_mask(valid, t, x.device())?.to_dtype(x.dtype())?;
        for layer in &self.layers {
            x = layer.forward(&x, &mask)?;
        }
        let d = x.dim(2)?;
        let pooled = x
            .narrow(1, 0, 2 * (t / 2))?
            .reshape((n, t / 2, 2, d))?
            .mean(2)?;
        self.norm.forward(&pooled)
    }
}

/// `[N, 1, 1, T]`: 0 for the encoder frames of each clip's valid audio, a large negative after.
fn key_padding_mask(valid: &[usize], t: usize, dev: &Device) -> Result<Tensor> {
    let v: Vec<f32> = valid
        .iter()
        .flat_map(|&mel| {
            let (frames, _) = output_lengths(mel);
            (0..t).map(move |i| if i < frames { 0.0 } else { -1e9 })
        })
        .collect();
    Tensor::from_vec(v, (valid.len(), 1, 1, t), dev)
}

/// Qwen2-Audio: audio tower, projector, decoder.
#[derive(Debug, Clone)]
pub struct Qwen2Audio {
    pub config: Qwen2AudioConfig,
    encoder: AudioEncoder,
    projector: Linear,
    lm: Decoder,
}

impl Qwen2Audio {
    pub fn new(config: Qwen2AudioConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            encoder: AudioEncoder::new(&config.audio, vb.pp("audio_tower"))?,
            projector: candle_nn::linear(
                config.audio.d_model,
                config.text.hidden_size,
                vb.pp("multi_modal_projector.linear"),
            )?,
            lm: Decoder::new(&config.text, vb.pp(LM_PREFIX.trim_end_matches('.')))?,
            config,
        })
    }

    /// Reads `config.json` of a Hugging Face model directory.
    pub fn read_config(dir: &Path) -> std::result::Result<Qwen2AudioConfig, LoadError> {
        let (path, text) = read_config(dir)?;
        Qwen2AudioConfig::from_json(&text).map_err(|message| LoadError::Config { path, message })
    }

    /// Builds the model from a directory's config and weights.
    pub fn load(dir: &Path, weights: &Weights) -> std::result::Result<Self, LoadError> {
        Ok(Self::new(Self::read_config(dir)?, weights.var_builder())?)
    }

    /// The language model's projections `lora` targets (audio tower excluded).
    pub fn lora_targets(&mut self, lora: &LoraConfig) -> Result<Vec<LoraTarget>> {
        self.lm.lora_targets(lora, LM_PREFIX)
    }

    /// Fresh adapters (`A` drawn from `seed`, `B` zero) on the projections `lora` targets.
    pub fn init_lora(&mut self, lora: LoraConfig, seed: u64) -> Result<LoraAdapters> {
        let targets = self.lora_targets(&lora)?;
        let device = self.lm.device();
        let adapters = LoraAdapters::init(lora, LM_PREFIX, &targets, seed, &device)?;
        self.lm.attach_lora(&adapters, LM_PREFIX)?;
        Ok(adapters)
    }

    /// Puts saved or fresh adapters on the language model.
    pub fn attach_lora(&mut self, adapters: &LoraAdapters) -> Result<()> {
        self.lm.attach_lora(adapters, LM_PREFIX)
    }

    /// Training mode turns LoRA dropout on.
    pub fn set_training(&mut self, training: bool) {
        self.lm.set_training(training);
    }

    pub fn encoder(&self) -> &AudioEncoder {
        &self.encoder
    }

    /// The projected audio tokens of every clip, concatenated: `[sum of tokens, hidden]`.
    pub fn audio_embeds(&self, features: &Tensor, valid: &[usize]) -> Result<Tensor> {
        let features = features.to_dtype(self.lm.dtype())?;
        let encoded = self
            .projector
            .forward(&self.encoder.forward(&features, valid)?)?;
        let clips: Vec<Tensor> = valid
            .iter()
            .enumerate()
            .map(|(i, &mel)| encoded.get(i)?.narrow(0, 0, output_lengths(mel).1))
            .collect::<Result<_>>()?;
        Tensor::cat(&clips, 0)
    }

    /// Logits `[B, S, vocab]` (f32) for prompts `[B, S]` whose audio placeholders are already
    /// expanded, with the clips' features in placeholder order.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        features: &Tensor,
        valid: &[usize],
    ) -> Result<Tensor> {
        self.forward_at(input_ids, features, valid, None)
    }

    /// As `forward`; with `at`, only prompt i's position `at[i]`: `[B, vocab]`
    /// (`Decoder::forward_at`).
    pub fn forward_at(
        &self,
        input_ids: &Tensor,
        features: &Tensor,
        valid: &[usize],
        at: Option<&[usize]>,
    ) -> Result<Tensor> {
        let (b, s) = input_ids.dims2()?;
        let ids: Vec<u32> = input_ids.flatten_all()?.to_dtype(DType::U32)?.to_vec1()?;
        let audio = self.audio_embeds(features, valid)?;
        let embeds = self.lm.embed_tokens(input_ids)?;
        let x = scatter_placeholders(&embeds, &ids, self.config.audio_token_index, &audio)?;
        self.lm
            .forward_at(&x, &sequential_positions(b, s), at)?
            .to_dtype(DType::F32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_lengths_follow_the_two_strides() {
        // 30 s of Whisper input: 3000 mel frames -> 1500 encoder frames -> 750 tokens.
        assert_eq!(output_lengths(3000), (1500, 750));
        assert_eq!(output_lengths(196), (98, 49));
        assert_eq!(output_lengths(117), (59, 29));
        assert_eq!(output_lengths(1), (1, 1));
    }

    #[test]
    fn placeholders_expand_per_clip() {
        let ids = expand_placeholders(&[1, 9, 2, 9, 3], 9, &[2, 3]).unwrap();
        assert_eq!(ids, vec![1, 9, 9, 2, 9, 9, 9, 3]);
        assert!(expand_placeholders(&[1, 9], 9, &[2, 3]).is_err());
        assert!(expand_placeholders(&[9, 9, 9], 9, &[2, 3]).is_err());
    }
}
