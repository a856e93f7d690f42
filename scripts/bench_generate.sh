#!/usr/bin/env bash
# Generation speed and memory, Kiln against llama.cpp (llama-cpp-python) on the same GGUF, same session:
# a 128-token prompt (prefill), then 128 greedy tokens (decode), one sequence, 2 threads; Kiln with f32
# weights, with int8 decoding weights beside them (`--int8`, kiln-quantize), and from the file's own
# quantized blocks (`--native`, what `kiln generate` does with a quantized GGUF file). The default
# model is the shared 4-bit file (Q4_1, with a Q8_0 embedding), the same file llama.cpp runs.
#
#   scripts/bench_generate.sh [MODEL.gguf]      # RUNS=3 by default
#
# Needs `pip install llama-cpp-python` (builds llama.cpp, ~10 minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
echo "cpu: $(lscpu | sed -n 's/^Model name: *//p' | head -1)"
MODEL=${1:-../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf}
RUNS=${RUNS:-3}
LOG=$(mktemp)
IDS=$(mktemp --suffix=.json)
python3 -c "import llama_cpp" 2>/dev/null || python3 -m pip install -q llama-cpp-python
cargo build --release --quiet --example generate_bench

# Peak RSS of one command, measured by a fresh Python parent that runs nothing else.
peak() {
  python3 -c 'import resource, subprocess, sys
r = subprocess.run(sys.argv[1:], check=True, capture_output=True, text=True)
sys.stdout.write(r.stdout)
print(f"peak_rss_mb={resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024:.0f}")' "$@"
}
RAYON_NUM_THREADS=2 peak target/release/examples/generate_bench "$MODEL" --runs "$RUNS" --ids-out "$IDS" | tee -a "$LOG"
RAYON_NUM_THREADS=2 peak target/release/examples/generate_bench "$MODEL" --runs "$RUNS" --int8 | sed 's/^peak_rss/int8_peak_rss/' | tee -a "$LOG"
RAYON_NUM_THREADS=2 peak target/release/examples/generate_bench "$MODEL" --runs "$RUNS" --native | sed 's/^peak_rss/native_peak_rss/' | tee -a "$LOG"
peak python3 scripts/llama_cpp_generate.py "$MODEL" "$IDS" --runs "$RUNS" --threads 2 | sed 's/^peak_rss/llama_peak_rss/' | tee -a "$LOG"

python3 - "$LOG" <<'PY'
import re, sys
rows, rss = {}, {}
for line in open(sys.argv[1]):
    kv = dict(re.findall(r"(\w+)=(\S+)", line))
    if "peer" in kv:
        rows[(kv["peer"], kv["task"])] = float(kv["tok_per_s"])
    for k in ("peak_rss_mb", "int8_peak_rss_mb", "native_peak_rss_mb", "llama_peak_rss_mb"):
        if k in kv:
            rss[k] = kv[k]
print("\nratios (kiln / llama.cpp, higher is better):")
for peer in ("kiln", "kiln-int8", "kiln-native"):
    for task in ("prefill", "decode"):
        print(f"  {peer} {task}: {rows[(peer, task)]:.1f} / {rows[('llama.cpp', task)]:.1f} tok/s = {rows[(peer, task)] / rows[('llama.cpp', task)]:.2f}x")
print(f"  peak RSS: kiln {rss.get('peak_rss_mb')} MB, kiln int8 {rss.get('int8_peak_rss_mb')} MB, kiln native {rss.get('native_peak_rss_mb')} MB, llama.cpp {rss.get('llama_peak_rss_mb')} MB")
PY
rm -f "$LOG" "$IDS"
