//! The GPU check of the fused distillation loss (`kernels/gpu-check.sh` runs it; needs the
//! `cuda` feature and one sm_90 GPU).
//!
//! 1. Correctness: the CUDA op against the CPU op (`fused_distill_loss` on the CPU, itself
//!    checked against PyTorch fixtures) on random inputs: every kernel (`cuda::Kernel::all`:
//!    row, cluster and each split kernel, the latter two where rows are 16-byte aligned), every
//!    dtype pair, temperatures 1/2/3/4, alpha 0/0.5/1, masked rows, extreme rows, a vocabulary
//!    mismatch. Outputs are filled with NaN before each launch, so an element the kernel forgets
//!    to write fails the check. Error measures: loss `|gpu - cpu| / max(|cpu|, 1e-6)`, gradient
//!    `max|gpu - cpu| / max|cpu|`; limits 1e-5 (f32 student) and 1e-2 (bf16 student). One case
//!    goes through candle's autograd (`Var`, `backward`) on the device as well.
//! 2. Bandwidth: a large device-to-device copy (bytes read + written per second) as the ceiling,
//!    then every kernel on bf16 logits, counting student + teacher read and gradient written,
//!    with the rows each keeps in flight (driver's occupancy calculator).
//!
//! A kernel that fails to launch (say, a cluster size the GPU does not take) gets its error in
//! its rows and the run goes on, unless the CUDA context is lost. Prints the per-case table,
//! the bandwidth table, then a summary per dtype pair and kernel; exits 1 if any check failed
//! or any kernel could not run.
//!
//! Environment: `XKD_GPU_CHECK_ONLY=bench` skips the correctness part (for profiling);
//! `XKD_GPU_CHECK_KERNELS=row,split-c8-t512` runs only the named kernels.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::cuda_backend::cudarc::driver::CudaSlice;
use candle_core::cuda_backend::{CudaDType, CudaDevice};
use candle_core::{DType, Device, Storage, Tensor, Var};
use half::bf16;
use xkd_kernels::cuda::{self, GpuElem, Kernel, Outputs, Shape};
use xkd_kernels::{fused_distill_loss, FusedLoss};

struct Case {
    name: &'static str,
    n: usize,
    vs: usize,
    vt: usize,
    shared: usize,
    temperature: f32,
    alpha: f32,
    /// Row weights; zeros mask rows.
    weights: Option<Vec<f32>>,
    /// Row 0 extreme (+-1e4), row 1 all equal.
    extreme: bool,
}

fn cases() -> Vec<Case> {
    let c = |name, n, vs, vt, shared, temperature, alpha| Case {
        name,
        n,
        vs,
        vt,
        shared,
        temperature,
        alpha,
        weights: None,
        extreme: false,
    };
    let mut v = vec![
        c("letters", 16, 10, 10, 10, 2.0, 0.5),
        c("small-vocab", 5, 1000, 1000, 1000, 1.0, 0.5),
        c("qwen2 [4,151936]", 4, 151936, 151936, 151936, 2.0, 0.5),
        c("T=1 a=1", 4, 151936, 151936, 151936, 1.0, 1.0),
        c("T=4 a=0", 4, 151936, 151936, 151936, 4.0, 0.0),
        c("T=3 (general T)", 3, 65536, 65536, 65536, 3.0, 0.5),
        c(
            "mismatch 156032/152064",
            8,
            156032,
            152064,
            151643,
            2.0,
            0.5,
        ),
        c(
            "mismatch, teacher larger",
            4,
            152064,
            156032,
            151643,
            1.0,
            1.0,
        ),
        c("unaligned V=50001", 3, 50001, 50001, 50001, 2.0, 0.5),
    ];
    let mut masked = c("masked rows", 6, 151936, 151936, 151936, 2.0, 0.5);
    masked.weights = Some(vec![1.0, 0.0, 0.5, 0.0, 2.0, 1.0]);
    v.push(masked);
    let mut all_masked = c("all masked", 3, 151936, 151936, 151936, 2.0, 0.5);
    all_masked.weights = Some(vec![0.0; 3]);
    v.push(all_masked);
    let mut extreme = c(
        "extreme +-1e4, equal row",
        4,
        151936,
        151936,
        151936,
        2.0,
        0.5,
    );
    extreme.extreme = true;
    v.push(extreme);
    v
}

