//! LoRA adapters on the Qwen2 decoder's projections, saved and loaded in PEFT's format.
//!
//! A targeted projection computes `W x + b + (alpha / r) * B A dropout(x)`. The base `W`, `b`
//! stay plain tensors (frozen, in the model's dtype, bf16 on a GPU); `A` `[r, in]` and `B`
//! `[out, r]` are f32 `Var`s, and the adapter path runs in f32 whatever the base dtype, so
//! small updates are not rounded away. `A` starts as PEFT's default (kaiming-uniform with
//! `a = sqrt(5)`, i.e. uniform in `±1 / sqrt(in)`) and `B` at zero, so a fresh adapter leaves
//! the model's output unchanged.
//!
//! On disk: `adapter_model.safetensors` with PEFT's names,
//! `base_model.model.<module path>.lora_{A,B}.weight` (the module path as in the Hugging Face
//! checkpoint: `language_model.model.layers.0.self_attn.q_proj` for Qwen2-Audio,
//! `model.layers.0.self_attn.q_proj` for Qwen2-VL), and `adapter_config.json`, whose
//! `target_modules` is a regex PEFT full-matches against module paths, so only the language
//! model's projections take adapters (the audio tower has `q_proj` too).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Module, Result, Tensor, Var};
use candle_nn::Linear;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Deserialize;

use super::weights::LoadError;

/// The decoder projections LoRA can target, by their Hugging Face names.
pub use xkd_config::{LoraConfig, LORA_PROJECTIONS as PROJECTIONS};

const WEIGHTS_FILE: &str = "adapter_model.safetensors";
const CONFIG_FILE: &str = "adapter_config.json";
const KEY_PREFIX: &str = "base_model.model.";

/// PEFT's `target_modules`: a regex full-matched against module paths, limited to the
/// decoder layers under `prefix` (the language model's path in the checkpoint).
fn peft_pattern(config: &LoraConfig, prefix: &str) -> String {
    let alternatives: Vec<&str> = PROJECTIONS
        .iter()
        .copied()
        .filter(|p| config.targets(p))
        .collect();
    format!(
        r"{}model\.layers\.\d+\.(self_attn|mlp)\.({})",
        prefix.replace('.', r"\."),
        alternatives.join("|")
    )
}

/// Where LoRA dropout draws its masks, shared by every adapter of a model. The trainer
/// reseeds it before each step ([`LoraAdapters::reseed`]) from the run seed, the step and the
/// rank, so a step's masks depend on nothing else: a resumed run draws the masks the
/// uninterrupted run drew. On the CPU the masks come from a ChaCha stream on the host; on a
/// GPU from the device's generator (curand), which the reseed restarts with the same value
/// (a step of the 7B models drops elements of every adapter's input, billions of them: too
/// many to draw on the host and copy over).
#[derive(Debug, Clone)]
struct DropoutRng(Arc<Mutex<ChaCha8Rng>>);

impl DropoutRng {
    fn new() -> Self {
        Self(Arc::new(Mutex::new(ChaCha8Rng::seed_from_u64(0))))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ChaCha8Rng> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `x` with each element zeroed with probability `p`, the rest scaled by `1 / (1 - p)`.
    fn dropout(&self, x: &Tensor, p: f32) -> Result<Tensor> {
        if !x.device().is_cpu() {
            return candle_nn::ops::dropout(x, p);
        }
        let keep = (1.0 / (1.0 - p as f64)) as f32;
        let mut rng = self.lock();
        let mask: Vec<f32> = (0..x.elem_count())
            .map(|_| if rng.random::<f32>() >= p { keep } else { 0.0 })
            .collect();
        x * Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?
    }
}

/// Whether a model's adapters take part in its forward pass, shared by every adapter of the
/// model. Off, the model is its frozen base: the distillation's replay anchor (the student
/// before distillation) is the student itself with its adapters off, not a second copy of
/// the base weights.
/// Also whether they are frozen for good (an evaluated student's).
#[derive(Debug, Clone)]
pub struct LoraSwitch(Arc<SwitchState>);

#[derive(Debug)]
struct SwitchState {
    on: AtomicBool,
    frozen: AtomicBool,
}

impl LoraSwitch {
    fn new() -> Self {
        Self(Arc::new(SwitchState {
            on: AtomicBool::new(true),
            frozen: AtomicBool::new(false),
        }))
    }

    fn is_on(&self) -> bool {
        self.0.on.load(Ordering::Relaxed)
    }

