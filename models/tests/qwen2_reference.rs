//! Qwen2-Audio and Qwen2-VL against transformers, on the tiny random checkpoints and real
//! inputs that tests/reference/make_qwen2_fixtures.py writes (torch 2.7.0, transformers 4.51.3),
//! and the same checkpoints under the config.json transformers 5 writes
//! (tests/reference/make_tf5_configs.py, transformers 5.25.0).
//!
//! Tolerances (issue 4): processor outputs to 1e-4 absolute; logits to 1e-4 relative at every
//! position (the largest difference over the vocabulary divided by the largest reference
//! logit at that position); gradients to 1e-3 relative (largest difference over the largest
//! reference entry of the tensor). Every check prints what it measured.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use common::{case, fixtures, max_abs};
use xkd_data::features::LogMel;
use xkd_models::qwen::{ImageProcessor, Qwen2Audio, Qwen2Vl, VisionInput, Weights};

/// Largest |got - want| over the largest |want|.
fn relative(got: &Tensor, want: &Tensor) -> f32 {
    assert_eq!(got.dims(), want.dims());
    max_abs(&(got - want).unwrap()) / max_abs(want)
}

/// `relative` at each position of `[1, S, V]` logits; the worst one.
fn worst_position(got: &Tensor, want: &Tensor) -> (usize, f32) {
    assert_eq!(got.dims(), want.dims(), "logit shapes");
    let (_, s, _) = want.dims3().unwrap();
    (0..s)
        .map(|p| {
            let g = got.get(0).unwrap().get(p).unwrap();
            let w = want.get(0).unwrap().get(p).unwrap();
            (p, relative(&g, &w))
        })
        .fold((0, 0.0), |a, b| if b.1 > a.1 { b } else { a })
}

/// A model's logits at single positions (`forward_at`, `[1, V]`) against the reference's at
/// the first, a middle and the last position.
fn check_forward_at(at: impl Fn(usize) -> Tensor, want: &Tensor, what: &str) {
    let (_, s, _) = want.dims3().unwrap();
    for p in [0, s / 2, s - 1] {
        let got = at(p);
        let err = relative(&got.get(0).unwrap(), &want.get(0).unwrap().get(p).unwrap());
        assert!(
            err <= 1e-4,
            "{what} forward_at position {p}: relative error {err}"
        );
    }
}

fn ids(t: &Tensor) -> Tensor {
    t.to_dtype(DType::U32).unwrap()
}

fn to_usizes(t: &Tensor) -> Vec<usize> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|v| v as usize)
        .collect()
}

// ---------------------------------------------------------------------------------------
// Qwen2-Audio

const AUDIO_DIR: &str = "qwen2-audio-tiny";
const AUDIO_CASE: &str = "qwen2_audio_case.safetensors";

fn audio_inputs(c: &HashMap<String, Tensor>) -> (Tensor, Vec<usize>) {
    let valid: Vec<usize> = (0..2)
        .map(|i| {
            let row = c["feature_attention_mask"].get(i).unwrap();
            row.sum_all().unwrap().to_scalar::<i64>().unwrap() as usize
        })
        .collect();
    (c["input_features"].clone(), valid)
}

#[test]
fn whisper_log_mel_matches_the_feature_extractor() {
    let c = case(AUDIO_CASE);
    let mel = LogMel::new(16000, 400, 160, 128);
    let (_, valid) = audio_inputs(&c);
    for (i, &want_valid) in valid.iter().enumerate() {
        let wav: Vec<f32> = c[&format!("wav.{i}")].to_vec1().unwrap();
        let (spec, frames) = mel.compute_window(&wav, 32000);
        assert_eq!(frames, want_valid, "clip {i}: valid frames");
        let got = Tensor::from_vec(spec, (200, 128), &Device::Cpu)
            .unwrap()
            .t()
            .unwrap();
        let want = c["input_features"].get(i).unwrap();
        let err = max_abs(&(got - &want).unwrap());
        eprintln!("log-mel clip {i}: max abs error {err:.3e} ({frames} valid frames)");
        assert!(err <= 1e-4, "clip {i}: log-mel max abs error {err}");
    }
}

fn audio_model(trainable: &[&str]) -> (Qwen2Audio, Vec<candle_core::Var>) {
    let dir = fixtures().join(AUDIO_DIR);
    let mut weights = Weights::load(&dir, DType::F32, &Device::Cpu).unwrap();
    let vars = trainable
        .iter()
        .map(|n| weights.trainable(n).unwrap())
        .collect();
    (Qwen2Audio::load(&dir, &weights).unwrap(), vars)
}