/// Random logits (std 4, fixed seed) as f32 host data, with the extreme rows when asked.
fn logits(n: usize, v: usize, seed: u64, extreme: bool) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f64 / (1u64 << 53) as f64
    };
    let mut out: Vec<f32> = (0..n * v)
        .map(|_| {
            let (a, b) = (next().max(1e-300), next());
            ((-2.0 * a.ln()).sqrt() * (2.0 * std::f64::consts::PI * b).cos() * 4.0) as f32
        })
        .collect();
    if extreme && n >= 2 {
        for (j, x) in out[..v].iter_mut().enumerate() {
            *x = if j % 7 == 0 { 1e4 } else { -1e4 };
        }
        for x in &mut out[v..2 * v] {
            *x = 3.0;
        }
    }
    out
}

fn cuda_slice<E: CudaDType + GpuElem>(t: &Tensor) -> Result<CudaSlice<E>> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(s) = &*storage else {
        bail!("tensor is not on the GPU")
    };
    let (a, b) = layout.contiguous_offsets().context("not contiguous")?;
    let src = s.as_cuda_slice::<E>()?;
    let dev = s.device.clone();
    let mut dst = unsafe { dev.alloc::<E>(b - a)? };
    dev.memcpy_dtod(&src.slice(a..b), &mut dst)?;
    Ok(dst)
}

/// A logits dtype of the check: what the kernels take, plus its NaN and its value as f32.
trait Elem: GpuElem + CudaDType + candle_core::WithDType {
    const NAN: Self;
    fn as_f32(self) -> f32;
}
impl Elem for f32 {
    const NAN: Self = f32::NAN;
    fn as_f32(self) -> f32 {
        self
    }
}
impl Elem for bf16 {
    const NAN: Self = bf16::NAN;
    fn as_f32(self) -> f32 {
        self.to_f32()
    }
}

struct Measured {
    loss: f32,
    kl: f32,
    ce: f32,
    grad: Vec<f32>,
}

/// One problem on the device: the inputs and the buffers the loss writes.
struct Problem<S, T> {
    shape: Shape,
    s: CudaSlice<S>,
    t: CudaSlice<T>,
    w: Option<CudaSlice<f32>>,
    tg: CudaSlice<i32>,
    grad: CudaSlice<S>,
    rows: CudaSlice<f32>,
    loss: CudaSlice<f32>,
    parts: CudaSlice<f32>,
}

impl<S: Elem, T: Elem> Problem<S, T> {
    fn new(
        dev: &CudaDevice,
        shape: Shape,
        s: CudaSlice<S>,
        t: CudaSlice<T>,
        weights: Option<&[f32]>,
        targets: &[i32],
    ) -> Result<Self> {
        let n = shape.n;
        Ok(Problem {
            shape,
            s,
            t,
            w: weights.map(|w| dev.clone_htod(w)).transpose()?,
            tg: dev.clone_htod(targets)?,
            grad: unsafe { dev.alloc::<S>(n * shape.vs)? },
            rows: unsafe { dev.alloc::<f32>(2 * n)? },
            loss: unsafe { dev.alloc::<f32>(1)? },
            parts: unsafe { dev.alloc::<f32>(2)? },
        })
    }

    /// A case's CPU tensors (in their dtypes) copied to the device.
    fn upload(
        dev: &CudaDevice,
        case: &Case,
        s: &Tensor,
        t: &Tensor,
        targets: &[i32],
    ) -> Result<Self> {
        let s = dev.clone_htod(&s.flatten_all()?.to_vec1::<S>()?)?;
        let t = dev.clone_htod(&t.flatten_all()?.to_vec1::<T>()?)?;
        Self::new(dev, shape(case), s, t, case.weights.as_deref(), targets)
    }

    fn fits(&self, dev: &CudaDevice, kernel: Kernel) -> bool {
        cuda::fits(
            dev,
            kernel,
            &self.shape,
            &self.s.slice(..),
            &self.t.slice(..),
        )
    }

    /// One launch of `kernel`: the one place both the correctness check and the bench launch.
    fn launch(&mut self, dev: &CudaDevice, kernel: Kernel) -> Result<()> {
        cuda::distill(
            dev,
            self.shape,
            &self.s.slice(..),
            &self.t.slice(..),
            self.w.as_ref(),
            Some(&self.tg),
            Outputs {
                grad: Some(&mut self.grad),
                rows: &mut self.rows,
                loss: &mut self.loss,
                parts: &mut self.parts,
            },
            Some(kernel),
        )?;
        Ok(())
    }

