//! The fused distillation loss (issue 3): one custom candle op that reads student and teacher
//! logits once per pass, never materialises a `[N, V]` temporary other than the gradient it must
//! return, and hands that gradient to autograd.
//!
//! # Semantics
//!
//! For student logits `s` `[N, Vs]`, teacher logits `t` `[N, Vt]`, per-row weights `w` (1 when
//! not given), temperature `T` and mixing weight `alpha`:
//!
//! ```text
//! loss = sum_r w_r * ( alpha * T^2 * KL(fold(softmax(t_r/T)) || fold(softmax(s_r/T)))
//!                    + (1 - alpha) * CE(s_r, target_r) ) / N
//! ```
//!
//! which is `alpha * T^2 * mean_rows KL + (1 - alpha) * CE` when all weights are 1. As in
//! [`crate::distill_loss`] (and with `kl_weight = alpha * w`, `ce_weight = (1 - alpha) * w` it is
//! the same number) the sum is divided by N, not by the weight sum, so the data-parallel average
//! of per-rank losses is the loss of the whole batch. Rows of weight 0 are never read: they add
//! nothing, their gradient row is exactly 0, and an all-masked batch gives loss 0 and a zero
//! gradient (never NaN), even if those rows hold NaN or arbitrary targets. The cross-entropy uses
//! the student's full vocabulary at temperature 1; the teacher never gets a gradient.
//!
//! # Vocabulary mismatch: the "rest" bucket
//!
//! When `Vs != Vt` the caller gives a shared id range `[0, Vshared)` (ids that mean the same token
//! on both sides). `fold` keeps the probabilities of the shared ids and adds one extra bucket per
//! side holding all the probability that side puts on its own ids `>= Vshared`, so both folded
//! distributions have `Vshared + 1` entries and still sum to one. Why not renormalise each side
//! over the shared range instead: renormalising divides away exactly the mass a model puts
//! outside the range, so a student that moves probability onto ids the teacher cannot express
//! would pay nothing for it (and get no gradient against it), and the loss would no longer be a
//! divergence between the distributions the models actually produce. With the rest bucket the
//! loss is the KL between both true distributions seen through the same coarsening (by the
//! data-processing inequality never more than a KL over a common vocabulary would be), it
//! penalises mass leaking out of the shared range on either side, and it reduces to the plain KL
//! when `Vs == Vt == Vshared`.
//!
//! A side whose whole vocabulary is shared has an empty rest bucket. That is fine for the
//! teacher (its term is `0 * log 0 = 0`), but if the student had none while the teacher can put
//! mass outside the range the KL would be infinite, so that combination is rejected: pass a
//! range that leaves the student a rest bucket (e.g. the real tokenizer size, 151,643 for the
//! Qwen2 family, below both padded vocabularies).
//!
//! # Implementation (CPU)
//!
//! Rows run in parallel on candle's thread pool. Each row takes two passes: the first computes
//! the log-sum-exps it needs (student and teacher at `1/T`, split at `Vshared`, and the student
//! at temperature 1 for the cross-entropy) with an online, chunk-wise rescaled sum; the second
//! computes the probabilities, accumulates the KL and writes the gradient with respect to the
//! student logits. Accumulation is f32 within a chunk of 256 logits and f64 across chunks; inputs
//! are f32, bf16 or f16 (each side independently). The gradient buffer (f32, `[N, Vs]`) is the
//! only large allocation; it is kept by the op and backward only scales it by the upstream
//! gradient (no copy at all when that is 1, as for `loss.backward()`), then casts it to the
//! student's dtype; backward can therefore run once per forward. It is only computed when the
//! student tracks gradients. (candle's autograd itself then adds the returned gradient into a
//! fresh `zeros_like(student)`, so the peak during `backward()` is three B x V buffers, two of
//! them candle's; see kernels/benches/kl.rs.)

use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Device, Layout, Result, Shape, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;

use crate::LossParts;

