#!/usr/bin/env bash
# Serving throughput under load, same session, same GGUF, same requests:
#   kiln serve with f32 weights (continuous batching, --max-batch-size 16), --max-batch-size 1 (one request
#   at a time), kiln serve --quantize int8, kiln serve --quantize native (the 4-bit file's own blocks
#   in memory: what `auto` does with a quantized GGUF), and llama-cpp-python's OpenAI server (--n_threads 2), both
#   as the issue runs it (its defaults interrupt a running stream when a request arrives) and with
#   --interrupt_requests False (every request runs to completion, one at a time).
# For 1, 4 and 16 concurrent streaming clients, each sending REQUESTS requests of MAX_TOKENS new
# tokens (scripts/load_test.py): aggregate generated tokens/s and time to first token p50/p99.
#
#   scripts/bench_serve.sh [MODEL.gguf]        # CLIENTS="1 4 16" REQUESTS=2 MAX_TOKENS=48
#
# Needs `pip install 'llama-cpp-python[server]'` (builds llama.cpp, ~10 minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf}
CLIENTS=${CLIENTS:-"1 4 16"}
REQUESTS=${REQUESTS:-2}
MAX_TOKENS=${MAX_TOKENS:-48}
PORT=${PORT:-8931}
python3 -c "import llama_cpp.server" 2>/dev/null || python3 -m pip install -q 'llama-cpp-python[server]'
cargo build --release --quiet

SERVER_PID=
stop() { if [ -n "$SERVER_PID" ]; then kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; fi; SERVER_PID=; }
trap stop EXIT

wait_ready() {
  for _ in $(seq 1 300); do
    curl -sf "http://127.0.0.1:$PORT/v1/models" >/dev/null && return 0
    sleep 0.2
  done
  echo "server on port $PORT did not come up" >&2; return 1
}

run_load() { # name
  for c in $CLIENTS; do
    printf '%s\t%s\t' "$1" "$c"
    python3 scripts/load_test.py --base-url "http://127.0.0.1:$PORT/v1" --clients "$c" \
      --requests "$REQUESTS" --max-tokens "$MAX_TOKENS"
  done
}

RESULTS=$(mktemp)
echo "cpu: $(lscpu | sed -n 's/^Model name: *//p' | head -1)"
for variant in "16 none" "1 none" "16 int8" "16 native"; do
  read -r batch quantize <<<"$variant"
  name="kiln (batch $batch)"
  [ "$quantize" != none ] && name="kiln $quantize (batch $batch)"
  target/release/kiln serve --model "$MODEL" --port "$PORT" --max-batch-size "$batch" \
    --quantize "$quantize" >/dev/null 2>&1 & SERVER_PID=$!
  wait_ready
  run_load "$name" | tee -a "$RESULTS"
  stop
done
# The issue's peer command (llama-cpp-python's defaults: a new request interrupts the running stream,
# so under load many streams end early) and the same server told to finish every request.
for interrupt in True False; do
  name="llama-cpp-python"
  [ "$interrupt" = False ] && name="llama-cpp-python (no interrupts)"
  python3 -m llama_cpp.server --model "$MODEL" --n_threads 2 --n_ctx 4096 --port "$PORT" \
    --interrupt_requests "$interrupt" >/dev/null 2>&1 & SERVER_PID=$!
  wait_ready
  run_load "$name" | tee -a "$RESULTS"
  stop
done

python3 - "$RESULTS" <<'PY'
import json, sys
rows = {}
for line in open(sys.argv[1]):
    name, clients, summary = line.rstrip("\n").split("\t")
    rows[(name, int(clients))] = json.loads(summary)
print(f"\n| server | clients | tok/s | TTFT p50 | TTFT p99 | errors | finish reasons |")
print("|---|---|---|---|---|---|---|")
for (name, c), s in rows.items():
    print(f"| {name} | {c} | {s['tokens_per_s']:.1f} | {s['ttft_p50_s']} s | {s['ttft_p99_s']} s | {s['errors']} | {s['finish_reasons']} |")
base = {c: s["tokens_per_s"] for (n, c), s in rows.items() if n == "kiln (batch 1)"}
peer = {c: s["tokens_per_s"] for (n, c), s in rows.items() if n == "llama-cpp-python"}
strict = {c: s["tokens_per_s"] for (n, c), s in rows.items() if n == "llama-cpp-python (no interrupts)"}
for (n, c), s in rows.items():
    if n in ("kiln (batch 16)", "kiln int8 (batch 16)", "kiln native (batch 16)"):
        print(f"{n}, clients {c}: {s['tokens_per_s'] / base[c]:.2f}x one-at-a-time, "
              f"{s['tokens_per_s'] / peer[c]:.2f}x llama-cpp-python, "
              f"{s['tokens_per_s'] / strict[c]:.2f}x llama-cpp-python without interrupts")
f32 = {c: s["tokens_per_s"] for (n, c), s in rows.items() if n == "kiln (batch 16)"}
for (n, c), s in rows.items():
    if n == "kiln native (batch 16)":
        print(f"4-bit in memory against f32, clients {c}: {s['tokens_per_s'] / f32[c]:.2f}x")
PY