#[test]
fn qwen2_audio_logits_match_transformers() {
    let c = case(AUDIO_CASE);
    let (model, _) = audio_model(&[]);
    let (features, valid) = audio_inputs(&c);
    let embeds = model.audio_embeds(&features, &valid).unwrap();
    let err = relative(&embeds, &c["audio_embeds"]);
    eprintln!(
        "qwen2-audio audio tokens {:?}: relative error {err:.3e}",
        embeds.dims()
    );
    assert!(err <= 1e-4, "audio embeddings relative error {err}");

    let logits = model
        .forward(&ids(&c["input_ids"]), &features, &valid)
        .unwrap();
    let (at, err) = worst_position(&logits, &c["logits"]);
    eprintln!(
        "qwen2-audio logits {:?}: worst position {at}, relative error {err:.3e}",
        logits.dims()
    );
    assert!(err <= 1e-4, "logits at position {at}: relative error {err}");
    let input_ids = ids(&c["input_ids"]);
    let at = |p: usize| {
        model
            .forward_at(&input_ids, &features, &valid, Some(&[p]))
            .unwrap()
    };
    check_forward_at(at, &c["logits"], "qwen2-audio");
}

const AUDIO_GRADS: [&str; 4] = [
    "language_model.model.layers.0.self_attn.q_proj.weight",
    "language_model.model.layers.0.self_attn.v_proj.weight",
    "language_model.model.layers.1.self_attn.q_proj.weight",
    "language_model.model.layers.1.self_attn.v_proj.weight",
];

#[test]
fn qwen2_audio_gradients_match_transformers() {
    let c = case(AUDIO_CASE);
    let (model, vars) = audio_model(&AUDIO_GRADS);
    let (features, valid) = audio_inputs(&c);
    let logits = model
        .forward(&ids(&c["input_ids"]), &features, &valid)
        .unwrap();
    let loss = (logits * &c["loss_weights"]).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    for (name, var) in AUDIO_GRADS.iter().zip(&vars) {
        let got = grads.get(var.as_tensor()).expect("a gradient");
        let err = relative(got, &c[&format!("grad.{name}")]);
        eprintln!("qwen2-audio grad {name}: relative error {err:.3e}");
        assert!(err <= 1e-3, "{name}: gradient relative error {err}");
    }
}

/// Rows `[..n]` of `[1, S, V]` logits at positions `0..n`.
fn head(t: &Tensor, row: usize, n: usize) -> Tensor {
    t.narrow(0, row, 1).unwrap().narrow(1, 0, n).unwrap()
}

/// `[B, S]` ids of `rows`, right-padded with token 0 to the longest.
fn right_padded(rows: &[Vec<u32>]) -> Tensor {
    let s = rows.iter().map(Vec::len).max().unwrap();
    let flat: Vec<u32> = rows
        .iter()
        .flat_map(|r| r.iter().copied().chain(std::iter::repeat(0)).take(s))
        .collect();
    Tensor::from_vec(flat, (rows.len(), s), &Device::Cpu).unwrap()
}

/// A batch of prompts of different lengths, right-padded: under the causal mask the padding
/// comes after every real token, so each prompt's logits are those it has alone.
#[test]
fn qwen2_audio_right_padded_batch_gives_each_prompts_own_logits() {
    let c = case(AUDIO_CASE);
    let (model, _) = audio_model(&[]);
    let (features, valid) = audio_inputs(&c);
    let full: Vec<u32> = ids(&c["input_ids"])
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    // The first clip's prompt only: up to three tokens after its placeholders.
    let short = full[..60].to_vec();
    let batch_features = Tensor::cat(&[&features, &features.narrow(0, 0, 1).unwrap()], 0).unwrap();
    let batch_valid = [valid[0], valid[1], valid[0]];
    let logits = model
        .forward(
            &right_padded(&[full.clone(), short.clone()]),
            &batch_features,
            &batch_valid,
        )
        .unwrap();
    let alone = model
        .forward(
            &right_padded(std::slice::from_ref(&short)),
            &features.narrow(0, 0, 1).unwrap(),
            &valid[..1],
        )
        .unwrap();
    let (at, err) = worst_position(&head(&logits, 0, full.len()), &c["logits"]);
    eprintln!("padded batch, long prompt: worst position {at}, relative error {err:.3e}");
    assert!(err <= 1e-4, "long prompt at {at}: {err}");
    let (at, err) = worst_position(&head(&logits, 1, short.len()), &alone);
    eprintln!("padded batch, short prompt vs alone: worst position {at}, relative error {err:.3e}");
    assert!(err <= 1e-5, "short prompt at {at}: {err}");
}

