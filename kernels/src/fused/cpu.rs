//! The CPU twin of the fused loss: rows in parallel (rayon), each in two passes over its logits
//! with an online log-sum-exp, in chunks of `CHUNK` logits (f32 within a chunk, f64 across).

use super::*;

pub(super) fn slice<'a, E>(v: &'a [E], l: &Layout) -> Result<&'a [E]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("fused loss: logits must be contiguous"),
    }
}

pub(super) type Out = (f64, f64, Option<Vec<f32>>);

pub(super) fn dispatch_teacher<S: Elem>(
    p: &Plan,
    s: &[S],
    t: &CpuStorage,
    lt: &Layout,
) -> Result<Out> {
    Ok(match t {
        CpuStorage::F32(t) => run(p, s, slice(t, lt)?),
        CpuStorage::BF16(t) => run(p, s, slice(t, lt)?),
        CpuStorage::F16(t) => run(p, s, slice(t, lt)?),
        other => candle_core::bail!("fused loss: teacher dtype {:?}", other.dtype()),
    })
}

/// A logits element type: read as f32.
pub(super) trait Elem: Copy + Send + Sync {
    fn f32(self) -> f32;
}
impl Elem for f32 {
    #[inline(always)]
    fn f32(self) -> f32 {
        self
    }
}
impl Elem for bf16 {
    #[inline(always)]
    fn f32(self) -> f32 {
        self.to_f32()
    }
}
impl Elem for f16 {
    #[inline(always)]
    fn f32(self) -> f32 {
        self.to_f32()
    }
}

pub(super) fn run<S: Elem, T: Elem>(p: &Plan, s: &[S], t: &[T]) -> Out {
    let rows = |grad: Option<&mut [f32]>| -> (f64, f64) {
        let work = |r: usize, g: Option<&mut [f32]>| {
            let w = p.weights.as_ref().map_or(1.0, |w| w[r]);
            if w == 0.0 {
                return (0.0, 0.0);
            }
            let target = p.targets.as_ref().map(|t| t[r] as usize);
            row(
                p,
                &s[r * p.vs..(r + 1) * p.vs],
                &t[r * p.vt..(r + 1) * p.vt],
                target,
                w,
                g,
            )
        };
        let add = |a: (f64, f64), b: (f64, f64)| (a.0 + b.0, a.1 + b.1);
        candle_core::utils::with_threadpool(|| match grad {
            Some(g) => g
                .par_chunks_mut(p.vs)
                .enumerate()
                .map(|(r, g)| work(r, Some(g)))
                .reduce(|| (0.0, 0.0), add),
            None => (0..p.n)
                .into_par_iter()
                .map(|r| work(r, None))
                .reduce(|| (0.0, 0.0), add),
        })
    };
    if p.want_grad {
        let mut grad = vec![0f32; p.n * p.vs];
        let (kl, ce) = rows(Some(&mut grad));
        (kl, ce, Some(grad))
    } else {
        let (kl, ce) = rows(None);
        (kl, ce, None)
    }
}

pub(super) const CHUNK: usize = 256;

/// Online log-sum-exp of `c * x` over a stream of chunks: `m + ln z` with `z = sum exp(c x - m)`.
#[derive(Clone, Copy)]
pub(super) struct Lse {
    m: f32,
    z: f64,
}

impl Lse {
    const EMPTY: Lse = Lse {
        m: f32::NEG_INFINITY,
        z: 0.0,
    };

    #[inline(always)]
    fn push(&mut self, x: &[f32], c: f32) {
        let mx = max(x) * c;
        if mx > self.m {
            if self.z != 0.0 {
                self.z *= ((self.m - mx) as f64).exp();
            }
            self.m = mx;
        }
        if self.m > f32::NEG_INFINITY {
            self.z += sum_exp(x, c, self.m) as f64;
        } else if x.iter().any(|v| v.is_nan()) {
            self.z = f64::NAN;
        }
    }

