#!/usr/bin/env bash
# Training speed, Kiln against nanoGPT (PyTorch, CPU, eager) in the same session:
#   1. nanoGPT's CPU Shakespeare-char recipe, whole run (4x4x128, ctx 64, batch 12, 2000 iters) and
#      Kiln's `shakespeare_char` example of the same recipe: wall time, ms/iter, val loss;
#   2. the 6x6x384 model (ctx 256, batch 8, no dropout): nanoGPT's median ms/iter over 24 iterations;
#   3. the same 6x384 step timed around nanoGPT's model in f32 and under PyTorch's CPU bf16 autocast
#      (scripts/nanogpt_step.py; train.py ignores --dtype on the CPU);
#   4. Kiln's criterion bench of one optimizer step on both models, Burn's composed ops vs Kiln's
#      fused kernels, and on CPUs with AVX512_BF16 the fused step in bf16 (criterion's medians).
# Every figure is printed with the CPU model (`lscpu`).
#
#   scripts/bench_train.sh        # needs `pip install torch numpy` and ../shared/data/tinyshakespeare.txt
#
# nanoGPT is cloned from $NANOGPT_REPO (default: GitHub) into $NANOGPT_DIR (default /tmp/nanogpt).
set -euo pipefail
cd "$(dirname "$0")/.."
CORPUS=${CORPUS:-../shared/data/tinyshakespeare.txt}
NANO=${NANOGPT_DIR:-/tmp/nanogpt}
LOG=$(mktemp -d)
python3 -c "import torch, numpy" 2>/dev/null || python3 -m pip install -q torch numpy
[ -d "$NANO" ] || git clone -q "${NANOGPT_REPO:-https://github.com/karpathy/nanoGPT}" "$NANO"
cp "$CORPUS" "$NANO/data/shakespeare_char/input.txt"
(cd "$NANO" && python3 data/shakespeare_char/prepare.py > /dev/null)
cargo build --release --quiet --example shakespeare_char
cargo bench --bench train_step --no-run --quiet 2>/dev/null

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
recipe=(--block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000
        --lr_decay_iters=2000 --dropout=0.0 --eval_iters=20 --log_interval=1)

echo "== nanoGPT CPU recipe (whole run)"
start=$EPOCHREALTIME
(cd "$NANO" && python3 train.py config/train_shakespeare_char.py --device=cpu --compile=False \
   "${recipe[@]}" --out_dir="$LOG/nano_cpu") > "$LOG/nano_cpu.log" 2>&1
nano_wall=$(python3 -c "print($EPOCHREALTIME - $start)")
nano_ms=$(grep -oP 'time \K[0-9.]+(?=ms)' "$LOG/nano_cpu.log" | tail -n +3 | median)
nano_val=$(grep -oP 'step 2000: .*val loss \K[0-9.]+' "$LOG/nano_cpu.log")

echo "== Kiln CPU recipe (whole run)"
start=$EPOCHREALTIME
target/release/examples/shakespeare_char "$CORPUS" --out "$LOG/kiln_cpu" > "$LOG/kiln_cpu.out" 2> "$LOG/kiln_cpu.log"
kiln_wall=$(python3 -c "print($EPOCHREALTIME - $start)")
kiln_ms=$(grep -oP '[0-9.]+(?= ms/step)' "$LOG/kiln_cpu.log" | tail -1)
kiln_val=$(grep -oP 'final val_loss \K[0-9.]+' "$LOG/kiln_cpu.out")

echo "== nanoGPT 6x6x384, ctx 256, batch 8"
(cd "$NANO" && python3 train.py config/train_shakespeare_char.py --device=cpu --compile=False \
   --block_size=256 --batch_size=8 --n_layer=6 --n_head=6 --n_embd=384 --dropout=0.0 --max_iters=25 \
   --eval_interval=100000 --eval_iters=1 --log_interval=1 --always_save_checkpoint=False \
   --out_dir="$LOG/nano_big") > "$LOG/nano_big.log" 2>&1
nano_big_ms=$(grep -oP 'time \K[0-9.]+(?=ms)' "$LOG/nano_big.log" | tail -n +3 | median)

echo "== nanoGPT 6x384 step, f32 and bf16 autocast (scripts/nanogpt_step.py)"
python3 scripts/nanogpt_step.py --nanogpt "$NANO" --model 6x384 | tee "$LOG/nano_step.log"
nano_step_f32=$(grep -oP 'f32: \K[0-9.]+' "$LOG/nano_step.log")
nano_step_bf16=$(grep -oP 'bf16: \K[0-9.]+' "$LOG/nano_step.log")

echo "== Kiln train_step bench (burn_ops vs fused vs fused_bf16)"
cargo bench --bench train_step --quiet -- --noplot 2>&1 | tee "$LOG/bench.log" | grep -E 'train_step$|time:' || true

echo
echo "CPU: $(lscpu | sed -n 's/^Model name: *//p') ($(nproc) cores)"
python3 - "$nano_ms" "$nano_big_ms" "$nano_wall" "$kiln_wall" "$kiln_ms" "$nano_val" "$kiln_val" \
  "$nano_step_f32" "$nano_step_bf16" <<'PY'
import json, os, sys
(nano_ms, nano_big, nano_wall, kiln_wall, kiln_ms, nano_val, kiln_val, nano_f32,
 nano_bf16) = sys.argv[1:]
def get(model, variant):
    """Criterion's median step time in ms (the group name's '/' becomes '_' on disk)."""
    path = f"target/criterion/shakespeare_char_{model}_{variant}/train_step/new/estimates.json"
    return json.load(open(path))["median"]["point_estimate"] / 1e6
small, big = "cpu_4x128_ctx64_b12", "6x384_ctx256_b8"
print(f"\nCPU recipe whole run: nanoGPT {float(nano_wall):.1f} s (val {nano_val}), "
      f"Kiln {float(kiln_wall):.1f} s (val {kiln_val}): {float(nano_wall)/float(kiln_wall):.2f}x")
print(f"CPU recipe ms/iter (medians): nanoGPT {float(nano_ms):.1f}, Kiln recipe {float(kiln_ms):.1f}, "
      f"Kiln bench fused {get(small, 'fused'):.1f} / burn_ops {get(small, 'burn_ops'):.1f}")
print(f"  tokens/s ratio Kiln/nanoGPT: {float(nano_ms)/get(small, 'fused'):.2f}x (bench), "
      f"{float(nano_ms)/float(kiln_ms):.2f}x (recipe)")
print(f"6x384 ms/iter (medians): nanoGPT {float(nano_big):.0f}, Kiln fused {get(big, 'fused'):.0f}, "
      f"burn_ops {get(big, 'burn_ops'):.0f}: Kiln/nanoGPT tokens/s {float(nano_big)/get(big, 'fused'):.2f}x")
print(f"6x384 step, model timed directly: nanoGPT f32 {float(nano_f32):.0f} ms, bf16 autocast "
      f"{float(nano_bf16):.0f} ms; Kiln f32 {get(big, 'fused'):.0f} ms: "
      f"{float(nano_f32)/get(big, 'fused'):.2f}x")
if os.path.exists(f"target/criterion/shakespeare_char_{big}_fused_bf16"):
    bf16 = get(big, "fused_bf16")
    print(f"6x384 bf16: Kiln {bf16:.0f} ms against PyTorch autocast {float(nano_bf16):.0f} ms: "
          f"{float(nano_bf16)/bf16:.2f}x; against Kiln's own f32: {get(big, 'fused')/bf16:.2f}x")
PY
