//! Writes a LoRA adapter with non-zero `A` and `B` for one fixture model, plus the logits the
//! Rust model gives with it, for tests/reference/check_peft_adapter.py to check through PEFT.
//!
//! The adapter is trained, not drawn: three SGD steps on the fixture loss
//! `sum(logits * loss_weights)` from PEFT's initialisation, so `B` and then `A` move.
//!
//!     cargo run --release -p xkd-models --example lora_peft_fixture -- audio /tmp/lora-audio
//!
//! With a third argument, the adapter is not trained here but read from that directory (the
//! `student-lora/` an `xkd run` with a Qwen2 student writes), and written out again with the
//! logits it gives on the fixture inputs:
//!
//!     cargo run --release -p xkd-models --example lora_peft_fixture -- audio /tmp/check runs/x/student-lora

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::{Optimizer, SGD};
use xkd_models::qwen::lora::PROJECTIONS;
use xkd_models::qwen::{LoraAdapters, LoraConfig, Qwen2Audio, Qwen2Vl, VisionInput, Weights};

const STEPS: usize = 3;
const LEARNING_RATE: f64 = 0.05;
const SEED: u64 = 7;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/reference/fixtures")
}

fn lora() -> LoraConfig {
    LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        target_modules: PROJECTIONS.map(String::from).to_vec(),
    }
}

fn grid(t: &Tensor) -> Result<Vec<[usize; 3]>> {
    let v: Vec<i64> = t.flatten_all()?.to_vec1()?;
    Ok(vec![[v[0] as usize, v[1] as usize, v[2] as usize]])
}

/// The family's forward pass on its fixture inputs, as a closure over the (mutable) model.
enum Model {
    Audio(Qwen2Audio),
    Vl(Qwen2Vl),
}

impl Model {
    fn load(family: &str) -> Result<(Self, PathBuf, HashMap<String, Tensor>)> {
        let (dir, case) = match family {
            "audio" => ("qwen2-audio-tiny", "qwen2_audio_case.safetensors"),
            "vl" => ("qwen2-vl-tiny", "qwen2_vl_case.safetensors"),
            _ => bail!("family must be audio or vl, not {family:?}"),
        };
        let dir = fixtures().join(dir);
        let case = candle_core::safetensors::load(fixtures().join(case), &Device::Cpu)?;
        let weights = Weights::load(&dir, DType::F32, &Device::Cpu)?;
        let model = match family {
            "audio" => Model::Audio(Qwen2Audio::load(&dir, &weights)?),
            _ => Model::Vl(Qwen2Vl::load(&dir, &weights)?),
        };
        Ok((model, dir, case))
    }

    fn logits(&self, c: &HashMap<String, Tensor>) -> Result<Tensor> {
        let ids = c["input_ids"].to_dtype(DType::U32)?;
        Ok(match self {
            Model::Audio(m) => {
                let valid: Vec<usize> = (0..2)
                    .map(|i| {
                        let row = c["feature_attention_mask"].get(i)?;
                        Ok(row.sum_all()?.to_scalar::<i64>()? as usize)
                    })
                    .collect::<Result<_>>()?;
                m.forward(&ids, &c["input_features"], &valid)?
            }
            Model::Vl(m) => {
                let image = VisionInput {
                    patches: c["pixel_values"].clone(),
                    grids: grid(&c["image_grid_thw"])?,
                };
                let video = VisionInput {
                    patches: c["pixel_values_videos"].clone(),
                    grids: grid(&c["video_grid_thw"])?,
                };
                m.forward(&ids, Some(&image), Some(&video))?
            }
        })
    }
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (family, out, from) = match args.as_slice() {
        [_, family, out] => (family, out, None),
        [_, family, out, from] => (family, out, Some(Path::new(from))),
        _ => bail!("usage: lora_peft_fixture <audio|vl> <out dir> [adapter dir]"),
    };
    let (mut model, dir, case) = Model::load(family)?;
    let base = model.logits(&case)?;
    let adapters = match from {
        Some(from) => {
            let adapters = LoraAdapters::load(from, &Device::Cpu)
                .with_context(|| format!("loading the adapter in {}", from.display()))?;
            match &mut model {
                Model::Audio(m) => m.attach_lora(&adapters)?,
                Model::Vl(m) => m.attach_lora(&adapters)?,
            }
            adapters
        }
        None => {
            let adapters = match &mut model {
                Model::Audio(m) => m.init_lora(lora(), SEED)?,
                Model::Vl(m) => m.init_lora(lora(), SEED)?,
            };
            let mut sgd = SGD::new(adapters.vars(), LEARNING_RATE)?;
            for step in 0..STEPS {
                let loss = (model.logits(&case)? * &case["loss_weights"])?.sum_all()?;
                eprintln!("step {step}: loss {:.6}", loss.to_scalar::<f32>()?);
                sgd.backward_step(&loss)?;
            }
            adapters
        }
    };
    let logits = model.logits(&case)?;
    let moved = ((&logits - &base)?.abs()?.max_all()?.to_scalar::<f32>()?)
        / base.abs()?.max_all()?.to_scalar::<f32>()?;
    eprintln!(
        "{} adapters; logits move by {moved:.3e} of the largest base logit",
        adapters.len()
    );
    let out = Path::new(out);
    adapters
        .save(out, &dir.to_string_lossy())
        .context("saving the adapter")?;
    candle_core::safetensors::save(
        &HashMap::from([("logits".to_string(), logits)]),
        out.join("logits.safetensors"),
    )?;
    eprintln!("wrote {}", out.display());
    Ok(())
}
