#!/usr/bin/env bash
# Makes sure Debian's ffmpeg (ffmpeg and ffprobe: the decoder of `xkd data prepare` and the
# encoder of the test clips) is installed; installs it with apt-get when it is missing (needs
# root, as tests/slurm/start.sh does). tests/prepare.rs runs it.
set -euo pipefail
if ! command -v ffmpeg >/dev/null || ! command -v ffprobe >/dev/null; then
    echo "installing ffmpeg (apt-get)" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends ffmpeg >&2 \
        || { apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends ffmpeg >&2; }
fi
ffmpeg -hide_banner -version | head -n 1
