#!/usr/bin/env bash
# Base images for deploy/Containerfile made on this machine from Debian's packages, for a
# builder that cannot pull from docker.io (as on the project's test machines): a Debian 12
# root made by debootstrap, imported as localhost/xkd-base/debian:bookworm, and the same with
# gcc, this machine's Rust toolchain (rustc --print sysroot) and its trust store as
# localhost/xkd-base/rust.
# Then:
#
#   podman build -f deploy/Containerfile -t localhost/xkd:cuda \
#       --build-arg RUST_IMAGE=localhost/xkd-base/rust \
#       --build-arg DEBIAN_IMAGE=localhost/xkd-base/debian:bookworm .
#
# Needs root, debootstrap and podman (Debian's packages). PODMAN overrides the podman command
# (for instance `podman --runtime runc` where crun cannot run on a cgroup-v1 host).
set -euo pipefail
podman=${PODMAN:-podman}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
command -v debootstrap >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap
debootstrap --variant=minbase bookworm "$work/root" http://deb.debian.org/debian >&2
tar -C "$work/root" -c . | $podman import - localhost/xkd-base/debian:bookworm
mkdir -p "$work/ctx"
# This machine's trust store: where HTTPS goes through a proxy with its own authority, cargo
# and pip in the build reach crates.io and PyPI as this machine does.
cp /etc/ssl/certs/ca-certificates.crt "$work/ctx/ca-certificates.crt"
sysroot=$(rustc --print sysroot)
tar -C "$sysroot" --exclude=./share/doc -c . | tar -C "$work/ctx" -x --one-top-level=rust
cat >"$work/ctx/Containerfile" <<'CF'
FROM localhost/xkd-base/debian:bookworm
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY rust /usr/local/rust
COPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
ENV PATH=/usr/local/rust/bin:/usr/local/cargo/bin:$PATH CARGO_HOME=/usr/local/cargo \
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt PIP_CERT=/etc/ssl/certs/ca-certificates.crt
CF
$podman build -t localhost/xkd-base/rust "$work/ctx"
