//! Gradient buckets: how the trainable parameters' gradients are packed into the flat f32
//! buffers that go through the all-reduce.
//!
//! One buffer per parameter would cost one collective round trip per parameter (hundreds of
//! tiny messages); one buffer for the whole model cannot start until every gradient is known
//! and needs a host copy the size of the model. Buckets of a bounded size sit between the two,
//! as PyTorch DDP's `bucket_cap_mb` does, and are the unit a future overlap with the backward
//! pass would launch (ARCHITECTURE.md, "Gradient all-reduce and the backward pass").
//!
//! The layout is a pure function of the parameters' element counts in their fixed name order
//! and of the bucket size, so every rank computes the same one without talking to the others:
//! the ranks' buffers line up element by element, which the all-reduce relies on.

use anyhow::{ensure, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

/// Bytes of one gradient element (f32).
const ELEM_BYTES: usize = 4;

/// Where one parameter's gradient lives: a contiguous run of `len` elements of one bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slot {
    bucket: usize,
    offset: usize,
    len: usize,
}

/// The packing of parameters into buckets, computed once per training task.
///
/// Parameters are packed in order; a bucket is closed when the next parameter would take it
/// past `bucket_bytes`. A parameter is never split: one larger than a bucket gets a bucket of
/// its own. Never splitting keeps every parameter one slice of one buffer, so writing the
/// averaged gradient back is one tensor per parameter with no stitching, and the cost is only
/// that such a bucket exceeds the size (the largest parameter bounds it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Buckets {
    slots: Vec<Slot>,
    /// Elements in each bucket.
    sizes: Vec<usize>,
}

impl Buckets {
    /// The layout for parameters of `counts` elements each (in the order given) and buckets of
    /// at most `bucket_bytes` (rounded down to whole elements, at least one).
    pub fn new(counts: &[usize], bucket_bytes: usize) -> Buckets {
        let cap = (bucket_bytes / ELEM_BYTES).max(1);
        let mut slots = Vec::with_capacity(counts.len());
        let mut sizes: Vec<usize> = Vec::new();
        for &len in counts {
            match sizes.last_mut() {
                Some(used) if *used > 0 && *used + len > cap => sizes.push(len),
                Some(used) => *used += len,
                None => sizes.push(len),
            }
            let bucket = sizes.len() - 1;
            slots.push(Slot {
                bucket,
                offset: sizes[bucket] - len,
                len,
            });
        }
        Buckets { slots, sizes }
    }

    /// The layout for `vars`, in the order given (the shared name order of `sorted_vars`).
    pub fn for_vars(vars: &[(String, Var)], bucket_bytes: usize) -> Buckets {
        let counts: Vec<usize> = vars.iter().map(|(_, v)| v.elem_count()).collect();
        Buckets::new(&counts, bucket_bytes)
    }

    /// Elements in each bucket, in order.
    pub fn sizes(&self) -> &[usize] {
        &self.sizes
    }

    /// The gradients of `vars` packed into one flat f32 tensor per bucket, on the parameters'
    /// device (a GPU's buckets never visit the host). A parameter with no gradient (not
    /// reached by this step's loss) contributes zeros, so every rank sends the same number of
    /// elements whatever its batch touched.
    pub fn flatten(&self, vars: &[(String, Var)], grads: &GradStore) -> Result<Vec<Tensor>> {
        self.check(vars)?;
        let mut parts: Vec<Vec<Tensor>> = vec![Vec::new(); self.sizes.len()];
        for ((_, var), slot) in vars.iter().zip(&self.slots) {
            let part = match grads.get(var.as_tensor()) {
                Some(g) => g.flatten_all()?.to_dtype(DType::F32)?,
                None => Tensor::zeros(slot.len, DType::F32, var.device())?,
            };
            parts[slot.bucket].push(part);
        }
        Ok(parts
            .iter()
            .map(|p| Tensor::cat(p, 0))
            .collect::<candle_core::Result<_>>()?)
    }

    /// Put the (averaged) buckets back into `grads`, one tensor per parameter with the
    /// parameter's shape (a view into its bucket, no copy), replacing what was there.
    pub fn unflatten(
        &self,
        vars: &[(String, Var)],
        buffers: &[Tensor],
        grads: &mut GradStore,
    ) -> Result<()> {
        self.check(vars)?;
        ensure!(
            buffers.len() == self.sizes.len()
                && buffers
                    .iter()
                    .zip(&self.sizes)
                    .all(|(b, &n)| b.dims() == [n]),
            "gradient buckets do not match the layout"
        );
        for ((_, var), slot) in vars.iter().zip(&self.slots) {
            let g = buffers[slot.bucket]
                .narrow(0, slot.offset, slot.len)?
                .reshape(var.shape())?;
            grads.insert(var.as_tensor(), g);
        }
        Ok(())
    }