    /// Fills every output with NaN, so that an element a kernel does not write fails the check.
    fn poison(&mut self, dev: &CudaDevice) -> Result<()> {
        dev.memcpy_htod(&vec![S::NAN; self.grad.len()], &mut self.grad)?;
        dev.memcpy_htod(&vec![f32::NAN; self.rows.len()], &mut self.rows)?;
        dev.memcpy_htod(&[f32::NAN], &mut self.loss)?;
        dev.memcpy_htod(&[f32::NAN; 2], &mut self.parts)?;
        Ok(())
    }

    fn measured(&self, dev: &CudaDevice) -> Result<Measured> {
        let grad = dev.clone_dtoh(&self.grad)?;
        let parts = dev.clone_dtoh(&self.parts)?;
        Ok(Measured {
            loss: dev.clone_dtoh(&self.loss)?[0],
            kl: parts[0],
            ce: parts[1],
            grad: grad.into_iter().map(Elem::as_f32).collect(),
        })
    }

    /// Poison, launch, read back.
    fn run(&mut self, dev: &CudaDevice, kernel: Kernel) -> Result<Measured> {
        self.poison(dev)?;
        self.launch(dev, kernel)?;
        self.measured(dev)
    }
}

fn shape(case: &Case) -> Shape {
    Shape {
        n: case.n,
        vs: case.vs,
        vt: case.vt,
        shared: case.shared,
        temperature: case.temperature,
        alpha: case.alpha,
    }
}

fn opts(case: &Case, targets: &[i32], device: &Device) -> Result<FusedLoss> {
    let t: Vec<u32> = targets.iter().map(|&x| x as u32).collect();
    Ok(FusedLoss {
        temperature: case.temperature as f64,
        alpha: case.alpha as f64,
        shared_vocab: Some(case.shared),
        targets: (case.alpha < 1.0)
            .then(|| Tensor::new(t.as_slice(), device))
            .transpose()?,
        weights: case
            .weights
            .as_ref()
            .map(|w| Tensor::new(w.as_slice(), device))
            .transpose()?,
    })
}

/// The CPU op's loss, parts and gradient (through candle's autograd).
fn run_cpu(case: &Case, s: &Tensor, t: &Tensor, targets: &[i32]) -> Result<Measured> {
    let var = Var::from_tensor(s)?;
    let parts = fused_distill_loss(var.as_tensor(), t, &opts(case, targets, &Device::Cpu)?)?;
    let grads = parts.total.backward()?;
    let grad = grads
        .get(var.as_tensor())
        .context("no gradient")?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    Ok(Measured {
        loss: parts.total.to_scalar::<f32>()?,
        kl: parts.kl.to_scalar::<f32>()?,
        ce: parts.ce.to_scalar::<f32>()?,
        grad,
    })
}

fn rel(a: f32, b: f32) -> f64 {
    (a as f64 - b as f64).abs() / (b.abs() as f64).max(1e-6)
}

fn grad_err(gpu: &[f32], cpu: &[f32]) -> (f64, usize) {
    let scale = cpu
        .iter()
        .fold(0f64, |m, &x| m.max(x.abs() as f64))
        .max(1e-30);
    let mut nan = 0;
    let mut worst = 0f64;
    for (a, b) in gpu.iter().zip(cpu) {
        if !a.is_finite() {
            nan += 1;
        }
        worst = worst.max((*a as f64 - *b as f64).abs());
    }
    (worst / scale, nan)
}

/// The checks of one kernel in one dtype pair.
struct Tally {
    dtypes: String,
    kernel: Kernel,
    cases: usize,
    /// Worst relative error of loss, KL, CE and gradient over the cases.
    worst: f64,
    unwritten: usize,
    failed: usize,
}

/// What the run found, kernel by kernel; printed at the end.
#[derive(Default)]
struct Report {
    tallies: Vec<Tally>,
    /// Kernels that could not run, with the first error of each.
    errors: Vec<(Kernel, String)>,
}

impl Report {
    fn check(&mut self, dtypes: &str, kernel: Kernel, err: f64, unwritten: usize, ok: bool) {
        let found = self
            .tallies
            .iter()
            .position(|t| t.dtypes == dtypes && t.kernel == kernel);
        let i = found.unwrap_or_else(|| {
            self.tallies.push(Tally {
                dtypes: dtypes.to_string(),
                kernel,
                cases: 0,
                worst: 0.0,
                unwritten: 0,
                failed: 0,
            });
            self.tallies.len() - 1
        });
        let t = &mut self.tallies[i];
        t.cases += 1;
        t.worst = t.worst.max(err);
        t.unwritten += unwritten;
        t.failed += usize::from(!ok);
    }

