"""Sanity check against llama.cpp: its logits for the reference prompts against the f32 reference
that Kiln's tests match (`crates/transformer/tests/transformer/smollm2_parity.rs`: within 1e-4).

    pip install llama-cpp-python
    python scripts/llama_cpp_check.py [MODEL.gguf]

llama.cpp's Q4_1 path quantizes activations to 8 bits, so its logits differ from the f32 reference by
up to ~0.5; what should agree is the top-1 token at every prompt position.
"""
import json, os, sys

import numpy as np
from llama_cpp import Llama

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
model = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "..", "shared", "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
cases = [json.load(open(os.path.join(os.path.dirname(model), "SmolLM2-135M-Instruct.Q4_1.golden.json")))]
cases += [json.loads(l) for l in open(os.path.join(ROOT, "crates/transformer/tests/data/smollm2_reference.jsonl")) if l.strip()]
llm = Llama(model, n_ctx=256, n_threads=2, logits_all=True, verbose=False)
agree = total = 0
worst = 0.0
for case in cases:
    llm.reset()
    llm.eval(case["prompt_ids"])
    for pos, top5 in enumerate(case["top5_per_position"]):
        row = np.array(llm._scores[pos])
        total += 1
        agree += int(np.argmax(row)) == top5[0][0]
        worst = max(worst, max(abs(float(row[i]) - l) for i, l in top5))
    print(f"{case['prompt']!r}: top-1 agreement so far {agree}/{total}")
print(f"llama.cpp vs the f32 reference: top-1 agrees at {agree}/{total} prompt positions; "
      f"largest top-5 logit difference {worst:.3f}")
