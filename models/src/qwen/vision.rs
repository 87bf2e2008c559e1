//! Qwen2-VL: the vision transformer (patch embedding of 2 x 14 x 14 RGB patches, 2-D rotary
//! attention inside each frame group, pre-LN blocks, the 2x2 patch merger into the LM's width),
//! the image processor's normalisation and patch order, the image/video placeholder expansion,
//! M-RoPE's 3-D position ids, and the Qwen2 decoder.

use std::path::Path;

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Linear, VarBuilder};

use super::config::{Qwen2VlConfig, VisionConfig};
use super::decoder::{inverse_frequencies, scatter_placeholders, Decoder, Position};
use super::lora::{LoraAdapters, LoraConfig, LoraTarget};
use super::resize::resize_bicubic;
use super::weights::{read_config, LoadError, Weights};
use crate::nn::{activation, apply_rotary, softmax, LayerNorm};

/// The ViT's and the merger's LayerNorm epsilon.
const LN_EPS: f64 = 1e-6;

/// Patches of images or of videos: `[N, channels * temporal * patch * patch]` rows in the
/// processor's order, and one (t, h, w) patch grid per image or video.
#[derive(Debug, Clone)]
pub struct VisionInput {
    pub patches: Tensor,
    pub grids: Vec<[usize; 3]>,
}

/// What Qwen2VLImageProcessor does to frames whose size is already a multiple of
/// `patch * merge`: rescale, normalise with the CLIP mean and std, cut patches.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageProcessor {
    pub mean: [f32; 3],
    pub std: [f32; 3],
    pub rescale_factor: f64,
    pub patch_size: usize,
    pub merge_size: usize,
    pub temporal_patch_size: usize,
    pub min_pixels: usize,
    pub max_pixels: usize,
}

impl Default for ImageProcessor {
    fn default() -> Self {
        Self {
            mean: [0.481_454_66, 0.457_827_5, 0.408_210_73],
            std: [0.268_629_54, 0.261_302_6, 0.275_777_1],
            rescale_factor: 1.0 / 255.0,
            patch_size: 14,
            merge_size: 2,
            temporal_patch_size: 2,
            min_pixels: 56 * 56,
            max_pixels: 28 * 28 * 1280,
        }
    }
}

#[derive(Debug, serde::Deserialize)]
struct RawProcessor {
    image_mean: [f32; 3],
    image_std: [f32; 3],
    rescale_factor: f64,
    patch_size: usize,
    merge_size: usize,
    temporal_patch_size: usize,
    min_pixels: usize,
    max_pixels: usize,
}

impl ImageProcessor {
    /// Reads a `preprocessor_config.json` of Qwen2VLImageProcessor.
    pub fn from_json(text: &str) -> std::result::Result<Self, String> {
        let r: RawProcessor = serde_json::from_str(text).map_err(|e| e.to_string())?;
        Ok(Self {
            mean: r.image_mean,
            std: r.image_std,
            rescale_factor: r.rescale_factor,
            patch_size: r.patch_size,
            merge_size: r.merge_size,
            temporal_patch_size: r.temporal_patch_size,
            min_pixels: r.min_pixels,
            max_pixels: r.max_pixels,
        })
    }

    /// The size (height, width) the processor resizes an `h x w` picture to: multiples of
    /// `patch * merge`, as close to the original as the pixel bounds allow. Ties round to
    /// even, as Python's `round` does.
    pub fn smart_resize(&self, h: usize, w: usize) -> Result<(usize, usize)> {
        let f = (self.patch_size * self.merge_size) as f64;
        let (hf, wf) = (h as f64, w as f64);
        if h < f as usize || w < f as usize {
            candle_core::bail!("{h}x{w} is smaller than the {f} pixel factor");
        }
        if hf.max(wf) / hf.min(wf) > 200.0 {
            candle_core::bail!("{h}x{w}: aspect ratio over 200");
        }
        let mut hb = (hf / f).round_ties_even() * f;
        let mut wb = (wf / f).round_ties_even() * f;
        if hb * wb > self.max_pixels as f64 {
            let beta = (hf * wf / self.max_pixels as f64).sqrt();
            hb = (hf / beta / f).floor() * f;
            wb = (wf / beta / f).floor() * f;
        } else if hb * wb < self.min_pixels as f64 {
            let beta = (self.min_pixels as f64 / (hf * wf)).sqrt();
            hb = (hf * beta / f).ceil() * f;
            wb = (wf * beta / f).ceil() * f;
        }
        Ok((hb as usize, wb as usize))
    }

