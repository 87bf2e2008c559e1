//! The GPU check of the fused distillation loss (`kernels/gpu-check.sh` runs it; needs the
//! `cuda` feature and one sm_90 GPU).
//!
//! 1. Correctness: the CUDA op against the CPU op (`fused_distill_loss` on the CPU, itself
//!    checked against PyTorch fixtures) on random inputs: both kernels, every dtype pair,
//!    temperatures 1/2/3/4, alpha 0/0.5/1, masked rows, extreme rows, a vocabulary mismatch.
//!    Gradient buffers are filled with NaN first, so an element the kernel forgets to write
//!    fails the check. Error measures: loss `|gpu - cpu| / max(|cpu|, 1e-6)`, gradient
//!    `max|gpu - cpu| / max|cpu|`; limits 1e-5 (f32 student) and 1e-2 (bf16 student).
//!    One case goes through candle's autograd (`Var`, `backward`) on the device as well.
//! 2. Bandwidth: a large device-to-device copy (bytes read + written per second) as the ceiling,
//!    then the loss kernel on bf16 logits, counting student + teacher read and gradient written.
//!
//! Prints two tables; exits 1 if any correctness check fails.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::cuda_backend::cudarc::driver::CudaSlice;
use candle_core::cuda_backend::CudaDevice;
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

