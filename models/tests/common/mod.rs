//! What the Qwen2 test files share: the reference fixtures of tests/reference and a norm.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

/// tests/reference/fixtures, where make_qwen2_fixtures.py and make_tiny_tokenizer.py write.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/reference/fixtures")
}

/// The tensors of one fixture case file.
pub fn case(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join(name), &Device::Cpu).expect("fixture")
}

/// fixtures/qwen2_prompt_case.json (make_tiny_tokenizer.py): a question's ten option names
/// and each family's reference text and ids for it.
pub fn prompt_case() -> serde_json::Value {
    let text = std::fs::read_to_string(fixtures().join("qwen2_prompt_case.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The option names of `prompt_case()`.
pub fn prompt_options(case: &serde_json::Value) -> Vec<&str> {
    case["options"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o.as_str().unwrap())
        .collect()
}

/// Largest |t|.
pub fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}