    /// Records a kernel that could not run and fails if the CUDA context is lost with it
    /// (nothing after it could run either).
    fn error(&mut self, dev: &CudaDevice, kernel: Kernel, e: &anyhow::Error) -> Result<()> {
        if !self.errors.iter().any(|(k, _)| *k == kernel) {
            self.errors.push((kernel, format!("{e:#}")));
        }
        dev.cuda_stream().synchronize().with_context(|| {
            format!(
                "the CUDA context is lost after the {kernel} kernel failed ({e:#}); rerun \
                 without it (XKD_GPU_CHECK_KERNELS)"
            )
        })
    }

    fn failed(&self) -> bool {
        !self.errors.is_empty() || self.tallies.iter().any(|t| t.failed > 0)
    }

    fn print(&self) {
        println!("\n## Summary: correctness by dtype pair and kernel\n");
        println!("| student/teacher dtypes | kernel | cases | worst of loss, KL, CE, gradient rel. error | unwritten elements | failed |");
        println!("|---|---|---:|---:|---:|---:|");
        for t in &self.tallies {
            println!(
                "| {} | {} | {} | {:.1e} | {} | {} |",
                t.dtypes, t.kernel, t.cases, t.worst, t.unwritten, t.failed
            );
        }
        for (kernel, e) in &self.errors {
            println!("\nCOULD NOT RUN: {kernel}: {e}");
        }
    }
}

const DTYPE_PAIRS: [(DType, DType); 4] = [
    (DType::F32, DType::F32),
    (DType::BF16, DType::BF16),
    (DType::F32, DType::BF16),
    (DType::BF16, DType::F32),
];

fn correctness(
    dev: &CudaDevice,
    gpu: &Device,
    kernels: &[Kernel],
    report: &mut Report,
) -> Result<()> {
    println!("## Correctness: CUDA op vs CPU op (random inputs, NaN-poisoned outputs)\n");
    println!("| case | dtypes s/t | kernel | loss rel err | kl rel err | grad rel err | unwritten | limit | ok |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for (ci, case) in cases().iter().enumerate() {
        let s32 = logits(case.n, case.vs, 1 + ci as u64, case.extreme);
        let t32 = logits(case.n, case.vt, 1000 + ci as u64, false);
        let targets: Vec<i32> = (0..case.n)
            .map(|r| ((r * 7919 + 13) % case.vs) as i32)
            .collect();
        for (sd, td) in DTYPE_PAIRS {
            let s_cpu =
                Tensor::from_vec(s32.clone(), (case.n, case.vs), &Device::Cpu)?.to_dtype(sd)?;
            let t_cpu =
                Tensor::from_vec(t32.clone(), (case.n, case.vt), &Device::Cpu)?.to_dtype(td)?;
            // The CPU op once per case and dtype pair; every kernel is checked against it.
            let cpu = run_cpu(case, &s_cpu, &t_cpu, &targets)?;
            let args = (dev, case, &s_cpu, &t_cpu, targets.as_slice(), &cpu, kernels);
            match (sd, td) {
                (DType::F32, DType::F32) => check_case::<f32, f32>(args, report)?,
                (DType::BF16, DType::BF16) => check_case::<bf16, bf16>(args, report)?,
                (DType::F32, DType::BF16) => check_case::<f32, bf16>(args, report)?,
                _ => check_case::<bf16, f32>(args, report)?,
            }
        }
    }
    autograd(gpu, report)
}

type CaseArgs<'a> = (
    &'a CudaDevice,
    &'a Case,
    &'a Tensor,
    &'a Tensor,
    &'a [i32],
    &'a Measured,
    &'a [Kernel],
);

