//! The CUDA twin of the fused distillation loss (feature `cuda`): launches the kernels of
//! `kernels/cuda/distill.cu`, which build.rs compiles into a fatbin (sm_90 machine code, the code
//! `kernels/ptx-check.sh` inspects, plus compute_90 PTX for later GPUs) that this module embeds
//! and loads once per device.
//!
//! Three kernel shapes compute the same numbers:
//! - **row**: one block per row, reading global memory twice (statistics, then gradient). Runs
//!   on any row: small vocabularies (the option letters of the tiny models), unaligned rows.
//! - **cluster**: a cluster of [`CLUSTER`] blocks per row, each block owning one slice of the
//!   vocabulary; the slice is brought into shared memory by bulk copies, so global memory is read
//!   once and the gradient written once. Needs 16-byte aligned rows and a slice that fits in
//!   shared memory (up to ~200 KiB per block: vocabularies to ~400k in bf16 or ~200k in f32).
//! - **split** (one kernel per entry of [`SPLITS`]): a cluster of blocks per row without staging;
//!   each block reads its slice twice, the second time from L2, which holds it because only a
//!   few rows are in flight. Needs 16-byte aligned rows.
//!
//! [`distill`] uses [`DEFAULT_SPLIT`] unless told otherwise (the fastest on the large shapes of
//! the H100 check in kernels/PERF.md), the row kernel where rows are not aligned, and returns
//! which kernel ran; the GPU check runs them all.

use std::fmt;
use std::sync::{Arc, Mutex};

use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute_enum;
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaModule, CudaSlice, CudaView, DevicePtr, DeviceRepr, LaunchConfig,
    PushKernelArg,
};
use candle_core::cuda_backend::cudarc::nvrtc::Ptx;
use candle_core::cuda_backend::{CudaDevice, WrapErr};
use candle_core::Result;
use half::bf16;

/// `kernels/cuda/distill.cu` as built by build.rs: sm_90 machine code and compute_90 PTX.
pub const FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/distill.fatbin"));

/// Blocks per row in the cluster kernel (the `__cluster_dims__` of distill.cu).
pub const CLUSTER: usize = 8;
const CLUSTER_THREADS: u32 = 512;
/// Dynamic shared memory a cluster block may use (the opt-in limit on sm_90 is 227 KiB, less the
/// kernel's ~2 KiB of static shared memory).
const SMEM_LIMIT: usize = 200 * 1024;

/// One compiled shape of the split kernel (`split_body` in distill.cu).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Split {
    /// Blocks per row: the kernel's `__cluster_dims__`.
    pub cluster: u32,
    /// Threads per block: the kernel's compile-time block size.
    pub threads: u32,
    /// L2 eviction hints: keep on the first read, drop on the second, streaming stores.
    pub l2_hints: bool,
}

const fn split(cluster: u32, threads: u32, l2_hints: bool) -> Split {
    Split {
        cluster,
        threads,
        l2_hints,
    }
}

/// Every split kernel distill.cu compiles (the `XKD_SPLIT` lines of its `XKD_DISTILL`), in the
/// order the GPU check runs them. Each takes 64 registers, so an SM holds 1024 of its threads:
/// on 132 SMs, c blocks per row keep about 132 * 1024 / (c * threads) rows in flight (264 / c
/// for 512 threads), 608 KB each in bf16, against 50 MB of L2. Cluster sizes stay portable (at
/// most 8), so every kernel launches on every sm_90 part.
pub const SPLITS: [Split; 5] = [
    split(1, 512, false), // the row kernel's work split with more loads in flight
    split(4, 512, true),
    split(8, 512, true),
    split(8, 512, false), // the same without cache hints, as a control
    split(8, 1024, true), // half the rows in flight, one block per SM
];

/// What [`distill`] runs on aligned rows when not told otherwise: the fastest kernel on the
/// large shapes of the H100 check in kernels/PERF.md (one block of 512 threads per row, two
/// 16-byte loads per side in flight per thread, no cache hints). Unaligned rows take the row
/// kernel.
pub const DEFAULT_SPLIT: Split = SPLITS[0];

/// Which kernel ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    Row,
    Cluster,
    Split(Split),
}

