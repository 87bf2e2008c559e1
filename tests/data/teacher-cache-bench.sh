#!/usr/bin/env bash
# The teacher cache against the online teacher (issue 15, item 4): the same LoRA distillation
# (configs/tiny-qwen2.toml's recipe, one worker, on the CPU) with random-weight Qwen2 models,
# a Qwen2-VL teacher many times the Qwen2-Audio student's parameters, once with
# distill.teacher = "online" and once "cached". Prints, for each: the median distillation step
# (from the step reports: batch / samples_per_s, first step left out), the peak RSS of a
# worker that distils (see `run` below for how the earlier stages are kept out of it), the
# caching stage's wall time and the whole first run's. Not part of the tests: run it by hand.
# Needs python3 (standard library only) and bc.
#
#   tests/data/teacher-cache-bench.sh [DIR] [STEPS]     (default target/teacher-cache-bench, 30)
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
dir=${1:-$root/target/teacher-cache-bench}
steps=${2:-30}
cargo build --release --quiet --manifest-path "$root/Cargo.toml"
xkd=$root/target/release/xkd
mkdir -p "$dir"

# Random bf16 weights without torch: shapes from tests/gpu/make_random_qwen2.py's rules,
# bytes from a seeded stream with the exponent pinned so |w| lies in [2^-7, 2^-5).
python3 - "$dir/models" "$root" <<'PY'
import json, random, shutil, struct, sys
from pathlib import Path
out, root = Path(sys.argv[1]), Path(sys.argv[2])
sys.path.insert(0, str(root / "tests/gpu"))
import make_random_qwen2 as m

SIZES = {
    # The student: a small Qwen2-Audio (LoRA trains its LM's projections).
    "qwen2-audio": {"text_config": {"hidden_size": 192, "intermediate_size": 512,
                                    "num_hidden_layers": 3, "num_attention_heads": 4,
                                    "num_key_value_heads": 2},
                    "audio_config": {"d_model": 128, "encoder_ffn_dim": 512, "encoder_layers": 2,
                                     "num_hidden_layers": 2, "encoder_attention_heads": 4}},
    # The teacher: a Qwen2-VL with a wider, deeper LM.
    "qwen2-vl": {"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 6,
                 "num_attention_heads": 12, "num_key_value_heads": 4,
                 "rope_scaling": {"mrope_section": [8, 12, 12], "rope_type": "default",
                                  "type": "default"},
                 "vision_config": {"embed_dim": 128, "depth": 2, "num_heads": 4,
                                   "hidden_size": 768}},
}
HIGH = bytes(((b & 0x80) | 0x3C) for b in range(256))
rng = random.Random(0)

def tensor_bytes(name, shape):
    n = 1
    for d in shape:
        n *= d
    if len(shape) == 1:
        norm = "norm" in name and name.endswith(".weight") or name.endswith("ln_q.weight")
        return (b"\x80\x3f" if norm else b"\0\0") * n
    data = bytearray(rng.randbytes(2 * n))
    data[1::2] = bytes(data[1::2]).translate(HIGH)
    return bytes(data)

