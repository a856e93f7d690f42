#!/usr/bin/env python3
"""Checks a checkpoint written by `kiln export pt` with real PyTorch and nanoGPT's own model.

Loads FILE with `torch.load(FILE, weights_only=True)`, builds nanoGPT's
`GPT(GPTConfig(**ckpt["model_args"]))` from model.py in --nanogpt, loads `ckpt["model"]` with
`strict=True`, and compares its logits for the reference's `ids` with the reference's `logits`
(Kiln's, as JSON: {"ids": [...], "logits": [...]}) within --tolerance. Prints a JSON summary.

Usage: python3 scripts/check_nanogpt_export.py FILE --reference REF.json [--nanogpt DIR]
Exit status 0 when every check passes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("file")
    parser.add_argument("--reference", required=True, help="JSON with Kiln's ids and logits")
    parser.add_argument("--nanogpt", default=os.environ.get("NANOGPT_DIR", "/tmp/nanogpt"),
                        help="directory holding nanoGPT's model.py")
    parser.add_argument("--tolerance", type=float, default=1e-4)
    args = parser.parse_args()

    sys.path.insert(0, args.nanogpt)
    from model import GPT, GPTConfig  # nanoGPT's own model.py

    ckpt = torch.load(args.file, weights_only=True, map_location="cpu")
    for key in ("model", "model_args", "iter_num", "best_val_loss", "config"):
        assert key in ckpt, f"checkpoint lacks {key!r}"
    model = GPT(GPTConfig(**ckpt["model_args"]))
    model.load_state_dict(ckpt["model"], strict=True)
    model.eval()

    ref = json.load(open(args.reference))
    idx = torch.tensor([ref["ids"]])
    with torch.no_grad():
        logits, _ = model(idx, targets=idx)  # with targets, every position's logits
    want = torch.tensor(ref["logits"]).reshape(logits.shape)
    diff = (logits - want).abs().max().item()
    summary = {"max_abs_diff": diff, "iter_num": ckpt["iter_num"],
               "best_val_loss": ckpt["best_val_loss"], "model_args": ckpt["model_args"],
               "parameters": sum(p.numel() for p in model.parameters())}
    print(json.dumps(summary))
    if not diff <= args.tolerance:
        print(f"logits differ by {diff} > {args.tolerance}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