fn cuda_slice<E: candle_core::cuda_backend::CudaDType + GpuElem>(
    t: &Tensor,
) -> Result<CudaSlice<E>> {
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

struct Measured {
    loss: f32,
    kl: f32,
    ce: f32,
    grad: Vec<f32>,
}

#[allow(clippy::too_many_arguments)]
fn run_gpu<
    S: GpuElem + candle_core::cuda_backend::CudaDType,
    T: GpuElem + candle_core::cuda_backend::CudaDType,
>(
    dev: &CudaDevice,
    case: &Case,
    s: &Tensor,
    t: &Tensor,
    targets: &[i32],
    kernel: Kernel,
    nan: S,
) -> Result<Measured> {
    let ss = cuda_slice::<S>(s)?;
    let ts = cuda_slice::<T>(t)?;
    let w = match &case.weights {
        Some(w) => Some(dev.clone_htod(w.as_slice())?),
        None => None,
    };
    let tg = dev.clone_htod(targets)?;
    let mut grad = dev.clone_htod(&vec![nan; case.n * case.vs])?;
    let mut rows = dev.clone_htod(&vec![f32::NAN; 2 * case.n])?;
    let mut loss = dev.clone_htod(&[f32::NAN])?;
    let mut parts = dev.clone_htod(&[f32::NAN; 2])?;
    cuda::distill(
        dev,
        shape(case),
        &ss.slice(..),
        &ts.slice(..),
        w.as_ref(),
        Some(&tg),
        Outputs {
            grad: Some(&mut grad),
            rows: &mut rows,
            loss: &mut loss,
            parts: &mut parts,
        },
        Some(kernel),
    )?;
    let grad = Tensor::from_storage(
        Storage::Cuda(S::wrap_cuda_slice(grad, dev.clone())),
        case.n * case.vs,
        candle_core::op::BackpropOp::none(),
        false,
    );
    let grad = grad.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    let loss = dev.clone_dtoh(&loss)?[0];
    let parts = dev.clone_dtoh(&parts)?;
    Ok(Measured {
        loss,
        kl: parts[0],
        ce: parts[1],
        grad,
    })
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

fn correctness(dev: &CudaDevice, gpu: &Device) -> Result<bool> {
    println!("## Correctness: CUDA op vs CPU op (random inputs, NaN-poisoned outputs)\n");
    println!("| case | dtypes s/t | kernel | loss rel err | kl rel err | grad rel err | unwritten | limit | ok |");
    println!("|---|---|---|---|---|---|---|---|---|");
    let mut all_ok = true;
    // The one-block kernel first: its results print even if the cluster kernel misbehaves.
    for kernel in [Kernel::Row, Kernel::Cluster] {
        for (ci, case) in cases().iter().enumerate() {
            let s32 = logits(case.n, case.vs, 1 + ci as u64, case.extreme);
            let t32 = logits(case.n, case.vt, 1000 + ci as u64, false);
            let targets: Vec<i32> = (0..case.n)
                .map(|r| ((r * 7919 + 13) % case.vs) as i32)
                .collect();
            for (sd, td) in [
                (DType::F32, DType::F32),
                (DType::BF16, DType::BF16),
                (DType::F32, DType::BF16),
                (DType::BF16, DType::F32),
            ] {
                let s_cpu =
                    Tensor::from_vec(s32.clone(), (case.n, case.vs), &Device::Cpu)?.to_dtype(sd)?;
                let t_cpu =
                    Tensor::from_vec(t32.clone(), (case.n, case.vt), &Device::Cpu)?.to_dtype(td)?;
                let cpu = run_cpu(case, &s_cpu, &t_cpu, &targets)?;
                let s_gpu = s_cpu.to_device(gpu)?;
                let t_gpu = t_cpu.to_device(gpu)?;
                let limit = if sd == DType::F32 { 1e-5 } else { 1e-2 };
                {
                    let got = match (sd, td) {
                        (DType::F32, DType::F32) => run_gpu::<f32, f32>(
                            dev,
                            case,
                            &s_gpu,
                            &t_gpu,
                            &targets,
                            kernel,
                            f32::NAN,
                        ),
                        (DType::BF16, DType::BF16) => run_gpu::<bf16, bf16>(
                            dev,
                            case,
                            &s_gpu,
                            &t_gpu,
                            &targets,
                            kernel,
                            bf16::NAN,
                        ),
                        (DType::F32, DType::BF16) => run_gpu::<f32, bf16>(
                            dev,
                            case,
                            &s_gpu,
                            &t_gpu,
                            &targets,
                            kernel,
                            f32::NAN,
                        ),
                        _ => run_gpu::<bf16, f32>(
                            dev,
                            case,
                            &s_gpu,
                            &t_gpu,
                            &targets,
                            kernel,
                            bf16::NAN,
                        ),
                    };
                    let got = match got {
                        Ok(g) => g,
                        Err(e)
                            if kernel == Kernel::Cluster
                                && e.to_string().contains("cluster kernel needs") =>
                        {
                            continue; // unaligned rows: the row kernel is the one used
                        }
                        Err(e) => return Err(e),
                    };
                    let (ge, unwritten) = grad_err(&got.grad, &cpu.grad);
                    let (le, ke, ce) = (
                        rel(got.loss, cpu.loss),
                        rel(got.kl, cpu.kl),
                        rel(got.ce, cpu.ce),
                    );
                    let ok =
                        unwritten == 0 && le <= limit && ke <= limit && ce <= limit && ge <= limit;
                    all_ok &= ok;
                    println!(
                    "| {} | {:?}/{:?} | {:?} | {le:.1e} | {ke:.1e} | {ge:.1e} | {unwritten} | {limit:.0e} | {} |",
                    case.name,
                    sd,
                    td,
                    kernel,
                    if ok { "yes" } else { "NO" }
                );
                }
            }
        }
    }
    // Through candle: the custom op's cuda_fwd and backward on the device.
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
    all_ok &= ok;
    println!(
        "| {} via candle autograd (x3 upstream) | F32/BF16 | auto | {le:.1e} | {ke:.1e} | {ge:.1e} | {unwritten} | 1e-5 | {} |",
        case.name,
        if ok { "yes" } else { "NO" }
    );
    Ok(all_ok)
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

fn bandwidth(dev: &CudaDevice, gpu: &Device) -> Result<()> {
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
    println!("| shape | kernel | time (ms) | bytes moved (GB) | GB/s | % of copy |");
    println!("|---|---|---|---|---|---|");
    for (n, v) in [(64, 151936), (1024, 151936), (8192, 152064)] {
        let case = Case {
            name: "bench",
            n,
            vs: v,
            vt: v,
            shared: v,
            temperature: 2.0,
            alpha: 0.5,
            weights: None,
            extreme: false,
        };
        let s = Tensor::randn(0f32, 4.0, (n, v), gpu)?.to_dtype(DType::BF16)?;
        let t = Tensor::randn(0f32, 4.0, (n, v), gpu)?.to_dtype(DType::BF16)?;
        let ss = cuda_slice::<bf16>(&s)?;
        let ts = cuda_slice::<bf16>(&t)?;
        drop((s, t));
        let targets: Vec<i32> = (0..n).map(|r| (r * 7919 % v) as i32).collect();
        let tg = dev.clone_htod(targets.as_slice())?;
        let mut grad = unsafe { dev.alloc::<bf16>(n * v)? };
        let mut rows = unsafe { dev.alloc::<f32>(2 * n)? };
        let mut loss = unsafe { dev.alloc::<f32>(1)? };
        let mut parts = unsafe { dev.alloc::<f32>(2)? };
        let moved = (3 * n * v * 2) as f64;
        for kernel in [Kernel::Cluster, Kernel::Row] {
            let reps = if n >= 4096 { 10 } else { 30 };
            let secs = time_it(dev, reps, || {
                cuda::distill(
                    dev,
                    shape(&case),
                    &ss.slice(..),
                    &ts.slice(..),
                    None,
                    Some(&tg),
                    Outputs {
                        grad: Some(&mut grad),
                        rows: &mut rows,
                        loss: &mut loss,
                        parts: &mut parts,
                    },
                    Some(kernel),
                )?;
                Ok(())
            })?;
            let gbs = moved / secs / 1e9;
            println!(
                "| [{n}, {v}] | {kernel:?} | {:.3} | {:.2} | {gbs:.0} | {:.0}% |",
                secs * 1e3,
                moved / 1e9,
                100.0 * gbs / ceiling
            );
        }
    }
    Ok(())
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
    // XKD_GPU_CHECK_ONLY=bench skips the correctness part (for profiling the bench launches).
    let bench_only = std::env::var("XKD_GPU_CHECK_ONLY").is_ok_and(|v| v == "bench");
    let ok = bench_only || correctness(dev, &gpu)?;
    bandwidth(dev, &gpu)?;
    if !ok {
        println!("\nFAILED: at least one CUDA result differs from the CPU op beyond its limit");
        std::process::exit(1);
    }
    println!("\nall correctness checks passed");
    Ok(())
}
