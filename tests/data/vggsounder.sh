#!/usr/bin/env bash
# Prints the path of VGGSounder's label file (vggsounder/data/vggsounder.csv), from PyPI's
# vggsounder 1.0 (Apache-2.0), installed into .tools/vggsounder once. tests/prior.rs runs it.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
dir=$root/.tools/vggsounder
if [ ! -f "$dir/vggsounder/data/vggsounder.csv" ]; then
    python3 -m pip install -q --disable-pip-version-check --no-deps --target "$dir" \
        vggsounder==1.0 >&2
fi
echo "$dir/vggsounder/data/vggsounder.csv"
