#!/usr/bin/env bash
# Compiles every kernels/cuda/*.cu to PTX for sm_90 with the pip CUDA 13.0 toolchain (installed
# into .cuda/ by kernels/cuda-env.sh if missing), assembles it with `ptxas -arch=sm_90 -v`, prints
# registers, shared memory and spills per kernel, and fails if any kernel spills or fails to build.
# The report of unchanged sources, flags and toolchain is reused from target/ptx-check/.
# Needs no GPU. Part of the test command (tests/run.sh), so CI shows it.
set -euo pipefail
cd "$(dirname "$0")"
. ./cuda-env.sh || exit 1
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
# ptxas's report is a pure function of the sources, the flags and the toolchain: a report made
# from the same ones is reused (target/ptx-check/<sha256>/), so a re-run with nothing changed
# skips two minutes of nvcc and ptxas. A fresh clone (CI) always builds.
flags="--ptx -arch=sm_90 -O3 -std=c++17"
key=$( (cat cuda/*; echo "$flags"; nvcc --version; ptxas --version) | sha256sum | cut -c1-64)
cache=../target/ptx-check/$key
status=0
for cu in cuda/*.cu; do
    ptx=$out/$(basename "${cu%.cu}").ptx
    log=$cache/$(basename "${cu%.cu}").ptxas.log
    if [ -f "$log" ]; then
        echo "== $cu: ptxas report of the same sources, flags and toolchain (target/ptx-check/${key:0:12}...)"
        cp "$log" "$out/ptxas.log"
    else
        echo "== nvcc $flags $cu ($(nvcc --version | tail -1))"
        # shellcheck disable=SC2086
        nvcc $flags -o "$ptx" "$cu"
        echo "== ptxas -arch=sm_90 -v $(basename "$ptx")"
        ptxas -arch=sm_90 -v "$ptx" -o "$out/a.cubin" 2>"$out/ptxas.log" || { cat "$out/ptxas.log"; exit 1; }
        mkdir -p "$cache" && cp "$out/ptxas.log" "$log"
    fi
    grep -v "Compile time" "$out/ptxas.log"
    if grep -E 'spill (stores|loads)' "$out/ptxas.log" | grep -vqE '\b0 bytes spill stores, 0 bytes spill loads'; then
        echo "FAIL: $cu spills registers (see above)"
        status=1
    fi
done
[ $status -eq 0 ] && echo "ptx-check: every kernel assembled for sm_90 with 0 spill bytes"
exit $status
