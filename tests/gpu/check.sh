#!/usr/bin/env bash
# The GPU path on one GPU, in two steps on two machines (as kernels/gpu-check.sh):
#
#   tests/gpu/check.sh build   on a CPU machine with Rust (no GPU needed): builds `xkd` with the
#                              `cuda` feature (candle on CUDA, NCCL, the fused-loss kernels) and
#                              the kernel check with the pip CUDA 13.0 toolchain, stripped and
#                              xz-compressed into gpu-bundle/ (git-ignored; well under 64 MiB).
#   tests/gpu/check.sh         on a machine with one H100 or H200, the NVIDIA driver and the
#                              CUDA 13 libraries with NCCL (a CUDA install or PyTorch's nvidia
#                              wheels); no Rust, no network. In under 6 minutes it
#                              1. runs the fused KL kernel check (kernels/gpu-check.sh; the
#                                 default and the row kernel unless XKD_GPU_CHECK_KERNELS says),
#                              2. checks that NCCL's out-of-place sum writes every element
#                                 (tests/gpu/nccl_tail.py, through CuPy), runs `xkd run` on the
#                                 tiny default models with run.device = "cuda" (one worker: NCCL
#                                 at world size 1) and the same run on the CPU, and compares the
#                                 loss of every logged step (pretraining and distillation):
#                                 relative difference <= 1e-2,
#                              3. times distillation from a random-weight Qwen2-VL (0.5 B
#                                 parameters) into a Qwen2-Audio (0.65 B) through LoRA, with the
#                                 paper config's settings, preempted half-way (SIGTERM) and
#                                 started again so that it resumes from its checkpoint, and
#                                 prints samples/s, tokens/s and the share of step time in each
#                                 phase.
#                              It prints one table per part; paste them into tests/gpu/RESULTS.md.
# Exit status: non-zero if any part fails or a loss differs by more than the tolerance. A part
# that fails does not stop the ones after it (a device lease is short: one call says all).
#   XKD_GPU_CHECK_PARTS=2,3   runs only those parts (default 1,2,3)
#   XKD_GPU_CHECK_WORK=DIR    keeps the runs' outputs and logs in DIR (default: a temporary dir)
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
bundle=$root/gpu-bundle
if [ "${1:-}" = build ]; then
    "$root/kernels/gpu-check.sh" build
    # With NCCL's wheel for the link step (the GPU machine has its own libnccl.so.2).
    XKD_CUDA_NCCL=1 . "$root/kernels/cuda-env.sh" || exit 1
    cargo build --release --features cuda --bin xkd
    strip -o "$bundle/xkd" "$CARGO_TARGET_DIR/release/xkd"
    xz -T0 -6 -f "$bundle/xkd"
    ls -la "$bundle"
    exit 0
fi
[ -f "$bundle/xkd.xz" ] || {
    echo "no $bundle/xkd.xz: run 'tests/gpu/check.sh build' on a machine with Rust first" >&2
    exit 2
}
work=${XKD_GPU_CHECK_WORK:-$(mktemp -d)}
mkdir -p "$work"
parts=,${XKD_GPU_CHECK_PARTS:-1,2,3},
failed=()
# part N NAME: whether part N was asked for; prints its banner with the seconds since the start.
part() {
    [[ $parts == *",$1,"* ]] || return 1
    echo "== [$SECONDS s] $1/3 $2"
}
xkd=$work/xkd
python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
    "$bundle/xkd.xz" "$xkd"
chmod +x "$xkd"
if part 1 "fused KL kernel check"; then
    XKD_GPU_CHECK_KERNELS=${XKD_GPU_CHECK_KERNELS:-row,split-c1-t512-nohint} \
        "$root/kernels/gpu-check.sh" || failed+=(1)
fi
# kernels/gpu-check.sh found the CUDA libraries; the same search for xkd (NCCL included).
libs=$(python3 -c 'import glob, os, nvidia; print(":".join(d for p in nvidia.__path__ for d in glob.glob(os.path.join(p, "*", "lib"))))' 2>/dev/null || true)
export LD_LIBRARY_PATH=${libs:+$libs:}/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}