/// One case in one dtype pair, every kernel that fits it, against the CPU op's `cpu`.
fn check_case<S: Elem, T: Elem>(args: CaseArgs<'_>, report: &mut Report) -> Result<()> {
    let (dev, case, s_cpu, t_cpu, targets, cpu, kernels) = args;
    let dtypes = format!("{:?}/{:?}", S::DTYPE, T::DTYPE);
    let limit = if S::DTYPE == DType::F32 { 1e-5 } else { 1e-2 };
    let mut problem = Problem::<S, T>::upload(dev, case, s_cpu, t_cpu, targets)?;
    for &kernel in kernels {
        if !problem.fits(dev, kernel) {
            continue; // unaligned rows: the row kernel is the one used
        }
        let got = match problem.run(dev, kernel) {
            Ok(got) => got,
            Err(e) => {
                println!(
                    "| {} | {dtypes} | {kernel} | FAILED TO RUN: {e:#} | | | | {limit:.0e} | NO |",
                    case.name
                );
                report.error(dev, kernel, &e)?;
                continue;
            }
        };
        let (ge, unwritten) = grad_err(&got.grad, &cpu.grad);
        let (le, ke, ce) = (
            rel(got.loss, cpu.loss),
            rel(got.kl, cpu.kl),
            rel(got.ce, cpu.ce),
        );
        let ok = unwritten == 0 && le <= limit && ke <= limit && ce <= limit && ge <= limit;
        report.check(&dtypes, kernel, le.max(ke).max(ce).max(ge), unwritten, ok);
        println!(
            "| {} | {dtypes} | {kernel} | {le:.1e} | {ke:.1e} | {ge:.1e} | {unwritten} | {limit:.0e} | {} |",
            case.name,
            if ok { "yes" } else { "NO" }
        );
    }
    Ok(())
}

/// Through candle: the custom op's cuda_fwd and backward on the device (the automatic kernel).
fn autograd(gpu: &Device, report: &mut Report) -> Result<()> {
    let case = &cases()[6];
    let s32 = logits(case.n, case.vs, 77, false);
    let t32 = logits(case.n, case.vt, 78, false);
    let targets: Vec<i32> = (0..case.n).map(|r| (r * 31 % case.vs) as i32).collect();
    let s_cpu = Tensor::from_vec(s32, (case.n, case.vs), &Device::Cpu)?;
    let t_cpu = Tensor::from_vec(t32, (case.n, case.vt), &Device::Cpu)?.to_dtype(DType::BF16)?;
    let cpu = run_cpu(case, &s_cpu, &t_cpu, &targets)?;
    let var = Var::from_tensor(&s_cpu.to_device(gpu)?)?;
    let parts = fused_distill_loss(
        var.as_tensor(),
        &t_cpu.to_device(gpu)?,
        &opts(case, &targets, gpu)?,
    )?;
    let grads = (&parts.total * 3.0)?.backward()?;
    let grad = (grads.get(var.as_tensor()).context("no gradient")? / 3.0)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let (ge, unwritten) = grad_err(&grad, &cpu.grad);
    let le = rel(parts.total.to_scalar::<f32>()?, cpu.loss);
    let ke = rel(parts.kl.to_scalar::<f32>()?, cpu.kl);
    let ok = unwritten == 0 && le <= 1e-5 && ke <= 1e-5 && ge <= 1e-5;
    // Case 6's rows are 16-byte aligned ([8, 156032] f32, [8, 152064] bf16), so the automatic
    // choice is the default split kernel.
    let auto = Kernel::Split(xkd_kernels::cuda::DEFAULT_SPLIT);
    report.check(
        "F32/BF16 via candle autograd",
        auto,
        le.max(ke).max(ge),
        unwritten,
        ok,
    );
    println!(
        "| {} via candle autograd (x3 upstream) | F32/BF16 | automatic ({auto}) | {le:.1e} | {ke:.1e} | {ge:.1e} | {unwritten} | 1e-5 | {} |",
        case.name,
        if ok { "yes" } else { "NO" }
    );
    Ok(())
}

fn time_it(dev: &CudaDevice, reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..3 {
        f()?;
    }
    let stream = dev.cuda_stream();
    stream.synchronize()?;
    let t0 = Instant::now();
    for _ in 0..reps {
        f()?;
    }
    stream.synchronize()?;
    Ok(t0.elapsed().as_secs_f64() / reps as f64)
}

