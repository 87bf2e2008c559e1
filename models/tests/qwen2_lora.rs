//! LoRA on the Qwen2 decoder, with no Python: a fresh adapter (`B = 0`) leaves the fixture
//! models' logits exactly as they are; the loss's gradient reaches `A` and `B` and no base
//! weight; adapters saved in PEFT's format load back to the same logits; a bf16 base (the GPU
//! path's) with f32 adapters answers and trains like the f32 model. That PEFT computes
//! the same logits from those files is checked by tests/reference/check_peft_adapter.py on
//! what `examples/lora_peft_fixture.rs` writes.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::{Optimizer, SGD};
use common::{case, fixtures, max_abs, prompt_case, prompt_options};
use xkd_models::qwen::lora::PROJECTIONS;
use xkd_models::qwen::{
    Clip, Family, LoraAdapters, LoraConfig, Prepared, Qwen2Audio, Qwen2Vl, QwenModel, VisionInput,
    Weights,
};

fn lora(targets: &[&str]) -> LoraConfig {
    LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        target_modules: targets.iter().map(|t| t.to_string()).collect(),
    }
}

/// Each adapter's largest |dA| and |dB| in `grads`, printed with `when`.
fn adapter_grads(
    grads: &candle_core::backprop::GradStore,
    adapters: &LoraAdapters,
    when: &str,
) -> Vec<(String, f32, f32)> {
    adapters
        .paths()
        .map(|path| {
            let m = adapters.get(path).unwrap();
            let ga = max_abs(grads.get(m.a()).unwrap());
            let gb = max_abs(grads.get(m.b()).unwrap());
            eprintln!("{path}: |dA| {ga:.3e}, |dB| {gb:.3e} {when}");
            (path.clone(), ga, gb)
        })
        .collect()
}

struct Audio {
    model: Qwen2Audio,
    weights: Weights,
    case: HashMap<String, Tensor>,
}

impl Audio {
    fn load() -> Self {
        let dir = fixtures().join("qwen2-audio-tiny");
        let weights = Weights::load(&dir, DType::F32, &Device::Cpu).unwrap();
        Self {
            model: Qwen2Audio::load(&dir, &weights).unwrap(),
            weights,
            case: case("qwen2_audio_case.safetensors"),
        }
    }

    fn logits(&self) -> Tensor {
        let c = &self.case;
        let valid: Vec<usize> = (0..2)
            .map(|i| {
                let row = c["feature_attention_mask"].get(i).unwrap();
                row.sum_all().unwrap().to_scalar::<i64>().unwrap() as usize
            })
            .collect();
        let ids = c["input_ids"].to_dtype(DType::U32).unwrap();
        self.model
            .forward(&ids, &c["input_features"], &valid)
            .unwrap()
    }

    fn loss(&self) -> Tensor {
        (self.logits() * &self.case["loss_weights"])
            .unwrap()
            .sum_all()
            .unwrap()
    }

    /// A few SGD steps, so that both `B` and `A` move away from their initial values.
    fn train(&self, adapters: &LoraAdapters) {
        let mut sgd = SGD::new(adapters.vars(), 0.05).unwrap();
        for _ in 0..3 {
            sgd.backward_step(&self.loss()).unwrap();
        }
    }
}

fn vl_logits(model: &Qwen2Vl, c: &HashMap<String, Tensor>) -> Tensor {
    let grid = |k: &str| {
        let v: Vec<i64> = c[k].flatten_all().unwrap().to_vec1().unwrap();
        vec![[v[0] as usize, v[1] as usize, v[2] as usize]]
    };
    let image = VisionInput {
        patches: c["pixel_values"].clone(),
        grids: grid("image_grid_thw"),
    };
    let video = VisionInput {
        patches: c["pixel_values_videos"].clone(),
        grids: grid("video_grid_thw"),
    };
    let ids = c["input_ids"].to_dtype(DType::U32).unwrap();
    model.forward(&ids, Some(&image), Some(&video)).unwrap()
}