// ---------------------------------------------------------------------------------------
// Qwen2-VL

const VL_DIR: &str = "qwen2-vl-tiny";
const VL_CASE: &str = "qwen2_vl_case.safetensors";

fn processor() -> ImageProcessor {
    let text = std::fs::read_to_string(fixtures().join(VL_DIR).join("preprocessor_config.json"));
    ImageProcessor::from_json(&text.unwrap()).unwrap()
}

/// Runs our processor on the stored frames `[F, H, W, 3]` (or one `[H, W, 3]` image).
fn patches(frames: &Tensor) -> VisionInput {
    let frames = if frames.rank() == 3 {
        frames.unsqueeze(0).unwrap()
    } else {
        frames.clone()
    };
    let (f, h, w, _) = frames.dims4().unwrap();
    let bytes: Vec<Vec<u8>> = (0..f)
        .map(|i| {
            frames
                .get(i)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        })
        .collect();
    let refs: Vec<&[u8]> = bytes.iter().map(Vec::as_slice).collect();
    let (data, grid) = processor().patches(&refs, h, w).unwrap();
    let n = grid.iter().product::<usize>();
    let patches = Tensor::from_vec(data, (n, 3 * 2 * 14 * 14), &Device::Cpu).unwrap();
    VisionInput {
        patches,
        grids: vec![grid],
    }
}

#[test]
fn qwen2_vl_patches_match_the_image_processor() {
    let c = case(VL_CASE);
    let checks = [
        ("image", "image_rgb", "pixel_values", "image_grid_thw"),
        (
            "video",
            "video_rgb",
            "pixel_values_videos",
            "video_grid_thw",
        ),
    ];
    for (what, rgb, want, grid) in checks {
        let got = patches(&c[rgb]);
        assert_eq!(got.grids[0].to_vec(), to_usizes(&c[grid]), "{what} grid");
        let err = max_abs(&(&got.patches - &c[want]).unwrap());
        eprintln!(
            "{what} patches {:?}: max abs error {err:.3e}",
            got.patches.dims()
        );
        assert!(err <= 1e-4, "{what} patches: max abs error {err}");
    }
}

/// Pictures whose size is not a multiple of 28: the processor resizes them with Pillow's
/// bicubic filter (one up, one down), and so must we, byte for byte.
#[test]
fn qwen2_vl_processor_resizes_as_pillow_does() {
    let c = case(VL_CASE);
    for name in ["resize_up", "resize_down"] {
        let rgb = &c[&format!("{name}_rgb")];
        let (h, w, _) = rgb.dims3().unwrap();
        let bytes: Vec<u8> = rgb.flatten_all().unwrap().to_vec1().unwrap();
        let (data, grid) = processor().preprocess(&[&bytes], h, w).unwrap();
        assert_eq!(
            grid.to_vec(),
            to_usizes(&c[&format!("{name}_grid_thw")]),
            "{name} grid"
        );
        let want = &c[&format!("{name}_pixel_values")];
        let got = Tensor::from_vec(data, want.shape(), &Device::Cpu).unwrap();
        let err = max_abs(&(got - want).unwrap());
        eprintln!("{name} {h}x{w} -> grid {grid:?}: patches max abs error {err:.3e}");
        assert!(err <= 1e-4, "{name}: patches max abs error {err}");
    }
}

fn vl_inputs(c: &HashMap<String, Tensor>) -> (VisionInput, VisionInput) {
    let grid = |k: &str| {
        let v = to_usizes(&c[k]);
        vec![[v[0], v[1], v[2]]]
    };
    (
        VisionInput {
            patches: c["pixel_values"].clone(),
            grids: grid("image_grid_thw"),
        },
        VisionInput {
            patches: c["pixel_values_videos"].clone(),
            grids: grid("video_grid_thw"),
        },
    )
}

fn vl_model(trainable: &[&str]) -> (Qwen2Vl, Vec<candle_core::Var>) {
    let dir = fixtures().join(VL_DIR);
    let mut weights = Weights::load(&dir, DType::F32, &Device::Cpu).unwrap();
    let vars = trainable
        .iter()
        .map(|n| weights.trainable(n).unwrap())
        .collect();
    (Qwen2Vl::load(&dir, &weights).unwrap(), vars)
}

