//! The fused distillation loss against the PyTorch float64 fixtures written by
//! tests/reference/make_kl_fixtures.py, and against the composed `distill_loss` oracle.

use candle_core::{DType, Device, Tensor, Var};
use serde_json::Value;
use xkd_kernels::{distill_loss, fused_distill_loss, FusedLoss};

const FIXTURES: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tests/reference/fixtures/kl_fixtures.json"
);

// The generator of make_kl_fixtures.py: counter-based splitmix64, exact in f32.
const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn raw(seed: u64, i: usize) -> u64 {
    mix(seed.wrapping_add((i as u64 + 1).wrapping_mul(GAMMA)))
}

fn gen(seed: u64, n: usize, v: usize, scale: f64) -> Vec<f32> {
    (0..n * v)
        .map(|i| {
            let u = (raw(seed, i) >> 40) as f64 / (1u64 << 24) as f64;
            (scale * (2.0 * u - 1.0)) as f32
        })
        .collect()
}

fn gen_targets(seed: u64, n: usize, v: usize) -> Vec<u32> {
    (0..n).map(|r| (raw(seed, r) % v as u64) as u32).collect()
}

fn patch(x: &mut [f32], v: usize, patches: &[Value], side: &str) {
    for p in patches {
        if p["side"] != side {
            continue;
        }
        let r = p["row"].as_u64().unwrap() as usize;
        let row = &mut x[r * v..(r + 1) * v];
        match p["kind"].as_str().unwrap() {
            "const" => row.fill(p["value"].as_f64().unwrap() as f32),
            "spike" => {
                row.fill(-1e4);
                row[p["at"].as_u64().unwrap() as usize] = 1e4;
            }
            "alternating" => {
                for (j, x) in row.iter_mut().enumerate() {
                    *x = if j % 2 == 0 { 1e4 } else { -1e4 };
                }
            }
            "nan" => row.fill(f32::NAN),
            k => panic!("unknown patch {k}"),
        }
    }
}

fn close(got: f64, want: f64, rel: f64, abs: f64) -> bool {
    (got - want).abs() <= (rel * want.abs()).max(abs)
}

fn usize_of(v: &Value) -> usize {
    v.as_u64().unwrap() as usize
}

