//! The Qwen2 decoder LM both families share: token embeddings, layers of (RMSNorm, grouped-query
//! attention with q/k/v bias and rotary positions, RMSNorm, SwiGLU MLP), final RMSNorm and the
//! LM head (or the embeddings, when tied). Logits at every position.
//!
//! Rotary positions are M-RoPE in general: each token has three position ids (temporal, height,
//! width) and `mrope_section` says how many of the `head_dim / 2` frequencies follow each. Plain
//! RoPE is the case of one section (Qwen2-Audio), where text tokens' three ids are equal anyway.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Linear, VarBuilder};

use super::config::TextConfig;
use super::lora::{LoraAdapters, LoraConfig, LoraLinear, LoraTarget};
use crate::nn::{apply_rotary, causal_mask, repeat_kv, softmax, RmsNorm};

/// A token's position ids: (temporal, height, width). Text tokens have all three equal.
pub type Position = [u32; 3];

/// Positions `0..s` for each of `b` sequences.
pub fn sequential_positions(b: usize, s: usize) -> Vec<Vec<Position>> {
    let row: Vec<Position> = (0..s as u32).map(|p| [p, p, p]).collect();
    vec![row; b]
}

#[derive(Debug, Clone)]
struct SelfAttention {
    q: LoraLinear,
    k: LoraLinear,
    v: LoraLinear,
    o: LoraLinear,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl SelfAttention {
    fn new(cfg: &TextConfig, vb: VarBuilder) -> Result<Self> {
        let (h, d) = (cfg.hidden_size, cfg.head_dim());
        let (heads, kv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        Ok(Self {
            q: LoraLinear::new(candle_nn::linear(h, heads * d, vb.pp("q_proj"))?),
            k: LoraLinear::new(candle_nn::linear(h, kv * d, vb.pp("k_proj"))?),
            v: LoraLinear::new(candle_nn::linear(h, kv * d, vb.pp("v_proj"))?),
            o: LoraLinear::new(candle_nn::linear_no_bias(heads * d, h, vb.pp("o_proj"))?),
            heads,
            kv_heads: kv,
            head_dim: d,
        })
    }

    /// `[B, S, n * D]` -> `[B, n, S, D]`.
    fn heads_first(&self, x: &Tensor, n: usize) -> Result<Tensor> {
        let (b, s, _) = x.dims3()?;
        x.reshape((b, s, n, self.head_dim))?
            .transpose(1, 2)?
            .contiguous()
    }

    fn forward(&self, x: &Tensor, rope: &(Tensor, Tensor), mask: &Tensor) -> Result<Tensor> {
        let (b, s, _) = x.dims3()?;
        let (cos, sin) = rope;
        let q = apply_rotary(
            &self.heads_first(&self.q.forward(x)?, self.heads)?,
            cos,
            sin,
        )?;
        let k = apply_rotary(
            &self.heads_first(&self.k.forward(x)?, self.kv_heads)?,
            cos,
            sin,
        )?;
        let groups = self.heads / self.kv_heads;
        let k = repeat_kv(k, groups)?;
        let v = repeat_kv(
            self.heads_first(&self.v.forward(x)?, self.kv_heads)?,
            groups,
        )?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(mask)?;
        let out = softmax(&scores)?.matmul(&v)?;
        self.o.forward(
            &out.transpose(1, 2)?
                .reshape((b, s, self.heads * self.head_dim))?,
        )
    }
}

#[derive(Debug, Clone)]
struct DecoderLayer {
    input_norm: RmsNorm,
    attn: SelfAttention,
    post_norm: RmsNorm,
    gate: LoraLinear,
    up: LoraLinear,
    down: LoraLinear,
}

impl DecoderLayer {
    fn new(cfg: &TextConfig, vb: VarBuilder) -> Result<Self> {
        let (h, i, eps) = (cfg.hidden_size, cfg.intermediate_size, cfg.rms_norm_eps);
        Ok(Self {
            input_norm: RmsNorm::new(h, eps, vb.pp("input_layernorm"))?,
            attn: SelfAttention::new(cfg, vb.pp("self_attn"))?,
            post_norm: RmsNorm::new(h, eps, vb.pp("post_attention_layernorm"))?,
            gate: LoraLinear::new(candle_nn::linear_no_bias(h, i, vb.pp("mlp.gate_proj"))?),
            up: LoraLinear::new(candle_nn::linear_no_bias(h, i, vb.pp("mlp.up_proj"))?),
            down: LoraLinear::new(candle_nn::linear_no_bias(i, h, vb.pp("mlp.down_proj"))?),
        })
    }

    /// The projections by their path below the layer, in Hugging Face's names.
    fn projections(&mut self) -> [(&'static str, &mut LoraLinear); 7] {
        [
            ("self_attn.q_proj", &mut self.attn.q),
            ("self_attn.k_proj", &mut self.attn.k),
            ("self_attn.v_proj", &mut self.attn.v),
            ("self_attn.o_proj", &mut self.attn.o),
            ("mlp.gate_proj", &mut self.gate),
            ("mlp.up_proj", &mut self.up),
            ("mlp.down_proj", &mut self.down),
        ]
    }

    fn forward(&self, x: &Tensor, rope: &(Tensor, Tensor), mask: &Tensor) -> Result<Tensor> {
        let h = (x + self
            .attn
            .forward(&self.input_norm.forward(x)?, rope, mask)?)?;
        let n = self.post_norm.forward(&h)?;
        let swiglu = (self.gate.forward(&n)?.silu()? * self.up.forward(&n)?)?;
        h + self.down.forward(&swiglu)?
    }
}

/// The Qwen2 decoder with its LM head. Built from the builder at the parent of `model.` and
/// `lm_head` (the checkpoint root for Qwen2-VL, `language_model` for Qwen2-Audio).
#[derive(Debug, Clone)]
pub struct Decoder {
    embed: Tensor,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    /// `None` when the head is tied to the token embeddings.
    head: Option<Linear>,
    inv_freq: Vec<f32>,
    /// Frequency index -> which of the three position ids drives it.
    axis_of: Vec<usize>,
}

impl Decoder {
    pub fn new(cfg: &TextConfig, vb: VarBuilder) -> Result<Self> {
        let (h, v) = (cfg.hidden_size, cfg.vocab_size);
        let half = cfg.head_dim() / 2;
        let sections = cfg.mrope_section.clone().unwrap_or_else(|| vec![half]);
        let axis_of = sections
            .iter()
            .enumerate()
            .flat_map(|(axis, &n)| std::iter::repeat_n(axis, n))
            .collect();
        Ok(Self {
            embed: vb.get((v, h), "model.embed_tokens.weight")?,
            layers: (0..cfg.num_hidden_layers)
                .map(|i| DecoderLayer::new(cfg, vb.pp(format!("model.layers.{i}"))))
                .collect::<Result<_>>()?,
            norm: RmsNorm::new(h, cfg.rms_norm_eps, vb.pp("model.norm"))?,
            head: if cfg.tie_word_embeddings {
                None
            } else {
                Some(candle_nn::linear_no_bias(h, v, vb.pp("lm_head"))?)
            },
            inv_freq: inverse_frequencies(cfg.rope_theta, cfg.head_dim()),
            axis_of,
        })
    }

    pub fn dtype(&self) -> DType {
        self.embed.dtype()
    }

    pub fn device(&self) -> Device {
        self.embed.device().clone()
    }

    /// Each layer's projection, with its module path under `prefix` (the decoder's path in the
    /// checkpoint).
    fn projections(&mut self, prefix: &str) -> Vec<(String, &str, &mut LoraLinear)> {
        self.layers
            .iter_mut()
            .enumerate()
            .flat_map(|(i, layer)| {
                layer.projections().map(|(name, proj)| {
                    let short = name.rsplit('.').next().unwrap_or(name);
                    (format!("{prefix}model.layers.{i}.{name}"), short, proj)
                })
            })
            .collect()
    }

    /// The projections `config` targets, with their module paths under `prefix`.
    pub fn lora_targets(&mut self, config: &LoraConfig, prefix: &str) -> Result<Vec<LoraTarget>> {
        self.projections(prefix)
            .into_iter()
            .filter(|(_, short, _)| config.targets(short))
            .map(|(path, _, proj)| {
                let (in_dim, out_dim) = proj.shape()?;
                Ok(LoraTarget {
                    path,
                    in_dim,
                    out_dim,
                })
            })
            .collect()
    }

    /// Puts each adapter on its projection; an adapter whose path names no projection of
    /// this decoder is an error, never silently dropped.
    pub fn attach_lora(&mut self, adapters: &LoraAdapters, prefix: &str) -> Result<()> {
        let mut attached = 0;
        for (path, _, proj) in self.projections(prefix) {
            if let Some(adapter) = adapters.get(&path) {
                proj.attach(adapter.clone())?;
                attached += 1;
            }
        }
        if attached != adapters.len() {
            let known: Vec<String> = self
                .projections(prefix)
                .into_iter()
                .map(|(p, _, _)| p)
                .collect();
            let stray: Vec<&String> = adapters.paths().filter(|p| !known.contains(p)).collect();
            candle_core::bail!("LoRA adapters for modules this model lacks: {stray:?}");
        }
        Ok(())
    }

    /// Training mode turns LoRA dropout on.
    pub fn set_training(&mut self, training: bool) {
        for (_, _, proj) in self.projections("") {
            proj.set_training(training);
        }
    }

    /// Token embeddings `[B, S, H]` of ids `[B, S]`.
    pub fn embed_tokens(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, s) = ids.dims2()?;
        let h = self.embed.dim(1)?;
        self.embed
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, s, h))
    }

