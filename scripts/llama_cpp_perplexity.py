#!/usr/bin/env python3
"""Perplexity of a GGUF model in llama.cpp (llama-cpp-python) by llama-perplexity's protocol:
the text's tokens cut into non-overlapping windows of CTX tokens, each a fresh context (its first
token replaced by BOS when the vocabulary adds one), scored on its second half; the result is
exp(mean NLL) ± its standard error, as llama-perplexity prints it.

    python3 scripts/llama_cpp_perplexity.py MODEL.gguf TEXT [--ctx 512] [--chunks N] [--threads 2]

Prints one line: `peer=llama.cpp ppl=… stderr=… windows=… tokens=… mean_nll=…`.
"""
import argparse
import math

import llama_cpp
import numpy as np


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("text")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    llm = llama_cpp.Llama(
        model_path=args.model,
        n_ctx=args.ctx,
        n_batch=args.ctx,
        n_ubatch=args.ctx,
        logits_all=True,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        verbose=False,
    )
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    add_bos = bool(llama_cpp.llama_vocab_get_add_bos(vocab))
    bos = llama_cpp.llama_vocab_bos(vocab)
    text = open(args.text, "rb").read()
    tokens = llm.tokenize(text, add_bos=add_bos, special=False)
    windows = len(tokens) // args.ctx
    if args.chunks is not None:
        windows = min(windows, args.chunks)
    first = args.ctx // 2
    nll = nll2 = 0.0
    count = 0
    for w in range(windows):
        window = list(tokens[w * args.ctx:(w + 1) * args.ctx])
        if add_bos:
            window[0] = bos
        llm.reset()
        llm.eval(window)
        logits = np.asarray(llm.scores[: args.ctx], dtype=np.float64)
        part = logits[first: args.ctx - 1]
        m = part.max(axis=1, keepdims=True)
        logz = (m[:, 0] + np.log(np.exp(part - m).sum(axis=1)))
        targets = np.asarray(window[first + 1:])
        token_nll = logz - part[np.arange(len(targets)), targets]
        nll += float(token_nll.sum())
        nll2 += float((token_nll ** 2).sum())
        count += len(targets)
    mean = nll / count
    var = nll2 / count - mean * mean
    err = math.sqrt(var / (count - 1)) if var > 0 and count > 1 else 0.0
    ppl = math.exp(mean)
    print(f"peer=llama.cpp ppl={ppl:.4f} stderr={err * ppl:.5f} windows={windows} "
          f"tokens={count} mean_nll={mean:.6f}")


if __name__ == "__main__":
    main()
