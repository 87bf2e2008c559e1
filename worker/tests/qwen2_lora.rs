//! LoRA on the Qwen2 decoder, with no Python: a fresh adapter (`B = 0`) leaves the fixture
//! models' logits exactly as they are; the loss's gradient reaches `A` and `B` and no base
//! weight; adapters saved in PEFT's format load back to the same logits. That PEFT computes
//! the same logits from those files is checked by tests/reference/check_peft_adapter.py on
//! what `examples/lora_peft_fixture.rs` writes.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::{Optimizer, SGD};
use common::{case, fixtures, max_abs};
use xkd_worker::qwen::lora::PROJECTIONS;
use xkd_worker::qwen::{LoraAdapters, LoraConfig, Qwen2Audio, Qwen2Vl, VisionInput, Weights};

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