    /// Logits `[B, S, vocab]` for input embeddings `[B, S, H]` at `positions` (one list of
    /// `S` position ids per sequence), under a causal mask.
    pub fn forward(&self, embeds: &Tensor, positions: &[Vec<Position>]) -> Result<Tensor> {
        self.forward_at(embeds, positions, None)
    }

    /// As `forward`, but with `at`, only sequence i's position `at[i]` gets logits: `[B,
    /// vocab]`. With a 152k vocabulary the head over every position is a step's largest tensor,
    /// and a question needs the logits after its last token only.
    pub fn forward_at(
        &self,
        embeds: &Tensor,
        positions: &[Vec<Position>],
        at: Option<&[usize]>,
    ) -> Result<Tensor> {
        let (_, s, _) = embeds.dims3()?;
        let rope = self.rotary_tables(positions, embeds.device())?;
        let rope = (
            rope.0.to_dtype(self.dtype())?,
            rope.1.to_dtype(self.dtype())?,
        );
        let mask = causal_mask(s, embeds.device())?.to_dtype(self.dtype())?;
        let mut x = embeds.clone();
        for layer in &self.layers {
            x = layer.forward(&x, &rope, &mask)?;
        }
        if let Some(at) = at {
            let rows: Vec<Tensor> = at
                .iter()
                .enumerate()
                .map(|(i, &p)| x.get(i)?.get(p))
                .collect::<Result<_>>()?;
            x = Tensor::stack(&rows, 0)?;
        }
        let x = self.norm.forward(&x)?;
        match &self.head {
            Some(head) => head.forward(&x),
            None => x.broadcast_matmul(&self.embed.t()?),
        }
    }