impl Kernel {
    /// Every kernel distill.cu compiles: row, cluster, then the split kernels.
    pub fn all() -> Vec<Kernel> {
        let mut v = vec![Kernel::Row, Kernel::Cluster];
        v.extend(SPLITS.map(Kernel::Split));
        v
    }

    /// The kernel's name without its dtypes, as in distill.cu (`row`, `split_c8_t512`, ...).
    fn symbol(&self) -> String {
        match self {
            Kernel::Row => "row".into(),
            Kernel::Cluster => "cluster".into(),
            Kernel::Split(s) => format!(
                "split_c{}_t{}{}",
                s.cluster,
                s.threads,
                if s.l2_hints { "" } else { "_nohint" }
            ),
        }
    }
}

/// `row`, `cluster`, `split-c8-t512`, `split-c8-t512-nohint`, ...
impl fmt::Display for Kernel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.symbol().replace('_', "-"))
    }
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

/// The loaded fatbin of a device, loaded on first use. (Keyed by the device's context; the
/// module holds its context, so a key is never reused by another one.)
fn module(dev: &CudaDevice) -> Result<Arc<CudaModule>> {
    static MODULES: Mutex<Vec<(usize, Arc<CudaModule>)>> = Mutex::new(Vec::new());
    let ctx = dev.cuda_stream().context().clone();
    let key = Arc::as_ptr(&ctx) as usize;
    let mut modules = MODULES
        .lock()
        .map_err(|_| candle_core::Error::Msg("cuda distill: module cache poisoned".into()))?;
    if let Some((_, m)) = modules.iter().find(|(k, _)| *k == key) {
        return Ok(m.clone());
    }
    let m = ctx.load_module(Ptx::from_binary(FATBIN.to_vec())).w()?;
    modules.push((key, m.clone()));
    Ok(m)
}

/// How one kernel is launched for one problem: the one place where grid, block, cluster and
/// shared-memory sizes are worked out.
struct Launch {
    kernel: Kernel,
    /// The kernel's symbol in distill.cu.
    name: String,
    cfg: LaunchConfig,
    /// Ids per block (`Params::cs`): the whole row for the row kernel, else a multiple of 8.
    cs: usize,
    /// Blocks per row.
    cluster: u32,
}

impl Launch {
    fn new<S: GpuElem, T: GpuElem>(kernel: Kernel, n: usize, vmax: usize) -> Self {
        let slice = |c: usize| vmax.div_ceil(c).div_ceil(8) * 8;
        let (threads, cluster, cs, smem) = match kernel {
            // One thread per pack of 8 ids, in whole warps, at most 1024.
            Kernel::Row => (
                (vmax.div_ceil(8).div_ceil(32) * 32).clamp(32, 1024) as u32,
                1,
                vmax,
                0,
            ),
            Kernel::Cluster => {
                let cs = slice(CLUSTER);
                let smem = cs * (std::mem::size_of::<S>() + std::mem::size_of::<T>());
                (CLUSTER_THREADS, CLUSTER as u32, cs, smem)
            }
            Kernel::Split(s) => (s.threads, s.cluster, slice(s.cluster as usize), 0),
        };
        Launch {
            kernel,
            name: format!("xkd_distill_{}_{}_{}", kernel.symbol(), S::NAME, T::NAME),
            cfg: LaunchConfig {
                grid_dim: (
                    (n as u64 * cluster as u64).min(u32::MAX as u64) as u32,
                    1,
                    1,
                ),
                block_dim: (threads, 1, 1),
                shared_mem_bytes: smem as u32,
            },
            cs,
            cluster,
        }
    }

    /// Why this kernel cannot take the problem, if it cannot: the cluster and split kernels load
    /// whole 16-byte words, so each row must start 16-byte aligned (`aligned`).
    fn unfit(&self, aligned: bool) -> Option<String> {
        let smem = self.cfg.shared_mem_bytes as usize;
        match self.kernel {
            Kernel::Row => None,
            _ if !aligned => Some(format!(
                "the {} kernel needs 16-byte aligned rows",
                self.kernel
            )),
            Kernel::Cluster if smem > SMEM_LIMIT => Some(format!(
                "the cluster kernel needs {smem} bytes of shared memory, more than {SMEM_LIMIT}"
            )),
            Kernel::Split(s) if !SPLITS.contains(&s) => Some(format!(
                "no {} kernel is compiled (see SPLITS)",
                self.kernel
            )),
            _ if self.cfg.grid_dim.0 > i32::MAX as u32 => {
                Some(format!("{} blocks exceed the grid", self.cfg.grid_dim.0))
            }
            _ => None,
        }
    }

