"""llama.cpp's side of the generation speed comparison (llama-cpp-python, `pip install llama-cpp-python`).

    python scripts/llama_cpp_generate.py MODEL.gguf IDS.json [--new-tokens 128] [--runs 3] [--threads 2]

Same protocol as `examples/generate_bench.rs`: evaluate the prompt ids (prefill), then greedy decode
one token at a time; medians over --runs; one line per measurement.
"""
import argparse, json, statistics, time

import numpy as np
from llama_cpp import Llama


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("ids")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    ids = json.load(open(a.ids))
    llm = Llama(a.model, n_ctx=len(ids) + a.new_tokens + 8, n_threads=a.threads, n_threads_batch=a.threads,
                n_batch=512, verbose=False)
    prefill, decode = [], []
    for _ in range(a.runs):
        llm.reset()
        t = time.perf_counter()
        llm.eval(ids)
        prefill.append(time.perf_counter() - t)
        nxt = int(np.argmax(llm._scores[llm.n_tokens - 1]))
        t = time.perf_counter()
        for _ in range(a.new_tokens):
            llm.eval([nxt])
            nxt = int(np.argmax(llm._scores[llm.n_tokens - 1]))
        decode.append(time.perf_counter() - t)
    p, d = statistics.median(prefill), statistics.median(decode)
    print(f"peer=llama.cpp task=prefill tokens={len(ids)} seconds={p:.3f} tok_per_s={len(ids) / p:.1f}")
    print(f"peer=llama.cpp task=decode tokens={a.new_tokens} seconds={d:.3f} tok_per_s={a.new_tokens / d:.1f}")


if __name__ == "__main__":
    main()
