//! AdamW with state that can be saved and restored: per-parameter first and second moments as
//! named tensors, and the step count.
//!
//! `candle_nn::AdamW` keeps its moments private, so a checkpoint could not carry them. This one
//! applies the same update with the same tensor operations in the same order (decoupled weight
//! decay on the parameter, bias-corrected moments, epsilon added after the square root), so it
//! produces bit-identical parameters for the same `ParamsAdamW` and gradients; the tests check
//! that against candle's over several steps.

use anyhow::{bail, Context as _, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::ParamsAdamW;
use std::collections::HashMap;

/// Name of the step count in an exported state.
pub const STEP: &str = "step";
/// Prefix of a parameter's first moment in an exported state (`m.<parameter>`).
pub const FIRST: &str = "m.";
/// Prefix of a parameter's second moment in an exported state (`v.<parameter>`).
pub const SECOND: &str = "v.";

/// One parameter and its moments.
struct Slot {
    name: String,
    var: Var,
    m: Tensor,
    v: Tensor,
}

/// AdamW over named parameters.
pub struct AdamW {
    slots: Vec<Slot>,
    params: ParamsAdamW,
    step: u64,
}

impl AdamW {
    /// An optimizer over `vars` (name, parameter) with zero moments at step 0.
    pub fn new(vars: &[(String, Var)], params: ParamsAdamW) -> Result<AdamW> {
        let slots = vars
            .iter()
            .map(|(name, var)| {
                let zeros = var.zeros_like()?;
                Ok(Slot {
                    name: name.clone(),
                    var: var.clone(),
                    m: zeros.clone(),
                    v: zeros,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(AdamW {
            slots,
            params,
            step: 0,
        })
    }

    /// Sets the learning rate of the next steps (the schedule lives with the caller).
    pub fn set_learning_rate(&mut self, lr: f64) {
        self.params.lr = lr;
    }

    /// Updates taken so far.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// One update from `grads`; a parameter without a gradient is left as it is.
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.step += 1;
        let p = &self.params;
        let t = i32::try_from(self.step).context("AdamW step count overflows i32")?;
        let bias1 = 1.0 / (1.0 - p.beta1.powi(t));
        let bias2 = 1.0 / (1.0 - p.beta2.powi(t));
        let decay = 1.0 - p.lr * p.weight_decay;
        for slot in &mut self.slots {
            let Some(g) = grads.get(slot.var.as_tensor()) else {
                continue;
            };
            let m = ((&slot.m * p.beta1)? + (g * (1.0 - p.beta1))?)?;
            let v = ((&slot.v * p.beta2)? + (g.sqr()? * (1.0 - p.beta2))?)?;
            let denom = ((&v * bias2)?.sqrt()? + p.eps)?;
            let direction = ((&m * bias1)? / denom)?;
            let decayed = (slot.var.as_tensor() * decay)?;
            slot.var.set(&(decayed - (direction * p.lr)?)?)?;
            slot.m = m;
            slot.v = v;
        }
        Ok(())
    }

    /// The state as named tensors: `m.<name>`, `v.<name>` per parameter and `step` (one i64).
    pub fn export(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::with_capacity(2 * self.slots.len() + 1);
        for slot in &self.slots {
            out.push((format!("{FIRST}{}", slot.name), slot.m.clone()));
            out.push((format!("{SECOND}{}", slot.name), slot.v.clone()));
        }
        let step = i64::try_from(self.step).context("AdamW step count overflows i64")?;
        out.push((STEP.to_string(), Tensor::new(&[step], &Device::Cpu)?));
        Ok(out)
    }

    /// Restores a state written by [`AdamW::export`]: every parameter's moments must be there
    /// with its shape, and nothing else may be.
    pub fn import(&mut self, mut state: HashMap<String, Tensor>) -> Result<()> {
        let step = state
            .remove(STEP)
            .context("optimizer state has no `step`")?
            .to_dtype(DType::I64)?
            .flatten_all()?
            .to_vec1::<i64>()?;
        let step = match step.as_slice() {
            [s] if *s >= 0 => *s as u64,
            other => bail!("optimizer state `step` must be one non-negative number, got {other:?}"),
        };
        let mut moments = Vec::with_capacity(self.slots.len());
        for slot in &self.slots {
            let mut take = |prefix: &str| -> Result<Tensor> {
                let key = format!("{prefix}{}", slot.name);
                let t = state
                    .remove(&key)
                    .with_context(|| format!("optimizer state has no `{key}`"))?;
                if t.dims() != slot.var.dims() {
                    bail!(
                        "optimizer state `{key}` has shape {:?}, the parameter {:?}",
                        t.dims(),
                        slot.var.dims()
                    );
                }
                // Checkpoints are read on the host; the moments live where the parameter does.
                Ok(t.to_dtype(slot.var.dtype())?.to_device(slot.var.device())?)
            };
            moments.push((take(FIRST)?, take(SECOND)?));
        }
        if let Some(extra) = state.keys().min() {
            bail!("optimizer state has `{extra}`, which is no parameter of this model");
        }
        for (slot, (m, v)) in self.slots.iter_mut().zip(moments) {
            slot.m = m;
            slot.v = v;
        }
        self.step = step;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_nn::Optimizer as _;
    use rand::{Rng, SeedableRng};

    fn vars(seed: u64) -> Vec<(String, Var)> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        [("a", vec![3, 5]), ("b", vec![7]), ("c", vec![2, 2, 2])]
            .into_iter()
            .map(|(name, shape)| {
                let n: usize = shape.iter().product();
                let data: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
                let t = Tensor::from_vec(data, shape, &Device::Cpu).unwrap();
                (name.to_string(), Var::from_tensor(&t).unwrap())
            })
            .collect()
    }

    /// Random gradients for `vars`, with some exact zeros (Adam's 0/0 corner).
    fn random(vars: &[(String, Var)], rng: &mut impl Rng) -> Vec<Tensor> {
        vars.iter()
            .map(|(_, var)| {
                let data: Vec<f32> = (0..var.elem_count())
                    .map(|i| {
                        if i % 5 == 0 {
                            0.0
                        } else {
                            rng.random_range(-2.0..2.0)
                        }
                    })
                    .collect();
                Tensor::from_vec(data, var.shape(), &Device::Cpu).unwrap()
            })
            .collect()
    }

    /// A `GradStore` holding `g[i]` for `vars[i]` (candle makes stores only by backward).
    fn store_of(vars: &[(String, Var)], g: &[Tensor]) -> GradStore {
        let terms: Vec<Tensor> = vars
            .iter()
            .map(|(_, v)| v.as_tensor().sum_all().unwrap())
            .collect();
        let mut store = Tensor::stack(&terms, 0)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for ((_, v), t) in vars.iter().zip(g) {
            store.insert(v.as_tensor(), t.clone());
        }
        store
    }

    fn bits(vars: &[(String, Var)]) -> Vec<Vec<u32>> {
        vars.iter()
            .map(|(_, v)| {
                let x = v.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                x.iter().map(|f| f.to_bits()).collect()
            })
            .collect()
    }

    fn params() -> ParamsAdamW {
        ParamsAdamW {
            lr: 3e-3,
            weight_decay: 0.01,
            ..Default::default()
        }
    }

    #[test]
    fn matches_candle_adamw_bit_for_bit() {
        let (ours, theirs) = (vars(1), vars(1));
        let mut a = AdamW::new(&ours, params()).unwrap();
        let list = theirs.iter().map(|(_, v)| v.clone()).collect();
        let mut b = candle_nn::AdamW::new(list, params()).unwrap();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2);
        for step in 0..6 {
            let lr = 3e-3 * (step + 1) as f64 / 4.0;
            a.set_learning_rate(lr);
            b.set_learning_rate(lr);
            let g = random(&ours, &mut rng);
            a.step(&store_of(&ours, &g)).unwrap();
            b.step(&store_of(&theirs, &g)).unwrap();
            assert_eq!(bits(&ours), bits(&theirs), "differ after step {step}");
        }
        assert_eq!(a.step_count(), 6);
    }

    #[test]
    fn exported_state_continues_exactly() {
        // Straight through: four steps.
        let straight = vars(5);
        let mut opt = AdamW::new(&straight, params()).unwrap();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(4);
        let mut seen = Vec::new();
        for _ in 0..4 {
            let g = random(&straight, &mut rng);
            opt.step(&store_of(&straight, &g)).unwrap();
            seen.push(g);
        }
        // Two steps, export, restore into a fresh optimizer over copied parameters, two more.
        let first = vars(5);
        let mut opt = AdamW::new(&first, params()).unwrap();
        for g in &seen[..2] {
            opt.step(&store_of(&first, g)).unwrap();
        }
        let state: HashMap<String, Tensor> = opt.export().unwrap().into_iter().collect();
        let resumed: Vec<(String, Var)> = first
            .iter()
            .map(|(n, v)| {
                (
                    n.clone(),
                    Var::from_tensor(&v.as_tensor().copy().unwrap()).unwrap(),
                )
            })
            .collect();
        let mut opt = AdamW::new(&resumed, params()).unwrap();
        opt.import(state).unwrap();
        assert_eq!(opt.step_count(), 2);
        for g in &seen[2..] {
            opt.step(&store_of(&resumed, g)).unwrap();
        }
        assert_eq!(bits(&resumed), bits(&straight));
    }

    #[test]
    fn import_names_what_is_wrong() {
        let v = vars(1);
        let mut opt = AdamW::new(&v, params()).unwrap();
        let mut state: HashMap<String, Tensor> = opt.export().unwrap().into_iter().collect();
        state.remove("v.b");
        let e = opt.import(state.clone()).unwrap_err().to_string();
        assert!(e.contains("v.b"), "{e}");
        state.insert(
            "v.b".into(),
            Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
        );
        let e = opt.import(state.clone()).unwrap_err().to_string();
        assert!(e.contains("v.b") && e.contains("shape"), "{e}");
        state.insert(
            "v.b".into(),
            Tensor::zeros(7, DType::F32, &Device::Cpu).unwrap(),
        );
        state.insert(
            "m.zzz".into(),
            Tensor::zeros(7, DType::F32, &Device::Cpu).unwrap(),
        );
        let e = opt.import(state).unwrap_err().to_string();
        assert!(e.contains("m.zzz"), "{e}");
    }
}
