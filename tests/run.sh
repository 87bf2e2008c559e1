#!/usr/bin/env bash
# The test command (README.md; .ci/run calls exactly this). Installs what it needs itself:
# the pip CUDA 13.0 compiler (into .cuda/, once) and the S3-compatible server s3s-fs 0.14.1 that
# the checkpoint tests start on 127.0.0.1 (into .tools/, once); tests/slurm.rs installs Debian's
# slurm-wlm with apt-get when it is missing (tests/slurm/start.sh; needs root) and tests/deploy.rs
# PyPI's kubernetes-validate into .tools/k8s-venv. Needs no GPU and no cloud.
#  1. every CUDA kernel compiled to PTX for sm_90 and assembled, 0 spill bytes (kernels/ptx-check.sh);
#     tests/gpu/make_random_qwen2.py's tensor layout against the fixtures transformers wrote
#  2. the `cuda` build (the xkd binary with candle on CUDA, NCCL and the kernels' CUDA path)
#     type-checks against candle's CUDA backend and cudarc's NCCL bindings (candle's own .cu
#     files are not compiled for it: kernels/nvcc-typecheck)
#  3. the whole workspace's tests, release build
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

echo "== 1/3 CUDA kernels: PTX for sm_90, ptxas, spills"
kernels/ptx-check.sh
echo "== the GPU check's random-weight Qwen2 models: names and shapes as transformers lays them out"
python3 tests/gpu/make_random_qwen2.py --check
echo "== 2/3 cargo check --features cuda (xkd, xkd-worker, xkd-models, xkd-collective, xkd-kernels)"
# candle's own CUDA sources are answered by kernels/nvcc-typecheck (a type-check never uses
# them; compiling them took 29.5 of this script's 52 minutes); ours go through the real nvcc.
(. kernels/cuda-env.sh \
    && XKD_REAL_NVCC=$NVCC NVCC=$PWD/kernels/nvcc-typecheck CARGO_TARGET_DIR=$PWD/target/cuda-check \
    cargo check --release -p xkd -p xkd-worker -p xkd-models -p xkd-collective -p xkd-kernels \
        --features cuda --all-targets)
install_s3s_fs
echo "== 3/3 cargo test --release --workspace"
cargo test --release --workspace
