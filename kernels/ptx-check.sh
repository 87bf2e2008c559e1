#!/usr/bin/env bash
# Compiles every kernels/cuda/*.cu to PTX for sm_90 with the pip CUDA 13.0 toolchain (installed
# into .cuda/ by kernels/cuda-env.sh if missing), assembles it with `ptxas -arch=sm_90 -v`, prints
# registers, shared memory and spills per kernel, and fails if any kernel spills or fails to build.
# Needs no GPU. Part of the test command (tests/run.sh), so CI shows it.
set -euo pipefail
cd "$(dirname "$0")"
. ./cuda-env.sh || exit 1
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
status=0
for cu in cuda/*.cu; do
    ptx=$out/$(basename "${cu%.cu}").ptx
    echo "== nvcc --ptx -arch=sm_90 $cu ($(nvcc --version | tail -1))"
    nvcc --ptx -arch=sm_90 -O3 -std=c++17 -o "$ptx" "$cu"
    echo "== ptxas -arch=sm_90 -v $(basename "$ptx")"
    ptxas -arch=sm_90 -v "$ptx" -o "$out/a.cubin" 2>"$out/ptxas.log" || { cat "$out/ptxas.log"; exit 1; }
    grep -v "Compile time" "$out/ptxas.log"
    if grep -E 'spill (stores|loads)' "$out/ptxas.log" | grep -vqE '\b0 bytes spill stores, 0 bytes spill loads'; then
        echo "FAIL: $cu spills registers (see above)"
        status=1
    fi
done
[ $status -eq 0 ] && echo "ptx-check: every kernel assembled for sm_90 with 0 spill bytes"
exit $status
