//! What one model costs in memory, computed from its architecture: parameter counts from the
//! shapes the checkpoints hold, and the bytes of the tensors a forward (and, for the student, a
//! backward) pass holds at once, counted op by op as `xkd_models` computes them.
//!
//! Why the counts are what they are. candle keeps every tensor computed from a trainable
//! variable alive until the loss's graph is dropped (after the optimizer step), so a LoRA
//! student's forward keeps all its intermediates, layer after layer; nothing is fused, so
//! a projection with an adapter keeps its base output, its input cast to f32, the dropout mask
//! and product, `A x`, `B A x`, the scaled delta, its cast back, and the sum. candle 0.11's
//! backward also computes and keeps, until the step ends, the gradient of every operand of a
//! differentiated op, even operands that are not variables: a frozen weight broadcast over the
//! batch (`Linear` on `[B, S, in]` inputs) gets a `[B, in, out]` gradient, an RMSNorm weight, a
//! bias, the rotary tables and the causal mask a gradient of their broadcast shape. Frozen
//! forwards (the teacher, the replay anchor, evaluation of a frozen model) keep nothing between
//! layers: their peak is one layer's working set.

use xkd_models::qwen::config::{AudioEncoderConfig, TextConfig, VisionConfig};

/// Bytes of f32.
pub const F32: u64 = 4;

/// Element sizes of a model's tensors: `w` the model's dtype (f32 on a CPU, bf16 on a GPU),
/// `f` the f32 statistics and adapters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bytes {
    pub w: u64,
}

impl Bytes {
    /// A tensor of `n` elements cast to f32: a new tensor only when the model is not f32.
    fn to_f32(self, n: u64) -> u64 {
        if self.w == F32 {
            0
        } else {
            F32 * n
        }
    }

    /// A tensor of `n` elements cast back from f32 to the model's dtype.
    fn back(self, n: u64) -> u64 {
        if self.w == F32 {
            0
        } else {
            self.w * n
        }
    }
}

/// The adapters on a trained Qwen2 student's projections.
#[derive(Debug, Clone, PartialEq)]
pub struct Adapters {
    pub r: u64,
    pub dropout: bool,
    pub targets: Vec<String>,
}

impl Adapters {
    pub fn on(&self, projection: &str) -> bool {
        self.targets.iter().any(|t| t == projection)
    }
}

