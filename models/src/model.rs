//! The tiny stand-ins of the two model families, shaped like the real ones:
//! audio = log-mel -> two convs (the second strided) -> pre-LN transformer encoder -> average pool
//! -> projector -> decoder LM (Qwen2-Audio's shape); visual = frames -> temporal x spatial patch
//! embedding -> transformer encoder -> 2x2 merger -> decoder LM (Qwen2-VL's shape). The decoder is
//! Qwen2-like: RMSNorm, grouped-query attention with q/k/v bias, RoPE, SwiGLU.
//!
//! Everything on the training path is built from differentiable candle ops. candle's fused
//! `softmax_last_dim`, `rms_norm`, `rope` and the LayerNorm fast path have no backward pass, so
//! gradients through them silently vanish; `tests::every_parameter_gets_a_gradient` guards this.

use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::{Linear, VarBuilder};

use crate::nn::{causal_mask, conv1d_k3, repeat_kv, LayerNorm, RmsNorm};
use xkd_config::{Modality, ModelConfig};

/// The shared vocabulary of both stand-ins: a few prompt words, the ten option letters and one
/// token per class name.
#[derive(Debug, Clone, PartialEq)]
pub struct Vocab {
    pub n_classes: usize,
}

pub const OPTIONS: usize = 10;
const BOS: u32 = 1;
const MM_START: u32 = 2;
const MM: u32 = 3;
const MM_END: u32 = 4;
const QUESTION: [u32; 5] = [5, 6, 7, 8, 9]; // "Which" "class" "is" "this" "?"
const ANSWER: [u32; 2] = [10, 11]; // "Answer" ":"
const FIRST_LETTER: u32 = 12;
const FIRST_CLASS: u32 = FIRST_LETTER + OPTIONS as u32;

impl Vocab {
    pub fn new(n_classes: usize) -> Vocab {
        Vocab { n_classes }
    }

    pub fn size(&self) -> usize {
        FIRST_CLASS as usize + self.n_classes
    }

    /// Token id of a class name.
    pub fn class_token(&self, class: u32) -> u32 {
        FIRST_CLASS + class
    }

    /// Token ids of the ten option letters, in order A..J.
    pub fn letters(&self) -> Vec<u32> {
        (0..OPTIONS as u32).map(|k| FIRST_LETTER + k).collect()
    }

    pub fn letter(&self, option: usize) -> u32 {
        FIRST_LETTER + option as u32
    }

    /// The prompt, with `mm_tokens` placeholders where the modality embeddings go:
    /// `<bos> <mm_start> <mm>*n <mm_end> Which class is this ? A c1 B c2 ... J c10 Answer :`
    pub fn prompt(&self, options: &[u32; OPTIONS], mm_tokens: usize) -> Vec<u32> {
        let mut ids = vec![BOS, MM_START];
        ids.extend(std::iter::repeat_n(MM, mm_tokens));
        ids.push(MM_END);
        ids.extend(QUESTION);
        for (k, class) in options.iter().enumerate() {
            ids.push(self.letter(k));
            ids.push(FIRST_CLASS + class);
        }
        ids.extend(ANSWER);
        ids
    }

    /// Position of the first modality placeholder in `prompt`.
    pub fn mm_offset(&self) -> usize {
        2
    }
}

/// One multiple-choice question: ten class indices, and which of them is right.
#[derive(Debug, Clone, PartialEq)]
pub struct Question {
    pub options: [u32; OPTIONS],
    pub answer: usize,
}

/// The options of clip `clip` on its `visit`-th draw (its epoch; 0 in evaluation): a pure
/// function of (seed, clip, visit, label), so teacher and student always see the same
/// question, on every rank and in every run. A new option order per epoch keeps a model from
/// memorising prompts instead of perceiving the clip.
pub fn question(seed: u64, clip: u32, visit: u64, label: u32, n_classes: usize) -> Question {
    assert!(n_classes >= OPTIONS, "need at least {OPTIONS} classes");
    let mut state = seed
        ^ (clip as u64).wrapping_mul(0xA24B_AED4_963E_E407)
        ^ visit.wrapping_mul(0x9FB2_1C65_1E98_DF25);
    let mut pool: Vec<u32> = (0..n_classes as u32).filter(|&c| c != label).collect();
    let mut options = [0u32; OPTIONS];
    options[0] = label;
    for slot in options.iter_mut().skip(1) {
        let j = (xkd_protocol::splitmix64(&mut state) % pool.len() as u64) as usize;
        *slot = pool.swap_remove(j);
    }
    for i in (1..OPTIONS).rev() {
        let j = (xkd_protocol::splitmix64(&mut state) % (i as u64 + 1)) as usize;
        options.swap(i, j);
    }
    let answer = options
        .iter()
        .position(|&c| c == label)
        .expect("label is an option");
    Question { options, answer }
}

