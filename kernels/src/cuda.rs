//! The CUDA twin of the fused distillation loss (feature `cuda`): launches the kernels of
//! `kernels/cuda/distill.cu`, whose PTX build.rs compiles for sm_90 and this module embeds. The
//! module is loaded once per device (candle keeps it by name).
//!
//! Two kernel shapes compute the same numbers:
//! - **cluster**: a cluster of [`CLUSTER`] blocks per row, each block owning one slice of the
//!   vocabulary; the slice is brought into shared memory by bulk copies, so global memory is read
//!   once and the gradient written once. Needs 16-byte aligned rows and a slice that fits in
//!   shared memory (up to ~200 KiB per block: vocabularies to ~400k in bf16 or ~200k in f32).
//! - **row**: one block per row, reading global memory twice (statistics, then gradient). For
//!   small vocabularies (the option letters of the tiny models), unaligned rows, or rows too
//!   large for the cluster kernel.
//!
//! [`distill`] uses the row kernel unless told otherwise (it is the faster one on an H200 today,
//! see kernels/PERF.md) and returns which kernel ran; the GPU check runs both.

use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute_enum;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDevice, WrapErr};
use candle_core::Result;
use half::bf16;

/// The PTX of `kernels/cuda/distill.cu` (sm_90).
pub const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/distill.ptx"));
const MODULE: &str = "xkd_distill";

/// Blocks per row in the cluster kernel (the `__cluster_dims__` of distill.cu).
pub const CLUSTER: usize = 8;
const CLUSTER_THREADS: u32 = 512;
/// Dynamic shared memory a cluster block may use (the opt-in limit on sm_90 is 227 KiB, less the
/// kernel's ~2 KiB of static shared memory).
const SMEM_LIMIT: usize = 200 * 1024;

/// Which kernel ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    Row,
    Cluster,
}

/// A logits element type the kernels take.
pub trait GpuElem: DeviceRepr + Copy + 'static {
    const NAME: &'static str;
}
impl GpuElem for f32 {
    const NAME: &'static str = "f32";
}
impl GpuElem for bf16 {
    const NAME: &'static str = "bf16";
}

/// Kernel parameters; the same fields, in the same order, as `struct Params` in distill.cu.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct Params {
    n: i32,
    vs: i32,
    vt: i32,
    shared: i32,
    cs: i32,
    tpow: i32,
    do_kl: i32,
    do_ce: i32,
    inv_t: f32,
    alpha: f32,
    temperature: f32,
    inv_n: f32,
}

// SAFETY: a plain `#[repr(C)]` struct of 4-byte scalars, laid out as the CUDA struct.
unsafe impl DeviceRepr for Params {}

/// The problem, validated by the caller ([`crate::fused_distill_loss`] or the GPU check).
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub n: usize,
    pub vs: usize,
    pub vt: usize,
    pub shared: usize,
    pub temperature: f32,
    pub alpha: f32,
}

/// Device buffers the loss writes.
pub struct Outputs<'a, S> {
    /// d loss / d student `[N, Vs]` in the student's dtype; `None` skips it.
    pub grad: Option<&'a mut CudaSlice<S>>,
    /// Per-row `(kl, ce)` contributions `[N, 2]`.
    pub rows: &'a mut CudaSlice<f32>,
    /// The loss `[1]`.
    pub loss: &'a mut CudaSlice<f32>,
    /// `(kl, ce)` `[2]`.
    pub parts: &'a mut CudaSlice<f32>,
}