fn bandwidth(
    dev: &CudaDevice,
    gpu: &Device,
    kernels: &[Kernel],
    report: &mut Report,
) -> Result<()> {
    let bytes: usize = 4 << 30;
    let src = dev.alloc_zeros::<u8>(bytes)?;
    let mut dst = dev.alloc_zeros::<u8>(bytes)?;
    let copy = time_it(dev, 10, || Ok(dev.memcpy_dtod(&src, &mut dst)?))?;
    drop((src, dst));
    let ceiling = 2.0 * bytes as f64 / copy / 1e9;
    println!("\n## Bandwidth (bf16 logits, T = 2, alpha = 0.5)\n");
    println!(
        "Device-to-device copy of {} GiB: {:.3} ms, {ceiling:.0} GB/s (read + written).\n",
        bytes >> 30,
        copy * 1e3
    );
    println!(
        "| shape | kernel | rows in flight | time (ms) | bytes moved (GB) | GB/s | % of copy |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|");
    for (n, v) in [(64, 151936), (1024, 151936), (8192, 152064)] {
        let shape = Shape {
            n,
            vs: v,
            vt: v,
            shared: v,
            temperature: 2.0,
            alpha: 0.5,
        };
        let s = Tensor::randn(0f32, 4.0, (n, v), gpu)?.to_dtype(DType::BF16)?;
        let t = Tensor::randn(0f32, 4.0, (n, v), gpu)?.to_dtype(DType::BF16)?;
        let (ss, ts) = (cuda_slice::<bf16>(&s)?, cuda_slice::<bf16>(&t)?);
        drop((s, t));
        let targets: Vec<i32> = (0..n).map(|r| (r * 7919 % v) as i32).collect();
        let mut problem = Problem::<bf16, bf16>::new(dev, shape, ss, ts, None, &targets)?;
        let moved = (3 * n * v * 2) as f64;
        let reps = if n >= 4096 { 10 } else { 30 };
        for &kernel in kernels {
            let flight = match cuda::rows_in_flight::<bf16, bf16>(dev, kernel, &shape) {
                Ok(r) => r.to_string(),
                Err(e) => format!("? ({e})"),
            };
            match time_it(dev, reps, || problem.launch(dev, kernel)) {
                Ok(secs) => {
                    let gbs = moved / secs / 1e9;
                    println!(
                        "| [{n}, {v}] | {kernel} | {flight} | {:.3} | {:.2} | {gbs:.0} | {:.0}% |",
                        secs * 1e3,
                        moved / 1e9,
                        100.0 * gbs / ceiling
                    );
                }
                Err(e) => {
                    println!("| [{n}, {v}] | {kernel} | {flight} | FAILED TO RUN: {e:#} | | | |");
                    report.error(dev, kernel, &e)?;
                }
            }
        }
    }
    Ok(())
}

/// The kernels to run: all, or those `XKD_GPU_CHECK_KERNELS` names (comma-separated).
fn selected_kernels() -> Result<Vec<Kernel>> {
    let all = Kernel::all();
    let Ok(list) = std::env::var("XKD_GPU_CHECK_KERNELS") else {
        return Ok(all);
    };
    list.split(',')
        .map(str::trim)
        .filter(|name| !name.is_empty())
        .map(|name| {
            all.iter()
                .copied()
                .find(|k| k.to_string() == name)
                .with_context(|| {
                    let names: Vec<String> = all.iter().map(Kernel::to_string).collect();
                    format!("no kernel {name:?}; the kernels are {}", names.join(", "))
                })
        })
        .collect()
}

fn main() -> Result<()> {
    let gpu = Device::new_cuda(0).context("no CUDA device 0")?;
    let Device::Cuda(dev) = &gpu else {
        unreachable!()
    };
    let name = dev
        .cuda_stream()
        .context()
        .name()
        .unwrap_or_else(|_| "unknown GPU".into());
    println!("# xkd fused distillation loss: GPU check on {name}\n");
    let kernels = selected_kernels()?;
    let names: Vec<String> = kernels.iter().map(Kernel::to_string).collect();
    println!("Kernels: {}\n", names.join(", "));
    let started = Instant::now();
    let mut report = Report::default();
    // XKD_GPU_CHECK_ONLY=bench skips the correctness part (for profiling the bench launches).
    let bench_only = std::env::var("XKD_GPU_CHECK_ONLY").is_ok_and(|v| v == "bench");
    if !bench_only {
        correctness(dev, &gpu, &kernels, &mut report)?;
    }
    bandwidth(dev, &gpu, &kernels, &mut report)?;
    report.print();
    println!("\n(run took {:.1} s)", started.elapsed().as_secs_f64());
    if report.failed() {
        println!("\nFAILED: a CUDA result differs from the CPU op beyond its limit, or a kernel could not run");
        std::process::exit(1);
    }
    println!("\nall correctness checks passed");
    Ok(())
}
