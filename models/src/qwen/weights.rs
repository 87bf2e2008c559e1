//! Loading a Hugging Face model directory: `config.json` and the safetensors weights, one file
//! (`model.safetensors`) or shards listed by `model.safetensors.index.json`, under the
//! checkpoint's own parameter names.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;
use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error("{path}: no model.safetensors and no model.safetensors.index.json")]
    NoWeights { path: PathBuf },
    #[error("{path}: the index lists {name} in {file}, which does not hold it")]
    MissingTensor {
        path: PathBuf,
        name: String,
        file: String,
    },
    #[error("no parameter named {0}")]
    Unknown(String),
    #[error("{path}: {source}")]
    Candle {
        path: PathBuf,
        source: candle_core::Error,
    },
    #[error(transparent)]
    Model(#[from] candle_core::Error),
}

/// Reads a model directory's `config.json` as text.
pub fn read_config(dir: &Path) -> Result<(PathBuf, String), LoadError> {
    read_text(dir, "config.json")
}

/// Reads the file `name` of a model directory as text, with its path for messages.
pub fn read_text(dir: &Path, name: &str) -> Result<(PathBuf, String), LoadError> {
    let path = dir.join(name);
    let text = std::fs::read_to_string(&path).map_err(|source| LoadError::Io {
        path: path.clone(),
        source,
    })?;
    Ok((path, text))
}

#[derive(Debug, Deserialize)]
struct Index {
    weight_map: HashMap<String, String>,
}

/// A checkpoint's tensors by parameter name, in one dtype on one device. Parameters made
/// trainable are held as `Var`s: a model built from `var_builder` afterwards uses them, so its
/// loss differentiates with respect to them and nothing else.
#[derive(Debug, Clone)]
pub struct Weights {
    tensors: HashMap<String, Tensor>,
    dtype: DType,
    device: Device,
}

impl Weights {
    /// Loads every tensor of the model directory `dir` and converts it to `dtype`.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self, LoadError> {
        let index = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let tensors = if index.exists() {
            load_sharded(dir, &index, device)?
        } else if single.exists() {
            load_file(&single, device)?
        } else {
            return Err(LoadError::NoWeights { path: dir.into() });
        };
        let tensors = tensors
            .into_iter()
            .map(|(k, t)| Ok((k, t.to_dtype(dtype)?)))
            .collect::<Result<_, candle_core::Error>>()?;
        Ok(Self {
            tensors,
            dtype,
            device: device.clone(),
        })
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.tensors.keys()
    }

    pub fn tensors(&self) -> impl Iterator<Item = &Tensor> {
        self.tensors.values()
    }

    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.get(name)
    }

    /// Turns parameter `name` into a trainable variable (f32 whatever the weights' dtype) and
    /// returns it.
    pub fn trainable(&mut self, name: &str) -> Result<Var, LoadError> {
        let t = self
            .tensors
            .get(name)
            .ok_or_else(|| LoadError::Unknown(name.into()))?;
        let var = Var::from_tensor(&t.to_dtype(DType::F32)?)?;
        self.tensors.insert(name.into(), var.as_tensor().clone());
        Ok(var)
    }

    /// A builder over these tensors: a parameter the model asks for and the checkpoint lacks
    /// is an error naming it, never a fresh initialisation.
    pub fn var_builder(&self) -> VarBuilder<'static> {
        VarBuilder::from_tensors(self.tensors.clone(), self.dtype, &self.device)
    }
}

fn load_file(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>, LoadError> {
    candle_core::safetensors::load(path, device).map_err(|source| LoadError::Candle {
        path: path.into(),
        source,
    })
}

fn load_sharded(
    dir: &Path,
    index: &Path,
    device: &Device,
) -> Result<HashMap<String, Tensor>, LoadError> {
    let text = std::fs::read_to_string(index).map_err(|source| LoadError::Io {
        path: index.into(),
        source,
    })?;
    let index_map: Index = serde_json::from_str(&text).map_err(|e| LoadError::Config {
        path: index.into(),
        message: e.to_string(),
    })?;
    let mut files: Vec<&String> = index_map.weight_map.values().collect();
    files.sort();
    files.dedup();
    let mut shards = HashMap::new();
    for file in files {
        // Shard names come from the index; keep them inside the model directory.
        if file.contains('/') || file.contains('\\') || file.starts_with('.') {
            return Err(LoadError::Config {
                path: index.into(),
                message: format!("shard name {file:?} leaves the model directory"),
            });
        }
        shards.insert(file.clone(), load_file(&dir.join(file), device)?);
    }
    let mut tensors = HashMap::new();
    for (name, file) in &index_map.weight_map {
        let t = shards
            .get_mut(file)
            .and_then(|s| s.remove(name))
            .ok_or_else(|| LoadError::MissingTensor {
                path: index.into(),
                name: name.clone(),
                file: file.clone(),
            })?;
        tensors.insert(name.clone(), t);
    }
    Ok(tensors)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, file: &str, names: &[&str]) {
        let tensors: HashMap<String, Tensor> = names
            .iter()
            .map(|n| {
                (
                    n.to_string(),
                    Tensor::ones(2, DType::F32, &Device::Cpu).unwrap(),
                )
            })
            .collect();
        candle_core::safetensors::save(&tensors, dir.join(file)).unwrap();
    }

    #[test]
    fn shards_load_through_their_index_and_a_wrong_index_fails() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "a.safetensors", &["x"]);
        write(dir.path(), "b.safetensors", &["y"]);
        let index = r#"{"weight_map": {"x": "a.safetensors", "y": "b.safetensors"}}"#;
        std::fs::write(dir.path().join("model.safetensors.index.json"), index).unwrap();
        let w = Weights::load(dir.path(), DType::BF16, &Device::Cpu).unwrap();
        let mut names: Vec<_> = w.names().cloned().collect();
        names.sort();
        assert_eq!(names, ["x", "y"]);
        assert_eq!(w.get("x").unwrap().dtype(), DType::BF16);

        let wrong = r#"{"weight_map": {"x": "b.safetensors", "y": "b.safetensors"}}"#;
        std::fs::write(dir.path().join("model.safetensors.index.json"), wrong).unwrap();
        let err = Weights::load(dir.path(), DType::F32, &Device::Cpu).unwrap_err();
        assert!(
            matches!(err, LoadError::MissingTensor { ref name, .. } if name == "x"),
            "{err}"
        );

        let escape = r#"{"weight_map": {"x": "../a.safetensors"}}"#;
        std::fs::write(dir.path().join("model.safetensors.index.json"), escape).unwrap();
        assert!(Weights::load(dir.path(), DType::F32, &Device::Cpu).is_err());
    }

    #[test]
    fn an_empty_directory_has_no_weights() {
        let dir = tempfile::tempdir().unwrap();
        let err = Weights::load(dir.path(), DType::F32, &Device::Cpu).unwrap_err();
        assert!(matches!(err, LoadError::NoWeights { .. }), "{err}");
    }

    #[test]
    fn a_missing_parameter_is_an_error_not_a_fresh_init() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "model.safetensors", &["x"]);
        let w = Weights::load(dir.path(), DType::F32, &Device::Cpu).unwrap();
        assert!(w.var_builder().get(2, "x").is_ok());
        assert!(w.var_builder().get(2, "missing").is_err());
    }
}