    fn is_frozen(&self) -> bool {
        self.0.frozen.load(Ordering::Relaxed)
    }

    /// Turns the adapters off until the guard is dropped. A forward pass with them off reads
    /// no `Var`, so nothing it computes carries a gradient, and it draws no dropout mask.
    pub fn off(&self) -> AdaptersOff<'_> {
        self.0.on.store(false, Ordering::Relaxed);
        AdaptersOff(self)
    }

    /// Freezes the adapters for good: they enter every forward detached, so a forward records
    /// no graph and keeps one layer's tensors at a time, as a frozen model's does (with them
    /// as variables every layer's tensors live until the logits are dropped). For a student
    /// that is evaluated, never trained again.
    pub fn freeze(&self) {
        self.0.frozen.store(true, Ordering::Relaxed);
    }
}

/// The adapters stay off while this lives ([`LoraSwitch::off`]).
#[must_use = "the adapters are back on as soon as the guard is dropped"]
pub struct AdaptersOff<'a>(&'a LoraSwitch);

impl Drop for AdaptersOff<'_> {
    fn drop(&mut self) {
        self.0 .0.on.store(true, Ordering::Relaxed);
    }
}

/// One projection's adapter: `A` `[r, in]`, `B` `[out, r]`.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    a: Var,
    b: Var,
    scale: f64,
    dropout: f32,
    rng: DropoutRng,
    on: LoraSwitch,
}

impl LoraAdapter {
    pub fn a(&self) -> &Var {
        &self.a
    }

    pub fn b(&self) -> &Var {
        &self.b
    }

    /// `scale * B A dropout(x)` in f32, for `x` `[..., in]` of any dtype; `A` and `B`
    /// detached once the adapters are frozen ([`LoraSwitch::freeze`]).
    fn delta(&self, x: &Tensor, training: bool) -> Result<Tensor> {
        let mut x = x.to_dtype(DType::F32)?;
        if training && self.dropout > 0.0 {
            x = self.rng.dropout(&x, self.dropout)?;
        }
        let (a, b) = if self.on.is_frozen() {
            (self.a.as_tensor().detach(), self.b.as_tensor().detach())
        } else {
            (self.a.as_tensor().clone(), self.b.as_tensor().clone())
        };
        let h = x.broadcast_matmul(&a.t()?)?;
        h.broadcast_matmul(&b.t()?)? * self.scale
    }
}

/// A linear layer whose frozen base may carry a LoRA adapter.
#[derive(Debug, Clone)]
pub struct LoraLinear {
    base: Linear,
    adapter: Option<LoraAdapter>,
    training: bool,
}

impl LoraLinear {
    pub fn new(base: Linear) -> Self {
        Self {
            base,
            adapter: None,
            training: false,
        }
    }

    /// `(in, out)` of the base weight.
    pub fn shape(&self) -> Result<(usize, usize)> {
        let (out, inp) = self.base.weight().dims2()?;
        Ok((inp, out))
    }

    pub fn attach(&mut self, adapter: LoraAdapter) -> Result<()> {
        let (inp, out) = self.shape()?;
        let (a, b) = (adapter.a.dims(), adapter.b.dims());
        if a.len() != 2 || b.len() != 2 || a[1] != inp || b[0] != out || a[0] != b[1] {
            candle_core::bail!("LoRA A {a:?} and B {b:?} do not fit a {inp} -> {out} projection");
        }
        self.adapter = Some(adapter);
        Ok(())
    }

    pub fn set_training(&mut self, training: bool) {
        self.training = training;
    }
}

impl Module for LoraLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.base.forward(x)?;
        match &self.adapter {
            Some(adapter) if adapter.on.is_on() => {
                let delta = adapter.delta(x, self.training)?.to_dtype(y.dtype())?;
                y + delta
            }
            _ => Ok(y),
        }
    }
}

/// A target projection of a model: its module path in the checkpoint and `(in, out)`.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraTarget {
    pub path: String,
    pub in_dim: usize,
    pub out_dim: usize,
}

/// The adapters of one model, by module path.
#[derive(Debug, Clone)]
pub struct LoraAdapters {
    pub config: LoraConfig,
    /// The language model's path in the checkpoint (`language_model.` or empty).
    prefix: String,
    modules: BTreeMap<String, LoraAdapter>,
    rng: DropoutRng,
    on: LoraSwitch,
}