/// Computes the loss (and gradient) of `student` `[N, Vs]` against `teacher` `[N, Vt]`.
/// `weights` `[N]` (None: all 1) and `targets` `[N]` (-1 or None: no cross-entropy target) are
/// on the device. `force` picks the kernel; `None` takes the row kernel (see the module docs).
#[allow(clippy::too_many_arguments)]
pub fn distill<S: GpuElem, T: GpuElem>(
    dev: &CudaDevice,
    shape: Shape,
    student: &CudaView<'_, S>,
    teacher: &CudaView<'_, T>,
    weights: Option<&CudaSlice<f32>>,
    targets: Option<&CudaSlice<i32>>,
    out: Outputs<'_, S>,
    force: Option<Kernel>,
) -> Result<Kernel> {
    let Shape {
        n,
        vs,
        vt,
        shared,
        temperature,
        alpha,
    } = shape;
    if student.len() != n * vs || teacher.len() != n * vt {
        candle_core::bail!(
            "cuda distill: buffers of {} and {} elements for [{n}, {vs}] and [{n}, {vt}]",
            student.len(),
            teacher.len()
        );
    }
    if n == 0 || out.rows.len() < 2 * n || out.loss.is_empty() || out.parts.len() < 2 {
        candle_core::bail!("cuda distill: empty batch or output buffers too small");
    }
    if let Some(g) = &out.grad {
        if g.len() != n * vs {
            candle_core::bail!(
                "cuda distill: gradient buffer of {} for {}",
                g.len(),
                n * vs
            );
        }
    }
    if i32::try_from(vs.max(vt)).is_err() || i32::try_from(n).is_err() {
        candle_core::bail!("cuda distill: dimensions {n} x {} exceed i32", vs.max(vt));
    }
    let stream = dev.cuda_stream();
    let aligned =
        |ptr: u64, v: usize, size: usize| ptr.is_multiple_of(16) && (v * size).is_multiple_of(16);
    let (sp, _g1) = student.device_ptr(&stream);
    let (tp, _g2) = teacher.device_ptr(&stream);
    let vmax = vs.max(vt);
    let cs = vmax.div_ceil(CLUSTER).div_ceil(8) * 8;
    let smem = cs * (std::mem::size_of::<S>() + std::mem::size_of::<T>());
    let cluster_ok = aligned(sp, vs, std::mem::size_of::<S>())
        && aligned(tp, vt, std::mem::size_of::<T>())
        && smem <= SMEM_LIMIT;
    drop((_g1, _g2));
    let kernel = match force {
        Some(Kernel::Cluster) if !cluster_ok => candle_core::bail!(
            "cuda distill: the cluster kernel needs 16-byte aligned rows and {smem} bytes of \
             shared memory at most {SMEM_LIMIT}"
        ),
        Some(k) => k,
        // Measured on an H200 (kernels/PERF.md): the row kernel is faster today, although it
        // reads twice; the cluster kernel stays checked and benchmarked until it wins.
        None => Kernel::Row,
    };
    let tpow = match temperature {
        1.0 => 1,
        2.0 => 2,
        4.0 => 4,
        _ => 0,
    };
    let params = Params {
        n: n as i32,
        vs: vs as i32,
        vt: vt as i32,
        shared: shared as i32,
        cs: if kernel == Kernel::Cluster {
            cs as i32
        } else {
            vmax as i32
        },
        tpow,
        do_kl: (alpha > 0.0) as i32,
        do_ce: (alpha < 1.0) as i32,
        inv_t: 1.0 / temperature,
        alpha,
        temperature,
        inv_n: 1.0 / n as f32,
    };
    let (name, cfg) = match kernel {
        Kernel::Cluster => (
            format!("xkd_distill_cluster_{}_{}", S::NAME, T::NAME),
            LaunchConfig {
                grid_dim: ((n * CLUSTER) as u32, 1, 1),
                block_dim: (CLUSTER_THREADS, 1, 1),
                shared_mem_bytes: smem as u32,
            },
        ),
        Kernel::Row => {
            // One thread per pack of 8 ids, in whole warps, at most 1024.
            let threads = (vmax.div_ceil(8).div_ceil(32) * 32).clamp(32, 1024) as u32;
            (
                format!("xkd_distill_row_{}_{}", S::NAME, T::NAME),
                LaunchConfig {
                    grid_dim: (n as u32, 1, 1),
                    block_dim: (threads, 1, 1),
                    shared_mem_bytes: 0,
                },
            )
        }
    };
    let func = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
    if kernel == Kernel::Cluster {
        func.set_attribute(
            CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            smem as i32,
        )
        .w()?;
    }
    let null = 0u64;
    let Outputs {
        grad,
        rows,
        loss,
        parts,
    } = out;
    let mut b = func.builder();
    b.arg(student).arg(teacher);
    match weights {
        Some(w) => b.arg(w),
        None => b.arg(&null),
    };
    match targets {
        Some(t) => b.arg(t),
        None => b.arg(&null),
    };
    match grad {
        Some(g) => b.arg(g),
        None => b.arg(&null),
    };
    b.arg(&mut *rows).arg(&params);
    // SAFETY: the argument list matches the kernel's signature (pointers to buffers of the sizes
    // checked above, the Params struct by value), and every buffer outlives the launch (cudarc
    // records its use on the stream).
    unsafe { b.launch(cfg) }.w()?;

    let sum = dev.get_or_load_custom_func("xkd_distill_sum", MODULE, PTX)?;
    let n_i32 = n as i32;
    let mut b = sum.builder();
    b.arg(&*rows).arg(&n_i32).arg(loss).arg(parts);
    // SAFETY: rows holds 2n floats, loss 1 and parts 2, as checked above.
    unsafe {
        b.launch(LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (1024, 1, 1),
            shared_mem_bytes: 0,
        })
    }
    .w()?;
    Ok(kernel)
}