    /// cos and sin `[B, 1, S, head_dim]` in f32: frequency `j` (and `j + head_dim / 2`) turns
    /// with the position id of its M-RoPE section.
    fn rotary_tables(&self, positions: &[Vec<Position>], dev: &Device) -> Result<(Tensor, Tensor)> {
        let b = positions.len();
        let s = positions.first().map_or(0, Vec::len);
        let half = self.inv_freq.len();
        let mut angles = Vec::with_capacity(b * s * 2 * half);
        for row in positions {
            if row.len() != s {
                candle_core::bail!("position rows of different lengths ({} vs {s})", row.len());
            }
            for pos in row {
                let first: Vec<f32> = (0..half)
                    .map(|j| pos[self.axis_of[j]] as f32 * self.inv_freq[j])
                    .collect();
                angles.extend_from_slice(&first);
                angles.extend_from_slice(&first);
            }
        }
        let cos: Vec<f32> = angles.iter().map(|a| a.cos()).collect();
        let sin: Vec<f32> = angles.iter().map(|a| a.sin()).collect();
        let shape = (b, 1, s, 2 * half);
        Ok((
            Tensor::from_vec(cos, shape, dev)?,
            Tensor::from_vec(sin, shape, dev)?,
        ))
    }
}

/// `1 / theta^(2j / dim)` for `j < dim / 2`, in f32 as transformers computes it.
pub fn inverse_frequencies(theta: f64, dim: usize) -> Vec<f32> {
    (0..dim / 2)
        .map(|j| 1.0 / (theta as f32).powf((2 * j) as f32 / dim as f32))
        .collect()
}

