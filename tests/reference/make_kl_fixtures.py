#!/usr/bin/env python3
"""Reference fixtures for the fused distillation loss of `xkd-kernels` (issue 3).

Writes tests/reference/fixtures/kl_fixtures.json, checked by kernels/tests/fixtures.rs.

The reference is PyTorch in float64: `F.kl_div(log_ps, log_pt, log_target=True)` and
`F.cross_entropy`, gradients by autograd. The loss is

    sum_r w_r * (alpha * T^2 * KL(fold(softmax(t_r/T)) || fold(softmax(s_r/T)))
                 + (1 - alpha) * CE(s_r, target_r)) / N

where rows with w_r == 0 are left out entirely (they may hold NaN), and `fold` keeps the shared
ids [0, S) and sums each side's probability on its ids >= S into one "rest" bucket (a side with
no ids >= S has no rest bucket; its term would be 0 * log 0 = 0 for the teacher).

Inputs are not stored: they come from a counter-based splitmix64 generator that the Rust test
implements too (`gen` below), so the committed file stays small. Element i (row-major flat index)
of a tensor with seed `seed` and scale `scale` (a power of two) is

    z  = splitmix64_mix(seed + (i + 1) * 0x9E3779B97F4A7C15 mod 2^64)
    u  = (z >> 40) / 2^24                      # exact in float32
    x  = float32(scale * (2u - 1))              # exact, so both sides see identical f32 bits

and targets are `splitmix64_mix(seed + (r + 1) * gamma) % Vs`. "patches" then overwrite whole
rows: const (every logit = value), spike (-1e4 everywhere, +1e4 at `at`), alternating (+1e4 at
even ids, -1e4 at odd), nan (every logit NaN; only used on rows of weight 0).

Small cases store the whole gradient; large ones store sampled entries (row, col, value), the
L2 norm of every gradient row and of the whole gradient.

Run: python3 -m venv /tmp/torchenv && /tmp/torchenv/bin/pip install torch numpy
     /tmp/torchenv/bin/python tests/reference/make_kl_fixtures.py
"""

import json
import os
import random

import numpy as np
import torch
import torch.nn.functional as F

GAMMA = 0x9E3779B97F4A7C15
M64 = (1 << 64) - 1


