#!/usr/bin/env python3
"""Generates kiln-transformer's GGUF architecture fixtures: small random-weight models written with
the `gguf` Python package in llama.cpp's layouts, each with the logits of an independent numpy
forward pass written from the Hugging Face modeling code's equations, cross-checked against
llama.cpp itself (llama-cpp-python) when it is importable.

Writes under crates/transformer/tests/data/gguf/ (read by crates/transformer/tests/transformer/gguf_architectures.rs):

  qwen2.gguf    `qwen2`: Q/K/V biases, grouped-query attention, RoPE θ = 1e6, tied output, a
                byte-level BPE tokenizer with pre-tokenizer `qwen2`.
  phi3.gguf     `phi3`: fused `attn_qkv` and `ffn_up` (gate rows first), separate output, a
                SentencePiece tokenizer, a 12-token sliding window.
  mistral.gguf  `llama` as llama.cpp writes Mistral: Q and K rows permuted for interleaved RoPE
                (convert_hf_to_gguf.py's `permute`), GQA, a SentencePiece tokenizer.
  gemma.gguf    `gemma`: GeGLU (tanh GELU gate), embeddings scaled by √d, norm weights stored as
                `1 + weight` (as llama.cpp's converter writes them), tied output, SentencePiece.
  expected.json For each: the token ids and the numpy logits (row-major [tokens, vocab]), and the
                largest difference from llama.cpp's logits when it was checked.

Seeded: reruns give the same files. Usage: python3 scripts/make_gguf_arch_fixtures.py
(needs numpy and gguf; llama-cpp-python for the cross-check).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import gguf

OUT = Path(__file__).resolve().parent.parent / "crates" / "transformer" / "tests" / "data" / "gguf"
IDS = [1, 40, 7, 7, 19, 200, 2, 130, 11, 259]


def byte_tokens() -> list[str]:
    """GPT-2's byte-to-unicode table: the 256 single-byte tokens of a byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs))
    return [chr(table[b]) for b in range(256)]


def bpe_tokenizer(w: gguf.GGUFWriter, pre: str) -> int:
    tokens = byte_tokens()
    merges = ["Ġ t", "h e", "Ġt he", "i n"]
    tokens += ["Ġt", "he", "Ġthe", "in", "<|endoftext|>"]
    types = [1] * (len(tokens) - 1) + [3]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_eos_token_id(len(tokens) - 1)
    return len(tokens)


def spm_tokenizer(w: gguf.GGUFWriter) -> int:
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    pieces = ["▁", "▁t", "h", "e", "▁the", "a"]
    tokens += pieces + ["<|endoftext|>"]
    types += [1] * len(pieces) + [3]
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))] + [0.0]
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    return len(tokens)


def permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: half-split rows to llama.cpp's interleaved order."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def reference(hf: dict, cfg: dict, ids: list[int]) -> np.ndarray:
    """The Hugging Face Llama/Qwen2/Phi-3 forward pass in numpy (rotate-half RoPE, GQA, SwiGLU)."""
    D, H, KV, L, eps, theta = cfg["D"], cfg["H"], cfg["KV"], cfg["L"], cfg["eps"], cfg["theta"]
    hd = D // H
    n = len(ids)

    def rms(x, g):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * g

    inv = 1.0 / theta ** (np.arange(0, hd, 2) / hd)
    ang = np.outer(np.arange(n), inv)
    cos, sin = np.concatenate([np.cos(ang)] * 2, -1), np.concatenate([np.sin(ang)] * 2, -1)

    def rope(x):
        return x * cos + np.concatenate([-x[..., hd // 2:], x[..., :hd // 2]], -1) * sin

    def causal(q, k, v):
        s = q @ k.transpose(0, 2, 1) / math.sqrt(hd) + np.triu(np.full((n, n), -np.inf), 1)
        s = np.exp(s - s.max(-1, keepdims=True))
        return (s / s.sum(-1, keepdims=True)) @ v

    x = hf["embed"][ids].astype(np.float64)
    if cfg.get("gemma"):
        x = x * math.sqrt(D)  # GemmaModel's normalizer
    head = hf["head"].astype(np.float64)
    for i in range(L):
        b = hf["layers"][i]
        h = rms(x, b["in_norm"])
        q = h @ b["q"].T + b.get("q_bias", 0)
        k = h @ b["k"].T + b.get("k_bias", 0)
        v = h @ b["v"].T + b.get("v_bias", 0)
        q = rope(q.reshape(n, H, hd).transpose(1, 0, 2))
        k = rope(k.reshape(n, KV, hd).transpose(1, 0, 2))
        v = v.reshape(n, KV, hd).transpose(1, 0, 2)
        k, v = np.repeat(k, H // KV, 0), np.repeat(v, H // KV, 0)
        x = x + causal(q, k, v).transpose(1, 0, 2).reshape(n, D) @ b["o"].T
        h = rms(x, b["post_norm"])
        g, u = h @ b["gate"].T, h @ b["up"].T
        if cfg.get("gemma"):  # GeGLU, gelu_pytorch_tanh
            act = 0.5 * g * (1 + np.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g ** 3)))
        else:
            act = g / (1 + np.exp(-g))
        x = x + (act * u) @ b["down"].T
    return rms(x, hf["norm"]) @ head.T


def make(name: str, arch: str, rng: np.random.Generator, *, qkv_bias=False, fused=False,
         permuted=False, spm=False, tied=False, theta=10000.0, window=None, gemma=False) -> dict:
    D, H, KV, L, FF, T, eps = 32, 4, 2, 2, 32, 32, 1e-5
    hd = D // H
    path = OUT / f"{name}.gguf"
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"kiln fixture {name}")
    vocab = spm_tokenizer(w) if spm else bpe_tokenizer(w, "qwen2")
    w.add_block_count(L)
    w.add_context_length(T)
    w.add_embedding_length(D)
    w.add_feed_forward_length(FF)
    w.add_head_count(H)
    w.add_head_count_kv(KV)
    w.add_layer_norm_rms_eps(eps)
    w.add_rope_freq_base(theta)
    w.add_rope_dimension_count(hd)
    if window is not None:
        w.add_sliding_window(window)

    def r(*shape, std=0.2):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    # Norm scales near 1 (for Gemma these are `1 + weight`, what llama.cpp's converter stores).
    hf = {"embed": r(vocab, D), "norm": 1 + r(D, std=0.1), "layers": []}
    hf["head"] = hf["embed"] if tied else r(vocab, D)
    w.add_tensor("token_embd.weight", hf["embed"])
    w.add_tensor("output_norm.weight", hf["norm"])
    if not tied:
        w.add_tensor("output.weight", hf["head"])
    for i in range(L):
        b = {"in_norm": 1 + r(D, std=0.1), "post_norm": 1 + r(D, std=0.1),
             "q": r(H * hd, D), "k": r(KV * hd, D), "v": r(KV * hd, D), "o": r(D, H * hd),
             "gate": r(FF, D), "up": r(FF, D), "down": r(D, FF)}
        if qkv_bias:
            b.update(q_bias=r(H * hd), k_bias=r(KV * hd), v_bias=r(KV * hd))
        hf["layers"].append(b)
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", b["in_norm"])
        w.add_tensor(p + "ffn_norm.weight", b["post_norm"])
        if fused:
            w.add_tensor(p + "attn_qkv.weight", np.concatenate([b["q"], b["k"], b["v"]]))
            w.add_tensor(p + "ffn_up.weight", np.concatenate([b["gate"], b["up"]]))
        else:
            q, k = (permute(b["q"], H, H), permute(b["k"], H, KV)) if permuted else (b["q"], b["k"])
            w.add_tensor(p + "attn_q.weight", q)
            w.add_tensor(p + "attn_k.weight", k)
            w.add_tensor(p + "attn_v.weight", b["v"])
            w.add_tensor(p + "ffn_gate.weight", b["gate"])
            w.add_tensor(p + "ffn_up.weight", b["up"])
        if qkv_bias:
            for s in "qkv":
                w.add_tensor(p + f"attn_{s}.bias", b[f"{s}_bias"])
        w.add_tensor(p + "attn_output.weight", b["o"])
        w.add_tensor(p + "ffn_down.weight", b["down"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    ids = [t % vocab for t in IDS]
    logits = reference(hf, dict(D=D, H=H, KV=KV, L=L, eps=eps, theta=theta, gemma=gemma), ids)
    entry = {"ids": ids, "vocab": vocab, "logits": [float(f"{v:.7g}") for v in logits.reshape(-1)],
             "context_length": min(T, window) if window else T}
    # ggml's CPU GELU reads an f16 table: llama.cpp's GeGLU logits carry ~1e-3 of rounding.
    entry["llama_cpp_max_diff"] = llama_cpp_difference(path, ids, logits, 5e-3 if gemma else 1e-4)
    return entry


def llama_cpp_difference(path: Path, ids: list[int], logits: np.ndarray, tolerance: float) -> float | None:
    """The largest difference between llama.cpp's logits for `ids` and the numpy ones, checked to be
    under `tolerance` and to pick the same top token at every position."""
    try:
        import llama_cpp
    except ImportError:
        return None
    llm = llama_cpp.Llama(str(path), n_ctx=32, logits_all=True, verbose=False, n_threads=1,
                          type_k=0, type_v=0)  # f32 KV cache
    llm.eval(ids)
    theirs = np.array(llm.scores[: len(ids)])
    diff = float(np.abs(theirs - logits).max())
    assert diff < tolerance, f"{path.name}: llama.cpp differs from the numpy reference by {diff}"
    assert (theirs.argmax(-1) == logits.argmax(-1)).all(), f"{path.name}: top-1 differs"
    return diff


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    expected = {
        "qwen2": make("qwen2", "qwen2", np.random.default_rng(21), qkv_bias=True, tied=True,
                      theta=1e6),
        "phi3": make("phi3", "phi3", np.random.default_rng(22), fused=True, spm=True, window=12),
        "mistral": make("mistral", "llama", np.random.default_rng(23), permuted=True, spm=True),
        "gemma": make("gemma", "gemma", np.random.default_rng(24), spm=True, tied=True, gemma=True),
    }
    (OUT / "expected.json").write_text(json.dumps(expected))
    for name, e in expected.items():
        size = (OUT / f"{name}.gguf").stat().st_size
        print(f"{name}.gguf: {size} bytes, vocab {e['vocab']}, llama.cpp max diff {e['llama_cpp_max_diff']}")


if __name__ == "__main__":
    main()