/// The stand-ins' norm epsilons (Whisper's LayerNorm, Qwen2's RMSNorm).
const LN_EPS: f64 = 1e-5;
const RMS_EPS: f64 = 1e-6;

fn linear(i: usize, o: usize, vb: VarBuilder) -> Result<Linear> {
    candle_nn::linear(i, o, vb)
}

fn linear_no_bias(i: usize, o: usize, vb: VarBuilder) -> Result<Linear> {
    candle_nn::linear_no_bias(i, o, vb)
}

/// Rotary tables for the LM (rotate-half convention), not trained.
#[derive(Debug, Clone)]
struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    fn new(head_dim: usize, seq: usize, theta: f32, dev: &Device) -> Result<Self> {
        let half = head_dim / 2;
        let inv: Vec<f32> = (0..half)
            .map(|i| 1.0 / theta.powf(2.0 * i as f32 / head_dim as f32))
            .collect();
        let mut angles = Vec::with_capacity(seq * head_dim);
        for p in 0..seq {
            for k in 0..head_dim {
                angles.push(p as f32 * inv[k % half]);
            }
        }
        let angles = Tensor::from_vec(angles, (seq, head_dim), dev)?;
        Ok(Self {
            cos: angles.cos()?,
            sin: angles.sin()?,
        })
    }

    fn into_dtype(self, dtype: DType) -> Result<Self> {
        Ok(Self {
            cos: self.cos.to_dtype(dtype)?,
            sin: self.sin.to_dtype(dtype)?,
        })
    }

    /// x: [B, H, S, Dh]
    fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let (_, _, s, dh) = x.dims4()?;
        let cos = self.cos.narrow(0, 0, s)?;
        let sin = self.sin.narrow(0, 0, s)?;
        let x1 = x.narrow(D::Minus1, 0, dh / 2)?;
        let x2 = x.narrow(D::Minus1, dh / 2, dh / 2)?;
        let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        x.broadcast_mul(&cos)?
            .broadcast_add(&rotated.broadcast_mul(&sin)?)
    }
}

/// Multi-head attention with optional grouped KV heads, rotary positions and causal mask.
#[derive(Debug, Clone)]
struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    /// `k_bias`: Qwen2 has a key bias, Whisper and the ViT here do not. A key bias shifts every
    /// score of a query by the same amount, so softmax ignores it and its true gradient is
    /// zero: `train` keeps it frozen rather than let Adam amplify rounding noise.
    fn new(
        hidden: usize,
        heads: usize,
        kv_heads: usize,
        k_bias: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let head_dim = hidden / heads;
        let k = if k_bias { linear } else { linear_no_bias };
        Ok(Self {
            q: linear(hidden, heads * head_dim, vb.pp("q_proj"))?,
            k: k(hidden, kv_heads * head_dim, vb.pp("k_proj"))?,
            v: linear(hidden, kv_heads * head_dim, vb.pp("v_proj"))?,
            o: linear_no_bias(heads * head_dim, hidden, vb.pp("o_proj"))?,
            heads,
            kv_heads,
            head_dim,
        })
    }

    fn split(&self, x: &Tensor, heads: usize) -> Result<Tensor> {
        let (b, s, _) = x.dims3()?;
        x.reshape((b, s, heads, self.head_dim))?
            .transpose(1, 2)?
            .contiguous()
    }

    /// Repeat each KV head for the query heads that share it.
    fn expand_kv(&self, x: Tensor) -> Result<Tensor> {
        repeat_kv(x, self.heads / self.kv_heads)
    }

    fn forward(&self, x: &Tensor, rope: Option<&Rope>, mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, s, _) = x.dims3()?;
        let mut q = self.split(&self.q.forward(x)?, self.heads)?;
        let mut k = self.split(&self.k.forward(x)?, self.kv_heads)?;
        let v = self.expand_kv(self.split(&self.v.forward(x)?, self.kv_heads)?)?;
        if let Some(rope) = rope {
            q = rope.apply(&q)?;
            k = rope.apply(&k)?;
        }
        let k = self.expand_kv(k)?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let mut scores = (q.matmul(&k.t()?)? * scale)?;
        if let Some(mask) = mask {
            scores = scores.broadcast_add(mask)?;
        }
        let probs = candle_nn::ops::softmax(&scores.to_dtype(DType::F32)?, D::Minus1)?
            .to_dtype(v.dtype())?;
        let out = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, s, ()))?;
        self.o.forward(&out)
    }
}

