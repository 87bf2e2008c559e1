//! The models a rank runs and the parameters a student trains. A model is a stand-in
//! (`model.rs`, every parameter in a `VarMap`, trained whole) or a Qwen2 model
//! (`qwen::QwenModel` from a Hugging Face directory, base weights frozen, LoRA adapters
//! trained and saved in PEFT's format). Which one a modality uses is `[audio_model]` /
//! `[visual_model]` `family`.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use candle_core::{Device, Tensor, Var};
use candle_nn::VarMap;
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

/// How `local_model_dir` came by a directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fetched {
    /// `dir` is a local path.
    Local,
    /// This call downloaded it.
    Downloaded,
    /// A complete copy was there (another rank of the node made it, perhaps while this one
    /// waited for the lock).
    Cached,
}

/// The local directory of a model `dir` names: `dir` itself, or for an object-store URL
/// (`s3://`, `gs://`, `az://`, `file://`; credentials from the standard variables, as for
/// checkpoints) the node's one copy under `<cache_dir>/models/remote-<digest of the URL>/`
/// (`xkd_checkpoint::local_copy`: downloaded once per node under a lock, in ranged parallel
/// GETs, never used half-downloaded).
pub fn local_model_dir(dir: &str, cache_dir: &str) -> Result<(PathBuf, Fetched)> {
    if !dir.contains("://") {
        return Ok((PathBuf::from(dir), Fetched::Local));
    }
    let local = Path::new(cache_dir)
        .join("models")
        .join(format!("remote-{}", section_digest(&dir)));
    let fetched = xkd_checkpoint::local_copy(dir, &local)
        .with_context(|| format!("downloading the model directory {dir}"))?;
    Ok((
        local,
        match fetched {
            xkd_checkpoint::Fetched::Downloaded => Fetched::Downloaded,
            xkd_checkpoint::Fetched::Cached => Fetched::Cached,
        },
    ))
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
        // Unique per call, not only per process: ranks that are threads of one process (the
        // worker crate's tests) may save to the same path at once.
        static SAVES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = SAVES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = path.with_extension(format!("tmp-{}-{n}", std::process::id()));
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
