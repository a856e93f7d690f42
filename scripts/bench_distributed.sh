#!/usr/bin/env bash
# Distributed training speed on this machine, in one run:
#   1. all-reduce bus bandwidth through burn-collective over loopback (2 processes), 1-256 MB,
#      against memcpy (examples/allreduce_bench.rs);
#   2. the 6x384 GPT (context 256, Tiny Shakespeare bytes) at the same global batch: 1 process x 2
#      threads against `--nproc 2` (2 processes x 1 thread), DDP; then ZeRO-3 at N = 2.
#      Tokens/s are the medians of metrics.jsonl's logged windows after the first.
#   3. tensor and pipeline parallelism: the pipeline bubble per stage against (P-1)/(M+P-1),
#      parameter memory per rank, tensor-parallel bytes against Megatron (examples/parallel_bench.rs).
#
#   scripts/bench_distributed.sh        # needs ../shared/data/tinyshakespeare.txt
set -euo pipefail
cd "$(dirname "$0")/.."
CORPUS=${CORPUS:-../shared/data/tinyshakespeare.txt}
STEPS=${STEPS:-12}
ROWS=${ROWS:-8}   # global rows per step
OUT=$(mktemp -d)
echo "CPU: $(lscpu | sed -n 's/^Model name: *//p'); $(nproc) cores; $(grep -o -w -E 'avx512f|avx512_vnni|avx512_bf16|avx2' /proc/cpuinfo | sort -u | tr '\n' ' ')"
cargo build --release --quiet --bin kiln --example allreduce_bench --example parallel_bench

echo "== all-reduce over loopback"
./target/release/examples/allreduce_bench --ranks 2

echo "== 6x384 GPT, context 256, $ROWS rows per step in total"
kiln=./target/release/kiln
$kiln tokenizer train --vocab-size 257 -o "$OUT/tok.json" "$CORPUS" >/dev/null 2>&1
$kiln data prepare -t "$OUT/tok.json" -o "$OUT/data" "$CORPUS" >/dev/null 2>&1
config() {  # rows per rank, zero stage
  cat > "$OUT/c$1-$2.toml" <<TOML
max_steps = $STEPS
micro_batch = $1
seq_len = 256
lr = 1e-3
warmup_steps = 2
eval_interval = 0
eval_batches = 1
checkpoint_interval = 0
log_interval = 2
zero_stage = $2
[model]
preset = "shakespeare-char"
dropout = 0.0
TOML
  echo "$OUT/c$1-$2.toml"
}
tps() {  # median tokens/s of the logged windows after the first
  python3 - "$1/metrics.jsonl" <<'PY'
import json, sys, statistics
v = [json.loads(l)["tokens_per_s"] for l in open(sys.argv[1]) if '"tokens_per_s"' in l][1:]
print(f"{statistics.median(v):.0f}")
PY
}
half=$((ROWS / 2))
RAYON_NUM_THREADS=2 $kiln train --config "$(config $ROWS 0)" --data "$OUT/data" --out "$OUT/one" >/dev/null 2>&1
# /usr/bin/time's maximum RSS of the launcher covers its reaped children: the largest rank.
/usr/bin/time -f %M -o "$OUT/ddp.rss" $kiln train --config "$(config $half 0)" --data "$OUT/data" --out "$OUT/ddp" --nproc 2 --master 127.0.0.1:29710 >/dev/null 2>&1
/usr/bin/time -f %M -o "$OUT/z3.rss" $kiln train --config "$(config $half 3)" --data "$OUT/data" --out "$OUT/z3" --nproc 2 --master 127.0.0.1:29720 >/dev/null 2>&1
one=$(tps "$OUT/one"); ddp=$(tps "$OUT/ddp"); z3=$(tps "$OUT/z3")
echo "1 process x 2 threads:   $one tokens/s"
echo "2 processes x 1 thread:  $ddp tokens/s (DDP)   ratio $(python3 -c "print(f'{$ddp/$one:.2f}')")x   peak RSS of a rank $(($(tail -1 "$OUT/ddp.rss") / 1024)) MB"
echo "2 processes, ZeRO-3:     $z3 tokens/s          step time vs DDP $(python3 -c "print(f'{$ddp/$z3:.2f}')")x   peak RSS of a rank $(($(tail -1 "$OUT/z3.rss") / 1024)) MB"

echo "== tensor and pipeline parallelism (pipeline stages as processes over loopback, one core per stage)"
RAYON_NUM_THREADS=1 ./target/release/examples/parallel_bench --timeline