    /// Resizes `frames` (`h x w x 3` bytes each) to the size `smart_resize` gives, as the
    /// reference does (Pillow's bicubic), then cuts them into patches (`patches`).
    pub fn preprocess(
        &self,
        frames: &[&[u8]],
        h: usize,
        w: usize,
    ) -> Result<(Vec<f32>, [usize; 3])> {
        let (rh, rw) = self.smart_resize(h, w)?;
        if frames.iter().any(|f| f.len() != h * w * 3) {
            candle_core::bail!("frames must be {h} x {w} x 3 bytes each");
        }
        let resized: Vec<Vec<u8>> = frames
            .iter()
            .map(|f| resize_bicubic(f, h, w, rh, rw))
            .collect();
        let refs: Vec<&[u8]> = resized.iter().map(Vec::as_slice).collect();
        self.patches(&refs, rh, rw)
    }

    /// Patches `[t/2 * h/14 * w/14, 3 * 2 * 14 * 14]` and their grid for `frames` RGB frames
    /// (`h x w x 3` bytes each; one frame for an image, which is repeated to fill the temporal
    /// patch, as the last frame of a video with an odd count is). The frames must already have
    /// the size `smart_resize` gives (`preprocess` resizes them first).
    pub fn patches(&self, frames: &[&[u8]], h: usize, w: usize) -> Result<(Vec<f32>, [usize; 3])> {
        let (p, m, tp) = (self.patch_size, self.merge_size, self.temporal_patch_size);
        if frames.is_empty() || frames.iter().any(|f| f.len() != h * w * 3) {
            candle_core::bail!("frames must be {h} x {w} x 3 bytes each");
        }
        if self.smart_resize(h, w)? != (h, w) {
            candle_core::bail!("{h}x{w} is not a processor size; use preprocess");
        }
        let t = frames.len().div_ceil(tp) * tp;
        let normed: Vec<Vec<f32>> = (0..t)
            .map(|i| self.normalise(frames[i.min(frames.len() - 1)], h * w))
            .collect();
        let (gt, gh, gw) = (t / tp, h / p, w / p);
        let mut out = Vec::with_capacity(t * h * w * 3);
        for ti in 0..gt {
            for bh in 0..gh / m {
                for bw in 0..gw / m {
                    for mi in 0..m {
                        for mj in 0..m {
                            let (y0, x0) = ((bh * m + mi) * p, (bw * m + mj) * p);
                            for c in 0..3 {
                                for k in 0..tp {
                                    let plane = &normed[ti * tp + k][c * h * w..(c + 1) * h * w];
                                    for y in y0..y0 + p {
                                        out.extend_from_slice(&plane[y * w + x0..y * w + x0 + p]);
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        Ok((out, [gt, gh, gw]))
    }

    /// Channel-first `[3, h, w]` f32: `(byte * rescale, in f64, then f32 - mean) / std`,
    /// the operations and precisions of the reference processor.
    fn normalise(&self, frame: &[u8], pixels: usize) -> Vec<f32> {
        let mut out = vec![0f32; 3 * pixels];
        for (i, px) in frame.chunks_exact(3).enumerate() {
            for c in 0..3 {
                let x = (px[c] as f64 * self.rescale_factor) as f32;
                out[c * pixels + i] = (x - self.mean[c]) / self.std[c];
            }
        }
        out
    }
}

#[derive(Debug, Clone)]
struct VisionAttention {
    qkv: Linear,
    proj: Linear,
    heads: usize,
}

impl VisionAttention {
    /// `x`: `[N, E]`; attention only inside each `(start, len)` segment (one frame group).
    fn forward(
        &self,
        x: &Tensor,
        rope: &(Tensor, Tensor),
        segments: &[(usize, usize)],
    ) -> Result<Tensor> {
        let (n, e) = x.dims2()?;
        let d = e / self.heads;
        let qkv = self.qkv.forward(x)?.reshape((n, 3, self.heads, d))?;
        let part = |i: usize| -> Result<Tensor> { qkv.narrow(1, i, 1)?.squeeze(1) };
        let (cos, sin) = rope;
        let q = apply_rotary(&part(0)?, cos, sin)?
            .transpose(0, 1)?
            .contiguous()?;
        let k = apply_rotary(&part(1)?, cos, sin)?
            .transpose(0, 1)?
            .contiguous()?;
        let v = part(2)?.transpose(0, 1)?.contiguous()?;
        let scale = 1.0 / (d as f64).sqrt();
        let outs: Vec<Tensor> = segments
            .iter()
            .map(|&(start, len)| {
                let q = q.narrow(1, start, len)?;
                let k = k.narrow(1, start, len)?;
                let v = v.narrow(1, start, len)?;
                softmax(&(q.matmul(&k.t()?)? * scale)?)?.matmul(&v)
            })
            .collect::<Result<_>>()?;
        let out = Tensor::cat(&outs, 1)?.transpose(0, 1)?.reshape((n, e))?;
        self.proj.forward(&out)
    }
}

#[derive(Debug, Clone)]
struct VisionBlock {
    norm1: LayerNorm,
    attn: VisionAttention,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    act: String,
}

impl VisionBlock {
    fn new(cfg: &VisionConfig, vb: VarBuilder) -> Result<Self> {
        let e = cfg.embed_dim;
        let hidden = (e as f64 * cfg.mlp_ratio) as usize;
        Ok(Self {
            norm1: LayerNorm::new(e, LN_EPS, vb.pp("norm1"))?,
            attn: VisionAttention {
                qkv: candle_nn::linear(e, 3 * e, vb.pp("attn.qkv"))?,
                proj: candle_nn::linear(e, e, vb.pp("attn.proj"))?,
                heads: cfg.num_heads,
            },
            norm2: LayerNorm::new(e, LN_EPS, vb.pp("norm2"))?,
            fc1: candle_nn::linear(e, hidden, vb.pp("mlp.fc1"))?,
            fc2: candle_nn::linear(hidden, e, vb.pp("mlp.fc2"))?,
            act: cfg.hidden_act.clone(),
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        rope: &(Tensor, Tensor),
        segments: &[(usize, usize)],
    ) -> Result<Tensor> {
        let x = (x + self.attn.forward(&self.norm1.forward(x)?, rope, segments)?)?;
        let m = activation(&self.act, &self.fc1.forward(&self.norm2.forward(&x)?)?)?;
        x + self.fc2.forward(&m)?
    }
}

/// The vision tower (`visual.*`): patches -> merged tokens `[N / merge^2, LM hidden]`.
#[derive(Debug, Clone)]
pub struct VisionTower {
    patch_embed: Tensor,
    blocks: Vec<VisionBlock>,
    merger_norm: LayerNorm,
    merger_fc1: Linear,
    merger_fc2: Linear,
    cfg: VisionConfig,
}

impl VisionTower {
    pub fn new(cfg: &VisionConfig, vb: VarBuilder) -> Result<Self> {
        let (e, p, tp) = (cfg.embed_dim, cfg.patch_size, cfg.temporal_patch_size);
        let merged = e * cfg.spatial_merge_size * cfg.spatial_merge_size;
        // The Conv3d's kernel equals its stride: one matmul over flattened patches.
        let conv = vb.get((e, cfg.in_channels, tp, p, p), "patch_embed.proj.weight")?;
        Ok(Self {
            patch_embed: conv.reshape((e, cfg.patch_len()))?,
            blocks: (0..cfg.depth)
                .map(|i| VisionBlock::new(cfg, vb.pp(format!("blocks.{i}"))))
                .collect::<Result<_>>()?,
            merger_norm: LayerNorm::new(e, LN_EPS, vb.pp("merger.ln_q"))?,
            merger_fc1: candle_nn::linear(merged, merged, vb.pp("merger.mlp.0"))?,
            merger_fc2: candle_nn::linear(merged, cfg.hidden_size, vb.pp("merger.mlp.2"))?,
            cfg: cfg.clone(),
        })
    }

    pub fn forward(&self, input: &VisionInput) -> Result<Tensor> {
        let n: usize = input.grids.iter().map(|g| g[0] * g[1] * g[2]).sum();
        let dtype = self.patch_embed.dtype();
        let patches = input.patches.to_dtype(dtype)?;
        if patches.dims2()? != (n, self.cfg.patch_len()) {
            candle_core::bail!(
                "patches {:?} do not match grids {:?}",
                patches.shape(),
                input.grids
            );
        }
        let mut x = patches.matmul(&self.patch_embed.t()?)?;
        let (cos, sin) = self.rotary_tables(&input.grids, x.device())?;
        let rope = (cos.to_dtype(dtype)?, sin.to_dtype(dtype)?);
        let segments = frame_segments(&input.grids);
        for block in &self.blocks {
            x = block.forward(&x, &rope, &segments)?;
        }
        let e = self.cfg.embed_dim * self.cfg.spatial_merge_size * self.cfg.spatial_merge_size;
        let x = self
            .merger_norm
            .forward(&x)?
            .reshape((n * self.cfg.embed_dim / e, e))?;
        self.merger_fc2
            .forward(&self.merger_fc1.forward(&x)?.gelu_erf()?)
    }

    /// cos and sin `[N, 1, head_dim]`: the first quarter of the frequencies turns with the
    /// patch's row, the second with its column, and the second half repeats the first.
    fn rotary_tables(&self, grids: &[[usize; 3]], dev: &Device) -> Result<(Tensor, Tensor)> {
        let d = self.cfg.head_dim();
        let inv = inverse_frequencies(self.cfg.rope_theta, d / 2);
        let m = self.cfg.spatial_merge_size;
        let mut angles = Vec::new();
        for &[t, h, w] in grids {
            for _ in 0..t {
                for (row, col) in merge_order(h, w, m) {
                    let mut first: Vec<f32> = inv.iter().map(|f| row as f32 * f).collect();
                    first.extend(inv.iter().map(|f| col as f32 * f));
                    angles.extend_from_slice(&first);
                    angles.extend_from_slice(&first);
                }
            }
        }
        let n = angles.len() / d;
        let cos: Vec<f32> = angles.iter().map(|a| a.cos()).collect();
        let sin: Vec<f32> = angles.iter().map(|a| a.sin()).collect();
        Ok((
            Tensor::from_vec(cos, (n, 1, d), dev)?,
            Tensor::from_vec(sin, (n, 1, d), dev)?,
        ))
    }
}

/// (row, column) of each patch of an `h x w` grid in the processor's order: `m x m` windows
/// row by row, and the patches of a window row by row, so each window's patches are adjacent.
fn merge_order(h: usize, w: usize, m: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..h / m).flat_map(move |bh| {
        (0..w / m).flat_map(move |bw| {
            (0..m).flat_map(move |i| (0..m).map(move |j| (bh * m + i, bw * m + j)))
        })
    })
}

/// Patches attend within their frame group: one segment of `h * w` patches per temporal step.
fn frame_segments(grids: &[[usize; 3]]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut start = 0;
    for &[t, h, w] in grids {
        for _ in 0..t {
            out.push((start, h * w));
            start += h * w;
        }
    }
    out
}

/// Qwen2-VL: vision tower and decoder.
#[derive(Debug, Clone)]
pub struct Qwen2Vl {
    pub config: Qwen2VlConfig,
    visual: VisionTower,
    lm: Decoder,
}

impl Qwen2Vl {
    pub fn new(config: Qwen2VlConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            visual: VisionTower::new(&config.vision, vb.pp("visual"))?,
            lm: Decoder::new(&config.text, vb.clone())?,
            config,
        })
    }

    pub fn read_config(dir: &Path) -> std::result::Result<Qwen2VlConfig, LoadError> {
        let (path, text) = read_config(dir)?;
        Qwen2VlConfig::from_json(&text).map_err(|message| LoadError::Config { path, message })
    }

    pub fn load(dir: &Path, weights: &Weights) -> std::result::Result<Self, LoadError> {
        Ok(Self::new(Self::read_config(dir)?, weights.var_builder())?)
    }

    /// The language model's projections `lora` targets (vision tower excluded).
    pub fn lora_targets(&mut self, lora: &LoraConfig) -> Result<Vec<LoraTarget>> {
        self.lm.lora_targets(lora, "")
    }

    /// Fresh adapters (`A` drawn from `seed`, `B` zero) on the projections `lora` targets.
    pub fn init_lora(&mut self, lora: LoraConfig, seed: u64) -> Result<LoraAdapters> {
        let targets = self.lora_targets(&lora)?;
        let device = self.lm.device();
        let adapters = LoraAdapters::init(lora, "", &targets, seed, &device)?;
        self.lm.attach_lora(&adapters, "")?;
        Ok(adapters)
    }

    /// Puts saved or fresh adapters on the language model.
    pub fn attach_lora(&mut self, adapters: &LoraAdapters) -> Result<()> {
        self.lm.attach_lora(adapters, "")
    }

    /// Training mode turns LoRA dropout on.
    pub fn set_training(&mut self, training: bool) {
        self.lm.set_training(training);
    }

    pub fn visual(&self) -> &VisionTower {
        &self.visual
    }

    /// LM tokens one image or video of patch grid `grid` takes.
    pub fn tokens_for(&self, grid: [usize; 3]) -> usize {
        let m = self.config.vision.spatial_merge_size;
        grid[0] * grid[1] * grid[2] / (m * m)
    }

    /// Logits `[B, S, vocab]` (f32) for prompts `[B, S]` whose image and video placeholders
    /// are expanded (`tokens_for` each), with the images' and videos' patches in prompt order.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        images: Option<&VisionInput>,
        videos: Option<&VisionInput>,
    ) -> Result<Tensor> {
        self.forward_at(input_ids, images, videos, None)
    }

    /// As `forward`; with `at`, only prompt i's position `at[i]`: `[B, vocab]`
    /// (`Decoder::forward_at`).
    pub fn forward_at(
        &self,
        input_ids: &Tensor,
        images: Option<&VisionInput>,
        videos: Option<&VisionInput>,
        at: Option<&[usize]>,
    ) -> Result<Tensor> {
        let (b, s) = input_ids.dims2()?;
        let ids: Vec<u32> = input_ids.flatten_all()?.to_dtype(DType::U32)?.to_vec1()?;
        let mut x = self.lm.embed_tokens(input_ids)?;
        if let Some(images) = images {
            let feats = self.visual.forward(images)?;
            x = scatter_placeholders(&x, &ids, self.config.image_token_id, &feats)?;
        }
        if let Some(videos) = videos {
            let feats = self.visual.forward(videos)?;
            x = scatter_placeholders(&x, &ids, self.config.video_token_id, &feats)?;
        }
        let rows: Vec<Vec<u32>> = ids.chunks(s).map(<[u32]>::to_vec).collect();
        let grids = |v: Option<&VisionInput>| v.map(|v| v.grids.clone()).unwrap_or_default();
        let positions = self.rope_index(&rows, &grids(images), &grids(videos))?;
        debug_assert_eq!(positions.len(), b);
        self.lm.forward_at(&x, &positions, at)?.to_dtype(DType::F32)
    }

    /// M-RoPE position ids of each prompt. A text token takes the next position on all three
    /// axes; a run of image (video) placeholders takes the next grid in batch order, and its
    /// token at (t, row, col) of the merged grid gets `next + (t, row, col)`; text after it
    /// continues from one past the largest id given.
    pub fn rope_index(
        &self,
        rows: &[Vec<u32>],
        image_grids: &[[usize; 3]],
        video_grids: &[[usize; 3]],
    ) -> Result<Vec<Vec<Position>>> {
        let m = self.config.vision.spatial_merge_size;
        let (image, video) = (self.config.image_token_id, self.config.video_token_id);
        let mut grids = [image_grids.iter(), video_grids.iter()];
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let mut positions = Vec::with_capacity(row.len());
            let mut next = 0u32;
            let mut i = 0;
            while i < row.len() {
                let kind = [image, video].iter().position(|&t| t == row[i]);
                let Some(kind) = kind else {
                    positions.push([next; 3]);
                    next += 1;
                    i += 1;
                    continue;
                };
                let Some(&[t, h, w]) = grids[kind].next() else {
                    candle_core::bail!("more {} runs than grids", ["image", "video"][kind]);
                };
                let (h, w) = (h / m, w / m);
                let token = [image, video][kind];
                let run = row.get(i..i + t * h * w);
                if !run.is_some_and(|r| r.iter().all(|&id| id == token)) {
                    candle_core::bail!(
                        "a {t}x{h}x{w} grid needs {} placeholders in a row",
                        t * h * w
                    );
                }
                for ti in 0..t as u32 {
                    for r in 0..h as u32 {
                        positions.extend((0..w as u32).map(|c| [next + ti, next + r, next + c]));
                    }
                }
                i += t * h * w;
                next += t.max(h).max(w) as u32;
            }
            out.push(positions);
        }
        if grids.iter_mut().any(|g| g.next().is_some()) {
            candle_core::bail!("more grids than vision runs in the prompts");
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Expected sizes from transformers 4.51.3:
    /// `from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize;
    ///  [smart_resize(h, w) for h, w in cases]`.
    #[test]
    fn smart_resize_matches_the_reference() {
        let p = ImageProcessor::default();
        let cases = [
            ((151, 175), (140, 168)),
            ((84, 112), (84, 112)),
            ((30, 30), (56, 56)),
            ((1000, 2000), (700, 1400)),
            ((4000, 3000), (1148, 840)),
            ((28, 500), (28, 504)),
        ];
        for ((h, w), want) in cases {
            assert_eq!(p.smart_resize(h, w).unwrap(), want, "{h}x{w}");
        }
        assert!(p.smart_resize(27, 100).is_err());
        assert!(p.smart_resize(28, 28 * 201).is_err());
    }

    #[test]
    fn merge_order_keeps_windows_adjacent() {
        let order: Vec<_> = merge_order(2, 4, 2).collect();
        assert_eq!(
            order,
            vec![
                (0, 0),
                (0, 1),
                (1, 0),
                (1, 1),
                (0, 2),
                (0, 3),
                (1, 2),
                (1, 3)
            ]
        );
        assert_eq!(
            frame_segments(&[[2, 2, 4], [1, 4, 4]]),
            vec![(0, 8), (8, 8), (16, 16)]
        );
    }
}
