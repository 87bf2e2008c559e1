#!/usr/bin/env bash
# The benchmark of `xkd data prepare` (issue 13): COUNT clips shaped like VGGSound's downloads
# (10 s, 640x360 at 25 fps and about 600 kbit/s, as YouTube's 360p; half mp4 with H.264 and AAC,
# half webm with VP9 and Opus; a moving test pattern with noise, a tone with noise), prepared for Qwen2-VL (2 frames a second, 16 kHz
# mono) with one job and with one job per core. Prints clips per second per core, what that
# means for VGGSound's 199,467 rows, and prepared bytes against source bytes. Not part of the
# tests: run it by hand.
#
#   tests/data/prepare-bench.sh [COUNT] [DIR]     (default 16 clips, target/prepare-bench)
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
count=${1:-16}
dir=${2:-$root/target/prepare-bench}
"$root/tests/data/ffmpeg.sh" >/dev/null
cargo build --release --quiet --manifest-path "$root/Cargo.toml"
xkd=$root/target/release/xkd
mkdir -p "$dir/clips"
: >"$dir/vggsound.csv"
for i in $(seq 1 "$count"); do
    if [ $((i % 2)) -eq 0 ]; then
        ext=mp4; codecs=(-c:v libx264 -preset medium -b:v 600k -maxrate 800k -bufsize 1200k -pix_fmt yuv420p -c:a aac -b:a 128k)
    else
        ext=webm; codecs=(-c:v libvpx-vp9 -deadline realtime -cpu-used 8 -b:v 500k -c:a libopus -b:a 96k)
    fi
    clip=$dir/clips/bench$i\_000000.$ext
    if [ ! -s "$clip" ]; then
        ffmpeg -nostdin -loglevel error -y \
            -f lavfi -i "testsrc2=size=640x360:rate=25:duration=10,noise=alls=8:allf=t" \
            -f lavfi -i "sine=frequency=$((200 + 40 * i)):sample_rate=44100:duration=10" \
            -f lavfi -i "anoisesrc=color=pink:sample_rate=44100:amplitude=0.1:duration=10" \
            -filter_complex "[1:a][2:a]amix=inputs=2[a]" -map 0:v -map "[a]" -ac 2 \
            "${codecs[@]}" "$clip"
    fi
    echo "bench$i,0,class $((i % 4)),$([ $((i % 5)) -eq 0 ] && echo test || echo train)" >>"$dir/vggsound.csv"
done
cores=$(nproc)
printf '\n%s clips of 10 s (640x360, 25 fps; H.264+AAC mp4 and VP9+Opus webm), --frames qwen2-vl\n' "$count"
printf 'machine: %s, %s cores; %s\n\n' "$(uname -m)" "$cores" "$(ffmpeg -version | head -n 1 | cut -d' ' -f1-3)"
printf '| jobs | clips | seconds | clips/s | clips/s per job | 199,467 rows | prepared / source bytes |\n'
printf '|---:|---:|---:|---:|---:|---:|---:|\n'
for jobs in 1 "$cores"; do
    out=$dir/out-$jobs
    rm -rf "$out"
    "$xkd" data prepare --csv "$dir/vggsound.csv" --clips "$dir/clips" --out "$out" \
        --frames qwen2-vl --set data.clip_seconds=10 --jobs "$jobs" >/dev/null
    python3 - "$out/prepare.json" "$jobs" <<'PY'
import json, sys
s = json.load(open(sys.argv[1])); jobs = int(sys.argv[2])
rate = s["prepared"] / s["seconds"]
print(f"| {jobs} | {s['prepared']} | {s['seconds']:.1f} | {rate:.2f} | {rate / jobs:.2f} "
      f"| {199467 / rate / 3600:.1f} h | {s['prepared_bytes'] / s['source_bytes']:.2f} |")
PY
done
