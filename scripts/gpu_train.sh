#!/usr/bin/env bash
# GPU training on Burn's CUDA backend: GPT-2 124M in BF16 (tokens/s and MFU, against PyTorch on the
# same GPU), then nanoGPT's GPU Shakespeare-char recipe (6x6x384, ctx 256, batch 64, 5000 steps,
# dropout 0.2; nanoGPT reaches val 1.47).
#
#   scripts/gpu_train.sh build   # here: build .gpu/kiln and .gpu/shakespeare_char with --features cuda
#                                #       (offline; the kernels compile at run time with NVRTC)
#   scripts/gpu_train.sh run     # there: needs shared/ (or KILN_SHARED) with data/ and tokenizers/gpt2/
#
# Environment: PEAK_TFLOPS (dense BF16 peak, default 989 for an H200 SXM), GPT2_STEPS (default 30),
# GPT2_BATCH (micro-batch of 1024-token rows, default 16), RECIPE=0 to skip the recipe.
# SMOKE=1 runs the plumbing on the CPU instead (KILN_BIN=target/release/kiln, a tiny preset, no recipe).
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  build)
    mkdir -p .gpu
    cargo build --release --features cuda --bin kiln --example shakespeare_char
    cp target/release/kiln target/release/examples/shakespeare_char .gpu/
    echo "built .gpu/kiln .gpu/shakespeare_char" ;;
  run)
    SHARED=${KILN_SHARED:-$( [ -d shared ] && echo shared || echo ../shared )}
    KILN=${KILN_BIN:-.gpu/kiln}
    PEAK=${PEAK_TFLOPS:-989}
    STEPS=${GPT2_STEPS:-30}
    BATCH=${GPT2_BATCH:-16}
    PRESET=gpt2; SEQ=1024; TORCH_FLAGS=()
    if [ "${SMOKE:-0}" = 1 ]; then
      PRESET=shakespeare-char-cpu; SEQ=64; TORCH_FLAGS=(--small); RECIPE=0
    fi
    W=$(mktemp -d)
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || true

    echo "== Kiln: $PRESET, bf16, batch $BATCH x $SEQ, $STEPS steps"
    "$KILN" data prepare -t "$SHARED/tokenizers/gpt2/tokenizer.json" -o "$W/gpt2" "$SHARED/data/tinyshakespeare.txt" > /dev/null
    cat > "$W/gpt2.toml" <<TOML
max_steps = $STEPS
micro_batch = $BATCH
seq_len = $SEQ
lr = 6e-4
min_lr = 6e-5
warmup_steps = 5
eval_interval = 0
checkpoint_interval = 0
log_interval = 10
peak_flops = ${PEAK}e12

[model]
preset = "$PRESET"
TOML
    "$KILN" train --config "$W/gpt2.toml" --data "$W/gpt2" --out "$W/run" --precision bf16 --max-memory 120 | tail -1
    # The first log window includes kernel compilation: report the later ones.
    python3 - "$W/run/metrics.jsonl" "$PEAK" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"tokens_per_s"' in l]
later = rows[1:] or rows
tps = sorted(r["tokens_per_s"] for r in later)[len(later) // 2]
mfu = sorted(r["mfu"] for r in later)[len(later) // 2]
print(f"kiln bf16: {tps:.0f} tokens/s, MFU {100 * mfu:.1f}% of {sys.argv[2]} TFLOP/s")
PY

    echo "== PyTorch: the same model and batch (bf16 autocast, SDPA attention, fused AdamW)"
    python3 scripts/torch_gpt2_step.py --batch "$BATCH" --steps "$STEPS" --peak-tflops "$PEAK" "${TORCH_FLAGS[@]}"

    if [ "${RECIPE:-1}" != 0 ]; then
      echo "== Kiln: nanoGPT's GPU Shakespeare-char recipe"
      start=$EPOCHREALTIME
      "${RECIPE_BIN:-.gpu/shakespeare_char}" "$SHARED/data/tinyshakespeare.txt" --gpu-recipe --out "$W/recipe" | tail -1
      python3 -c "print(f'recipe wall time {$EPOCHREALTIME - $start:.0f} s')"
    fi ;;
  *)
    echo "usage: $0 build|run" >&2; exit 2 ;;
esac