    /// The layout was made for these parameters: same count, same sizes, same order.
    fn check(&self, vars: &[(String, Var)]) -> Result<()> {
        ensure!(
            vars.len() == self.slots.len()
                && vars
                    .iter()
                    .zip(&self.slots)
                    .all(|((_, v), s)| v.elem_count() == s.len),
            "gradient bucket layout was made for other parameters ({} slots, {} parameters)",
            self.slots.len(),
            vars.len()
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Parameters of mixed shapes: a scalar, 1-D, 2-D, 3-D, and one of 300 elements that is
    /// larger than the 64-element buckets the tests use.
    fn params() -> Vec<(String, Var)> {
        let shapes: [&[usize]; 6] = [&[], &[5], &[3, 4], &[2, 3, 4], &[300], &[7]];
        shapes
            .iter()
            .enumerate()
            .map(|(i, dims)| {
                let var = Var::zeros(*dims, DType::F32, &Device::Cpu).unwrap();
                (format!("p{i}"), var)
            })
            .collect()
    }

    /// Gradients with distinct values everywhere, except parameter `missing` which has none.
    fn grads(vars: &[(String, Var)], missing: usize) -> GradStore {
        let mut store = GradStore::default();
        let mut next = 1.0f32;
        for (i, (_, var)) in vars.iter().enumerate() {
            if i == missing {
                continue;
            }
            let values: Vec<f32> = (0..var.elem_count())
                .map(|_| {
                    next += 0.5;
                    next
                })
                .collect();
            let g = Tensor::from_vec(values, var.shape(), &Device::Cpu).unwrap();
            store.insert(var.as_tensor(), g);
        }
        store
    }

    #[test]
    fn round_trip_restores_every_gradient_and_zero_fills_missing_ones() {
        let vars = params();
        let buckets = Buckets::for_vars(&vars, 64 * ELEM_BYTES);
        let missing = 2;
        let before = grads(&vars, missing);
        let buffers = buckets.flatten(&vars, &before).unwrap();
        let mut after = grads(&vars, usize::MAX);
        buckets.unflatten(&vars, &buffers, &mut after).unwrap();
        for (i, (name, var)) in vars.iter().enumerate() {
            let got = after.get(var.as_tensor()).unwrap();
            assert_eq!(got.dims(), var.dims(), "{name}");
            let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let want = match before.get(var.as_tensor()) {
                Some(g) => g.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                None => vec![0.0; var.elem_count()],
            };
            assert_eq!(got, want, "{name}");
            if i == missing {
                assert!(got.iter().all(|&x| x == 0.0), "{name}");
            }
        }
    }

    #[test]
    fn buckets_respect_the_size_and_never_split_a_parameter() {
        // Elements: 1, 5, 12, 24 | 300 (alone: larger than a bucket) | 7.
        let vars = params();
        let buckets = Buckets::for_vars(&vars, 64 * ELEM_BYTES);
        assert_eq!(buckets.sizes(), &[42, 300, 7]);
        let buffers = buckets.flatten(&vars, &grads(&vars, usize::MAX)).unwrap();
        let lens: Vec<usize> = buffers.iter().map(|b| b.elem_count()).collect();
        assert_eq!(lens, buckets.sizes());
        for (bucket, &n) in buckets.sizes().iter().enumerate() {
            let members = buckets.slots.iter().filter(|s| s.bucket == bucket).count();
            assert!(n <= 64 || members == 1, "bucket {bucket}: {n} elements");
        }
        // A bucket size below one element still holds one parameter per bucket.
        assert_eq!(Buckets::new(&[3, 1, 2], 1).sizes(), &[3, 1, 2]);
        // One big bucket holds everything, in order.
        assert_eq!(Buckets::new(&[3, 1, 2], 1 << 20).sizes(), &[6]);
        assert_eq!(Buckets::new(&[], 64).sizes(), &[] as &[usize]);
    }

    #[test]
    fn layout_is_the_same_for_the_same_inputs() {
        let counts = [1, 5, 12, 24, 300, 7, 64, 63, 2];
        for bytes in [4, 100, 256, 1 << 20] {
            assert_eq!(Buckets::new(&counts, bytes), Buckets::new(&counts, bytes));
        }
        let vars = params();
        assert_eq!(
            Buckets::for_vars(&vars, 256),
            Buckets::for_vars(&params(), 256)
        );
    }

    #[test]
    fn a_layout_for_other_parameters_is_refused() {
        let vars = params();
        let buckets = Buckets::new(&[1, 2, 3], 64);
        assert!(buckets.flatten(&vars, &grads(&vars, 0)).is_err());
    }
}