#[test]
fn qwen2_vl_position_ids_match_get_rope_index() {
    let c = case(VL_CASE);
    let (model, _) = vl_model(&[]);
    let (image, video) = vl_inputs(&c);
    let row: Vec<u32> = ids(&c["input_ids"])
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let got = model
        .rope_index(&[row], &image.grids, &video.grids)
        .unwrap();
    let want = c["position_ids"]
        .squeeze(1)
        .unwrap()
        .to_vec2::<i64>()
        .unwrap();
    for (p, pos) in got[0].iter().enumerate() {
        let expected = [want[0][p], want[1][p], want[2][p]].map(|v| v as u32);
        assert_eq!(*pos, expected, "position ids of token {p}");
    }
    assert_eq!(got[0].len(), want[0].len());
}

#[test]
fn qwen2_vl_logits_match_transformers() {
    let c = case(VL_CASE);
    let (model, _) = vl_model(&[]);
    let (image, video) = vl_inputs(&c);
    for (what, input, want) in [
        ("image", &image, "image_embeds"),
        ("video", &video, "video_embeds"),
    ] {
        let got = model.visual().forward(input).unwrap();
        let err = relative(&got, &c[want]);
        eprintln!(
            "qwen2-vl {what} tokens {:?}: relative error {err:.3e}",
            got.dims()
        );
        assert!(err <= 1e-4, "{what} embeddings relative error {err}");
    }
    let logits = model
        .forward(&ids(&c["input_ids"]), Some(&image), Some(&video))
        .unwrap();
    let (at, err) = worst_position(&logits, &c["logits"]);
    eprintln!(
        "qwen2-vl logits {:?}: worst position {at}, relative error {err:.3e}",
        logits.dims()
    );
    assert!(err <= 1e-4, "logits at position {at}: relative error {err}");
    let input_ids = ids(&c["input_ids"]);
    let at = |p: usize| {
        model
            .forward_at(&input_ids, Some(&image), Some(&video), Some(&[p]))
            .unwrap()
    };
    check_forward_at(at, &c["logits"], "qwen2-vl");
}

const VL_GRADS: [&str; 4] = [
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.self_attn.v_proj.weight",
    "model.layers.1.self_attn.q_proj.weight",
    "model.layers.1.self_attn.v_proj.weight",
];

#[test]
fn qwen2_vl_gradients_match_transformers() {
    let c = case(VL_CASE);
    let (model, vars) = vl_model(&VL_GRADS);
    let (image, video) = vl_inputs(&c);
    let logits = model
        .forward(&ids(&c["input_ids"]), Some(&image), Some(&video))
        .unwrap();
    let loss = (logits * &c["loss_weights"]).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    for (name, var) in VL_GRADS.iter().zip(&vars) {
        let got = grads.get(var.as_tensor()).expect("a gradient");
        let err = relative(got, &c[&format!("grad.{name}")]);
        eprintln!("qwen2-vl grad {name}: relative error {err:.3e}");
        assert!(err <= 1e-3, "{name}: gradient relative error {err}");
    }
}

/// The same for Qwen2-VL, whose position ids come from the prompt: an image-only prompt padded
/// next to the image-and-video prompt keeps its own logits.
#[test]
fn qwen2_vl_right_padded_batch_gives_each_prompts_own_logits() {
    let c = case(VL_CASE);
    let (model, _) = vl_model(&[]);
    let (image, video) = vl_inputs(&c);
    let full: Vec<u32> = ids(&c["input_ids"])
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let end = full.iter().position(|&t| t == 991).unwrap(); // the image's vision_end
    let short = full[..end + 3].to_vec();
    let two_images = VisionInput {
        patches: Tensor::cat(&[&image.patches, &image.patches], 0).unwrap(),
        grids: vec![image.grids[0], image.grids[0]],
    };
    let logits = model
        .forward(
            &right_padded(&[full.clone(), short.clone()]),
            Some(&two_images),
            Some(&video),
        )
        .unwrap();
    let alone = model
        .forward(
            &right_padded(std::slice::from_ref(&short)),
            Some(&image),
            None,
        )
        .unwrap();
    let (at, err) = worst_position(&head(&logits, 0, full.len()), &c["logits"]);
    eprintln!("padded batch, long prompt: worst position {at}, relative error {err:.3e}");
    assert!(err <= 1e-4, "long prompt at {at}: {err}");
    let (at, err) = worst_position(&head(&logits, 1, short.len()), &alone);
    eprintln!("padded batch, short prompt vs alone: worst position {at}, relative error {err:.3e}");
    assert!(err <= 1e-5, "short prompt at {at}: {err}");
}