#[test]
fn a_fresh_adapter_leaves_the_logits_exactly_as_they_are() {
    let mut audio = Audio::load();
    let base = audio.logits();
    let adapters = audio.model.init_lora(lora(&PROJECTIONS), 1).unwrap();
    assert_eq!(adapters.len(), 2 * 7, "two layers, seven projections");
    let diff = max_abs(&(audio.logits() - &base).unwrap());
    eprintln!("qwen2-audio, B = 0: max |lora - base| = {diff:e}");
    assert_eq!(diff, 0.0);

    let dir = fixtures().join("qwen2-vl-tiny");
    let weights = Weights::load(&dir, DType::F32, &Device::Cpu).unwrap();
    let mut vl = Qwen2Vl::load(&dir, &weights).unwrap();
    let c = case("qwen2_vl_case.safetensors");
    let base = vl_logits(&vl, &c);
    let adapters = vl.init_lora(lora(&PROJECTIONS), 1).unwrap();
    assert_eq!(adapters.len(), 2 * 7);
    let diff = max_abs(&(vl_logits(&vl, &c) - &base).unwrap());
    eprintln!("qwen2-vl, B = 0: max |lora - base| = {diff:e}");
    assert_eq!(diff, 0.0);
}

#[test]
fn adapters_go_on_the_language_model_only() {
    let mut audio = Audio::load();
    let adapters = audio
        .model
        .init_lora(lora(&["q_proj", "v_proj"]), 1)
        .unwrap();
    let paths: Vec<&String> = adapters.paths().collect();
    assert_eq!(
        paths,
        [
            "language_model.model.layers.0.self_attn.q_proj",
            "language_model.model.layers.0.self_attn.v_proj",
            "language_model.model.layers.1.self_attn.q_proj",
            "language_model.model.layers.1.self_attn.v_proj",
        ]
    );
}

#[test]
fn the_gradient_reaches_a_and_b_and_no_base_weight() {
    let mut audio = Audio::load();
    let adapters = audio
        .model
        .init_lora(lora(&["q_proj", "down_proj"]), 3)
        .unwrap();
    // With B = 0 the loss does not depend on A yet: only B has a gradient.
    let grads = audio.loss().backward().unwrap();
    for (path, ga, gb) in adapter_grads(&grads, &adapters, "at B = 0") {
        assert_eq!(ga, 0.0, "{path}: A's gradient at B = 0");
        assert!(gb > 0.0, "{path}: no gradient reaches B");
    }
    audio.train(&adapters);
    let grads = audio.loss().backward().unwrap();
    for (path, ga, gb) in adapter_grads(&grads, &adapters, "after 3 steps") {
        assert!(ga > 0.0 && gb > 0.0, "{path}");
    }
    let frozen: Vec<&String> = audio
        .weights
        .names()
        .filter(|n| grads.get(audio.weights.get(n).unwrap()).is_some())
        .collect();
    assert!(frozen.is_empty(), "base weights with gradients: {frozen:?}");
}

#[test]
fn saved_adapters_load_back_to_the_same_logits() {
    let mut audio = Audio::load();
    let base = audio.logits();
    let adapters = audio.model.init_lora(lora(&PROJECTIONS), 5).unwrap();
    audio.train(&adapters);
    let trained = audio.logits();
    let moved = max_abs(&(&trained - &base).unwrap()) / max_abs(&base);
    eprintln!("trained adapter moves the logits by {moved:.3e} relative");
    assert!(
        moved > 1e-3,
        "the adapter barely changes the logits ({moved})"
    );

    let dir = tempfile::tempdir().unwrap();
    adapters.save(dir.path(), "qwen2-audio-tiny").unwrap();
    let names: Vec<String> =
        candle_core::safetensors::load(dir.path().join("adapter_model.safetensors"), &Device::Cpu)
            .unwrap()
            .into_keys()
            .collect();
    assert_eq!(names.len(), 2 * 2 * 7);
    assert!(
        names
            .iter()
            .any(|n| n
                == "base_model.model.language_model.model.layers.1.mlp.down_proj.lora_B.weight")
    );
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["peft_type"], "LORA");
    assert_eq!(config["r"], 4);

    let loaded = LoraAdapters::load(dir.path(), &Device::Cpu).unwrap();
    assert_eq!(loaded.config, adapters.config);
    let mut fresh = Audio::load();
    fresh.model.attach_lora(&loaded).unwrap();
    let diff = max_abs(&(fresh.logits() - &trained).unwrap());
    eprintln!("save -> load: max |loaded - trained| = {diff:e}");
    assert_eq!(diff, 0.0);

    // Adapters for modules the model lacks are refused, not dropped.
    let dir_vl = fixtures().join("qwen2-vl-tiny");
    let weights = Weights::load(&dir_vl, DType::F32, &Device::Cpu).unwrap();
    let mut vl = Qwen2Vl::load(&dir_vl, &weights).unwrap();
    assert!(vl.attach_lora(&loaded).is_err());
}