impl LoraAdapters {
    /// Fresh adapters for `targets`: `A` from PEFT's default init, drawn from `seed` in the
    /// order of the module paths, `B` zero.
    pub fn init(
        config: LoraConfig,
        prefix: &str,
        targets: &[LoraTarget],
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        config.validate().map_err(candle_core::Error::msg)?;
        let mut sorted: Vec<&LoraTarget> = targets.iter().collect();
        sorted.sort_by(|x, y| x.path.cmp(&y.path));
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let dropout = DropoutRng::new();
        let on = LoraSwitch::new();
        let mut modules = BTreeMap::new();
        for t in sorted {
            let bound = 1.0 / (t.in_dim as f32).sqrt();
            let a: Vec<f32> = (0..config.r * t.in_dim)
                .map(|_| rng.random_range(-bound..bound))
                .collect();
            let a = Tensor::from_vec(a, (config.r, t.in_dim), device)?;
            let b = Tensor::zeros((t.out_dim, config.r), DType::F32, device)?;
            modules.insert(t.path.clone(), adapter(&config, a, b, &dropout, &on)?);
        }
        Ok(Self {
            config,
            prefix: prefix.into(),
            modules,
            rng: dropout,
            on,
        })
    }

    /// Restarts the dropout masks' random stream at `seed` (on a GPU, `device`'s generator
    /// too): the masks of what runs next are a function of `seed` alone.
    pub fn reseed(&self, seed: u64, device: &Device) -> Result<()> {
        if self.config.dropout == 0.0 {
            return Ok(()); // nothing draws from it
        }
        *self.rng.lock() = ChaCha8Rng::seed_from_u64(seed);
        if !device.is_cpu() {
            device.set_seed(seed)?;
        }
        Ok(())
    }

    /// The switch of every adapter here and of the model they are attached to.
    pub fn switch(&self) -> &LoraSwitch {
        &self.on
    }

    pub fn get(&self, path: &str) -> Option<&LoraAdapter> {
        self.modules.get(path)
    }

    pub fn len(&self) -> usize {
        self.modules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.modules.is_empty()
    }

    pub fn paths(&self) -> impl Iterator<Item = &String> {
        self.modules.keys()
    }

    /// Every `A` and `B` under its name in this crate's checkpoints, `{path}.lora_A.weight`
    /// and `{path}.lora_B.weight`, in name order.
    pub fn named_vars(&self) -> Vec<(String, Var)> {
        let mut out: Vec<(String, Var)> = self
            .modules
            .iter()
            .flat_map(|(path, m)| {
                [
                    (format!("{path}.lora_A.weight"), m.a.clone()),
                    (format!("{path}.lora_B.weight"), m.b.clone()),
                ]
            })
            .collect();
        out.sort_by(|x, y| x.0.cmp(&y.0));
        out
    }

    /// Every `A` and `B`, in module path order: what an optimiser trains.
    pub fn vars(&self) -> Vec<Var> {
        self.modules
            .values()
            .flat_map(|m| [m.a.clone(), m.b.clone()])
            .collect()
    }

    /// Writes `adapter_model.safetensors` and `adapter_config.json` into `dir`, which PEFT's
    /// `PeftModel.from_pretrained` loads onto `base_model` (a name or directory).
    pub fn save(&self, dir: &Path, base_model: &str) -> std::result::Result<(), LoadError> {
        std::fs::create_dir_all(dir).map_err(|source| LoadError::Io {
            path: dir.into(),
            source,
        })?;
        let mut tensors = std::collections::HashMap::new();
        for (path, m) in &self.modules {
            tensors.insert(peft_key(path, "A"), m.a.as_tensor().clone());
            tensors.insert(peft_key(path, "B"), m.b.as_tensor().clone());
        }
        let file = dir.join(WEIGHTS_FILE);
        candle_core::safetensors::save(&tensors, &file)
            .map_err(|source| LoadError::Candle { path: file, source })?;
        let json = serde_json::to_string_pretty(&self.peft_config(base_model))
            .expect("a JSON value serialises");
        let file = dir.join(CONFIG_FILE);
        std::fs::write(&file, json).map_err(|source| LoadError::Io { path: file, source })
    }

    fn peft_config(&self, base_model: &str) -> serde_json::Value {
        serde_json::json!({
            "peft_type": "LORA",
            "task_type": null,
            "base_model_name_or_path": base_model,
            "r": self.config.r,
            "lora_alpha": self.config.alpha,
            "lora_dropout": self.config.dropout,
            "target_modules": peft_pattern(&self.config, &self.prefix),
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "use_rslora": false,
            "use_dora": false,
            "init_lora_weights": true,
            "modules_to_save": null,
        })
    }

