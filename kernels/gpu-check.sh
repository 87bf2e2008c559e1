#!/usr/bin/env bash
# The GPU check of the fused distillation loss, in two steps on two machines:
#
#   kernels/gpu-check.sh build   on a CPU machine with Rust (no GPU needed): builds the `cuda`
#                                check binary with the pip CUDA 13.0 toolchain and puts it,
#                                stripped and xz-compressed, into gpu-bundle/ (git-ignored; ~6 MB)
#   kernels/gpu-check.sh         on a machine with one H100 or H200, the NVIDIA driver and CUDA 13
#                                libraries (a CUDA install or PyTorch's nvidia wheels); no Rust,
#                                no network: checks the CUDA op against the CPU op and prints the
#                                bandwidth table (see kernels/PERF.md). Under 5 minutes.
#                                XKD_GPU_CHECK_KERNELS=row,split-c8-t512 limits it to those kernels,
#                                XKD_GPU_CHECK_ONLY=bench to the bandwidth table.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bundle=$root/gpu-bundle
if [ "${1:-}" = build ]; then
    . "$root/kernels/cuda-env.sh" || exit 1
    cargo build --release -p xkd-kernels --features cuda --bin xkd-gpu-check
    mkdir -p "$bundle"
    strip -o "$bundle/xkd-gpu-check" "$CARGO_TARGET_DIR/release/xkd-gpu-check"
    xz -T0 -6 -f "$bundle/xkd-gpu-check"
    ls -la "$bundle"
    exit 0
fi
[ -f "$bundle/xkd-gpu-check.xz" ] || {
    echo "no $bundle/xkd-gpu-check.xz: run 'kernels/gpu-check.sh build' on a machine with Rust first" >&2
    exit 2
}
bin=$(mktemp -d)/xkd-gpu-check
python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
    "$bundle/xkd-gpu-check.xz" "$bin"
chmod +x "$bin"
# The CUDA 13 runtime, cuBLAS, cuRAND and NVRTC: a CUDA install, else PyTorch's pip packages.
libs=$(python3 - <<'PY' 2>/dev/null || true
import glob, os
try:
    import nvidia
    dirs = [d for p in nvidia.__path__ for d in glob.glob(os.path.join(p, "*", "lib"))]
except ImportError:
    dirs = []
print(":".join(dirs))
PY
)
export LD_LIBRARY_PATH=${libs:+$libs:}/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
# XKD_GPU_CHECK_WRAP runs the binary under a tool, e.g. "ncu -k regex:xkd_distill_cluster ...".
timeout 290 ${XKD_GPU_CHECK_WRAP:-} "$bin"
