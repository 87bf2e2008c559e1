#!/usr/bin/env bash
# The test command (README.md; .ci/run calls exactly this). Installs what it needs itself:
# the pip CUDA 13.0 compiler (into .cuda/, once). Needs no GPU.
#  1. every CUDA kernel compiled to PTX for sm_90 and assembled, 0 spill bytes (kernels/ptx-check.sh)
#  2. the `cuda` feature's Rust code type-checks against candle's CUDA backend
#  3. the whole workspace's tests, release build
set -euo pipefail
cd "$(dirname "$0")/.."
echo "== 1/3 CUDA kernels: PTX for sm_90, ptxas, spills"
kernels/ptx-check.sh
echo "== 2/3 cargo check --features cuda (xkd-kernels)"
(. kernels/cuda-env.sh && cargo check --release -p xkd-kernels --features cuda --all-targets)
echo "== 3/3 cargo test --release --workspace"
cargo test --release --workspace
