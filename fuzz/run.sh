#!/usr/bin/env bash
# Fuzzes the bytes a run takes from outside: frames off the network, a connection's join, and
# config files and `--set` arguments. Coverage-guided by honggfuzz (honggfuzz-rs), which works
# on stable Rust: its cargo wrapper instruments through `-C passes=sancov-module` and LLVM's
# sanitizer-coverage options, no nightly flag.
#
#   fuzz/run.sh [SECONDS] [TARGET...]     # default: 60 s each for frame, join, config
#   fuzz/run.sh replay TARGET FILE...     # inputs through a target once, panic message shown
#
# XKD_FUZZ_THREADS (default 1) sets honggfuzz's threads per target.
#
# Not part of tests/run.sh or CI: it runs for as long as it is told to. On first use it installs
# cargo-hfuzz into .tools/ (and, as root, the Debian packages honggfuzz links: binutils-dev,
# libunwind-dev, libblocksruntime-dev). Each target starts from seeds its binary writes (frames
# made by the protocol's encoder, the repository's configs) plus what earlier runs added to its
# corpus (fuzz/hfuzz_workspace/TARGET/input). A crash (a panic: every target must refuse bad
# input with an error, never panic) is kept as fuzz/hfuzz_workspace/TARGET/*.fuzz; replay it,
# fix it, and commit the input as a regression test in the crate's own tests. Exits 1 if any
# target crashed this time.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
fuzz=$root/fuzz
hfuzz_version=0.5.62
threads=${XKD_FUZZ_THREADS:-1}
export PATH=$root/.tools/bin:$PATH
# cargo-hfuzz builds into hfuzz_target/ and runs in hfuzz_workspace/, both under fuzz/.
unset CARGO_TARGET_DIR HFUZZ_WORKSPACE HFUZZ_INPUT
triple=$(rustc -vV | sed -n 's/^host: //p')
bin=$fuzz/hfuzz_target/$triple/release

install_honggfuzz() {
    if cargo hfuzz version 2>/dev/null | grep -q "$hfuzz_version"; then
        return
    fi
    local missing=()
    for pkg in binutils-dev libunwind-dev libblocksruntime-dev; do
        dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
    done
    if ((${#missing[@]})); then
        if [[ $(id -u) != 0 ]]; then
            echo "honggfuzz needs the Debian packages ${missing[*]}: install them (as root)" >&2
            exit 2
        fi
        apt-get install -y "${missing[@]}"
    fi
    nice -n 10 cargo install --root "$root/.tools" --version "$hfuzz_version" --locked honggfuzz
}

install_honggfuzz
cd "$fuzz"

if [[ ${1:-} == replay ]]; then
    # Crash inputs through a target once each, with the panic message and a backtrace.
    target=$2
    shift 2
    nice -n 10 cargo hfuzz build >/dev/null
    RUST_BACKTRACE=1 exec "$bin/$target" --replay "$@"
fi

seconds=${1:-60}
shift || true
targets=("$@")
((${#targets[@]})) || targets=(frame join config)

nice -n 10 cargo hfuzz build
crashed=0
for target in "${targets[@]}"; do
    ws=$fuzz/hfuzz_workspace/$target
    mkdir -p "$ws/input"
    "$bin/$target" --seeds "$ws/input" >/dev/null
    crashes() { find "$ws" -maxdepth 1 -name '*.fuzz' | sort; }
    before=$(crashes)
    log=$ws/last-run.log
    rm -f "$log"
    # -n: threads (the machine is shared); -F: inputs up to 64 KiB (a join frame's limit; a
    # config file or a frame header that matters fits); -t: an input taking 5 s is a hang.
    HFUZZ_RUN_ARGS="--run_time $seconds -n $threads -F 65536 -t 5 -v --logfile $log" \
        nice -n 10 cargo hfuzz run "$target" >/dev/null 2>&1 || true
    summary=$(grep -o "Summary iterations:.*" "$log" | tail -1 || true)
    [[ -n $summary ]] || { echo "$target: honggfuzz printed no summary, see $log" >&2; exit 1; }
    field() { sed -n "s/.*$1:\([0-9]*\).*/\1/p" <<<"$summary"; }
    new=$(comm -13 <(echo "$before") <(crashes) | sed '/^$/d')
    printf '%-7s %10s execs in %4s s (%s/s), %s crashes (%s new crash files), %s timeouts, coverage %s%% of %s guards, corpus %s files\n' \
        "$target" "$(field iterations)" "$(field time)" "$(field speed)" "$(field crashes_count)" \
        "$(grep -c . <<<"$new" || true)" "$(field timeout_count)" "$(field branch_coverage_percent)" "$(field guard_nb)" \
        "$(find "$ws/input" -type f | wc -l)"
    if [[ -n $new ]]; then
        crashed=1
        sed 's/^/  crash: /' <<<"$new"
    fi
done
exit $crashed