for name, over in SIZES.items():
    tiny, d = m.FIXTURES / f"{name}-tiny", out / name
    if (d / "model.safetensors").exists():
        continue
    d.mkdir(parents=True, exist_ok=True)
    for f in ("tokenizer.json", "generation_config.json", "preprocessor_config.json"):
        shutil.copy(tiny / f, d / f)
    config = m.merge(json.loads((tiny / "config.json").read_text()), over)
    config["torch_dtype"] = "bfloat16"
    (d / "config.json").write_text(json.dumps(config, indent=2))
    shapes = m.SHAPES[name](config)
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for k, shape in shapes.items():
        size = 2
        for s in shape:
            size *= s
        header[k] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(d / "model.safetensors.partial", "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for k, shape in shapes.items():
            f.write(tensor_bytes(k, shape))
    (d / "model.safetensors.partial").rename(d / "model.safetensors")
for name in SIZES:
    header = m.stored_shapes(out / name)
    count = 0
    for shape in header.values():
        n = 1
        for s in shape:
            n *= s
        count += n
    print(f"{name}: {count / 1e6:.1f}M parameters ({count * 4 / 2**20:.0f} MiB as the f32 a CPU "
          f"worker holds frozen weights in)")
PY

# start MODE OUT: one `xkd run` of the recipe in MODE into OUT (the same run id each time).
# Prints the worker's peak RSS while it distilled, in KiB, and the wall seconds. The peak is
# VmHWM, reset (/proc/PID/clear_refs) when the worker logs `student model` (its models,
# the teacher among them in online mode, are loaded; the first step is next) and read every
# 50 ms until it logs `clips loaded` (the loop is over), so it misses at most the last 50 ms
# of the last step and leaves the final evaluation out.
start() {
    local mode=$1 out=$2 t0=$(date +%s.%N)
    local log=$out/logs/worker-0.log
    local seen=$(cat "$log" 2>/dev/null | wc -l)
    "$xkd" --log-format json run --config "$root/configs/tiny-qwen2.toml" --workers 1 --out "$out" \
        --set "audio_model.dir=\"$dir/models/qwen2-audio\"" \
        --set "visual_model.dir=\"$dir/models/qwen2-vl\"" \
        --set "run.cache_dir=\"$dir/cache\"" --set "run.run_id=bench-$mode" \
        --set "data.probe_clips=2" --set "data.eval_clips=2" \
        --set "distill.steps=$steps" --set "distill.batch=8" --set "checkpoint.every_steps=0" \
        --set "distill.teacher=\"$mode\"" >>"$out.stdout" 2>>"$out.log" &
    local pid=$! worker="" peak=0 state=wait hwm new
    while kill -0 $pid 2>/dev/null; do
        [ -z "$worker" ] && worker=$(pgrep -P $pid -f "xkd.* worker" | head -1 || true)
        if [ -n "$worker" ] && [ $state != done ]; then
            new=$(tail -n +$((seen + 1)) "$log" 2>/dev/null || true)
            if [ $state = wait ] && grep -q '"message":"student model"' <<<"$new"; then
                echo 5 > /proc/$worker/clear_refs && state=distill
            elif [ $state = distill ]; then
                grep -q '"message":"clips loaded"' <<<"$new" && state=done
                hwm=$(awk '/VmHWM/ {print $2}' /proc/$worker/status 2>/dev/null || true)
                [ $state = distill ] && [ "${hwm:-0}" -gt "$peak" ] && peak=$hwm
            fi
        fi
        sleep 0.05
    done
    wait $pid || { echo "$mode run failed, see $out.log" >&2; exit 1; }
    echo "$peak $(echo "$(date +%s.%N) - $t0" | bc)"
}

# run MODE: the run twice. The first start probes, evaluates, caches (in cached mode) and
# distils; the second, after its checkpoints are deleted, reuses the run's decisions (and the
# cache, whose shards all verify, so the teacher is not loaded) and distils again from step 0
# in a fresh worker process, whose peak RSS while distilling is then measured: the probe and
# the first evaluations (which load both models in both modes) and the caching stage, and
# what the allocator kept of their memory, are not in that process. Prints the table row.
run() {
    local mode=$1 out=$dir/$1
    rm -rf "$out" "$out.log" "$out.stdout"
    read -r _ first < <(start "$mode" "$out")
    rm -rf "$out/checkpoints/bench-$mode/ckpt"
    read -r peak _ < <(start "$mode" "$out")
    python3 - "$out" "$mode" "$peak" "$first" "$steps" <<'PY'
import json, statistics, sys
from datetime import datetime
out, mode, peak, first, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
rows = [json.loads(l) for l in open(f"{out}/metrics.jsonl")]
steps_of = [r for r in rows if r.get("stage") == "distill"]
second = steps_of[steps:][1:]  # the second start's steps, its first left out
times = [8 / r["samples_per_s"] for r in second]
teacher = [r["ms_teacher"] for r in second]
log = [json.loads(l) for l in open(f"{out}.log") if l.startswith("{")]
def at(msg):
    ts = [r["timestamp"] for r in log if r.get("message") == msg]
    return datetime.fromisoformat(ts[0].replace("Z", "+00:00")).timestamp() if ts else None
cache = "-"
if at("teacher cache ready"):
    cache = f"{at('teacher cache ready') - at('run decisions stored'):.1f} s"
report = json.load(open(f"{out}/report.json"))
print(f"| {mode} | {statistics.median(times) * 1e3:.0f} ms | {statistics.median(teacher):.0f} ms "
      f"| {peak / 1024:.0f} MiB | {cache} | {first:.0f} s | {report['student_digest'][:12]} |")
PY
}

printf '| teacher | step (median) | of which teacher | peak RSS of a distilling worker | caching stage | whole first run | student digest |\n'
printf '|---|---:|---:|---:|---:|---:|---|\n'
run online
run cached