# A short run of the whole job; every step logged. $1 = device, $2 = output folder, rest = --set.
# $limit: seconds it may take; its log goes to $run_log, else to the folder's name + .log.
limit=150
short_run() {
    local device=$1 out=$2
    local log=${run_log:-$out.log}
    shift 2
    timeout "$limit" "$xkd" run --workers 1 --out "$out" --log-format json \
        --set run.device="$device" --set run.cache_dir="$out/cache" --set run.run_id=gpu-check \
        --set log.every=1 --set checkpoint.every_steps=1000 \
        --set heuristic.top_k=3 --set heuristic.teacher_floor=0 "$@" \
        > "$log" 2>&1 || { echo "xkd run on $device failed:"; tail -n 40 "$log"; return 1; }
}

if part 2 "loss curve: run.device = cuda (NCCL, world size 1) against cpu"; then
    # NCCL itself first: does an out-of-place all-reduce write every element?
    python3 "$root/tests/gpu/nccl_tail.py" || failed+=(2)
    tiny=(--set pretrain.steps=40 --set distill.steps=30)
    # The cpu run uses the cores, the cuda run the GPU: side by side.
    short_run cpu "$work/tiny-cpu" "${tiny[@]}" &
    cpu_pid=$!
    cuda_ok=0 cpu_ok=0
    short_run cuda "$work/tiny-cuda" "${tiny[@]}" || cuda_ok=$?
    wait "$cpu_pid" || cpu_ok=$?
    if [ $cuda_ok -ne 0 ] || [ $cpu_ok -ne 0 ]; then
        failed+=(2)
    else
        python3 - "$work/tiny-cuda/metrics.jsonl" "$work/tiny-cpu/metrics.jsonl" <<'PY' || failed+=(2)
import json, sys
def curve(path):
    rows = [json.loads(l) for l in open(path)]
    return {(r["stage"], r["step"]): r["loss"] for r in rows if r.get("rank") == 0 and "loss" in r}
gpu, cpu = curve(sys.argv[1]), curve(sys.argv[2])
assert gpu.keys() == cpu.keys() and gpu, f"different steps logged: {len(gpu)} vs {len(cpu)}"
worst = {}
for key in sorted(gpu):
    rel = abs(gpu[key] - cpu[key]) / max(abs(cpu[key]), 1e-12)
    stage = key[0]
    if rel >= worst.get(stage, (0.0, None))[0]:
        worst[stage] = (rel, key[1])
print(f"| stage | steps | worst relative difference | at step | cuda loss | cpu loss |")
print(f"|---|---:|---:|---:|---:|---:|")
bad = False
for stage, (rel, step) in worst.items():
    n = sum(1 for k in gpu if k[0] == stage)
    print(f"| {stage} | {n} | {rel:.2e} | {step} | {gpu[(stage, step)]:.6f} | {cpu[(stage, step)]:.6f} |")
    bad |= rel > 1e-2
print("loss curves " + ("DIFFER by more than 1e-2" if bad else "match within 1e-2"))
sys.exit(1 if bad else 0)
PY
    fi
fi