/// Parameters of the Qwen2 decoder LM (embeddings, layers, final norm, head unless tied).
pub fn text_params(t: &TextConfig) -> u64 {
    let (h, i, v) = (
        t.hidden_size as u64,
        t.intermediate_size as u64,
        t.vocab_size as u64,
    );
    let kv = (t.num_key_value_heads * t.head_dim()) as u64;
    let layer = 2 * h + (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * i;
    let head = if t.tie_word_embeddings { 0 } else { v * h };
    v * h + t.num_hidden_layers as u64 * layer + h + head
}

/// Parameters of one decoder layer's linear weights (what a frozen base's `[B, in, out]`
/// gradients are made of).
pub fn text_layer_linear_params(t: &TextConfig) -> u64 {
    let (h, i) = (t.hidden_size as u64, t.intermediate_size as u64);
    let kv = (t.num_key_value_heads * t.head_dim()) as u64;
    2 * h * h + 2 * h * kv + 3 * h * i
}

/// Parameters of Qwen2-Audio's Whisper-style encoder and its projector into an LM of width `lm`.
pub fn audio_encoder_params(a: &AudioEncoderConfig, lm: u64) -> u64 {
    let (d, f, m) = (
        a.d_model as u64,
        a.encoder_ffn_dim as u64,
        a.num_mel_bins as u64,
    );
    let convs = (d * m * 3 + d) + (d * d * 3 + d);
    let layer = 3 * (d * d + d) + d * d + 4 * d + (f * d + f) + (d * f + d);
    convs
        + a.max_source_positions as u64 * d
        + 2 * d
        + a.encoder_layers as u64 * layer
        + (lm * d + lm)
}

/// Parameters of Qwen2-VL's vision tower with its merger.
pub fn vision_params(v: &VisionConfig) -> u64 {
    let e = v.embed_dim as u64;
    let mlp = (v.embed_dim as f64 * v.mlp_ratio) as u64;
    let merged = e * (v.spatial_merge_size * v.spatial_merge_size) as u64;
    let out = v.hidden_size as u64;
    let block = 4 * e + (3 * e * e + 3 * e) + (e * e + e) + (mlp * e + mlp) + (e * mlp + e);
    e * v.patch_len() as u64
        + 2 * e
        + (merged * merged + merged)
        + (out * merged + out)
        + v.depth as u64 * block
}

/// A projection's tensors per token in a trained decoder layer: its base output (and bias sum,
/// with the bias's broadcast gradient), and with an adapter the f32 path beside it.
fn projection(b: Bytes, inp: u64, out: u64, bias: bool, adapter: Option<&Adapters>, g: u64) -> u64 {
    let mut n = b.w * out;
    if bias {
        n += (1 + g) * b.w * out;
    }
    if let Some(a) = adapter {
        n += b.to_f32(inp);
        if a.dropout {
            // The mask, the product, and (in a backward) the mask's broadcast gradient.
            n += (2 + g) * F32 * inp;
        }
        n += F32 * a.r + 2 * F32 * out + b.back(out) + b.w * out;
    }
    n
}

/// RMSNorm's tensors per token: the f32 statistics path, the cast back, the weight's product
/// and that weight's broadcast gradient.
fn rms_norm(b: Bytes, h: u64, g: u64) -> u64 {
    b.to_f32(h) + 2 * F32 * h + b.back(h) + (1 + g) * b.w * h
}

/// Rotary embedding of `n` values per token: `x cos`, `-x2`, the cat, `rot sin`, the sum, and
/// (in a backward) the gradients of the broadcast cos and sin tables.
fn rotary(b: Bytes, n: u64, g: u64) -> u64 {
    b.w * (n + n / 2 + n + n + n) + 2 * g * b.w * n
}

/// Bytes a decoder layer with trainable adapters keeps per token, for sequences of `s` tokens:
/// its activations, and with `backward` the per-token gradients of frozen operands that the
/// backward pass adds and keeps until the step ends. Without `backward` (evaluating a student
/// whose adapters are variables) the activations alone, kept while the logits live.
pub fn text_layer_token_bytes(
    t: &TextConfig,
    s: u64,
    b: Bytes,
    lora: Option<&Adapters>,
    backward: bool,
) -> u64 {
    let g = u64::from(backward);
    let (h, i, heads) = (
        t.hidden_size as u64,
        t.intermediate_size as u64,
        t.num_attention_heads as u64,
    );
    let d = t.head_dim() as u64;
    let (q, kv) = (heads * d, t.num_key_value_heads as u64 * d);
    let grouped = t.num_key_value_heads != t.num_attention_heads;
    let on = |p: &str| lora.filter(|a| a.on(p));
    let repeat = if grouped { b.w * q } else { 0 };
    let attention = projection(b, h, q, true, on("q_proj"), g)
        + projection(b, h, kv, true, on("k_proj"), g)
        + projection(b, h, kv, true, on("v_proj"), g)
        + (b.w * q + rotary(b, q, g))
        + (b.w * kv + rotary(b, kv, g) + repeat)
        + (b.w * kv + repeat)
        // Scores, scaled, masked (and the mask's broadcast gradient); softmax in f32.
        + heads * s * ((3 + g) * b.w + b.to_f32(1) + 3 * F32 + b.back(1))
        + 2 * b.w * q
        + projection(b, q, h, false, on("o_proj"), g);
    let mlp = projection(b, h, i, false, on("gate_proj"), g)
        + projection(b, h, i, false, on("up_proj"), g)
        + 2 * b.w * i
        + projection(b, i, h, false, on("down_proj"), g);
    2 * rms_norm(b, h, g) + attention + mlp + 2 * b.w * h
}

/// The most a frozen decoder layer holds at once per token: the attention scores through
/// softmax (the masked scores, and softmax's f32 input, difference, exponentials and
/// quotient: the statement's temporaries are gone by then), or the MLP's gate, activation, up
/// and product, beside the residual stream.
pub fn text_frozen_token_bytes(t: &TextConfig, s: u64, b: Bytes) -> u64 {
    let (h, i, heads) = (
        t.hidden_size as u64,
        t.intermediate_size as u64,
        t.num_attention_heads as u64,
    );
    let q = heads * t.head_dim() as u64;
    let attention = 6 * b.w * q + heads * s * (b.w + b.to_f32(1) + 3 * F32);
    let mlp = 4 * b.w * i + b.w * h;
    attention.max(mlp) + 3 * b.w * h
}

/// The audio encoder's peak over a batch of `clips`: it always runs over the checkpoint's
/// whole window (`2 * max_source_positions` mel frames), whatever the clip's length.
pub fn audio_encoder_peak(a: &AudioEncoderConfig, clips: u64, b: Bytes) -> u64 {
    let (d, f, heads) = (
        a.d_model as u64,
        a.encoder_ffn_dim as u64,
        a.encoder_attention_heads as u64,
    );
    let p = a.max_source_positions as u64;
    let mels = a.num_mel_bins as u64;
    // The two convolutions as unfold + matmul over 2p frames, then p.
    let convs = 2 * p * (2 * 3 * mels * F32 + 3 * b.w * d) + p * (2 * 3 * d * b.w + 3 * b.w * d);
    let attention = 6 * b.w * d + heads * p * (b.w + b.to_f32(1) + 3 * F32);
    let layer = p * (attention.max(3 * b.w * f) + 3 * b.w * d);
    clips * convs.max(layer)
}

/// Qwen2-VL's vision tower's peak for `clips` clips of `patches` patches each, attending
/// within frame groups of `group` patches (one group's scores at a time).
pub fn vision_peak(v: &VisionConfig, clips: u64, patches: u64, group: u64, b: Bytes) -> u64 {
    let e = v.embed_dim as u64;
    let mlp = (v.embed_dim as f64 * v.mlp_ratio) as u64;
    let heads = v.num_heads as u64;
    let n = clips * patches;
    let input = n * v.patch_len() as u64 * (F32 + b.w);
    // qkv, q/k rotary copies, v, the groups' outputs; the quick GELU's temporaries.
    let per_patch = (12 * b.w * e).max(5 * b.w * mlp) + 3 * b.w * e;
    let scores = heads * group * group * (2 * b.w + b.to_f32(1) + 3 * F32);
    input.max(n * per_patch + scores)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use xkd_models::qwen::{Qwen2AudioConfig, Qwen2VlConfig};

    fn fixture(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/reference/fixtures")
            .join(name)
    }

    /// Parameters in the safetensors files of a model directory (headers only).
    fn stored(dir: &Path) -> u64 {
        let mut n = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "safetensors") {
                let bytes = std::fs::read(&path).unwrap();
                let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
                n += st
                    .tensors()
                    .iter()
                    .map(|(_, t)| t.shape().iter().product::<usize>() as u64)
                    .sum::<u64>();
            }
        }
        n
    }

    /// The counts from the shapes agree with what transformers wrote for both tiny families.
    #[test]
    fn parameter_counts_match_the_tiny_checkpoints() {
        let dir = fixture("qwen2-audio-tiny");
        let cfg =
            Qwen2AudioConfig::from_json(&std::fs::read_to_string(dir.join("config.json")).unwrap())
                .unwrap();
        let ours =
            text_params(&cfg.text) + audio_encoder_params(&cfg.audio, cfg.text.hidden_size as u64);
        assert_eq!(ours, stored(&dir));

        let dir = fixture("qwen2-vl-tiny");
        let cfg =
            Qwen2VlConfig::from_json(&std::fs::read_to_string(dir.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(
            text_params(&cfg.text) + vision_params(&cfg.vision),
            stored(&dir)
        );
    }

    fn tiny_text() -> TextConfig {
        TextConfig {
            vocab_size: 100,
            hidden_size: 8,
            intermediate_size: 16,
            num_hidden_layers: 1,
            num_attention_heads: 2,
            num_key_value_heads: 1,
            hidden_act: "silu".into(),
            rms_norm_eps: 1e-6,
            rope_theta: 1e4,
            tie_word_embeddings: true,
            mrope_section: None,
        }
    }

    /// Counted by hand for h = 8, q = 8, kv = 4, I = 16, 2 heads, s = 3, f32 weights and no
    /// adapters: norms 2 x 32, projections q 24 + k 12 + v 12 + o 8 + gate 16 + up 16 +
    /// down 8, q copy and rotary 8 + 52, k 4 + 26 + repeat 8, v 4 + 8, scores 2 x 3 x 7,
    /// probabilities times v and the transpose 16, silu and product 32, residuals 16: 376
    /// values of 4 bytes.
    #[test]
    fn a_trained_layer_keeps_what_was_counted_by_hand() {
        let t = tiny_text();
        assert_eq!(
            text_layer_token_bytes(&t, 3, Bytes { w: 4 }, None, true),
            376 * 4
        );
    }

    /// An adapter adds its f32 path; dropout its mask, product and the mask's gradient; a bf16
    /// model adds casts but halves the base tensors.
    #[test]
    fn adapters_and_dtypes_change_the_count_as_the_ops_do() {
        let t = tiny_text();
        let plain = text_layer_token_bytes(&t, 3, Bytes { w: 4 }, None, true);
        let q_only = Adapters {
            r: 2,
            dropout: false,
            targets: vec!["q_proj".into()],
        };
        // r + B A x + scale (8 + 8) + the sum (8), in f32: 2 + 16 + 8 values.
        let with = text_layer_token_bytes(&t, 3, Bytes { w: 4 }, Some(&q_only), true);
        assert_eq!(with - plain, (2 + 16 + 8) * 4);
        let dropout = Adapters {
            dropout: true,
            ..q_only.clone()
        };
        let more = text_layer_token_bytes(&t, 3, Bytes { w: 4 }, Some(&dropout), true);
        assert_eq!(more - with, 3 * 8 * 4);
        // Without a backward pass, the broadcast gradients (norm weights 2 x 8, biases 16,
        // rotary tables 16 + 8, the mask 2 x 3) are not there.
        let forward = text_layer_token_bytes(&t, 3, Bytes { w: 4 }, None, false);
        assert_eq!(plain - forward, (16 + 16 + 24 + 6) * 4);
        let bf16 = text_layer_token_bytes(&t, 3, Bytes { w: 2 }, None, true);
        assert!(bf16 < plain && bf16 > plain / 2, "{bf16} vs {plain}");
    }

    /// Attention grows with the sequence: each token's scores row is as long as the sequence.
    #[test]
    fn scores_grow_linearly_per_token_with_the_sequence() {
        let t = tiny_text();
        let b = Bytes { w: 4 };
        let d1 = text_layer_token_bytes(&t, 11, b, None, true)
            - text_layer_token_bytes(&t, 10, b, None, true);
        assert_eq!(d1, 2 * 7 * 4);
        let f1 = text_frozen_token_bytes(&t, 1000, b) - text_frozen_token_bytes(&t, 999, b);
        assert_eq!(f1, 2 * 4 * 4);
    }
}
