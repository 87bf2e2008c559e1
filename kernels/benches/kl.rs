//! Fused CPU distillation loss versus the same loss composed from candle ops, forward + backward
//! on `[64, 151936]` f32 logits: median wall time and peak extra heap memory (counted by a global
//! allocator in this binary). Checks the two agree before timing. No assertion on timings.
//!
//! cargo bench -p xkd-kernels --bench kl            (XKD_BENCH_ROWS / XKD_BENCH_RUNS to change)

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use xkd_kernels::{distill_loss, fused_distill_loss, FusedLoss};

struct Counting;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(n: usize) {
    let now = CURRENT.fetch_add(n, Ordering::Relaxed) + n;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

// SAFETY: forwards every call to the system allocator unchanged; only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            grew(l.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(l) };
        if !p.is_null() {
            grew(l.size());
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) };
        CURRENT.fetch_sub(l.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        let q = unsafe { System.realloc(p, l, new) };
        if !q.is_null() {
            CURRENT.fetch_sub(l.size(), Ordering::Relaxed);
            grew(new);
        }
        q
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Runs `f`, returning its result, seconds, and the peak heap above what was live before.
fn measure<R>(f: impl FnOnce() -> R) -> (R, f64, usize) {
    let base = CURRENT.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let t0 = Instant::now();
    let r = f();
    let secs = t0.elapsed().as_secs_f64();
    (r, secs, PEAK.load(Ordering::Relaxed) - base)
}

fn logits(seed: u64, n: usize, v: usize, scale: f32) -> Tensor {
    let mut x = seed;
    let data: Vec<f32> = (0..n * v)
        .map(|_| {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            scale * (2.0 * ((z >> 40) as f32 / (1u64 << 24) as f32) - 1.0)
        })
        .collect();
    Tensor::from_vec(data, (n, v), &Device::Cpu).unwrap()
}

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn median(mut x: Vec<f64>) -> f64 {
    x.sort_by(f64::total_cmp);
    x[x.len() / 2]
}

fn main() -> candle_core::Result<()> {
    let n = env("XKD_BENCH_ROWS", 64);
    let v = 151_936;
    let runs = env("XKD_BENCH_RUNS", 5);
    let (t, alpha) = (2.0, 0.5);
    let student = Var::from_tensor(&logits(1, n, v, 8.0))?;
    let teacher = logits(2, n, v, 8.0);
    let targets: Vec<u32> = (0..n as u32)
        .map(|r| (r * 2_654_435_761) % v as u32)
        .collect();
    let targets = Tensor::new(targets.as_slice(), &Device::Cpu)?;
    let ones = Tensor::ones(n, candle_core::DType::F32, &Device::Cpu)?;
    let (kw, cw) = ((&ones * alpha)?, (&ones * (1.0 - alpha))?);
    let opts = FusedLoss {
        temperature: t,
        alpha,
        shared_vocab: None,
        targets: Some(targets.clone()),
        weights: Some(ones.clone()),
    };

    let fused = || -> candle_core::Result<(f32, Tensor)> {
        let parts = fused_distill_loss(student.as_tensor(), &teacher, &opts)?;
        let grads = parts.total.backward()?;
        let g = grads.get(student.as_tensor()).unwrap().clone();
        Ok((parts.total.to_scalar::<f32>()?, g))
    };
    let composed = || -> candle_core::Result<(f32, Tensor)> {
        let parts = distill_loss(student.as_tensor(), &teacher, &targets, &kw, &cw, t)?;
        let grads = parts.total.backward()?;
        let g = grads.get(student.as_tensor()).unwrap().clone();
        Ok((parts.total.to_scalar::<f32>()?, g))
    };

    // Check before timing.
    let (lf, gf) = fused()?;
    let (lc, gc) = composed()?;
    let gdiff = (&gf - &gc)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?;
    let gmax = gc.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    println!(
        "check [{n}, {v}] T={t} alpha={alpha}: loss fused {lf} composed {lc} (rel diff {:.1e}), \
         grad max |diff| {gdiff:.1e} (max |g| {gmax:.1e})",
        ((lf - lc) / lc).abs()
    );
    if ((lf - lc) / lc).abs() > 1e-5 || gdiff > 1e-5 * gmax {
        candle_core::bail!("fused and composed losses disagree; not timing");
    }
    drop((gf, gc));

    let bxv = (n * v * 4) as f64 / 1e6;
    println!(
        "threads: {} (candle/rayon), {} runs each, B x V f32 = {bxv:.1} MB",
        candle_core::utils::get_num_threads(),
        runs
    );
    println!(
        "| op (fwd+bwd, [{n}, {v}] f32) | median ms | min ms | peak extra MB | x B*V f32 \
         | fwd-only peak x B*V |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    let mut rows = Vec::new();
    for (name, f) in [
        (
            "composed candle ops",
            &composed as &dyn Fn() -> candle_core::Result<(f32, Tensor)>,
        ),
        ("fused CPU op", &fused),
    ] {
        let mut times = Vec::new();
        let mut peak = 0;
        // Forward alone (no backward): what the op itself keeps.
        let (r, _, fwd_peak) = measure(|| {
            if name.starts_with("fused") {
                fused_distill_loss(student.as_tensor(), &teacher, &opts).map(|p| p.total)
            } else {
                distill_loss(student.as_tensor(), &teacher, &targets, &kw, &cw, t).map(|p| p.total)
            }
        });
        drop(r?);
        for _ in 0..runs {
            let (r, secs, p) = measure(|| f().map(|_| ()));
            r?;
            times.push(secs);
            peak = peak.max(p);
        }
        let min = times.iter().cloned().fold(f64::INFINITY, f64::min);
        let med = median(times);
        println!(
            "| {name} | {:.1} | {:.1} | {:.1} | {:.2} | {:.2} |",
            med * 1e3,
            min * 1e3,
            peak as f64 / 1e6,
            peak as f64 / 1e6 / bxv,
            fwd_peak as f64 / 1e6 / bxv
        );
        rows.push(med);
    }
    println!("speed-up (median): {:.2}x", rows[0] / rows[1]);
    Ok(())
}
