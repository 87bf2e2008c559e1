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
/// checkpoints) a copy under `<cache_dir>/models/remote-<digest of the URL>/`. The ranks of one
/// node download it once: the first takes an exclusive lock on `remote-<digest>.lock`
/// (released by the kernel if the process dies), downloads into a temporary sibling in ranged,
/// parallel GETs and renames it into place; the others wait on the lock and find the copy. A
/// directory exists under its final name only complete, so a half-downloaded one (a rank
/// killed mid-way) is never used; its leftover is removed by the next download.
pub fn local_model_dir(dir: &str, cache_dir: &str) -> Result<(PathBuf, Fetched)> {
    if !dir.contains("://") {
        return Ok((PathBuf::from(dir), Fetched::Local));
    }
    let root = Path::new(cache_dir).join("models");
    let local = root.join(format!("remote-{}", section_digest(&dir)));
    if local.is_dir() {
        return Ok((local, Fetched::Cached));
    }
    std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    let lock_path = local.with_extension("lock");
    let lock = std::fs::File::create(&lock_path)
        .with_context(|| format!("creating the lock {}", lock_path.display()))?;
    lock.lock()
        .with_context(|| format!("locking {}", lock_path.display()))?;
    if local.is_dir() {
        return Ok((local, Fetched::Cached));
    }
    let tmp = local.with_extension("partial");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)
            .with_context(|| format!("removing the interrupted download {}", tmp.display()))?;
    }
    tracing::info!(model = dir, to = %local.display(), "downloading the model directory");
    let started = std::time::Instant::now();
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
            .map_err(|_| anyhow::anyhow!("the download thread panicked"))?
    })
    .with_context(|| format!("downloading the model directory {dir}"))?;
    std::fs::rename(&tmp, &local).with_context(|| format!("renaming into {}", local.display()))?;
    let bytes: u64 = names
        .iter()
        .filter_map(|n| std::fs::metadata(local.join(n)).ok())
        .map(|m| m.len())
        .sum();
    let seconds = started.elapsed().as_secs_f64();
    tracing::info!(
        model = dir,
        files = names.len(),
        bytes,
        mb_per_s = format!("{:.1}", bytes as f64 / 1e6 / seconds.max(1e-9)),
        "model directory downloaded"
    );
    drop(lock);
    Ok((local, Fetched::Downloaded))
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