#[test]
fn fused_cpu_op_matches_every_pytorch_fixture() {
    let text = std::fs::read_to_string(FIXTURES).expect("fixtures (run make_kl_fixtures.py)");
    let all: Value = serde_json::from_str(&text).unwrap();
    let cases = all["cases"].as_array().unwrap();
    assert!(cases.len() >= 20, "{} cases", cases.len());
    let dev = Device::Cpu;
    let mut failures = Vec::new();
    for c in cases {
        let name = c["name"].as_str().unwrap();
        let (n, vs, vt) = (usize_of(&c["n"]), usize_of(&c["vs"]), usize_of(&c["vt"]));
        let mut s = gen(
            c["student"]["seed"].as_u64().unwrap(),
            n,
            vs,
            c["student"]["scale"].as_f64().unwrap(),
        );
        let mut t = gen(
            c["teacher"]["seed"].as_u64().unwrap(),
            n,
            vt,
            c["teacher"]["scale"].as_f64().unwrap(),
        );
        let patches = c["patches"].as_array().unwrap();
        patch(&mut s, vs, patches, "student");
        patch(&mut t, vt, patches, "teacher");
        let student = Var::from_vec(s, (n, vs), &dev).unwrap();
        let teacher = Tensor::from_vec(t, (n, vt), &dev).unwrap();
        let opts = FusedLoss {
            temperature: c["temperature"].as_f64().unwrap(),
            alpha: c["alpha"].as_f64().unwrap(),
            shared_vocab: c["shared"].as_u64().map(|s| s as usize),
            targets: c["targets_seed"]
                .as_u64()
                .map(|seed| Tensor::new(gen_targets(seed, n, vs).as_slice(), &dev).unwrap()),
            weights: c["weights"].as_array().map(|w| {
                let w: Vec<f32> = w.iter().map(|x| x.as_f64().unwrap() as f32).collect();
                Tensor::new(w.as_slice(), &dev).unwrap()
            }),
        };
        let parts = fused_distill_loss(student.as_tensor(), &teacher, &opts).unwrap();
        let grads = parts.total.backward().unwrap();
        let g = grads.get(student.as_tensor()).unwrap();
        let g = g.to_vec2::<f32>().unwrap();

        let mut check = |what: String, got: f64, want: f64, rel: f64, abs: f64| {
            if !got.is_finite() || !close(got, want, rel, abs) {
                failures.push(format!("{name}: {what}: got {got:e}, want {want:e}"));
            }
        };
        for part in ["loss", "kl", "ce"] {
            let tensor = match part {
                "loss" => &parts.total,
                "kl" => &parts.kl,
                _ => &parts.ce,
            };
            let got = tensor.to_scalar::<f32>().unwrap() as f64;
            check(part.into(), got, c[part].as_f64().unwrap(), 1e-5, 1e-7);
        }
        // Every gradient entry is finite, masked rows are exactly 0.
        for (r, row) in g.iter().enumerate() {
            assert!(
                row.iter().all(|x| x.is_finite()),
                "{name}: row {r} not finite"
            );
            let w = c["weights"]
                .as_array()
                .map_or(1.0, |w| w[r].as_f64().unwrap());
            if w == 0.0 {
                assert!(row.iter().all(|x| *x == 0.0), "{name}: masked row {r}");
            }
        }
        if let Some(want) = c["grad"].as_array() {
            for (r, row) in want.iter().enumerate() {
                for (j, x) in row.as_array().unwrap().iter().enumerate() {
                    let want = x.as_f64().unwrap();
                    check(format!("grad[{r}][{j}]"), g[r][j] as f64, want, 1e-5, 1e-7);
                }
            }
        }
        if let Some(samples) = c["grad_samples"].as_array() {
            for e in samples {
                let (r, j) = (usize_of(&e[0]), usize_of(&e[1]));
                let want = e[2].as_f64().unwrap();
                check(format!("grad[{r}][{j}]"), g[r][j] as f64, want, 1e-5, 1e-7);
            }
        }
        let norm = |row: &[f32]| row.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        for (r, want) in c["grad_row_norms"].as_array().unwrap().iter().enumerate() {
            check(
                format!("|grad[{r}]|"),
                norm(&g[r]),
                want.as_f64().unwrap(),
                1e-5,
                1e-9,
            );
        }
        let total = g.iter().map(|r| norm(r).powi(2)).sum::<f64>().sqrt();
        check(
            "|grad|".into(),
            total,
            c["grad_norm"].as_f64().unwrap(),
            1e-5,
            1e-9,
        );
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Small uniform random logits from the fixture generator.
fn rand_t(seed: u64, n: usize, v: usize, scale: f64) -> Tensor {
    Tensor::from_vec(gen(seed, n, v, scale), (n, v), &Device::Cpu).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn fused_matches_the_composed_oracle_forward_and_backward() {
    let dev = Device::Cpu;
    let mut k = 0;
    for (n, v) in [(1, 5), (3, 37), (6, 300), (5, 1000)] {
        for t in [0.5, 1.0, 2.0, 4.0] {
            for alpha in [0.0, 0.3, 0.5, 1.0] {
                k += 1;
                let s = Var::from_tensor(&rand_t(100 + k, n, v, 4.0)).unwrap();
                let te = rand_t(200 + k, n, v, 8.0);
                let targets = Tensor::new(gen_targets(300 + k, n, v).as_slice(), &dev).unwrap();
                let w: Vec<f32> = (0..n).map(|r| [1.0, 0.0, 0.5, 2.0][r % 4]).collect();
                let w = Tensor::new(w.as_slice(), &dev).unwrap();
                let kw = (&w * alpha).unwrap();
                let cw = (&w * (1.0 - alpha)).unwrap();
                let want = distill_loss(s.as_tensor(), &te, &targets, &kw, &cw, t).unwrap();
                let opts = FusedLoss {
                    temperature: t,
                    alpha,
                    shared_vocab: None,
                    targets: Some(targets.clone()),
                    weights: Some(w.clone()),
                };
                let got = fused_distill_loss(s.as_tensor(), &te, &opts).unwrap();
                for (a, b, what) in [
                    (&got.total, &want.total, "total"),
                    (&got.kl, &want.kl, "kl"),
                    (&got.ce, &want.ce, "ce"),
                ] {
                    let (a, b) = (a.to_scalar::<f32>().unwrap(), b.to_scalar::<f32>().unwrap());
                    assert!(
                        close(a as f64, b as f64, 1e-5, 1e-6),
                        "{what} n={n} v={v} T={t} alpha={alpha}: fused {a} composed {b}"
                    );
                }
                let gw = want.total.backward().unwrap();
                let gg = got.total.backward().unwrap();
                let (gw, gg) = (
                    gw.get(s.as_tensor()).unwrap(),
                    gg.get(s.as_tensor()).unwrap(),
                );
                let scale = gw.abs().unwrap().max_keepdim(1).unwrap().max(0).unwrap();
                let scale = scale.flatten_all().unwrap().to_vec1::<f32>().unwrap()[0];
                let diff = max_abs_diff(gg, gw);
                assert!(
                    diff <= 1e-5 * scale.max(1e-2),
                    "grad n={n} v={v} T={t} alpha={alpha}: max diff {diff} (max |g| {scale})"
                );
            }
        }
    }
}

#[test]
fn bf16_and_f16_inputs_match_f32_on_the_same_values() {
    let dev = Device::Cpu;
    let (n, v) = (4, 3000);
    let targets = Tensor::new(gen_targets(9, n, v).as_slice(), &dev).unwrap();
    let opts = FusedLoss {
        temperature: 2.0,
        alpha: 0.5,
        shared_vocab: None,
        targets: Some(targets),
        weights: None,
    };
    for dt in [DType::BF16, DType::F16] {
        let s = rand_t(7, n, v, 8.0).to_dtype(dt).unwrap();
        let te = rand_t(8, n, v, 8.0).to_dtype(dt).unwrap();
        let s_var = Var::from_tensor(&s).unwrap();
        let low = fused_distill_loss(s_var.as_tensor(), &te, &opts).unwrap();
        let s32 = Var::from_tensor(&s.to_dtype(DType::F32).unwrap()).unwrap();
        let te32 = te.to_dtype(DType::F32).unwrap();
        let high = fused_distill_loss(s32.as_tensor(), &te32, &opts).unwrap();
        let (a, b) = (
            low.total.to_scalar::<f32>().unwrap(),
            high.total.to_scalar::<f32>().unwrap(),
        );
        assert_eq!(a, b, "{dt:?}: same values, same f32 arithmetic");
        // Mixed: bf16 teacher, f32 student.
        let mixed = fused_distill_loss(s32.as_tensor(), &te, &opts).unwrap();
        assert_eq!(mixed.total.to_scalar::<f32>().unwrap(), b);
        let g = low.total.backward().unwrap();
        let g = g.get(s_var.as_tensor()).unwrap();
        assert_eq!(g.dtype(), dt, "gradient in the student's dtype");
        let g32 = high.total.backward().unwrap();
        let g32 = g32.get(s32.as_tensor()).unwrap().to_dtype(dt).unwrap();
        assert_eq!(
            max_abs_diff(
                &g.to_dtype(DType::F32).unwrap(),
                &g32.to_dtype(DType::F32).unwrap()
            ),
            0.0
        );
    }
}

#[test]
fn backward_scales_by_the_upstream_gradient_and_skips_the_teacher() {
    let dev = Device::Cpu;
    let s = Var::from_tensor(&rand_t(1, 3, 50, 4.0)).unwrap();
    let te = Var::from_tensor(&rand_t(2, 3, 50, 4.0)).unwrap();
    let opts = FusedLoss {
        temperature: 2.0,
        alpha: 1.0,
        ..FusedLoss::default()
    };
    let once = fused_distill_loss(s.as_tensor(), te.as_tensor(), &opts).unwrap();
    let g1 = once.total.backward().unwrap();
    assert!(g1.get(te.as_tensor()).is_none(), "teacher gets no gradient");
    let g1 = g1.get(s.as_tensor()).unwrap().clone();
    let again = fused_distill_loss(s.as_tensor(), te.as_tensor(), &opts).unwrap();
    let tripled = (again.total * 3.0).unwrap();
    let g3 = tripled.backward().unwrap();
    let g3 = g3.get(s.as_tensor()).unwrap();
    let want = (&g1 * 3.0).unwrap();
    assert!(max_abs_diff(g3, &want) <= 1e-7);
    // The saved gradient is handed over once.
    assert!(once.total.backward().is_err());
    // Without gradient tracking the loss is the same number.
    let plain = fused_distill_loss(&s.as_tensor().detach(), te.as_tensor(), &opts).unwrap();
    let tracked = fused_distill_loss(s.as_tensor(), te.as_tensor(), &opts).unwrap();
    assert_eq!(
        plain.total.to_scalar::<f32>().unwrap(),
        tracked.total.to_scalar::<f32>().unwrap()
    );
    let _ = dev;
}

#[test]
fn all_masked_is_zero_with_zero_gradient() {
    let dev = Device::Cpu;
    let s = Var::from_tensor(&rand_t(1, 2, 9, 1e4)).unwrap();
    let te = Tensor::from_vec(vec![f32::NAN; 18], (2, 9), &dev).unwrap();
    let opts = FusedLoss {
        temperature: 4.0,
        alpha: 0.5,
        targets: Some(Tensor::new(&[-100i64, 99], &dev).unwrap()),
        weights: Some(Tensor::new(&[0f32, 0.0], &dev).unwrap()),
        ..FusedLoss::default()
    };
    let parts = fused_distill_loss(s.as_tensor(), &te, &opts).unwrap();
    assert_eq!(parts.total.to_scalar::<f32>().unwrap(), 0.0);
    let g = parts.total.backward().unwrap();
    let g = g.get(s.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
    assert!(g.iter().flatten().all(|x| *x == 0.0));
}

#[test]
fn rejects_what_it_cannot_define() {
    let s = rand_t(1, 2, 10, 1.0);
    let t = rand_t(2, 2, 12, 1.0);
    let base = FusedLoss::default();
    // Different vocabularies without a shared range.
    assert!(fused_distill_loss(&s, &t, &base).is_err());
    // Student entirely shared, teacher has a rest: infinite KL.
    let all_shared = FusedLoss {
        shared_vocab: Some(10),
        ..base.clone()
    };
    assert!(fused_distill_loss(&s, &t, &all_shared).is_err());
    assert!(fused_distill_loss(
        &s,
        &t,
        &FusedLoss {
            shared_vocab: Some(9),
            ..base.clone()
        }
    )
    .is_ok());
    // Cross-entropy part without targets, out-of-range targets.
    let s2 = rand_t(3, 2, 10, 1.0);
    let half = FusedLoss {
        alpha: 0.5,
        ..base.clone()
    };
    assert!(fused_distill_loss(&s, &s2, &half).is_err());
    let bad = FusedLoss {
        targets: Some(Tensor::new(&[0u32, 10], &Device::Cpu).unwrap()),
        ..half
    };
    assert!(fused_distill_loss(&s, &s2, &bad).is_err());
}

/// The training loop's answer loss: the hard-class rows (alpha, targets) and the replay rows
/// (pure KL) as two fused calls whose row weights are n_part / n_all, equal in value and
/// gradient to one composed call with per-row KL and CE weights over all rows.
#[test]
fn split_calls_with_share_weights_equal_one_call_over_all_rows() {
    let dev = Device::Cpu;
    let (n_main, n_replay, v, t, alpha) = (5, 3, 10, 2.0, 0.5);
    let n = n_main + n_replay;
    let s = Var::from_tensor(&rand_t(7, n, v, 4.0)).unwrap();
    let te = rand_t(8, n, v, 6.0);
    let targets = Tensor::new(gen_targets(9, n, v).as_slice(), &dev).unwrap();
    let per_row = |main: f32, replay: f32| {
        let w: Vec<f32> = (0..n)
            .map(|r| if r < n_main { main } else { replay })
            .collect();
        Tensor::new(w.as_slice(), &dev).unwrap()
    };
    let alpha32 = alpha as f32;
    let want = distill_loss(
        s.as_tensor(),
        &te,
        &targets,
        &per_row(alpha32, 1.0),
        &per_row(1.0 - alpha32, 0.0),
        t,
    )
    .unwrap();
    let share = |k: usize| Tensor::new(vec![k as f32 / n as f32; k], &dev).unwrap();
    let main = fused_distill_loss(
        &s.as_tensor().narrow(0, 0, n_main).unwrap(),
        &te.narrow(0, 0, n_main).unwrap(),
        &FusedLoss {
            temperature: t,
            alpha,
            shared_vocab: None,
            targets: Some(targets.narrow(0, 0, n_main).unwrap()),
            weights: Some(share(n_main)),
        },
    )
    .unwrap();
    let replay = fused_distill_loss(
        &s.as_tensor().narrow(0, n_main, n_replay).unwrap(),
        &te.narrow(0, n_main, n_replay).unwrap(),
        &FusedLoss {
            temperature: t,
            alpha: 1.0,
            shared_vocab: None,
            targets: None,
            weights: Some(share(n_replay)),
        },
    )
    .unwrap();
    let got = (&main.total + &replay.total).unwrap();
    let (a, b) = (
        got.to_scalar::<f32>().unwrap(),
        want.total.to_scalar::<f32>().unwrap(),
    );
    assert!(
        close(a as f64, b as f64, 1e-5, 1e-6),
        "split {a} one call {b}"
    );
    let gg = got.backward().unwrap();
    let gw = want.total.backward().unwrap();
    let diff = max_abs_diff(
        gg.get(s.as_tensor()).unwrap(),
        gw.get(s.as_tensor()).unwrap(),
    );
    assert!(diff <= 1e-6, "gradients differ by {diff}");
}