/// Replaces the embeddings at the placeholder positions (`ids == token`, row-major over the
/// batch) by the rows of `features`, in order, as transformers' `masked_scatter` does. An
/// index-select over `[embeds; features]`, so gradients reach both.
pub fn scatter_placeholders(
    embeds: &Tensor,
    ids: &[u32],
    token: u32,
    features: &Tensor,
) -> Result<Tensor> {
    let (b, s, h) = embeds.dims3()?;
    if ids.len() != b * s {
        candle_core::bail!("{} ids for {b} x {s} embeddings", ids.len());
    }
    let n = features.dim(0)?;
    let mut next = (b * s) as u32;
    let index: Vec<u32> = ids
        .iter()
        .enumerate()
        .map(|(i, &id)| {
            if id == token {
                next += 1;
                next - 1
            } else {
                i as u32
            }
        })
        .collect();
    let placeholders = next as usize - b * s;
    if placeholders != n {
        candle_core::bail!("{placeholders} placeholder tokens {token} for {n} feature rows");
    }
    let index = Tensor::from_vec(index, b * s, embeds.device())?;
    let all = Tensor::cat(
        &[
            &embeds.reshape((b * s, h))?,
            &features.to_dtype(embeds.dtype())?,
        ],
        0,
    )?;
    all.index_select(&index, 0)?.reshape((b, s, h))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_take_feature_rows_in_order() {
        let dev = Device::Cpu;
        let embeds = Tensor::zeros((1, 4, 2), DType::F32, &dev).unwrap();
        let feats = Tensor::new(&[[1f32, 1.0], [2.0, 2.0]], &dev).unwrap();
        let out = scatter_placeholders(&embeds, &[5, 9, 7, 9], 9, &feats).unwrap();
        let rows = out.squeeze(0).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(
            rows,
            vec![
                vec![0.0, 0.0],
                vec![1.0, 1.0],
                vec![0.0, 0.0],
                vec![2.0, 2.0]
            ]
        );
        assert!(scatter_placeholders(&embeds, &[9, 0, 0, 0], 9, &feats).is_err());
    }

    #[test]
    fn inverse_frequencies_start_at_one_and_fall() {
        let inv = inverse_frequencies(10000.0, 8);
        assert_eq!(inv.len(), 4);
        assert_eq!(inv[0], 1.0);
        assert!((inv[2] - 0.01).abs() < 1e-7);
        assert!(inv.windows(2).all(|w| w[1] < w[0]));
    }
}
