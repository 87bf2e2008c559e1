#!/usr/bin/env bash
# The data plane at scale (issue 13, item 3): manifests of 2,000 and 200,000 tiny clips (every
# row points at the same 0.5-s wav and four 32x32 pngs; the clips are distinct ids, so each is
# read and featurised on its own), nearly all in the distill split, and for each an `xkd run`
# (coordinator and 2 workers, stand-ins) that takes 50 distillation steps. Prints the time to
# the first distillation step, each worker's and the coordinator's peak RSS (VmHWM, polled from
# /proc while it runs), the distillation's steps/s, and where the workers' distillation clips
# came from (their `clips loaded` log lines): made ahead on the loader's threads, waited for
# while a loader thread made them, reused, or made on the training thread. Not part of the
# tests: run it by hand.
#
#   tests/data/scale-bench.sh [DIR]     (default target/scale-bench)
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
dir=${1:-$root/target/scale-bench}
cargo build --release --quiet --manifest-path "$root/Cargo.toml"
xkd=$root/target/release/xkd
mkdir -p "$dir"

make_set() { # make_set N OUT: N clips over 24 classes
    python3 - "$1" "$2" "$root" <<'PY'
import json, os, shutil, subprocess, sys
n, out, root = int(sys.argv[1]), sys.argv[2], sys.argv[3]
os.makedirs(out, exist_ok=True)
classes = [f"class {i:02d}" for i in range(24)]
json.dump({"classes": classes}, open(os.path.join(out, "classes.json"), "w"))
# One clip's files, taken from a synthetic set made by a tiny run (any will do).
src = sys.argv[2] + "-src"
if not os.path.exists(os.path.join(out, "a.wav")):
    import wave, struct, math
    w = wave.open(os.path.join(out, "a.wav"), "wb")
    w.setnchannels(1); w.setsampwidth(2); w.setframerate(16000)
    w.writeframes(b"".join(struct.pack("<h", int(8000 * math.sin(i / 9))) for i in range(8000)))
    w.close()
    import zlib
    def png(path, seed):
        raw = b"".join(b"\0" + bytes(((x * 7 + y * 3 + seed) % 256) for x in range(32) for _ in range(3)) for y in range(32))
        def chunk(t, d):
            c = t + d
            return struct.pack(">I", len(d)) + c + struct.pack(">I", zlib.crc32(c) & 0xffffffff)
        data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 32, 32, 8, 2, 0, 0, 0)) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
        open(path, "wb").write(data)
    for t in range(4):
        png(os.path.join(out, f"f{t}.png"), t)
with open(os.path.join(out, "manifest.jsonl"), "w") as f:
    for i in range(n):
        label = i % 24
        k = i // 24
        # 20 pretraining, 4 probe and 4 eval clips per class; the rest distill.
        split = "pretrain" if k < 20 else "probe" if k < 24 else "eval" if k < 28 else "distill"
        rec = {"id": i, "class": classes[label], "label": label, "split": split,
               "audio": "a.wav", "frames": [f"f{t}.png" for t in range(4)],
               "pretrain_for": ["audio", "visual"] if split == "pretrain" else []}
        f.write(json.dumps(rec) + "\n")
PY
}

printf '| clips | manifest | time to first step | peak RSS worker 0 | peak RSS worker 1 | peak RSS coordinator | steps/s | clips ahead / waited / reused / on training thread |\n'
printf '|---:|---:|---:|---:|---:|---:|---:|---|\n'
for n in 2000 200000; do
    set_dir=$dir/set-$n
    [ -f "$set_dir/manifest.jsonl" ] || make_set "$n" "$set_dir"
    out=$dir/run-$n
    rm -rf "$out" "$dir/cache-$n"
    log=$dir/run-$n.log
    start=$(date +%s.%N)
    "$xkd" --log-format json run --out "$out" \
        --set "run.cache_dir=\"$dir/cache-$n\"" --set run.run_id=scale-$n \
        --set data.source=\"manifest\" --set "data.dir=\"$set_dir\"" \
        --set pretrain.steps=20 --set heuristic.teacher_floor=0.0 \
        --set distill.steps=50 --set checkpoint.every_steps=0 --set log.every=1 \
        >/dev/null 2>"$log" &
    run_pid=$!
    declare -A peak=()
    coordinator=0
    while kill -0 "$run_pid" 2>/dev/null; do
        kb=$(awk '/VmHWM/ {print $2}' "/proc/$run_pid/status" 2>/dev/null || echo 0)
        [ -n "$kb" ] && [ "${kb:-0}" -gt "$coordinator" ] && coordinator=$kb
        for pid in $(pgrep -P "$run_pid" || true); do
            kb=$(awk '/VmHWM/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)
            [ -n "$kb" ] && [ "${kb:-0}" -gt "${peak[$pid]:-0}" ] && peak[$pid]=$kb
        done
        sleep 0.2
    done
    wait "$run_pid"
    python3 - "$log" "$start" "$n" "$(du -k "$set_dir/manifest.jsonl" | cut -f1)" "$out/logs" "$coordinator" "${peak[@]}" <<'PY'
import glob, json, os, sys, datetime
log, start, n, manifest_kb = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
logs, coordinator = sys.argv[5], int(sys.argv[6])
peaks = sorted(int(p) for p in sys.argv[7:])
steps = []
for line in open(log):
    try:
        r = json.loads(line)
    except ValueError:
        continue
    if r.get("message") == "step" and r.get("stage") == "distill":
        t = datetime.datetime.fromisoformat(r["timestamp"].replace("Z", "+00:00")).timestamp()
        steps.append((int(r["step"]), t))
steps.sort()
first = steps[0][1] - start
rate = (steps[-1][0] - steps[0][0]) / (steps[-1][1] - steps[0][1])
rss = [f"{p / 1024:.0f} MiB" for p in peaks] + ["?"] * (2 - len(peaks))
# Each worker's last `clips loaded` line is its distillation task's (the last training task).
loads = [0, 0, 0, 0]
for path in sorted(glob.glob(os.path.join(logs, "worker-*.log"))):
    last = None
    for line in open(path):
        try:
            r = json.loads(line)
        except ValueError:
            continue
        fields = r.get("fields", r)
        if fields.get("message") == "clips loaded":
            last = fields
    if last:
        for i, k in enumerate(["ahead", "waited", "reused", "on_training_thread"]):
            loads[i] += int(last[k])
print(f"| {n:,} | {manifest_kb / 1024:.1f} MiB | {first:.1f} s | {rss[0]} | {rss[1]} "
      f"| {coordinator / 1024:.0f} MiB | {rate:.2f} | {' / '.join(str(x) for x in loads)} |")
PY
done