/// Options of [`fused_distill_loss`].
#[derive(Debug, Clone)]
pub struct FusedLoss {
    /// Softmax temperature `T` of the KL part (> 0). The cross-entropy uses temperature 1.
    pub temperature: f64,
    /// Weight of the KL part in `[0, 1]`; the cross-entropy gets `1 - alpha`.
    pub alpha: f64,
    /// Shared id range `[0, Vshared)` when the vocabularies differ; `None` requires `Vs == Vt`.
    pub shared_vocab: Option<usize>,
    /// Target ids `[N]` (u32 or i64) of the cross-entropy part; required unless `alpha == 1`.
    /// Targets of rows with weight 0 are ignored (any value, e.g. -100, is allowed there).
    pub targets: Option<Tensor>,
    /// Per-row weights `[N]` (any float dtype, >= 0); 0 masks a row. `None` means all 1.
    pub weights: Option<Tensor>,
}

impl Default for FusedLoss {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            alpha: 1.0,
            shared_vocab: None,
            targets: None,
            weights: None,
        }
    }
}

/// The fused distillation loss; see the module documentation for the exact definition.
///
/// `student` is `[N, Vs]`, `teacher` `[N, Vt]`, both on the CPU (f32, bf16 or f16) or, with the
/// `cuda` feature, both on one CUDA device (f32 or bf16; sm_90 or newer). Returns
/// `total` (a scalar f32 tensor that backpropagates into `student` only) and its two parts `kl`
/// (`alpha * T^2 * ...`) and `ce` (`(1 - alpha) * ...`), both weighted and divided by N like
/// `total`, as detached scalars for logging: `total == kl + ce`.
pub fn fused_distill_loss(
    student: &Tensor,
    teacher: &Tensor,
    opts: &FusedLoss,
) -> Result<LossParts> {
    let (n, vs) = student.dims2()?;
    let (nt, vt) = teacher.dims2()?;
    if nt != n {
        candle_core::bail!(
            "teacher logits {:?} and student logits {:?} have different row counts",
            teacher.dims(),
            student.dims()
        );
    }
    let shared = match opts.shared_vocab {
        None if vs == vt => vs,
        None => candle_core::bail!(
            "student vocabulary {vs} != teacher vocabulary {vt}: give shared_vocab"
        ),
        Some(s) => s,
    };
    if shared == 0 || shared > vs.min(vt) {
        candle_core::bail!("shared_vocab {shared} must be in 1..={}", vs.min(vt));
    }
    let alpha = opts.alpha;
    if !(0.0..=1.0).contains(&alpha) {
        candle_core::bail!("alpha {alpha} must be in [0, 1]");
    }
    let temperature = opts.temperature;
    if !(temperature > 0.0 && temperature.is_finite()) {
        candle_core::bail!("temperature {temperature} must be positive");
    }
    if alpha > 0.0 && shared == vs && vt > shared {
        candle_core::bail!(
            "the student has no ids outside the shared range [0, {shared}) but the teacher has \
             {} more: the KL would be infinite; pass a smaller shared_vocab",
            vt - shared
        );
    }
    if !student.device().same_device(teacher.device()) {
        candle_core::bail!(
            "fused_distill_loss: student on {:?}, teacher on {:?}",
            student.device().location(),
            teacher.device().location()
        );
    }
    for x in [student, teacher] {
        let ok = match x.device() {
            Device::Cpu => matches!(x.dtype(), DType::F32 | DType::BF16 | DType::F16),
            Device::Cuda(_) if cfg!(feature = "cuda") => {
                matches!(x.dtype(), DType::F32 | DType::BF16)
            }
            other => candle_core::bail!(
                "fused_distill_loss: no implementation on {:?} (build with --features cuda for \
                 CUDA)",
                other.location()
            ),
        };
        if !ok {
            candle_core::bail!(
                "fused_distill_loss: unsupported logits dtype {:?} on {:?}",
                x.dtype(),
                x.device().location()
            );
        }
    }
    let weights = match &opts.weights {
        None => None,
        Some(w) => {
            let w = w.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
            if w.len() != n {
                candle_core::bail!("{} weights for {n} rows", w.len());
            }
            if w.iter().any(|x| !(*x >= 0.0 && x.is_finite())) {
                candle_core::bail!("row weights must be finite and >= 0");
            }
            Some(w)
        }
    };
    let weight = |r: usize| weights.as_ref().map_or(1.0, |w| w[r]);
    let targets = match &opts.targets {
        None if alpha < 1.0 => {
            candle_core::bail!("alpha {alpha} < 1 needs targets for the cross-entropy part")
        }
        None => None,
        Some(t) => {
            let t = t.flatten_all()?.to_dtype(DType::I64)?.to_vec1::<i64>()?;
            if t.len() != n {
                candle_core::bail!("{} targets for {n} rows", t.len());
            }
            let mut out = Vec::with_capacity(n);
            for (r, &id) in t.iter().enumerate() {
                if weight(r) == 0.0 || alpha == 1.0 {
                    out.push(0);
                } else if id < 0 || id as usize >= vs {
                    candle_core::bail!("target {id} of row {r} is outside [0, {vs})");
                } else {
                    out.push(id as u32);
                }
            }
            Some(out)
        }
    };
    let plan = Plan {
        n,
        vs,
        vt,
        shared,
        temperature: temperature as f32,
        alpha: alpha as f32,
        targets,
        weights,
        want_grad: student.track_op(),
    };
    let saved = Arc::new(Mutex::new(Saved::default()));
    let op = DistillOp {
        plan,
        saved: saved.clone(),
    };
    let student = student.contiguous()?;
    let teacher = teacher.detach().contiguous()?;
    let total = student.apply_op2(&teacher, op)?;
    let saved = saved.lock().expect("poisoned");
    let (kl, ce) = match &saved.parts {
        // The CUDA op leaves (kl, ce) on the device: no synchronisation here.
        Some(parts) => (parts.get(0)?, parts.get(1)?),
        None => (
            Tensor::new(saved.kl as f32, &Device::Cpu)?,
            Tensor::new(saved.ce as f32, &Device::Cpu)?,
        ),
    };
    Ok(LossParts { total, kl, ce })
}

