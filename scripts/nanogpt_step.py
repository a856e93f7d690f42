"""nanoGPT's training step on the CPU, in f32 and under PyTorch's CPU bf16 autocast: the peer of
Kiln's `train_step` bench (`fused` and `fused_bf16`). nanoGPT's train.py ignores `--dtype` on the
CPU, so this times its model directly: forward, cross-entropy, backward, gradient clipping at 1.0
and AdamW (fused=False, as train.py picks on the CPU), on fixed random tokens, median ms over
`--steps` steps after `--warmup`.

    python3 scripts/nanogpt_step.py --nanogpt /tmp/nanogpt [--model 6x384|4x128] [--steps 12]
"""
import argparse
import contextlib
import os
import statistics
import sys
import time

import torch

MODELS = {
    # (layers, heads, width, context, batch): the Shakespeare-char models of bench_train.sh.
    "6x384": (6, 6, 384, 256, 8),
    "4x128": (4, 4, 128, 64, 12),
}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nanogpt", default=os.environ.get("NANOGPT_DIR", "/tmp/nanogpt"))
    p.add_argument("--model", choices=MODELS, default="6x384")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--dtype", choices=["f32", "bf16", "both"], default="both")
    args = p.parse_args()
    sys.path.insert(0, args.nanogpt)
    from model import GPT, GPTConfig  # nanoGPT's model.py

    layers, heads, width, ctx, batch = MODELS[args.model]
    torch.manual_seed(0)
    config = GPTConfig(block_size=ctx, vocab_size=65, n_layer=layers, n_head=heads,
                       n_embd=width, dropout=0.0, bias=False)
    x = torch.randint(0, 65, (batch, ctx))
    y = torch.randint(0, 65, (batch, ctx))
    dtypes = ["f32", "bf16"] if args.dtype == "both" else [args.dtype]
    for dtype in dtypes:
        torch.manual_seed(0)
        model = GPT(config)
        opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu")
        ctxm = (torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16"
                else contextlib.nullcontext())
        times = []
        for i in range(args.warmup + args.steps):
            t0 = time.perf_counter()
            with ctxm:
                _, loss = model(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
        print(f"nanoGPT {args.model} {dtype}: {1e3 * statistics.median(times):.1f} ms/step "
              f"(median of {args.steps}, {torch.get_num_threads()} threads, torch {torch.__version__})",
              flush=True)


if __name__ == "__main__":
    main()
