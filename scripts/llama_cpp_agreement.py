#!/usr/bin/env python3
"""llama.cpp (llama-cpp-python) against Kiln on the same GGUF file: for each prompt of a reference
written by Kiln, llama.cpp's top-1 token at every prompt position against Kiln's, and its greedy
continuation of the first prompt against Kiln's.

    python3 scripts/llama_cpp_agreement.py MODEL.gguf REFERENCE.json [--threads 2] [--kv-type f32]

REFERENCE.json: {"prompts": [[ids...], ...], "top1": [[ids...], ...], "greedy": [ids...]}.
Prints `agreement=A/N greedy_equal=true|false`, each position where the top-1 differs with the
gap between the two choices in llama.cpp's logits, and both greedy sequences.
"""
import argparse
import json

import numpy as np
from llama_cpp import Llama


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("reference")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kv-type", choices=["f16", "f32"],
                    default="f16",
                    help="llama.cpp's KV cache type (its default: f16)")
    args = ap.parse_args()
    ref = json.load(open(args.reference))
    longest = max(len(p) for p in ref["prompts"]) + len(ref["greedy"]) + 1
    kv = {"f16": 1, "f32": 0}[args.kv_type]  # ggml_type
    llm = Llama(args.model, n_ctx=max(64, longest), n_threads=args.threads,
                n_threads_batch=args.threads, logits_all=True, verbose=False,
                type_k=kv, type_v=kv)
    agree = total = 0
    misses = []
    for p, (prompt, top1) in enumerate(zip(ref["prompts"], ref["top1"])):
        llm.reset()
        llm.eval(prompt)
        for pos, want in enumerate(top1):
            total += 1
            row = np.asarray(llm.scores[pos])
            ours = int(np.argmax(row))
            agree += ours == want
            if ours != want:
                # How far Kiln's choice is below llama.cpp's in llama.cpp's own logits.
                misses.append(f"prompt {p} position {pos}: llama.cpp {ours}, kiln {want}, "
                              f"gap {row[ours] - row[want]:.3f}")
    llm.reset()
    ids = list(ref["prompts"][0])
    greedy = []
    llm.eval(ids)
    for _ in range(len(ref["greedy"])):
        nxt = int(np.argmax(np.asarray(llm.scores[llm.n_tokens - 1])))
        greedy.append(nxt)
        llm.eval([nxt])
    print(f"agreement={agree}/{total} greedy_equal={'true' if greedy == ref['greedy'] else 'false'}")
    for miss in misses:
        print(f"  differs at {miss}")
    print(f"llama.cpp greedy: {greedy}")
    print(f"kiln greedy:      {ref['greedy']}")


if __name__ == "__main__":
    main()