    fn merge(self, o: Lse) -> Lse {
        if o.z == 0.0 {
            return self;
        }
        if self.z == 0.0 {
            return o;
        }
        let m = self.m.max(o.m);
        Lse {
            m,
            z: self.z * ((self.m - m) as f64).exp() + o.z * ((o.m - m) as f64).exp(),
        }
    }

    /// The log-sum-exp as `m + lz`; `lz = -inf` for an empty (or all `-inf`) stream.
    fn norm(self) -> Norm {
        if self.z == 0.0 {
            Norm {
                m: 0.0,
                lz: f32::NEG_INFINITY,
            }
        } else {
            Norm {
                m: self.m,
                lz: self.z.ln() as f32,
            }
        }
    }
}

/// A log-normaliser kept as `max + ln(sum exp(x - max))`: log-probabilities are formed as
/// `(x - m) - lz`, whose first difference is exact near the maximum, so logits of size 1e4 do not
/// lose the ~1e-3 absolute precision that `x - lse` would in f32.
#[derive(Clone, Copy)]
pub(super) struct Norm {
    m: f32,
    lz: f32,
}

impl Norm {
    #[inline(always)]
    fn logp(self, x: f32) -> f32 {
        (x - self.m) - self.lz
    }

    fn is_empty(self) -> bool {
        self.lz == f32::NEG_INFINITY
    }

    /// `self - other` as a log-ratio of the two normalisers (f64).
    fn minus(self, other: Norm) -> f64 {
        (self.m as f64 - other.m as f64) + (self.lz as f64 - other.lz as f64)
    }
}

#[inline(always)]
pub(super) fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let mut it = x.chunks_exact(8);
    for c in &mut it {
        for k in 0..8 {
            acc[k] = if c[k] > acc[k] { c[k] } else { acc[k] };
        }
    }
    let mut m = f32::NEG_INFINITY;
    for &v in acc.iter().chain(it.remainder()) {
        m = if v > m { v } else { m };
    }
    m
}

#[inline(always)]
pub(super) fn sum_exp(x: &[f32], c: f32, m: f32) -> f32 {
    let mut acc = [0f32; 8];
    let mut it = x.chunks_exact(8);
    for ch in &mut it {
        for k in 0..8 {
            acc[k] += exp(ch[k] * c - m);
        }
    }
    let mut z: f32 = it.remainder().iter().map(|v| exp(v * c - m)).sum();
    for a in acc {
        z += a;
    }
    z
}

/// `e^x` for `x <= 88`, to about 1 ulp, written so that it vectorises (no libm call): Cody-Waite
/// reduction to `r` in `[-ln2/2, ln2/2]`, a degree-7 Taylor polynomial (truncation error below
/// 1e-8 relative) and the exponent put in by hand. Results below ~1e-38 flush to 0; NaN stays NaN.
#[inline(always)]
pub(super) fn exp(x: f32) -> f32 {
    const LO: f32 = -87.0;
    const HI: f32 = 88.0;
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const SHIFT: f32 = 12_582_912.0; // 1.5 * 2^23: adding and subtracting it rounds to an integer
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let xc = x.clamp(LO, HI); // NaN stays NaN
    let k = (xc * LOG2E + SHIFT) - SHIFT;
    let r = (xc - k * LN2_HI) - k * LN2_LO;
    let mut p = 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    let scale = f32::from_bits(((k as i32 + 127) as u32) << 23);
    if x < LO {
        0.0
    } else {
        p * scale
    }
}

/// Copies `src` into `dst` as f32 (the chunk buffer).
#[inline(always)]
pub(super) fn load<E: Elem>(dst: &mut [f32; CHUNK], src: &[E]) -> usize {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = s.f32();
    }
    src.len()
}