/// The GPU path's dtype mix, run on the CPU: a bf16 base with f32 adapters answers through
/// `QwenModel` with f32 letter logits within bf16 rounding of the all-f32 model's, and the
/// gradient of those logits reaches every adapter, close to the f32 model's.
#[test]
fn a_bf16_base_with_f32_adapters_answers_and_trains_like_the_f32_model() {
    let case = prompt_case();
    let options = prompt_options(&case);
    let questions = vec![options.clone(), options.iter().rev().copied().collect()];
    // Deterministic clips: two tones, and two videos of four patterned frames.
    let wavs: Vec<Vec<f32>> = [220.0f32, 880.0]
        .iter()
        .map(|f| {
            (0..16000)
                .map(|i| 0.3 * (i as f32 * f * std::f32::consts::TAU / 16000.0).sin())
                .collect()
        })
        .collect();
    let (h, w) = (40, 56);
    let frames: Vec<Vec<Vec<u8>>> = (0..2)
        .map(|c| {
            (0..4)
                .map(|t| {
                    (0..h * w * 3)
                        .map(|i| ((i * 7 + t * 31 + c * 90) % 256) as u8)
                        .collect()
                })
                .collect()
        })
        .collect();

    for (family, name) in [
        (Family::Audio, "qwen2-audio-tiny"),
        (Family::Vl, "qwen2-vl-tiny"),
    ] {
        let run = |dtype: DType| {
            let dir = fixtures().join(name);
            let mut model = QwenModel::load(&dir, family, dtype, &Device::Cpu).unwrap();
            let adapters = model.init_lora(lora(&PROJECTIONS), 11).unwrap();
            // B = 0 would hide the adapters' path from the logits: give B values.
            // (Deterministic: both dtypes must get the same values.)
            for (i, path) in adapters.paths().enumerate() {
                let b = adapters.get(path).unwrap().b();
                let n = b.elem_count();
                let values = Tensor::arange(0f32, n as f32, &Device::Cpu)
                    .unwrap()
                    .affine(0.37, i as f64)
                    .unwrap()
                    .cos()
                    .unwrap()
                    .affine(0.05, 0.0)
                    .unwrap()
                    .reshape(b.shape())
                    .unwrap();
                b.set(&values).unwrap();
            }
            let clips: Vec<Prepared> = (0..2)
                .map(|c| match family {
                    Family::Audio => model.prepare(Clip::Audio(&wavs[c])).unwrap(),
                    Family::Vl => model
                        .prepare(Clip::Video {
                            frames: &frames[c],
                            h,
                            w,
                        })
                        .unwrap(),
                })
                .collect();
            let refs: Vec<&Prepared> = clips.iter().collect();
            let (logits, _) = model
                .letter_logits(&refs, &questions, &Device::Cpu)
                .unwrap();
            assert_eq!(logits.dtype(), DType::F32, "{name} in {dtype:?}");
            let weights = Tensor::arange(0f32, 20.0, &Device::Cpu)
                .unwrap()
                .reshape((2, 10))
                .unwrap()
                .sin()
                .unwrap();
            let grads = (&logits * weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let grads: Vec<(Tensor, Tensor)> = adapters
                .paths()
                .map(|p| {
                    let m = adapters.get(p).unwrap();
                    let g = |v: &candle_core::Var| {
                        grads
                            .get(v)
                            .unwrap_or_else(|| panic!("{name} {dtype:?}: no gradient for {p}"))
                            .clone()
                    };
                    (g(m.a()), g(m.b()))
                })
                .collect();
            (logits, grads)
        };
        let (l32, g32) = run(DType::F32);
        let (l16, g16) = run(DType::BF16);
        let rel = |a: &Tensor, b: &Tensor| max_abs(&(a - b).unwrap()) / max_abs(b).max(1e-12);
        let logit_err = rel(&l16, &l32);
        let grad_err = g16
            .iter()
            .zip(&g32)
            .map(|((a16, b16), (a32, b32))| rel(a16, a32).max(rel(b16, b32)))
            .fold(0f32, f32::max);
        eprintln!("{name}: bf16 base vs f32: letter logits {logit_err:.2e}, adapter gradients {grad_err:.2e} (relative to the largest)");
        assert!(logit_err < 5e-2, "{name}: bf16 logits off by {logit_err}");
        assert!(
            grad_err < 1e-1,
            "{name}: bf16 adapter gradients off by {grad_err}"
        );
        assert!(g16
            .iter()
            .all(|(a, b)| max_abs(a) > 0.0 && max_abs(b) > 0.0));
    }
}