    /// The kernel, with the attributes this launch needs set.
    fn function(&self, dev: &CudaDevice) -> Result<CudaFunction> {
        let func = module(dev)?.load_function(&self.name).w()?;
        if self.cfg.shared_mem_bytes > 0 {
            func.set_attribute(
                CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                self.cfg.shared_mem_bytes as i32,
            )
            .w()?;
        }
        Ok(func)
    }

    fn params(&self, shape: &Shape) -> Params {
        let tpow = match shape.temperature {
            1.0 => 1,
            2.0 => 2,
            4.0 => 4,
            _ => 0,
        };
        Params {
            n: shape.n as i32,
            vs: shape.vs as i32,
            vt: shape.vt as i32,
            shared: shape.shared as i32,
            cs: self.cs as i32,
            tpow,
            do_kl: (shape.alpha > 0.0) as i32,
            do_ce: (shape.alpha < 1.0) as i32,
            inv_t: 1.0 / shape.temperature,
            alpha: shape.alpha,
            temperature: shape.temperature,
            inv_n: 1.0 / shape.n as f32,
        }
    }
}

/// Whether both inputs' rows start on 16-byte boundaries.
fn rows_aligned<S: GpuElem, T: GpuElem>(
    dev: &CudaDevice,
    shape: &Shape,
    student: &CudaView<'_, S>,
    teacher: &CudaView<'_, T>,
) -> bool {
    let stream = dev.cuda_stream();
    let aligned =
        |ptr: u64, v: usize, size: usize| ptr.is_multiple_of(16) && (v * size).is_multiple_of(16);
    let (sp, _g1) = student.device_ptr(&stream);
    let (tp, _g2) = teacher.device_ptr(&stream);
    aligned(sp, shape.vs, std::mem::size_of::<S>())
        && aligned(tp, shape.vt, std::mem::size_of::<T>())
}

/// Whether `kernel` can compute this problem (the row kernel always can; [`distill`] fails when
/// forced to use a kernel that cannot).
pub fn fits<S: GpuElem, T: GpuElem>(
    dev: &CudaDevice,
    kernel: Kernel,
    shape: &Shape,
    student: &CudaView<'_, S>,
    teacher: &CudaView<'_, T>,
) -> bool {
    let launch = Launch::new::<S, T>(kernel, shape.n, shape.vs.max(shape.vt));
    launch
        .unfit(rows_aligned(dev, shape, student, teacher))
        .is_none()
}

/// Rows one launch of `kernel` keeps in flight on this device, from the driver's occupancy
/// calculator: resident clusters, or resident blocks for the one-block-per-row kernels.
pub fn rows_in_flight<S: GpuElem, T: GpuElem>(
    dev: &CudaDevice,
    kernel: Kernel,
    shape: &Shape,
) -> Result<u32> {
    use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute;
    let launch = Launch::new::<S, T>(kernel, shape.n, shape.vs.max(shape.vt));
    let func = launch.function(dev)?;
    let stream = dev.cuda_stream();
    if launch.cluster > 1 {
        return func.occupancy_max_active_clusters(launch.cfg, &stream).w();
    }
    let per_sm = func
        .occupancy_max_active_blocks_per_multiprocessor(
            launch.cfg.block_dim.0,
            launch.cfg.shared_mem_bytes as usize,
            None,
        )
        .w()?;
    let sms = stream
        .context()
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .w()?;
    Ok(per_sm * sms as u32)
}