/// One row: returns its weighted contributions `(kl, ce)` to the loss (already divided by N) and
/// writes its gradient row when `g` is given.
pub(super) fn row<S: Elem, T: Elem>(
    p: &Plan,
    s: &[S],
    t: &[T],
    target: Option<usize>,
    w: f32,
    g: Option<&mut [f32]>,
) -> (f64, f64) {
    let sh = p.shared;
    let inv_t = 1.0 / p.temperature;
    let do_kl = p.alpha > 0.0;
    let do_ce = p.alpha < 1.0;
    // The cross-entropy softmax is the KL one when T = 1.
    let ce_own = do_ce && !(do_kl && p.temperature == 1.0);
    let mut buf = [0f32; CHUNK];

    // Pass 1: log-sum-exps.
    let (mut ss, mut sr, mut ts, mut tr, mut s1) =
        (Lse::EMPTY, Lse::EMPTY, Lse::EMPTY, Lse::EMPTY, Lse::EMPTY);
    for (i, c) in s.chunks(CHUNK).enumerate() {
        let len = load(&mut buf, c);
        // Chunks never straddle `shared` on the student side: split by hand.
        let start = i * CHUNK;
        let x = &buf[..len];
        let cut = sh.saturating_sub(start).min(len);
        if do_kl {
            ss.push(&x[..cut], inv_t);
            sr.push(&x[cut..], inv_t);
        }
        if ce_own {
            s1.push(x, 1.0);
        }
    }
    if do_kl {
        for (i, c) in t.chunks(CHUNK).enumerate() {
            let len = load(&mut buf, c);
            let start = i * CHUNK;
            let x = &buf[..len];
            let cut = sh.saturating_sub(start).min(len);
            ts.push(&x[..cut], inv_t);
            tr.push(&x[cut..], inv_t);
        }
    }
    let lse_s = ss.merge(sr).norm();
    let lse_t = ts.merge(tr).norm();
    let lse_sr = sr.norm();
    let lse_tr = tr.norm();
    let lse_1 = if ce_own { s1.norm() } else { lse_s };

    let n = p.n as f32;
    // d loss / d s_j = ck * (q_j - pt_b(j) * q_j / ps_b(j)) + cc * (p1_j - [j == target]).
    let ck = if do_kl {
        p.alpha * p.temperature * w / n
    } else {
        0.0
    };
    let cc = if do_ce { (1.0 - p.alpha) * w / n } else { 0.0 };

    // Pass 2: the KL over the shared ids (and the gradient).
    let mut kl = 0f64;
    let mut g = g;
    let mut tbuf = [0f32; CHUNK];
    if do_kl {
        let mut off = 0;
        while off < sh {
            let len = (sh - off).min(CHUNK);
            load(&mut buf, &s[off..off + len]);
            load(&mut tbuf, &t[off..off + len]);
            let mut acc = [0f32; 8];
            let (x, y) = (&buf[..len], &tbuf[..len]);
            match g.as_deref_mut() {
                Some(g) => {
                    let g = &mut g[off..off + len];
                    let k = KlGrad {
                        inv_t,
                        lse_s,
                        lse_t,
                        lse_1,
                        ck,
                        cc,
                    };
                    if ce_own {
                        k.block::<true>(x, y, g, &mut acc);
                    } else {
                        k.block::<false>(x, y, g, &mut acc);
                    }
                }
                None => {
                    for j in 0..len {
                        let lps = lse_s.logp(x[j] * inv_t);
                        let lpt = lse_t.logp(y[j] * inv_t);
                        acc[j % 8] += exp(lpt) * (lpt - lps);
                    }
                }
            }
            kl += acc.iter().map(|&a| a as f64).sum::<f64>();
            off += len;
        }
        // The rest buckets.
        if !lse_tr.is_empty() {
            let lpt = lse_tr.minus(lse_t);
            let lps = lse_sr.minus(lse_s);
            kl += lpt.exp() * (lpt - lps);
        }
    } else if let Some(g) = g.as_deref_mut() {
        // Cross-entropy only: the shared range is nothing special.
        fill_ce(&mut g[..sh], &s[..sh], &mut buf, lse_1, cc);
    }
    // The student's own ids outside the shared range.
    if let Some(g) = g {
        if sh < p.vs {
            let pt_rest = if !lse_tr.is_empty() {
                lse_tr.minus(lse_t).exp() as f32
            } else {
                0.0
            };
            let mut off = sh;
            while off < p.vs {
                let len = (p.vs - off).min(CHUNK);
                load(&mut buf, &s[off..off + len]);
                let g = &mut g[off..off + len];
                for j in 0..len {
                    let x = buf[j];
                    let (kq, kr) = if do_kl {
                        (exp(lse_s.logp(x * inv_t)), exp(lse_sr.logp(x * inv_t)))
                    } else {
                        (0.0, 0.0)
                    };
                    let p1 = if !do_ce {
                        0.0
                    } else if ce_own {
                        exp(lse_1.logp(x))
                    } else {
                        kq
                    };
                    g[j] = ck * (kq - pt_rest * kr) + cc * p1;
                }
                off += len;
            }
        }
        if let Some(tg) = target {
            g[tg] -= cc;
        }
    }
    let ce = match target {
        Some(tg) if do_ce => (lse_1.m as f64 - s[tg].f32() as f64) + lse_1.lz as f64,
        _ => 0.0,
    };
    let kl_part = if do_kl {
        p.alpha as f64 * (p.temperature as f64).powi(2) * w as f64 * kl / p.n as f64
    } else {
        0.0
    };
    let ce_part = (1.0 - p.alpha as f64) * w as f64 * ce / p.n as f64;
    (kl_part, ce_part)
}

