//! The models a rank runs and the parameters a student trains. A model is a stand-in
//! (`model.rs`, every parameter in a `VarMap`, trained whole) or a Qwen2 model
//! (`qwen::QwenModel` from a Hugging Face directory, base weights frozen, LoRA adapters
//! trained and saved in PEFT's format). Which one a modality uses is `[audio_model]` /
//! `[visual_model]` `family`.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use candle_core::{Device, Tensor, Var};
use candle_nn::VarMap;
use xkd_checkpoint::Store;
use xkd_config::{section_digest, Config, Modality, ModelFamily};
use xkd_protocol::splitmix64;

use crate::model::{self, Model};
use crate::qwen::{Family, LoraAdapters, QwenModel};

/// A model a rank runs forward.
pub enum Net {
    StandIn(Box<Model>),
    Qwen(Box<QwenModel>),
}

/// What a student trains.
pub enum Params {
    /// Every parameter of a stand-in.
    Full(VarMap),
    /// LoRA adapters on a Qwen2 model loaded from `base` (its directory).
    Lora {
        adapters: LoraAdapters,
        base: String,
    },
}

/// Whether `modality`'s model is a Qwen2 model (`family = "qwen2"`).
pub fn is_qwen2(config: &Config, modality: Modality) -> bool {
    config.model(modality).family == ModelFamily::Qwen2
}

/// The Qwen2 family of a modality: Qwen2-Audio for audio, Qwen2-VL for video.
pub fn family(modality: Modality) -> Family {
    match modality {
        Modality::Audio => Family::Audio,
        Modality::Visual => Family::Vl,
    }
}

/// Whether `path` is a directory of saved LoRA adapters (rather than a base model).
pub fn is_adapter_dir(path: &str) -> bool {
    Path::new(path).join("adapter_config.json").is_file()
}

/// The local directory of a model `dir` names: `dir` itself, or for an object-store URL
/// (`s3://`, `gs://`, `az://`, `file://`; credentials from the standard variables, as for
/// checkpoints) a copy under `<cache_dir>/models/remote-<digest of the URL>/`, downloaded once
/// into a temporary sibling and renamed into place (ranks on one node that race each keep the
/// first complete copy).
pub fn local_model_dir(dir: &str, cache_dir: &str) -> Result<PathBuf> {
    if !dir.contains("://") {
        return Ok(PathBuf::from(dir));
    }
    let local = Path::new(cache_dir)
        .join("models")
        .join(format!("remote-{}", section_digest(&dir)));
    if local.is_dir() {
        return Ok(local);
    }
    let tmp = local.with_extension(format!("tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    tracing::info!(model = dir, to = %local.display(), "downloading the model directory");
    // On a thread of its own: the caller may be inside the worker's async runtime.
    let names = std::thread::scope(|scope| {
        scope
            .spawn(|| -> Result<Vec<String>> {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                let store = Store::open(dir)?;
                Ok(runtime.block_on(store.download_prefix(&tmp))?)
            })
            .join()
            .expect("the download thread does not panic")
    })
    .with_context(|| format!("downloading the model directory {dir}"))?;
    match std::fs::rename(&tmp, &local) {
        Ok(()) => {}
        Err(_) if local.is_dir() => {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        Err(e) => {
            return Err(e).with_context(|| format!("renaming into {}", local.display()));
        }
    }
    tracing::info!(
        model = dir,
        files = names.len(),
        "model directory downloaded"
    );
    Ok(local)
}

impl Params {
    /// Before training step `step` on `rank`: restarts LoRA dropout's random stream at a value
    /// drawn from (seed, step, rank), so the step's masks are the same however the run got
    /// there (a stand-in has no dropout).
    pub fn start_step(&self, seed: u64, step: u64, rank: u32, device: &Device) -> Result<()> {
        let Params::Lora { adapters, .. } = self else {
            return Ok(());
        };
        let mut state = seed;
        let mut state = splitmix64(&mut state) ^ step;
        let mut state = splitmix64(&mut state) ^ u64::from(rank);
        adapters.reseed(splitmix64(&mut state), device)?;
        Ok(())
    }

    /// Every parameter a checkpoint holds, in name order: the whole stand-in (frozen ones
    /// too: the file is the whole model), or the adapters' `A` and `B`.
    pub fn named(&self) -> Vec<(String, Var)> {
        match self {
            Params::Full(varmap) => {
                let data = varmap.data().lock().expect("varmap lock");
                let mut vars: Vec<(String, Var)> =
                    data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
                vars.sort_by(|a, b| a.0.cmp(&b.0));
                vars
            }
            Params::Lora { adapters, .. } => adapters.named_vars(),
        }
    }

    /// The trainable parameters in name order: the flattening order every rank shares.
    pub fn trainable(&self) -> Vec<(String, Var)> {
        let mut vars = self.named();
        if let Params::Full(_) = self {
            vars.retain(|(k, _)| !model::is_frozen(k));
        }
        vars
    }

    pub fn tensors(&self) -> Vec<(String, Tensor)> {
        self.named()
            .into_iter()
            .map(|(k, v)| (k, v.as_tensor().clone()))
            .collect()
    }

    /// Writes the model (a safetensors file) or the adapters (a PEFT adapter directory) to
    /// `path` through a temporary sibling and a rename: a reader never sees half of it.
    pub fn save(&self, path: &Path) -> Result<()> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
        match self {
            Params::Full(varmap) => varmap
                .save(&tmp)
                .with_context(|| format!("writing {}", tmp.display()))?,
            Params::Lora { adapters, base } => {
                adapters
                    .save(&tmp, base)
                    .with_context(|| format!("writing adapters into {}", tmp.display()))?;
                if path.is_dir() {
                    std::fs::remove_dir_all(path)
                        .with_context(|| format!("replacing {}", path.display()))?;
                }
            }
        }
        std::fs::rename(&tmp, path).with_context(|| format!("renaming into {}", path.display()))?;
        Ok(())
    }
}