    /// Reads adapters that `save` wrote (or PEFT saved for the same targets) from `dir`.
    pub fn load(dir: &Path, device: &Device) -> std::result::Result<Self, LoadError> {
        let (path, text) = super::weights::read_text(dir, CONFIG_FILE)?;
        let raw: RawPeftConfig = serde_json::from_str(&text).map_err(|e| config_error(&path, e))?;
        if raw.peft_type != "LORA" || raw.use_rslora || raw.use_dora {
            return Err(config_error(
                &path,
                "only plain LoRA (no rsLoRA, no DoRA) loads",
            ));
        }
        let file = dir.join(WEIGHTS_FILE);
        let tensors =
            candle_core::safetensors::load(&file, device).map_err(|source| LoadError::Candle {
                path: file.clone(),
                source,
            })?;
        let pairs = pair_tensors(&file, tensors)?;
        let mut targets: Vec<String> = Vec::new();
        for path in pairs.keys() {
            let projection = path.rsplit('.').next().unwrap_or_default().to_string();
            if !targets.contains(&projection) {
                targets.push(projection);
            }
        }
        targets.sort_by_key(|t| PROJECTIONS.iter().position(|p| p == t));
        let config = LoraConfig {
            r: raw.r,
            alpha: raw.lora_alpha,
            dropout: raw.lora_dropout,
            target_modules: targets,
        };
        config.validate().map_err(|m| config_error(&path, m))?;
        let prefix = pairs
            .keys()
            .next()
            .and_then(|p| p.split_once("model.layers."))
            .map(|(prefix, _)| prefix.to_string())
            .unwrap_or_default();
        let dropout = DropoutRng::new();
        let on = LoraSwitch::new();
        let mut modules = BTreeMap::new();
        for (module, (a, b)) in pairs {
            if a.dim(0)? != config.r {
                return Err(config_error(
                    &file,
                    format!("{module}: A is {:?}", a.dims()),
                ));
            }
            modules.insert(module, adapter(&config, a, b, &dropout, &on)?);
        }
        Ok(Self {
            config,
            prefix,
            modules,
            rng: dropout,
            on,
        })
    }
}

#[derive(Debug, Deserialize)]
struct RawPeftConfig {
    peft_type: String,
    r: usize,
    lora_alpha: f64,
    #[serde(default)]
    lora_dropout: f64,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    use_dora: bool,
}

fn config_error(path: &Path, message: impl ToString) -> LoadError {
    LoadError::Config {
        path: path.into(),
        message: message.to_string(),
    }
}

fn adapter(
    config: &LoraConfig,
    a: Tensor,
    b: Tensor,
    rng: &DropoutRng,
    on: &LoraSwitch,
) -> Result<LoraAdapter> {
    Ok(LoraAdapter {
        a: Var::from_tensor(&a.to_dtype(DType::F32)?)?,
        b: Var::from_tensor(&b.to_dtype(DType::F32)?)?,
        scale: config.scale(),
        dropout: config.dropout as f32,
        rng: rng.clone(),
        on: on.clone(),
    })
}

fn peft_key(path: &str, which: &str) -> String {
    format!("{KEY_PREFIX}{path}.lora_{which}.weight")
}