def mix(z):
    """splitmix64 finaliser on a numpy uint64 array (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def raw(seed, count):
    i = np.arange(1, count + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = np.uint64(seed) + i * np.uint64(GAMMA)
    return mix(z)


def gen(seed, n, v, scale):
    u = (raw(seed, n * v) >> np.uint64(40)).astype(np.float64) / float(1 << 24)
    x = (scale * (2.0 * u - 1.0)).astype(np.float32)
    assert np.array_equal(x.astype(np.float64), scale * (2.0 * u - 1.0))
    return x.reshape(n, v)


def gen_targets(seed, n, v):
    return (raw(seed, n) % np.uint64(v)).astype(np.int64)


def apply_patches(x, patches, side):
    for p in patches:
        if p["side"] != side:
            continue
        r = p["row"]
        kind = p["kind"]
        if kind == "const":
            x[r, :] = np.float32(p["value"])
        elif kind == "spike":
            x[r, :] = np.float32(-1e4)
            x[r, p["at"]] = np.float32(1e4)
        elif kind == "alternating":
            x[r, 0::2] = np.float32(1e4)
            x[r, 1::2] = np.float32(-1e4)
        elif kind == "nan":
            x[r, :] = np.float32("nan")
        else:
            raise ValueError(kind)


def fold(logp, shared, keep_rest):
    """Log-probs over [0, shared) plus (if keep_rest) the log of the mass outside it."""
    parts = [logp[:, :shared]]
    if keep_rest:
        parts.append(torch.logsumexp(logp[:, shared:], dim=-1, keepdim=True))
    return torch.cat(parts, dim=-1)


def reference(case):
    n, vs, vt = case["n"], case["vs"], case["vt"]
    T, alpha = case["temperature"], case["alpha"]
    shared = case["shared"] if case["shared"] is not None else vs
    s = gen(case["student"]["seed"], n, vs, case["student"]["scale"])
    t = gen(case["teacher"]["seed"], n, vt, case["teacher"]["scale"])
    apply_patches(s, case["patches"], "student")
    apply_patches(t, case["patches"], "teacher")
    w = np.ones(n) if case["weights"] is None else np.array(case["weights"], dtype=np.float64)
    keep = torch.from_numpy(w > 0)
    wk = torch.from_numpy(w)[keep]

    s64 = torch.from_numpy(s.astype(np.float64)).requires_grad_()
    t64 = torch.from_numpy(t.astype(np.float64))
    sk, tk = s64[keep], t64[keep]

    kl = torch.zeros((), dtype=torch.float64)
    if alpha > 0 and int(keep.sum()) > 0:
        teacher_rest = vt > shared
        assert not (teacher_rest and vs == shared), "student needs a rest bucket"
        log_ps = fold(F.log_softmax(sk / T, dim=-1), shared, teacher_rest)
        log_pt = fold(F.log_softmax(tk / T, dim=-1), shared, teacher_rest)
        rows = F.kl_div(log_ps, log_pt, reduction="none", log_target=True).sum(-1)
        kl = alpha * T * T * (rows * wk).sum() / n
    ce = torch.zeros((), dtype=torch.float64)
    if alpha < 1 and int(keep.sum()) > 0:
        targets = torch.from_numpy(gen_targets(case["targets_seed"], n, vs))
        rows = F.cross_entropy(sk, targets[keep], reduction="none")
        ce = (1 - alpha) * (rows * wk).sum() / n
    loss = kl + ce
    if loss.requires_grad:
        loss.backward()
        grad = s64.grad.numpy()
    else:
        grad = np.zeros((n, vs))
    return s, t, float(loss.detach()), float(kl.detach()), float(ce.detach()), grad


def sample_cols(case, s, t, grad, r, rng):
    vs, shared = case["vs"], case["shared"] if case["shared"] is not None else case["vs"]
    cols = {0, shared - 1, vs - 1, int(np.argmax(s[r])), int(np.argmax(np.abs(grad[r])))}
    ta = int(np.argmax(t[r]))
    if ta < vs:
        cols.add(ta)
    if shared < vs:
        cols.add(shared)
    if case["targets_seed"] is not None:
        cols.add(int(gen_targets(case["targets_seed"], case["n"], vs)[r]))
    while len(cols) < 12:
        cols.add(rng.randrange(vs))
    return sorted(cols)


def case(name, n, vs, vt=None, shared=None, T=1.0, alpha=0.5, weights=None, patches=(),
         seed=1, targets=True, scales=(8.0, 8.0)):
    return {
        "name": name,
        "n": n,
        "vs": vs,
        "vt": vs if vt is None else vt,
        "shared": shared,
        "temperature": T,
        "alpha": alpha,
        "student": {"seed": 1000 + seed, "scale": scales[0]},
        "teacher": {"seed": 2000 + seed, "scale": scales[1]},
        "targets_seed": 3000 + seed if targets else None,
        "weights": weights,
        "patches": list(patches),
    }


def cases():
    out = []
    k = 0
    for T in (1.0, 2.0, 4.0):
        for alpha in (0.0, 0.5, 1.0):
            k += 1
            out.append(case(f"small_T{T:g}_a{alpha:g}", 3, 11, T=T, alpha=alpha,
                            weights=[1.0, 0.5, 0.0], seed=k, targets=alpha < 1,
                            patches=[{"side": "student", "row": 2, "kind": "nan"}]))
    out.append(case("all_masked", 2, 7, T=2.0, weights=[0.0, 0.0], seed=20,
                    patches=[{"side": "teacher", "row": 1, "kind": "nan"}]))
    extreme = [
        {"side": "student", "row": 0, "kind": "spike", "at": 3},
        {"side": "teacher", "row": 0, "kind": "spike", "at": 5},
        {"side": "student", "row": 1, "kind": "const", "value": 0.25},
        {"side": "teacher", "row": 1, "kind": "const", "value": -3.0},
        {"side": "student", "row": 2, "kind": "alternating"},
        {"side": "teacher", "row": 2, "kind": "alternating"},
        {"side": "student", "row": 3, "kind": "const", "value": -1e4},
        {"side": "teacher", "row": 4, "kind": "spike", "at": 0},
    ]
    for T in (1.0, 2.0, 4.0):
        out.append(case(f"extreme_T{T:g}", 5, 16, T=T, alpha=0.5, seed=21, patches=extreme))
    out.append(case("mismatch_small_teacher_larger", 3, 13, vt=17, shared=10, T=2.0,
                    weights=[1.0, 1.0, 0.25], seed=30))
    out.append(case("mismatch_small_student_larger", 3, 17, vt=13, shared=10, T=1.0,
                    alpha=1.0, seed=31, targets=False))
    out.append(case("mismatch_small_teacher_all_shared", 2, 12, vt=10, shared=10, T=4.0,
                    seed=32))
    out.append(case("qwen_4x151936_T2_a0.5", 4, 151936, T=2.0, alpha=0.5,
                    weights=[1.0, 1.0, 0.0, 1.0], seed=40))
    out.append(case("qwen_4x151936_T1_a1_no_targets", 4, 151936, T=1.0, alpha=1.0, seed=41,
                    targets=False, scales=(16.0, 4.0)))
    out.append(case("qwen_4x151936_T4_a0", 4, 151936, T=4.0, alpha=0.0, seed=42))
    out.append(case("mismatch_8x152064_vs_8x156032_T2", 8, 152064, vt=156032, shared=151643,
                    T=2.0, alpha=0.5, weights=[1.0, 0.5, 1.0, 0.0, 1.0, 1.0, 2.0, 1.0],
                    seed=43, patches=[{"side": "student", "row": 3, "kind": "nan"}]))
    out.append(case("mismatch_8x152064_vs_8x156032_T1_a1", 8, 152064, vt=156032, shared=151643,
                    T=1.0, alpha=1.0, seed=44, targets=False))
    return out


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    rng = random.Random(7)
    done = []
    for c in cases():
        s, t, loss, kl, ce, grad = reference(c)
        c = dict(c)
        c["loss"], c["kl"], c["ce"] = loss, kl, ce
        c["grad_norm"] = float(np.linalg.norm(grad))
        c["grad_row_norms"] = [float(x) for x in np.linalg.norm(grad, axis=1)]
        if c["n"] * c["vs"] <= 256:
            c["grad"] = [[float(x) for x in row] for row in grad]
            c["grad_samples"] = None
        else:
            c["grad"] = None
            c["grad_samples"] = [[r, col, float(grad[r, col])] for r in range(c["n"])
                                 for col in sample_cols(c, s, t, grad, r, rng)]
        assert np.isfinite(grad).all() and np.isfinite(loss), c["name"]
        print(f"{c['name']:40s} loss {loss:.12g} kl {kl:.12g} ce {ce:.12g}")
        done.append(c)
    out = {
        "about": "written by tests/reference/make_kl_fixtures.py; inputs regenerated from seeds",
        "torch": torch.__version__,
        "numpy": np.__version__,
        "cases": done,
    }
    os.makedirs(os.path.join(here, "fixtures"), exist_ok=True)
    path = os.path.join(here, "fixtures", "kl_fixtures.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    print(f"wrote {path} ({os.path.getsize(path)} bytes)")


if __name__ == "__main__":
    main()
