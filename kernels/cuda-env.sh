# Sourced (`. kernels/cuda-env.sh`) to build the `cuda` feature on a machine without a GPU or a
# CUDA install: the pip CUDA 13.0 toolchain goes into .cuda/ (once), a link-time stand-in for the
# driver library libcuda.so.1 (every cu* symbol cudarc declares, empty bodies: the real driver is
# what loads at run time) and unversioned links to the pip libraries go into .cuda/link/, and the
# variables candle, cudarc and kernels/build.rs read are exported. The cuda build gets its own
# target dir (RUSTFLAGS differ). See ../shared/GPU-BUILD.md for why each piece is needed.
# Returns non-zero (leaving the caller's shell options alone) if any step fails.
XKD_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
XKD_CUDA_VENV=${XKD_CUDA_VENV:-$XKD_ROOT/.cuda}
if [ ! -x "$XKD_CUDA_VENV/bin/pip" ]; then
    python3 -m venv "$XKD_CUDA_VENV" || return 1
fi
if ! "$XKD_CUDA_VENV/bin/python" -c 'import nvidia.cu13' 2>/dev/null \
    || [ ! -e "$XKD_CUDA_VENV/.xkd-toolchain-2" ]; then
    "$XKD_CUDA_VENV/bin/pip" install -q --disable-pip-version-check \
        nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
        nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cublas==13.0.0.19 \
        nvidia-curand==10.4.5.25 nvidia-cuda-nvrtc==13.0.88 || return 1
    touch "$XKD_CUDA_VENV/.xkd-toolchain-2"
fi
CUDA_ROOT=$("$XKD_CUDA_VENV/bin/python" -c 'import nvidia.cu13, os; print(list(nvidia.cu13.__path__)[0])' 2>/dev/null \
    || echo "$XKD_CUDA_VENV"/lib/python3*/site-packages/nvidia/cu13)
export CUDA_ROOT CUDA_PATH=$CUDA_ROOT CUDA_HOME=$CUDA_ROOT NVCC=$CUDA_ROOT/bin/nvcc
export PATH=$CUDA_ROOT/bin:$PATH CUDA_COMPUTE_CAP=90
link=$XKD_CUDA_VENV/link
if [ ! -e "$link/libcuda.so" ]; then
    mkdir -p "$link" && (cd "$XKD_ROOT" && cargo fetch -q) || return 1
    sys=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.10/src/driver/sys/mod.rs | head -1)
    [ -f "$sys" ] || { echo "cudarc 0.19.10 sources not found under CARGO_HOME" >&2; return 1; }
    grep -oE '^\s*fn cu[A-Za-z0-9_]+\(' "$sys" | sed -E 's/\s*fn (cu[A-Za-z0-9_]+)\(/\1/' | sort -u \
        | sed 's/.*/void &(void) {}/' > "$link/libcuda-stub.c"
    cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$link/libcuda.so.1" "$link/libcuda-stub.c" \
        || return 1
    ln -sf libcuda.so.1 "$link/libcuda.so"
    for l in cudart:libcudart.so.13 cublas:libcublas.so.13 cublasLt:libcublasLt.so.13 \
        nvrtc:libnvrtc.so.13 curand:libcurand.so.10; do
        ln -sf "$CUDA_ROOT/lib/${l#*:}" "$link/lib${l%%:*}.so"
    done
fi
# XKD_CUDA_NCCL=1: NCCL's pip wheel too, for a build that links (`cargo build`, not `check`):
# the `cuda` xkd needs libnccl.so at link time (a GPU machine brings its own libnccl.so.2).
if [ "${XKD_CUDA_NCCL:-0}" = 1 ]; then
    if ! "$XKD_CUDA_VENV/bin/python" -c 'import nvidia.nccl' 2>/dev/null; then
        "$XKD_CUDA_VENV/bin/pip" install -q --disable-pip-version-check nvidia-nccl-cu13==2.27.7 \
            || return 1
    fi
    XKD_NCCL_LIB=$("$XKD_CUDA_VENV/bin/python" -c \
        'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib"))')
    export XKD_NCCL_LIB
    ln -sf "$XKD_NCCL_LIB/libnccl.so.2" "$link/libnccl.so"
fi
export RUSTFLAGS="-L $link" CARGO_TARGET_DIR=$XKD_ROOT/target/cuda