/// Groups `base_model.model.<path>.lora_{A,B}.weight` into `(A, B)` by module path.
fn pair_tensors(
    file: &Path,
    tensors: std::collections::HashMap<String, Tensor>,
) -> std::result::Result<BTreeMap<String, (Tensor, Tensor)>, LoadError> {
    let mut a = BTreeMap::new();
    let mut b = BTreeMap::new();
    for (name, t) in tensors {
        let rest = name.strip_prefix(KEY_PREFIX);
        if let Some(path) = rest.and_then(|r| r.strip_suffix(".lora_A.weight")) {
            a.insert(path.to_string(), t);
        } else if let Some(path) = rest.and_then(|r| r.strip_suffix(".lora_B.weight")) {
            b.insert(path.to_string(), t);
        } else {
            return Err(config_error(file, format!("{name} is no LoRA A or B")));
        }
    }
    let mut pairs = BTreeMap::new();
    for (path, ta) in a {
        let tb = b
            .remove(&path)
            .ok_or_else(|| config_error(file, format!("{path} has lora_A but no lora_B")))?;
        pairs.insert(path, (ta, tb));
    }
    if let Some(path) = b.keys().next() {
        return Err(config_error(
            file,
            format!("{path} has lora_B but no lora_A"),
        ));
    }
    Ok(pairs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dropout: f64) -> LoraConfig {
        LoraConfig {
            r: 2,
            alpha: 6.0,
            dropout,
            target_modules: vec!["q_proj".into()],
        }
    }

    fn target() -> LoraTarget {
        LoraTarget {
            path: "model.layers.0.self_attn.q_proj".into(),
            in_dim: 16,
            out_dim: 3,
        }
    }

    #[test]
    fn config_reads_from_json_and_rejects_bad_values() {
        let c: LoraConfig = serde_json::from_str(
            r#"{"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"]}"#,
        )
        .unwrap();
        assert_eq!(c.scale(), 2.0);
        assert!(c.validate().is_ok());
        assert!(LoraConfig { r: 0, ..c.clone() }.validate().is_err());
        assert!(LoraConfig {
            dropout: 1.0,
            ..c.clone()
        }
        .validate()
        .is_err());
        let fc1 = LoraConfig {
            target_modules: vec!["fc1".into()],
            ..c
        };
        assert!(fc1.validate().is_err());
        assert_eq!(
            peft_pattern(&config(0.0), "language_model."),
            r"language_model\.model\.layers\.\d+\.(self_attn|mlp)\.(q_proj)"
        );
    }

    #[test]
    fn a_starts_uniform_within_one_over_root_fan_in_and_b_at_zero() {
        let dev = Device::Cpu;
        let x = LoraAdapters::init(config(0.0), "", &[target()], 9, &dev).unwrap();
        let y = LoraAdapters::init(config(0.0), "", &[target()], 9, &dev).unwrap();
        let m = x.get(&target().path).unwrap();
        let a: Vec<f32> = m.a().as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(m.a().dims(), [2, 16]);
        assert!(a.iter().all(|v| v.abs() < 0.25), "bound 1/sqrt(16)");
        assert!(a.iter().any(|v| v.abs() > 0.1), "spread over the range");
        let again: Vec<f32> = y
            .get(&target().path)
            .unwrap()
            .a()
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(a, again, "same seed, same A");
        let b: Vec<f32> = m.b().as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(m.b().dims(), [3, 2]);
        assert!(b.iter().all(|&v| v == 0.0));
    }

    #[test]
    fn the_update_is_scaled_and_dropout_acts_in_training_only() {
        let dev = Device::Cpu;
        let adapters = LoraAdapters::init(config(0.5), "", &[target()], 9, &dev).unwrap();
        let m = adapters.get(&target().path).unwrap();
        m.b()
            .set(&Tensor::ones((3, 2), DType::F32, &dev).unwrap())
            .unwrap();
        let base = Linear::new(Tensor::zeros((3, 16), DType::F32, &dev).unwrap(), None);
        let mut proj = LoraLinear::new(base);
        proj.attach(m.clone()).unwrap();
        let x = Tensor::ones((1, 16), DType::F32, &dev).unwrap();
        // Eval: 3 * B A x, every output equal to 3 * sum(A).
        let want = (m.a().as_tensor().sum_all().unwrap() * 3.0).unwrap();
        let got = proj.forward(&x).unwrap();
        let want = want.to_scalar::<f32>().unwrap();
        for v in got.flatten_all().unwrap().to_vec1::<f32>().unwrap() {
            assert!((v - want).abs() < 1e-5, "{v} vs {want}");
        }
        assert_eq!(
            proj.forward(&x).unwrap().to_vec2::<f32>().unwrap(),
            got.to_vec2::<f32>().unwrap()
        );
        proj.set_training(true);
        let dropped = proj.forward(&x).unwrap().to_vec2::<f32>().unwrap();
        assert_ne!(
            dropped,
            got.to_vec2::<f32>().unwrap(),
            "dropout in training"
        );
        let bad = LoraAdapters::init(
            config(0.0),
            "",
            &[LoraTarget {
                in_dim: 8,
                ..target()
            }],
            9,
            &dev,
        )
        .unwrap();
        assert!(proj
            .attach(bad.get(&target().path).unwrap().clone())
            .is_err());
    }

    #[test]
    fn switched_off_the_projection_is_its_base_bit_for_bit_and_draws_no_mask() {
        let dev = Device::Cpu;
        let adapters = LoraAdapters::init(config(0.5), "", &[target()], 9, &dev).unwrap();
        let m = adapters.get(&target().path).unwrap();
        m.b()
            .set(&Tensor::ones((3, 2), DType::F32, &dev).unwrap())
            .unwrap();
        let weight = Tensor::randn(0f32, 1.0, (3, 16), &dev).unwrap();
        let bias = Tensor::randn(0f32, 1.0, 3, &dev).unwrap();
        let base = Linear::new(weight, Some(bias));
        let mut proj = LoraLinear::new(base.clone());
        proj.attach(m.clone()).unwrap();
        proj.set_training(true);
        let x = Tensor::randn(0f32, 1.0, (4, 16), &dev).unwrap();
        let rows = |t: Tensor| t.to_vec2::<f32>().unwrap();
        adapters.reseed(3, &dev).unwrap();
        let on = rows(proj.forward(&x).unwrap());
        assert_ne!(
            on,
            rows(base.forward(&x).unwrap()),
            "the adapter moves the output"
        );
        adapters.reseed(3, &dev).unwrap();
        {
            let _off = adapters.switch().off();
            assert_eq!(
                rows(proj.forward(&x).unwrap()),
                rows(base.forward(&x).unwrap())
            );
        }
        // On again, and the pass with it off took nothing from the dropout stream.
        assert_eq!(rows(proj.forward(&x).unwrap()), on);
    }

    #[test]
    fn frozen_adapters_give_the_same_output_and_record_no_graph() {
        let dev = Device::Cpu;
        let adapters = LoraAdapters::init(config(0.0), "", &[target()], 9, &dev).unwrap();
        let m = adapters.get(&target().path).unwrap();
        m.b()
            .set(&Tensor::randn(0f32, 1.0, (3, 2), &dev).unwrap())
            .unwrap();
        let base = Linear::new(Tensor::randn(0f32, 1.0, (3, 16), &dev).unwrap(), None);
        let mut proj = LoraLinear::new(base);
        proj.attach(m.clone()).unwrap();
        let x = Tensor::randn(0f32, 1.0, (4, 16), &dev).unwrap();
        let live = proj.forward(&x).unwrap();
        let grads = live.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(m.a()).is_some() && grads.get(m.b()).is_some());
        adapters.switch().freeze();
        let frozen = proj.forward(&x).unwrap();
        assert_eq!(
            frozen.to_vec2::<f32>().unwrap(),
            live.to_vec2::<f32>().unwrap()
        );
        // Nothing the forward made tracks a variable: no graph is kept behind the output.
        let grads = frozen.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(m.a()).is_none() && grads.get(m.b()).is_none());
    }

    #[test]
    fn dropout_masks_are_a_function_of_the_reseed_value_alone() {
        let dev = Device::Cpu;
        let adapters = LoraAdapters::init(config(0.25), "", &[target()], 9, &dev).unwrap();
        let mut proj = LoraLinear::new(Linear::new(
            Tensor::zeros((3, 16), DType::F32, &dev).unwrap(),
            None,
        ));
        proj.attach(adapters.get(&target().path).unwrap().clone())
            .unwrap();
        proj.set_training(true);
        let x = Tensor::ones((64, 16), DType::F32, &dev).unwrap();
        let rng = &adapters.get(&target().path).unwrap().rng;
        let masks = |seed: u64, calls: usize| -> Vec<Vec<f32>> {
            adapters.reseed(seed, &dev).unwrap();
            (0..calls)
                .map(|_| {
                    let m = rng.dropout(&x, 0.25).unwrap();
                    m.flatten_all().unwrap().to_vec1().unwrap()
                })
                .collect()
        };
        let first = masks(7, 2);
        // What ran before the reseed does not matter: the attached copy shares the stream.
        proj.forward(&x).unwrap();
        assert_eq!(
            masks(7, 2),
            first,
            "same seed, same masks in the same order"
        );
        assert_ne!(first[0], first[1], "consecutive masks differ");
        assert_ne!(masks(8, 1)[0], first[0], "another seed, other masks");
        // Kept elements are scaled by 1 / (1 - p); about p of them are dropped.
        let all: Vec<f32> = first.concat();
        assert!(all
            .iter()
            .all(|&v| v == 0.0 || (v - 4.0 / 3.0).abs() < 1e-6));
        let dropped = all.iter().filter(|&&v| v == 0.0).count() as f64 / all.len() as f64;
        assert!((dropped - 0.25).abs() < 0.05, "dropped {dropped}");
    }
}