/// Pre-LN encoder block (Whisper / ViT style): LayerNorm, attention, LayerNorm, GELU MLP.
#[derive(Debug, Clone)]
struct EncoderLayer {
    ln1: LayerNorm,
    attn: Attention,
    ln2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

impl EncoderLayer {
    fn new(hidden: usize, heads: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            ln1: LayerNorm::new(hidden, LN_EPS, vb.pp("ln1"))?,
            attn: Attention::new(hidden, heads, heads, false, vb.pp("attn"))?,
            ln2: LayerNorm::new(hidden, LN_EPS, vb.pp("ln2"))?,
            fc1: linear(hidden, 4 * hidden, vb.pp("fc1"))?,
            fc2: linear(4 * hidden, hidden, vb.pp("fc2"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = (x + self.attn.forward(&self.ln1.forward(x)?, None, None)?)?;
        let m = self
            .fc2
            .forward(&self.fc1.forward(&self.ln2.forward(&h)?)?.gelu()?)?;
        h + m
    }
}

fn encoder_stack(cfg: &ModelConfig, vb: VarBuilder) -> Result<Vec<EncoderLayer>> {
    (0..cfg.encoder_layers)
        .map(|i| EncoderLayer::new(cfg.encoder_hidden, cfg.encoder_heads, vb.pp(i)))
        .collect()
}

fn run_stack(layers: &[EncoderLayer], mut x: Tensor) -> Result<Tensor> {
    for layer in layers {
        x = layer.forward(&x)?;
    }
    Ok(x)
}

/// Fixed sinusoidal positions (Whisper's encoder uses the same kind).
fn sinusoids(len: usize, dim: usize, dev: &Device) -> Result<Tensor> {
    let half = dim / 2;
    let mut v = vec![0f32; len * dim];
    for p in 0..len {
        for i in 0..half {
            let rate = (-(10000f32.ln()) * i as f32 / (half.max(2) - 1) as f32).exp();
            v[p * dim + i] = (p as f32 * rate).sin();
            v[p * dim + half + i] = (p as f32 * rate).cos();
        }
    }
    Tensor::from_vec(v, (len, dim), dev)
}

/// Whisper-style audio tower: [B, frames, mels] -> [B, modality_tokens, lm_hidden].
#[derive(Debug, Clone)]
struct AudioEncoder {
    conv1: (Tensor, Tensor),
    conv2: (Tensor, Tensor),
    layers: Vec<EncoderLayer>,
    ln_post: LayerNorm,
    projector: Linear,
    tokens: usize,
}

fn conv_params(cin: usize, cout: usize, vb: VarBuilder) -> Result<(Tensor, Tensor)> {
    Ok((vb.get((cout, cin, 3), "weight")?, vb.get(cout, "bias")?))
}

fn conv1d(x: &Tensor, (w, b): &(Tensor, Tensor), stride: usize) -> Result<Tensor> {
    conv1d_k3(x, w, b, stride)
}

impl AudioEncoder {
    fn new(cfg: &ModelConfig, n_mels: usize, vb: VarBuilder) -> Result<Self> {
        let h = cfg.encoder_hidden;
        Ok(Self {
            conv1: conv_params(n_mels, h, vb.pp("conv1"))?,
            conv2: conv_params(h, h, vb.pp("conv2"))?,
            layers: encoder_stack(cfg, vb.pp("layers"))?,
            ln_post: LayerNorm::new(h, LN_EPS, vb.pp("ln_post"))?,
            projector: linear(h, cfg.lm_hidden, vb.pp("projector"))?,
            tokens: cfg.modality_tokens,
        })
    }

    fn forward(&self, mel: &Tensor) -> Result<Tensor> {
        let x = conv1d(mel, &self.conv1, 1)?.gelu()?; // [B, frames, H]
        let x = conv1d(&x, &self.conv2, 2)?.gelu()?; // [B, frames / 2, H]
        let (b, t, h) = x.dims3()?;
        let x = x.broadcast_add(&sinusoids(t, h, x.device())?.to_dtype(x.dtype())?)?;
        let x = self.ln_post.forward(&run_stack(&self.layers, x)?)?;
        // Average-pool time into the fixed number of tokens the LM receives.
        let stride = t / self.tokens;
        if stride == 0 {
            candle_core::bail!("{t} encoder frames cannot give {} tokens", self.tokens);
        }
        let pooled = x
            .narrow(1, 0, stride * self.tokens)?
            .reshape((b, self.tokens, stride, h))?
            .mean(2)?;
        self.projector.forward(&pooled)
    }
}

/// Qwen2-VL-style vision tower: [B, T, 3, S, S] -> temporal-2 x patch-p patches -> encoder ->
/// 2x2 spatial merger -> [B, (T/2) * (S/p/2)^2, lm_hidden].
#[derive(Debug, Clone)]
struct VisualEncoder {
    patch_embed: Linear,
    pos: Tensor,
    layers: Vec<EncoderLayer>,
    merger_ln: LayerNorm,
    merger_fc1: Linear,
    merger_fc2: Linear,
    patch: usize,
    grid: usize,
}

pub const TEMPORAL_PATCH: usize = 2;

impl VisualEncoder {
    fn new(cfg: &ModelConfig, frames: usize, size: usize, vb: VarBuilder) -> Result<Self> {
        let (p, h) = (cfg.patch, cfg.encoder_hidden);
        let grid = size / p;
        let patches = (frames / TEMPORAL_PATCH) * grid * grid;
        Ok(Self {
            patch_embed: linear_no_bias(3 * TEMPORAL_PATCH * p * p, h, vb.pp("patch_embed"))?,
            pos: vb.get((patches, h), "pos_embed")?,
            layers: encoder_stack(cfg, vb.pp("layers"))?,
            merger_ln: LayerNorm::new(h, LN_EPS, vb.pp("merger.ln_q"))?,
            merger_fc1: linear(4 * h, 4 * h, vb.pp("merger.mlp.0"))?,
            merger_fc2: linear(4 * h, cfg.lm_hidden, vb.pp("merger.mlp.2"))?,
            patch: p,
            grid,
        })
    }

    /// Cut [B, T, C, S, S] into patches ordered (t, merge-row, merge-col, 2x2 neighbour), so the
    /// merger's four neighbours are adjacent, as Qwen2-VL's processor orders them.
    fn patchify(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t, c, _, _) = x.dims5()?;
        let (p, g) = (self.patch, self.grid);
        let (tt, m) = (t / TEMPORAL_PATCH, g / 2);
        // [B, tt, 2t, C, m, 2, p, m, 2, p]
        let x = x.reshape(&[b, tt, TEMPORAL_PATCH, c, m, 2, p, m, 2, p][..])?;
        // -> [B, tt, m(row), m(col), 2(row), 2(col), C, 2t, p, p]
        let x = x
            .permute(vec![0, 1, 4, 7, 5, 8, 3, 2, 6, 9])?
            .contiguous()?;
        x.reshape((b, tt * g * g, c * TEMPORAL_PATCH * p * p))
    }

    fn forward(&self, frames: &Tensor) -> Result<Tensor> {
        let x = self.patch_embed.forward(&self.patchify(frames)?)?;
        let x = x.broadcast_add(&self.pos)?;
        let x = self.merger_ln.forward(&run_stack(&self.layers, x)?)?;
        let (b, n, h) = x.dims3()?;
        let merged = x.reshape((b, n / 4, 4 * h))?;
        self.merger_fc2
            .forward(&self.merger_fc1.forward(&merged)?.gelu()?)
    }
}

/// Qwen2 decoder layer: RMSNorm, GQA attention with RoPE, RMSNorm, SwiGLU MLP.
#[derive(Debug, Clone)]
struct DecoderLayer {
    input_norm: RmsNorm,
    attn: Attention,
    post_norm: RmsNorm,
    gate: Linear,
    up: Linear,
    down: Linear,
}

impl DecoderLayer {
    fn new(cfg: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        let (h, i) = (cfg.lm_hidden, cfg.lm_intermediate);
        Ok(Self {
            input_norm: RmsNorm::new(h, RMS_EPS, vb.pp("input_layernorm"))?,
            attn: Attention::new(h, cfg.lm_heads, cfg.lm_kv_heads, true, vb.pp("self_attn"))?,
            post_norm: RmsNorm::new(h, RMS_EPS, vb.pp("post_attention_layernorm"))?,
            gate: linear_no_bias(h, i, vb.pp("mlp.gate_proj"))?,
            up: linear_no_bias(h, i, vb.pp("mlp.up_proj"))?,
            down: linear_no_bias(i, h, vb.pp("mlp.down_proj"))?,
        })
    }

