#!/usr/bin/env python3
"""Quantize a GGUF file with llama.cpp's llama-quantize (through llama-cpp-python), the peer of
`kiln quantize`.

    python3 scripts/llama_cpp_quantize.py IN.gguf OUT.gguf TYPE     # TYPE: q8_0, q4_0, ..., q4_k_m
"""
import sys

import llama_cpp

FTYPES = {
    "f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "q5_1": 9,
    "q4_k_s": 14, "q4_k_m": 15, "q5_k_s": 16, "q5_k_m": 17, "q6_k": 18,
}


def main():
    if len(sys.argv) != 4 or sys.argv[3] not in FTYPES:
        sys.exit(f"usage: {sys.argv[0]} IN.gguf OUT.gguf {{{','.join(FTYPES)}}}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[sys.argv[3]]
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), params)
    if rc != 0:
        sys.exit(f"llama_model_quantize failed with {rc}")


if __name__ == "__main__":
    main()