// ---------------------------------------------------------------------------------------
// Model directories as transformers 5 writes them (make_tf5_configs.py): only config.json is
// stored, the weights' names being those of 4.51; each model is built from the tf5 config with
// the 4.x directory's weights.

fn tf5_dir(dir: &str) -> std::path::PathBuf {
    fixtures().join(format!("{dir}-tf5"))
}

#[test]
fn transformers_5_configs_read_as_the_4x_ones() {
    let audio = |dir: &std::path::Path| Qwen2Audio::read_config(dir).unwrap();
    let vl = |dir: &std::path::Path| Qwen2Vl::read_config(dir).unwrap();
    let (old, new) = (fixtures().join(AUDIO_DIR), tf5_dir(AUDIO_DIR));
    assert_eq!(audio(&new), audio(&old), "qwen2-audio");
    let (old, new) = (fixtures().join(VL_DIR), tf5_dir(VL_DIR));
    assert_eq!(vl(&new), vl(&old), "qwen2-vl");
    assert_eq!(vl(&new).text.mrope_section, Some(vec![2, 3, 3]));
    assert_eq!(vl(&new).text.head_dim(), 16);
}

#[test]
fn transformers_5_configs_give_the_reference_logits() {
    let c = case(AUDIO_CASE);
    let weights = Weights::load(&fixtures().join(AUDIO_DIR), DType::F32, &Device::Cpu).unwrap();
    let model = Qwen2Audio::load(&tf5_dir(AUDIO_DIR), &weights).unwrap();
    let (features, valid) = audio_inputs(&c);
    let logits = model
        .forward(&ids(&c["input_ids"]), &features, &valid)
        .unwrap();
    let (at, err) = worst_position(&logits, &c["logits"]);
    eprintln!("qwen2-audio from the tf5 config: worst position {at}, relative error {err:.3e}");
    assert!(
        err <= 1e-4,
        "audio logits at position {at}: relative error {err}"
    );

    let c = case(VL_CASE);
    let weights = Weights::load(&fixtures().join(VL_DIR), DType::F32, &Device::Cpu).unwrap();
    let model = Qwen2Vl::load(&tf5_dir(VL_DIR), &weights).unwrap();
    let (image, video) = vl_inputs(&c);
    let logits = model
        .forward(&ids(&c["input_ids"]), Some(&image), Some(&video))
        .unwrap();
    let (at, err) = worst_position(&logits, &c["logits"]);
    eprintln!("qwen2-vl from the tf5 config: worst position {at}, relative error {err:.3e}");
    assert!(
        err <= 1e-4,
        "vl logits at position {at}: relative error {err}"
    );
}

/// A frozen teacher runs in bf16 on a GPU: both families load in bf16 and give f32 logits close
/// to the reference (bf16 keeps 8 significant bits; a few layers of rounding stay well under 5%
/// of the largest logit, while a dtype or cast bug is far outside it).
#[test]
fn both_families_run_in_bf16_within_bf16_precision() {
    let c = case(AUDIO_CASE);
    let dir = fixtures().join(AUDIO_DIR);
    let weights = Weights::load(&dir, DType::BF16, &Device::Cpu).unwrap();
    let model = Qwen2Audio::load(&dir, &weights).unwrap();
    let (features, valid) = audio_inputs(&c);
    let logits = model
        .forward(&ids(&c["input_ids"]), &features, &valid)
        .unwrap();
    assert_eq!(logits.dtype(), DType::F32);
    let err = relative(&logits, &c["logits"]);
    eprintln!("qwen2-audio bf16 logits: relative error {err:.3e}");
    assert!(err > 0.0 && err <= 0.05, "audio bf16: {err}");

    let c = case(VL_CASE);
    let dir = fixtures().join(VL_DIR);
    let weights = Weights::load(&dir, DType::BF16, &Device::Cpu).unwrap();
    let model = Qwen2Vl::load(&dir, &weights).unwrap();
    let (image, video) = vl_inputs(&c);
    let logits = model
        .forward(&ids(&c["input_ids"]), Some(&image), Some(&video))
        .unwrap();
    let err = relative(&logits, &c["logits"]);
    eprintln!("qwen2-vl bf16 logits: relative error {err:.3e}");
    assert!(err > 0.0 && err <= 0.05, "vl bf16: {err}");
}