if part 3 "throughput: random-weight Qwen2-VL teacher -> Qwen2-Audio LoRA student (cuda, one worker)"; then
    # configs/qwen2vl-to-qwen2audio.toml as it is (LoRA r 16 on all seven projections, replay rows,
    # batch 32) on the synthetic set, with random-weight models of about 0.5 and 0.65 billion
    # parameters (tests/gpu/make_random_qwen2.py; the audio window the real 30 s).
    # XKD_GPU_CHECK_LARGE_S and _STEPS shorten it.
    limit=${XKD_GPU_CHECK_LARGE_S:-240}
    steps=${XKD_GPU_CHECK_LARGE_STEPS:-25}
    large=(--config "$root/configs/qwen2vl-to-qwen2audio.toml"
        --set data.source=synthetic --set data.dir= --set checkpoint.url=
        --set audio_model.dir="$work/models/qwen2-audio"
        --set visual_model.dir="$work/models/qwen2-vl"
        --set data.probe_clips=2 --set data.eval_clips=2 --set distill.steps="$steps")
    # Preempted half-way (SIGTERM to the coordinator, as Slurm or Kubernetes sends it), then
    # started again: the second start resumes from the checkpoint the stop committed, so the
    # adapters and AdamW moments are also read back onto the GPU.
    preempted() {
        run_log=$work/large-preempted.log short_run cuda "$work/large" "${large[@]}" &
        local first=$! pid= taken=0
        while [ "${taken:-0}" -lt $((steps / 2)) ]; do
            kill -0 $first 2>/dev/null || { wait $first; return 1; }
            sleep 1
            taken=$(grep -c '"stage":"distill"' "$work/large/metrics.jsonl" 2>/dev/null)
        done
        pid=$(pgrep -f "^$xkd run --workers 1 --out $work/large ") && kill -TERM "$pid"
        wait $first || true
        grep -q "run preempted" "$work/large-preempted.log" || {
            echo "the preempted run did not stop as preempted:"
            tail -n 20 "$work/large-preempted.log"
            return 1
        }
        # It stops at the step after the signal: a later checkpoint means the stop vote was lost.
        local at
        at=$(grep -o '"checkpoint committed","step":[0-9]*' "$work/large-preempted.log" |
            tail -n 1 | grep -o '[0-9]*$')
        [ "${at:-$steps}" -lt "$steps" ] || {
            echo "SIGTERM after step $((steps / 2)) did not stop the run before its end (checkpoint: ${at:-none})"
            return 1
        }
        echo "preempted after step $((steps / 2)): checkpoint at step $at, then resumed from it"
    }
    if python3 "$root/tests/gpu/make_random_qwen2.py" "$work/models" && preempted &&
        short_run cuda "$work/large" "${large[@]}" &&
        grep -h '"resuming distillation from checkpoint"' "$work/large.log" | cut -c1-240 | grep . ; then
        python3 - "$work/large/metrics.jsonl" "$work/large/logs/worker-0.log" <<'PY' || failed+=(3)
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
steps = [r for r in rows if r.get("rank") == 0 and r["stage"] == "distill"]
steps = [r for r in steps if r["step"] > 5]  # the first steps warm up the allocator and cuBLAS
assert steps, "no distillation steps logged"
mean = lambda k: sum(r[k] for r in steps) / len(steps)
phases = ["ms_teacher", "ms_student", "ms_loss", "ms_allreduce", "ms_optimizer"]
total = sum(mean(k) for k in phases)
seen = set()
for line in open(sys.argv[2]):  # what was loaded, once per model
    try:
        r = json.loads(line)
    except ValueError:
        continue
    if r.get("message") in ("student model", "qwen2 model") and r.get("rank") == 0:
        shown = {k: r[k] for k in ("modality", "parameters", "trainable", "dtype", "dir") if k in r}
        if str(shown) not in seen:
            seen.add(str(shown))
            print(r["message"], shown)
print(f"distillation steps averaged: {len(steps)} (from step 6), {total:.1f} ms per step")
# ms_teacher holds every frozen forward: the teacher's, and the frozen student's on replay rows.
names = ["frozen fwd (teacher, replay)", "student fwd+bwd", "loss", "all-reduce", "optimizer"]
print("| samples/s | tokens/s | " + " | ".join(names) + " |")
print("|---:|---:|" + "---:|" * len(phases))
print(f"| {mean('samples_per_s'):.1f} | {mean('tokens_per_s'):.0f} | "
      + " | ".join(f"{100 * mean(p) / total:.1f}%" for p in phases) + " |")
PY
    else
        failed+=(3)
    fi
fi
rm -rf "$work/models"
if [ ${#failed[@]} -ne 0 ]; then
    echo "== [$SECONDS s] FAILED: part(s) ${failed[*]}"
    exit 1
fi
echo "== [$SECONDS s] done"