    fn forward(&self, x: &Tensor, rope: &Rope, mask: &Tensor) -> Result<Tensor> {
        let h = (x + self
            .attn
            .forward(&self.input_norm.forward(x)?, Some(rope), Some(mask))?)?;
        let n = self.post_norm.forward(&h)?;
        let swiglu = (self.gate.forward(&n)?.silu()? * self.up.forward(&n)?)?;
        h + self.down.forward(&swiglu)?
    }
}

/// The decoder LM: token embeddings, Qwen2 layers, final norm, LM head.
#[derive(Debug, Clone)]
struct Lm {
    embed: Tensor,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    /// `None` when the LM head is tied to the token embeddings (small Qwen2 models do this).
    head: Option<Linear>,
    rope: Rope,
}

/// Longest prompt the rotary tables cover.
const MAX_SEQ: usize = 128;

impl Lm {
    fn new(cfg: &ModelConfig, vocab: usize, vb: VarBuilder) -> Result<Self> {
        let h = cfg.lm_hidden;
        Ok(Self {
            embed: vb.get((vocab, h), "model.embed_tokens.weight")?,
            layers: (0..cfg.lm_layers)
                .map(|i| DecoderLayer::new(cfg, vb.pp(format!("model.layers.{i}"))))
                .collect::<Result<_>>()?,
            norm: RmsNorm::new(h, RMS_EPS, vb.pp("model.norm"))?,
            head: if cfg.tie_embeddings {
                None
            } else {
                Some(linear_no_bias(h, vocab, vb.pp("lm_head"))?)
            },
            rope: Rope::new(h / cfg.lm_heads, MAX_SEQ, cfg.rope_theta, vb.device())?
                .into_dtype(vb.dtype())?,
        })
    }