/// Everything the op needs besides the two logits tensors, already validated.
#[derive(Debug)]
struct Plan {
    n: usize,
    vs: usize,
    vt: usize,
    shared: usize,
    temperature: f32,
    alpha: f32,
    targets: Option<Vec<u32>>,
    weights: Option<Vec<f32>>,
    want_grad: bool,
}

/// What the forward leaves for backward and for the caller.
#[derive(Default)]
struct Saved {
    /// d total / d student, `[N, Vs]` (f32 on the CPU, the student's dtype on CUDA).
    grad: Option<Tensor>,
    kl: f64,
    ce: f64,
    /// `(kl, ce)` as an f32 tensor `[2]` on the device (CUDA only).
    parts: Option<Tensor>,
}

struct DistillOp {
    plan: Plan,
    saved: Arc<Mutex<Saved>>,
}

impl CustomOp2 for DistillOp {
    fn name(&self) -> &'static str {
        "xkd-fused-distill-loss"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let p = &self.plan;
        if l1.dims() != [p.n, p.vs] || l2.dims() != [p.n, p.vt] {
            candle_core::bail!(
                "fused loss: unexpected shapes {:?} {:?}",
                l1.dims(),
                l2.dims()
            );
        }
        let (kl, ce, grad) = match s1 {
            CpuStorage::F32(s) => dispatch_teacher(p, slice(s, l1)?, s2, l2)?,
            CpuStorage::BF16(s) => dispatch_teacher(p, slice(s, l1)?, s2, l2)?,
            CpuStorage::F16(s) => dispatch_teacher(p, slice(s, l1)?, s2, l2)?,
            other => candle_core::bail!("fused loss: student dtype {:?}", other.dtype()),
        };
        let grad = match grad {
            Some(g) => Some(Tensor::from_vec(g, (p.n, p.vs), &Device::Cpu)?),
            None => None,
        };
        let mut saved = self.saved.lock().expect("poisoned");
        *saved = Saved {
            grad,
            kl,
            ce,
            parts: None,
        };
        Ok((CpuStorage::F32(vec![(kl + ce) as f32]), Shape::from(())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::cuda_backend::CudaStorageSlice as C;
        let p = &self.plan;
        let (grad, loss, parts) = match (&s1.slice, &s2.slice) {
            (C::F32(s), C::F32(t)) => self.cuda_run(&s1.device, s, l1, t, l2)?,
            (C::F32(s), C::BF16(t)) => self.cuda_run(&s1.device, s, l1, t, l2)?,
            (C::BF16(s), C::F32(t)) => self.cuda_run(&s1.device, s, l1, t, l2)?,
            (C::BF16(s), C::BF16(t)) => self.cuda_run(&s1.device, s, l1, t, l2)?,
            _ => candle_core::bail!("fused loss: CUDA logits must be f32 or bf16"),
        };
        let mut saved = self.saved.lock().expect("poisoned");
        *saved = Saved {
            grad: grad.map(|g| {
                Tensor::from_storage(
                    candle_core::Storage::Cuda(g),
                    (p.n, p.vs),
                    candle_core::op::BackpropOp::none(),
                    false,
                )
            }),
            kl: 0.0,
            ce: 0.0,
            parts: Some(Tensor::from_storage(
                candle_core::Storage::Cuda(parts),
                2,
                candle_core::op::BackpropOp::none(),
                false,
            )),
        };
        Ok((loss, Shape::from(())))
    }

    fn bwd(
        &self,
        student: &Tensor,
        _teacher: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // Taken, not cloned: once autograd has accumulated it, nothing keeps a B x V buffer
        // alive behind the loss tensor. A second backward through the same forward is an error.
        let grad = self.saved.lock().expect("poisoned").grad.take();
        let Some(grad) = grad else {
            candle_core::bail!("fused loss: backward ran already (or without a saved gradient)");
        };
        let scale = grad_res.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let grad = if scale == 1.0 {
            grad
        } else {
            grad.affine(scale, 0.0)?
        };
        Ok((Some(grad.to_dtype(student.dtype())?), None))
    }
}

#[cfg(feature = "cuda")]
type CudaOut = (
    Option<candle_core::CudaStorage>,
    candle_core::CudaStorage,
    candle_core::CudaStorage,
);

#[cfg(feature = "cuda")]
impl DistillOp {
    /// Uploads the row weights and targets, runs the CUDA twin, and wraps its outputs.
    fn cuda_run<S, T>(
        &self,
        dev: &candle_core::CudaDevice,
        s: &candle_core::cuda_backend::cudarc::driver::CudaSlice<S>,
        ls: &Layout,
        t: &candle_core::cuda_backend::cudarc::driver::CudaSlice<T>,
        lt: &Layout,
    ) -> Result<CudaOut>
    where
        S: crate::cuda::GpuElem + candle_core::cuda_backend::CudaDType,
        T: crate::cuda::GpuElem,
    {
        use candle_core::cuda_backend::CudaDType;
        let p = &self.plan;
        let range = |l: &Layout| match l.contiguous_offsets() {
            Some(r) => Ok(r),
            None => candle_core::bail!("fused loss: logits must be contiguous"),
        };
        let (a, b) = range(ls)?;
        let (c, d) = range(lt)?;
        let weights = match &p.weights {
            Some(w) => Some(dev.clone_htod(w.as_slice())?),
            None => None,
        };
        let targets = match &p.targets {
            Some(t) => {
                let t: Vec<i32> = t.iter().map(|&x| x as i32).collect();
                Some(dev.clone_htod(t.as_slice())?)
            }
            None => None,
        };
        let mut grad = if p.want_grad {
            // SAFETY: the kernel writes every element (masked rows with zeros).
            Some(unsafe { dev.alloc::<S>(p.n * p.vs)? })
        } else {
            None
        };
        let mut rows = unsafe { dev.alloc::<f32>(2 * p.n)? };
        let mut loss = unsafe { dev.alloc::<f32>(1)? };
        let mut parts = unsafe { dev.alloc::<f32>(2)? };
        crate::cuda::distill(
            dev,
            crate::cuda::Shape {
                n: p.n,
                vs: p.vs,
                vt: p.vt,
                shared: p.shared,
                temperature: p.temperature,
                alpha: p.alpha,
            },
            &s.slice(a..b),
            &t.slice(c..d),
            weights.as_ref(),
            targets.as_ref(),
            crate::cuda::Outputs {
                grad: grad.as_mut(),
                rows: &mut rows,
                loss: &mut loss,
                parts: &mut parts,
            },
            None,
        )?;
        Ok((
            grad.map(|g| S::wrap_cuda_slice(g, dev.clone())),
            f32::wrap_cuda_slice(loss, dev.clone()),
            f32::wrap_cuda_slice(parts, dev.clone()),
        ))
    }
}

mod cpu;
use cpu::*;
