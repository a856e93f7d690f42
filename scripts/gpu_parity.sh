#!/usr/bin/env bash
# CUDA parity: the same model definition on the GPU gives the CPU's logits (random GPT-2 and Llama
# models within 1e-4, SmolLM2's last-position logits within 1e-3).
#
#   scripts/gpu_parity.sh          # on a machine with an NVIDIA GPU and CUDA drivers: build and run
#   scripts/gpu_parity.sh build    # here: build the test binary into .gpu/ (kernels compile at run time, NVRTC)
#   scripts/gpu_parity.sh run      # there: run .gpu/backend_parity (KILN_SHARED=dir with models/ for SmolLM2)
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-all}" in
  build)
    mkdir -p .gpu
    bin=$(cargo test --release -p kiln-transformer --features cuda --test backend_parity --no-run --message-format=json 2>/dev/null \
      | python3 -c 'import json,sys; print([m["executable"] for m in map(json.loads, sys.stdin) if m.get("executable")][-1])')
    cp "$bin" .gpu/backend_parity
    echo "built .gpu/backend_parity" ;;
  run)
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader || true
    .gpu/backend_parity --test-threads 1 ;;
  all)
    cargo test --release -p kiln-transformer --features cuda --test backend_parity -- --test-threads 1 ;;
esac