    /// Logits at positions `at`: [B, at.len(), vocab].
    fn forward_at(&self, x: Tensor, at: &[usize]) -> Result<Tensor> {
        let (_, s, _) = x.dims3()?;
        let mask = causal_mask(s, x.device())?.to_dtype(x.dtype())?;
        let mut x = x;
        for layer in &self.layers {
            x = layer.forward(&x, &self.rope, &mask)?;
        }
        let picked: Vec<Tensor> = at
            .iter()
            .map(|&p| x.narrow(1, p, 1))
            .collect::<Result<_>>()?;
        let h = self.norm.forward(&Tensor::cat(&picked, 1)?)?;
        match &self.head {
            Some(head) => head.forward(&h),
            None => h.broadcast_matmul(&self.embed.t()?),
        }
    }
}

#[derive(Debug, Clone)]
enum Tower {
    Audio(AudioEncoder),
    Visual(VisualEncoder),
}

/// A stand-in model: modality tower + projector/merger + decoder LM.
#[derive(Debug, Clone)]
pub struct Model {
    tower: Tower,
    lm: Lm,
    pub vocab: Vocab,
    pub modality: Modality,
    pub mm_tokens: usize,
}

/// Input shape facts the model needs beyond its own config.
#[derive(Debug, Clone, Copy)]
pub struct InputShape {
    pub n_mels: usize,
    pub frames: usize,
    pub frame_size: usize,
}

impl Model {
    pub fn new(
        modality: Modality,
        cfg: &ModelConfig,
        input: InputShape,
        vocab: Vocab,
        vb: VarBuilder,
    ) -> Result<Self> {
        let (tower, mm_tokens) = match modality {
            Modality::Audio => (
                Tower::Audio(AudioEncoder::new(cfg, input.n_mels, vb.pp("audio_tower"))?),
                cfg.modality_tokens,
            ),
            Modality::Visual => {
                check_visual(cfg, input)?;
                let grid = input.frame_size / cfg.patch;
                let tokens = (input.frames / TEMPORAL_PATCH) * grid * grid / 4;
                let enc = VisualEncoder::new(cfg, input.frames, input.frame_size, vb.pp("visual"))?;
                (Tower::Visual(enc), tokens)
            }
        };
        Ok(Self {
            tower,
            lm: Lm::new(cfg, vocab.size(), vb.pp("language_model"))?,
            vocab,
            modality,
            mm_tokens,
        })
    }

    /// `features`: [B, frames, mels] (audio) or [B, T, 3, S, S] (visual); `prompts`: [B, seq]
    /// token ids with `mm_tokens` placeholders. Returns logits at the answer position [B, vocab].
    pub fn forward(&self, features: &Tensor, prompts: &Tensor) -> Result<Tensor> {
        let (_, seq) = prompts.dims2()?;
        self.forward_at(features, prompts, &[seq - 1])?
            .squeeze(1)?
            .contiguous()
    }

