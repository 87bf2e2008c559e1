#!/usr/bin/env bash
# The test command (README.md; .ci/run calls exactly this). Installs what it needs itself:
# the pip CUDA 13.0 compiler (into .cuda/, once) and the S3-compatible server s3s-fs 0.14.1 that
# the checkpoint tests start on 127.0.0.1 (into .tools/, once); tests/slurm.rs installs Debian's
# slurm-wlm with apt-get when it is missing (tests/slurm/start.sh; needs root) and tests/deploy.rs
# PyPI's kubernetes-validate into .tools/k8s-venv. Needs no GPU and no cloud.
#  1. every CUDA kernel compiled to PTX for sm_90 and assembled, 0 spill bytes (kernels/ptx-check.sh);
#     tests/gpu/make_random_qwen2.py's tensor layout against the fixtures transformers wrote.
#     Runs in the background beside the builds of 2 and 3 (it is serial; they leave a core idle)
#  2. the `cuda` build (the xkd binary with candle on CUDA, NCCL and the kernels' CUDA path)
#     type-checks against candle's CUDA backend and cudarc's NCCL bindings (candle's own .cu
#     files are not compiled for it: kernels/nvcc-typecheck)
#  3. the whole workspace's tests, release build; the end-to-end job (CPU-bound) runs beside the
#     other suites (which mostly wait on processes, servers and timeouts), its output after theirs
#
#   tests/run.sh --repeat N CARGO-TEST-ARGS...   one suite N times in a row, for instance
#   tests/run.sh --repeat 5 --test recovery      (release build; prints each run's counts and
#                                                stops at the first failing run)
# Use it before stopping on any change to the recovery, Slurm or S3 tests: a test that passes
# once may still depend on the machine's speed.
set -euo pipefail
cd "$(dirname "$0")/.."

install_s3s_fs() {
    if [ ! -x .tools/bin/s3s-fs ] && [ -z "${XKD_S3S_FS:-}" ]; then
        echo "== installing s3s-fs 0.14.1 into .tools/ (the S3-compatible server of the checkpoint tests)"
        cargo install s3s-fs@0.14.1 --features binary --locked --root .tools
    fi
}

if [ "${1:-}" = "--repeat" ]; then
    runs=${2:?--repeat needs a count}
    shift 2
    install_s3s_fs
    cargo test --release --no-run "$@"
    log=$(mktemp)
    trap 'rm -f "$log"' EXIT
    for i in $(seq 1 "$runs"); do
        start=$SECONDS
        status=0
        cargo test --release "$@" >"$log" 2>&1 || status=$?
        counts=$(grep -E '^test result:' "$log" | sed -E 's/^test result: //; s/; finished in.*//' | paste -sd '|' -)
        echo "run $i/$runs: exit $status in $((SECONDS - start)) s: $counts"
        if [ $status -ne 0 ]; then
            cat "$log"
            exit $status
        fi
    done
    exit 0
fi

# Phases print the seconds since the start, so a slow one shows in CI's log.
phase() { echo "== [$SECONDS s] $*"; }

phase "the pip CUDA 13.0 toolchain (.cuda/, installed once)"
(. kernels/cuda-env.sh)
# Phase 1 runs beside the builds of phases 2 and 3: nvcc and ptxas keep one core busy for two
# minutes, and the builds leave a core idle in their serial stretches. Its output follows the
# builds.
ptx_log=$(mktemp)
s3s_log=$(mktemp)
e2e_log=$(mktemp)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; rm -f "$ptx_log" "$s3s_log" "$e2e_log"' EXIT
(
    echo "== 1/3 CUDA kernels: PTX for sm_90, ptxas, spills"
    kernels/ptx-check.sh
    echo "== the GPU check's random-weight Qwen2 models: names and shapes as transformers lays them out"
    python3 tests/gpu/make_random_qwen2.py --check
) >"$ptx_log" 2>&1 &
pids+=($!)
ptx_pid=$!
# s3s-fs's build (cargo install, its own target dir) fills the cores the builds below leave idle
# in their serial stretches, too.
install_s3s_fs >"$s3s_log" 2>&1 &
pids+=($!)
s3s_pid=$!
phase "2/3 cargo check --features cuda (xkd, xkd-worker, xkd-models, xkd-collective, xkd-kernels)"
# candle's own CUDA sources are answered by kernels/nvcc-typecheck (a type-check never uses
# them; compiling them took 29.5 of this script's 52 minutes); ours go through the real nvcc.
(. kernels/cuda-env.sh \
    && XKD_REAL_NVCC=$NVCC NVCC=$PWD/kernels/nvcc-typecheck CARGO_TARGET_DIR=$PWD/target/cuda-check \
    cargo check --release -p xkd -p xkd-worker -p xkd-models -p xkd-collective -p xkd-kernels \
        --features cuda --all-targets)
phase "3/3 cargo test --release --workspace: build"
cargo test --release --workspace --no-run
phase "s3s-fs (installed beside the builds)"
status=0
wait "$s3s_pid" || status=$?
cat "$s3s_log"
[ "$status" -eq 0 ] || exit "$status"
phase "1/3 (ran beside the builds)"
status=0
wait "$ptx_pid" || status=$?
cat "$ptx_log"
[ "$status" -eq 0 ] || exit "$status"
# The end-to-end job (three runs of the default job, CPU-bound) runs beside the other suites,
# most of whose time is spent waiting on processes, servers and timeouts. Its output follows.
phase "3/3 cargo test --release --workspace: the suites, the end-to-end job beside them"
cargo test --release --test end_to_end >"$e2e_log" 2>&1 &
pids+=($!)
e2e_pid=$!
status=0
cargo test --release --workspace -- --skip default_job_ || status=$?
phase "3/3 the end-to-end job"
e2e_status=0
wait "$e2e_pid" || e2e_status=$?
cat "$e2e_log"
phase "done"
[ "$status" -eq 0 ] || exit "$status"
exit "$e2e_status"