/// Cross-entropy-only gradient `cc * softmax(x)_j` over a range (the target is subtracted later).
pub(super) fn fill_ce<S: Elem>(
    g: &mut [f32],
    s: &[S],
    buf: &mut [f32; CHUNK],
    lse_1: Norm,
    cc: f32,
) {
    for (gc, sc) in g.chunks_mut(CHUNK).zip(s.chunks(CHUNK)) {
        let len = load(buf, sc);
        for (gj, &x) in gc.iter_mut().zip(&buf[..len]) {
            *gj = cc * exp(lse_1.logp(x));
        }
    }
}

/// The constants of the shared-range KL + gradient loop.
pub(super) struct KlGrad {
    inv_t: f32,
    lse_s: Norm,
    lse_t: Norm,
    lse_1: Norm,
    ck: f32,
    cc: f32,
}

impl KlGrad {
    /// Accumulates `pt (log pt - log ps)` into `acc` and writes
    /// `g = ck (q - pt) + cc p1` (`p1` the temperature-1 softmax, `q` itself unless `OWN_CE`).
    #[inline(always)]
    fn block<const OWN_CE: bool>(&self, x: &[f32], y: &[f32], g: &mut [f32], acc: &mut [f32; 8]) {
        let one = |x: f32, y: f32| {
            let lps = self.lse_s.logp(x * self.inv_t);
            let lpt = self.lse_t.logp(y * self.inv_t);
            let q = exp(lps);
            let pt = exp(lpt);
            let p1 = if OWN_CE { exp(self.lse_1.logp(x)) } else { q };
            (pt * (lpt - lps), self.ck * (q - pt) + self.cc * p1)
        };
        let mut xs = x.chunks_exact(8);
        let mut ys = y.chunks_exact(8);
        let mut gs = g.chunks_exact_mut(8);
        for ((xc, yc), gc) in (&mut xs).zip(&mut ys).zip(&mut gs) {
            for k in 0..8 {
                let (a, d) = one(xc[k], yc[k]);
                acc[k] += a;
                gc[k] = d;
            }
        }
        for ((x, y), g) in xs
            .remainder()
            .iter()
            .zip(ys.remainder())
            .zip(gs.into_remainder())
        {
            let (a, d) = one(*x, *y);
            acc[0] += a;
            *g = d;
        }
    }
}