    /// Answer logits and caption logits, both [B, vocab]. The caption logits are the LM's
    /// prediction right after `<mm_end>`: under the causal mask they depend on the prefix
    /// `<bos> <mm_start> modality <mm_end>` only, so they are exactly what a captioning pass
    /// over that prefix would give (the alignment objective of the real families' first
    /// pretraining stage), at no extra forward.
    pub fn forward_with_caption(
        &self,
        features: &Tensor,
        prompts: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let (_, seq) = prompts.dims2()?;
        let caption_at = self.vocab.mm_offset() + self.mm_tokens;
        let both = self.forward_at(features, prompts, &[seq - 1, caption_at])?;
        let pick = |i: usize| both.narrow(1, i, 1)?.squeeze(1)?.contiguous();
        Ok((pick(0)?, pick(1)?))
    }

    /// Logits in f32 whatever the model's dtype: a frozen model may run in bf16 on a GPU
    /// (`Rank::build_frozen`), and the features come in f32.
    fn forward_at(&self, features: &Tensor, prompts: &Tensor, at: &[usize]) -> Result<Tensor> {
        let features = features.to_dtype(self.lm.embed.dtype())?;
        let mm = match &self.tower {
            Tower::Audio(enc) => enc.forward(&features)?,
            Tower::Visual(enc) => enc.forward(&features)?,
        };
        let (b, seq) = prompts.dims2()?;
        let h = mm.dim(2)?;
        let embeds = self
            .lm
            .embed
            .index_select(&prompts.flatten_all()?, 0)?
            .reshape((b, seq, h))?;
        let start = self.vocab.mm_offset();
        let end = start + self.mm_tokens;
        let x = Tensor::cat(
            &[
                &embeds.narrow(1, 0, start)?,
                &mm,
                &embeds.narrow(1, end, seq - end)?,
            ],
            1,
        )?;
        self.lm.forward_at(x, at)?.to_dtype(DType::F32)
    }
}

fn check_visual(cfg: &ModelConfig, input: InputShape) -> Result<()> {
    let ok = cfg.patch > 0
        && input.frame_size.is_multiple_of(2 * cfg.patch)
        && input.frames.is_multiple_of(TEMPORAL_PATCH);
    if !ok {
        candle_core::bail!(
            "visual model needs frame_size ({}) a multiple of 2 x patch ({}) and an even frame count ({})",
            input.frame_size,
            cfg.patch,
            input.frames
        );
    }
    Ok(())
}

/// Parameters that are never trained (see `Attention::new`).
pub fn is_frozen(name: &str) -> bool {
    name.ends_with("k_proj.bias")
}

/// Deterministic initialisation from (seed, parameter name): the same bytes on every rank and
/// in every run, whatever order the parameters were created in. Norm weights start at one,
/// biases at zero, matrices normal with std 1/sqrt(fan-in).
pub fn init_params(varmap: &candle_nn::VarMap, seed: u64) -> Result<()> {
    use rand::SeedableRng;
    use rand_distr_free::normal;
    let data = varmap.data().lock().expect("varmap lock");
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for name in names {
        let var = &data[name];
        let dims = var.dims().to_vec();
        let n: usize = dims.iter().product();
        let values: Vec<f32> = if dims.len() == 1 {
            let is_norm = name.ends_with("weight");
            vec![if is_norm { 1.0 } else { 0.0 }; n]
        } else {
            let fan_in: usize = dims[1..].iter().product();
            let std = 1.0 / (fan_in as f32).sqrt();
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ name_hash(name));
            (0..n).map(|_| normal(&mut rng) * std).collect()
        };
        var.set(&Tensor::from_vec(values, dims, var.device())?.to_dtype(DType::F32)?)?;
    }
    Ok(())
}

fn name_hash(name: &str) -> u64 {
    // FNV-1a: stable across Rust versions, unlike DefaultHasher.
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

mod rand_distr_free {
    use rand::Rng;
    /// Standard normal by Box-Muller (rand 0.9 keeps distributions in another crate).
    pub fn normal(rng: &mut impl Rng) -> f32 {
        let u1: f32 = rng.random::<f32>().max(f32::MIN_POSITIVE);
        let u2: f32 = rng.random();
        (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
    }
}

#[cfg(test)]
mod tests;
