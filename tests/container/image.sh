#!/usr/bin/env bash
# Builds deploy/Containerfile with podman and runs the default job in the image (issue 17,
# item 5). Not part of CI: the build compiles xkd twice, once with candle's CUDA kernels
# (nvcc, about half an hour on 2 cores). From anywhere:
#
#   tests/container/image.sh [OUT]
#
# OUT (default runs/image) receives the job's output. XKD_LOCAL_BASES=1 builds on bases made
# here from Debian's packages (deploy/local-bases.sh, once), for a machine that cannot pull
# from docker.io; PODMAN overrides the podman command (`podman --runtime runc` on a cgroup-v1
# host, where crun cannot run); XKD_IMAGE names the image (default localhost/xkd:cuda);
# XKD_NO_BUILD=1 skips the build and checks that image as it is; PODMAN_RUN_ARGS are added to
# each `podman run` (where a sandbox refuses the rlimits podman sets by default:
# `--ulimit nofile=8192:8192 --ulimit nproc=4096:4096`).
#
# Checks, each failing the script: the image runs as uid 10001; the `cuda` xkd finds every
# library it links in the image but the driver's libcuda.so.1 (the node's, mounted by the
# NVIDIA container toolkit); `xkd-cpu run` finishes the default job with no network and
# writes its report.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
podman=${PODMAN:-podman}
image=${XKD_IMAGE:-localhost/xkd:cuda}
read -r -a run_args <<<"${PODMAN_RUN_ARGS:-}"
out=$(mkdir -p "${1:-$root/runs/image}" && cd "${1:-$root/runs/image}" && pwd)
if [ "${XKD_NO_BUILD:-0}" != 1 ]; then
    bases=()
    if [ "${XKD_LOCAL_BASES:-0}" = 1 ]; then
        if ! $podman image exists localhost/xkd-base/rust \
            || ! $podman image exists localhost/xkd-base/debian:bookworm; then
            PODMAN=$podman "$root/deploy/local-bases.sh"
        fi
        bases=(--build-arg RUST_IMAGE=localhost/xkd-base/rust
            --build-arg DEBIAN_IMAGE=localhost/xkd-base/debian:bookworm)
    fi
    start=$SECONDS
    $podman build -f "$root/deploy/Containerfile" -t "$image" "${bases[@]}" "$root"
    echo "== built $image in $((SECONDS - start)) s"
fi
$podman image inspect --format '{{.Size}}' "$image" | awk '{printf "== image size %.0f MiB\n", $1 / 1048576}'

uid=$($podman run --rm --network none "${run_args[@]}" "$image" id -u)
[ "$uid" = 10001 ] || { echo "the image runs as uid $uid, not 10001" >&2; exit 1; }
echo "== runs as uid $uid"

$podman run --rm --network none "${run_args[@]}" "$image" ls -l /usr/local/bin /opt/xkd/lib
missing=$($podman run --rm --network none "${run_args[@]}" "$image" ldd /usr/local/bin/xkd | awk '/not found/ {print $1}')
if [ "$missing" != libcuda.so.1 ]; then
    echo "the cuda xkd misses libraries besides the driver's libcuda.so.1: $missing" >&2
    exit 1
fi
echo "== the cuda xkd finds every library it links but the driver's libcuda.so.1"

start=$SECONDS
$podman run --rm --network none "${run_args[@]}" -v "$out:/home/xkd/run:U" "$image" \
    xkd-cpu run --out /home/xkd/run
echo "== the default job ran in the image in $((SECONDS - start)) s"
[ -s "$out/report.json" ] || { echo "no report.json in $out" >&2; exit 1; }
echo "== report: $out/report.md"