/// Computes the loss (and gradient) of `student` `[N, Vs]` against `teacher` `[N, Vt]`.
/// `weights` `[N]` (None: all 1) and `targets` `[N]` (-1 or None: no cross-entropy target) are
/// on the device. `force` picks the kernel; `None` takes [`DEFAULT_SPLIT`] on 16-byte aligned
/// rows and the row kernel otherwise.
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
    let Shape { n, vs, vt, .. } = shape;
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
    let aligned = rows_aligned(dev, &shape, student, teacher);
    let kernel = force.unwrap_or_else(|| {
        let fast = Kernel::Split(DEFAULT_SPLIT);
        match Launch::new::<S, T>(fast, n, vs.max(vt)).unfit(aligned) {
            None => fast,
            Some(_) => Kernel::Row,
        }
    });
    let launch = Launch::new::<S, T>(kernel, n, vs.max(vt));
    if let Some(why) = launch.unfit(aligned) {
        candle_core::bail!("cuda distill: {why}");
    }
    let params = launch.params(&shape);
    let func = launch.function(dev)?;
    let stream = dev.cuda_stream();
    let null = 0u64;
    let Outputs {
        grad,
        rows,
        loss,
        parts,
    } = out;
    let mut b = stream.launch_builder(&func);
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
    unsafe { b.launch(launch.cfg) }.w()?;

    let sum = module(dev)?.load_function("xkd_distill_sum").w()?;
    let n_i32 = n as i32;
    let mut b = stream.launch_builder(&sum);
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

#[cfg(test)]
mod tests {
    //! What can be checked without a GPU: the kernel list against the embedded fatbin, and the
    //! launch arithmetic. (The kernels themselves: `kernels/gpu-check.sh` on a GPU machine.)
    use super::*;

    fn names<S: GpuElem, T: GpuElem>() -> Vec<String> {
        Kernel::all()
            .into_iter()
            .map(|k| Launch::new::<S, T>(k, 1, 1000).name)
            .collect()
    }

    #[test]
    fn every_kernel_is_in_the_fatbin() {
        let mut all = names::<f32, f32>();
        all.extend(names::<f32, bf16>());
        all.extend(names::<bf16, f32>());
        all.extend(names::<bf16, bf16>());
        all.push("xkd_distill_sum".into());
        for name in all {
            let found = FATBIN.windows(name.len() + 1).any(|w| {
                &w[..name.len()] == name.as_bytes()
                    && !w[name.len()].is_ascii_alphanumeric()
                    && w[name.len()] != b'_'
            });
            assert!(
                found,
                "{name} is not in the fatbin (distill.cu and SPLITS disagree)"
            );
        }
    }

    #[test]
    fn kernel_names_are_distinct() {
        let shown: Vec<String> = Kernel::all().iter().map(Kernel::to_string).collect();
        let mut unique = shown.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), shown.len(), "{shown:?}");
        assert!(shown.contains(&"split-c8-t512".to_string()));
        assert!(shown.contains(&"split-c8-t512-nohint".to_string()));
    }

    #[test]
    fn launch_arithmetic() {
        let k = Kernel::Split(split(8, 512, true));
        let l = Launch::new::<bf16, bf16>(k, 1024, 151936);
        assert_eq!(l.cs, 18992); // 151936 / 8, a multiple of 8
        assert_eq!(l.cfg.grid_dim, (8192, 1, 1));
        assert_eq!(l.cfg.block_dim, (512, 1, 1));
        assert_eq!(l.cfg.shared_mem_bytes, 0);
        assert_eq!(l.unfit(true), None);
        assert!(l.unfit(false).is_some());

        let l = Launch::new::<bf16, bf16>(Kernel::Split(split(8, 1024, true)), 2, 152064);
        assert_eq!((l.cs, l.cluster, l.cfg.grid_dim.0), (19008, 8, 16));
        assert_eq!(l.cfg.block_dim.0, 1024);
        let l = Launch::new::<bf16, bf16>(Kernel::Split(split(4, 512, true)), 2, 152064);
        assert_eq!((l.cs, l.cluster, l.cfg.grid_dim.0), (38016, 4, 8));

        let l = Launch::new::<f32, bf16>(Kernel::Cluster, 4, 156032);
        assert_eq!(l.cs, 19504);
        assert_eq!(l.cfg.shared_mem_bytes as usize, 19504 * 6);
        assert_eq!(l.unfit(true), None);

        let l = Launch::new::<f32, f32>(Kernel::Row, 16, 10);
        assert_eq!((l.cs, l.cfg.block_dim.0, l.cfg.grid_dim.0), (10, 32, 16));
        assert_eq!(l.unfit(false), None);

        let not_compiled = Kernel::Split(split(2, 128, true));
        let l = Launch::new::<f32, f32>(not_compiled, 1, 1000);
        assert!(l.unfit(true).is_some());
    }
}
