#!/usr/bin/env python3
"""Checks an ONNX file written by Kiln (`kiln_gguf::onnx`) with the real `onnx` and onnxruntime.

  check_onnx_export.py MODEL.onnx --reference REF.npz [--tol 1e-4]
  check_onnx_export.py MODEL.onnx --numpy-model DIR [--save-reference REF.npz]
  check_onnx_export.py MODEL.onnx --golden MODEL.golden.json
  check_onnx_export.py MODEL_KV.onnx --bench [--prompt 128 --decode 32 --threads 2]

Always: `onnx.checker.check_model(full_check=True)` (structure, opset, strict shape inference),
then an onnxruntime CPU session.

Logits: the file's logits for the reference's `input_ids` (int64 [batch, seq]) must be within
`--tol` (absolute) of its `logits` (float [batch, seq, vocab]). The reference is an .npz made by
Kiln (`input_ids`, `logits`, optionally `greedy_ids` [steps]: Kiln's greedy continuation of
row 0), or is computed here by an independent NumPy forward pass (float64) of the random model
that `cargo run --example onnx_random` writes (DIR holds spec.json and weights/NAME.npy), or
is the golden output of shared/peers/llama_gguf_ref.py for a GGUF model exported by
`cargo run --example onnx_from_gguf` (`prompt_ids`, `top5_per_position` [[id, logit], ...] per
prompt position, `greedy_ids`): the logits at those ids are compared, and the greedy tokens.

KV cache (a file with `past_key_values.*` inputs; checked whenever present): greedy decoding of
row 0 token by token, feeding each step's `present.*` back as `past_key_values.*`, must pick the
same tokens as greedy decoding that reruns the whole sequence each step, with each step's logits
within `--tol` of the full run's; and `greedy_ids` of the reference, if any, must match. A
left-padded batch (the attention_mask / position_ids protocol of Hugging Face Optimum) must give
each row's logits of an unpadded run.

Bench: median prefill time of a `--prompt`-token prompt and per-token decode time through the
KV cache, with `--threads` intra-op threads.

Exit status 0 when every check passes. Needs `pip install onnx onnxruntime numpy`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort


# --- NumPy reference: Kiln's Transformer, written independently ------------------------------


class NumpyModel:
    """Kiln's decoder-only Transformer in float64 NumPy, from onnx_random's spec.json + weights."""

    def __init__(self, directory: Path):
        self.spec = json.loads((directory / "spec.json").read_text())
        self.w = {
            p.name[: -len(".npy")]: np.load(p).astype(np.float64)
            for p in (directory / "weights").glob("*.npy")
        }

    def norm(self, prefix: str, x: np.ndarray) -> np.ndarray:
        kind, eps = self.spec["norm"]["type"], self.spec["norm"]["eps"]
        if kind == "rms_norm":
            y = x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)
        else:
            c = x - x.mean(-1, keepdims=True)
            y = c / np.sqrt((c * c).mean(-1, keepdims=True) + eps)
        y = y * self.w[f"{prefix}.weight"]
        if f"{prefix}.bias" in self.w:
            y = y + self.w[f"{prefix}.bias"]
        return y

    def linear(self, prefix: str, x: np.ndarray) -> np.ndarray:
        y = x @ self.w[f"{prefix}.weight"]  # Kiln stores [d_in, d_out]
        if f"{prefix}.bias" in self.w:
            y = y + self.w[f"{prefix}.bias"]
        return y

    def rope(self, x: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """x [B, H, T, hd]; positions [T]."""
        pos = self.spec["position"]
        hd = x.shape[-1]
        inv = pos["theta"] ** (-2.0 * np.arange(hd // 2) / hd)
        ang = positions[:, None].astype(np.float64) * inv[None, :]  # [T, half]
        cos, sin = np.cos(ang), np.sin(ang)
        if pos["pairing"] == "interleaved":
            x0, x1 = x[..., 0::2], x[..., 1::2]
            out = np.empty_like(x)
            out[..., 0::2] = x0 * cos - x1 * sin
            out[..., 1::2] = x0 * sin + x1 * cos
            return out
        x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)

    def forward(self, ids: np.ndarray) -> np.ndarray:
        s = self.spec
        b, t = ids.shape
        h, kvh, d = s["n_heads"], s["n_kv_heads"], s["d_model"]
        hd = d // h
        positions = np.arange(t)
        x = self.w["tok_emb.weight"][ids]
        if s["position"]["type"] == "learned":
            x = x + self.w["pos_emb.weight"][positions][None]
        causal = np.triu(np.ones((t, t), dtype=bool), k=1)
        for i in range(s["n_layers"]):
            p = f"blocks.{i}"
            qkv = self.linear(f"{p}.attn.qkv", self.norm(f"{p}.norm1", x))
            q = qkv[..., : h * hd].reshape(b, t, h, hd).transpose(0, 2, 1, 3)
            k = qkv[..., h * hd : (h + kvh) * hd].reshape(b, t, kvh, hd).transpose(0, 2, 1, 3)
            v = qkv[..., (h + kvh) * hd :].reshape(b, t, kvh, hd).transpose(0, 2, 1, 3)
            if s["position"]["type"] == "rope":
                q, k = self.rope(q, positions), self.rope(k, positions)
            k = np.repeat(k, h // kvh, axis=1)  # query head j uses kv head j // (h / kvh)
            v = np.repeat(v, h // kvh, axis=1)
            att = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd)
            att = np.where(causal, -np.inf, att)
            att = np.exp(att - att.max(-1, keepdims=True))
            att = att / att.sum(-1, keepdims=True)
            y = (att @ v).transpose(0, 2, 1, 3).reshape(b, t, h * hd)
            x = x + self.linear(f"{p}.attn.proj", y)
            hn = self.norm(f"{p}.norm2", x)
            if s["mlp"] == "swi_glu":
                g = self.linear(f"{p}.mlp.gate", hn)
                m = g / (1.0 + np.exp(-g)) * self.linear(f"{p}.mlp.up", hn)
            elif s["mlp"] == "gelu_tanh":
                u = self.linear(f"{p}.mlp.up", hn)
                m = 0.5 * u * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (u + 0.044715 * u**3)))
            else:
                from math import erf

                u = self.linear(f"{p}.mlp.up", hn)
                m = 0.5 * u * (1.0 + np.vectorize(erf)(u / np.sqrt(2.0)))
            x = x + self.linear(f"{p}.mlp.down", m)
        x = self.norm("norm_f", x)
        head = self.w["tok_emb.weight"].T if s["tied_embeddings"] else self.w["lm_head.weight"]
        return x @ head


# --- onnxruntime ---------------------------------------------------------------------------------


class Runner:
    """An onnxruntime session over a Kiln export, with or without the KV cache."""

    def __init__(self, path: Path, threads: int):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.past = sorted(
            (n for n in self.inputs if n.startswith("past_key_values.")),
            key=lambda n: (int(n.split(".")[1]), n.split(".")[2]),
        )
        self.kv = bool(self.past)

    def empty_past(self, batch: int) -> dict:
        out = {}
        for name in self.past:
            _, kvh, _, hd = self.inputs[name].shape
            out[name] = np.zeros((batch, kvh, 0, hd), dtype=np.float32)
        return out

    def run(self, ids, past=None, mask=None, positions=None):
        """Logits [B, T, V] and the present cache (as the next step's past), if any."""
        ids = np.asarray(ids, dtype=np.int64)
        b, t = ids.shape
        feed = {"input_ids": ids}
        if self.kv:
            past = past if past is not None else self.empty_past(b)
            p = next(iter(past.values())).shape[2]
            feed["attention_mask"] = (
                mask if mask is not None else np.ones((b, p + t), dtype=np.int64)
            )
            feed["position_ids"] = (
                positions
                if positions is not None
                else np.broadcast_to(np.arange(p, p + t, dtype=np.int64), (b, t)).copy()
            )
            feed.update(past)
        outs = dict(zip(self.outputs, self.session.run(None, feed)))
        present = {
            name: outs[name.replace("past_key_values.", "present.")] for name in self.past
        }
        return outs["logits"], present


def compare(name: str, got: np.ndarray, want: np.ndarray, tol: float) -> bool:
    err = np.abs(got.astype(np.float64) - want.astype(np.float64))
    scale = np.abs(want).max()
    ok = bool(err.max() <= tol)
    print(
        f"{'ok  ' if ok else 'FAIL'} {name}: max |Δ| {err.max():.3e} (tolerance {tol:g}), "
        f"max |Δ| / max |ref| {err.max() / max(scale, 1e-30):.3e}, mean |Δ| {err.mean():.3e}, "
        f"max |ref| {scale:.3g}"
    )
    return ok


def greedy_check(runner: Runner, prompt: np.ndarray, steps: int, tol: float, want_ids) -> bool:
    """Greedy decoding through present/past against full reruns (and a reference, if given)."""
    ok = True
    seq = list(prompt)
    logits, past = runner.run(np.array([seq]))
    cached, worst = [], 0.0
    full_ids = []
    for step in range(steps):
        # Full rerun of the whole sequence, no cache reuse.
        full_logits, _ = runner.run(np.array([seq]))
        full_next = int(full_logits[0, -1].argmax())
        full_ids.append(full_next)
        worst = max(worst, float(np.abs(full_logits[0, -1] - logits[0, -1]).max()))
        nxt = int(logits[0, -1].argmax())
        cached.append(nxt)
        seq.append(nxt)
        if step + 1 < steps:
            logits, past = runner.run(np.array([[nxt]]), past=past)
    same = cached == full_ids
    ok &= same and worst <= tol
    print(
        f"{'ok  ' if same and worst <= tol else 'FAIL'} KV-cache greedy decoding, {steps} steps: "
        f"{'same tokens' if same else 'DIFFERENT tokens'} as full reruns; max |Δ logits| {worst:.3e}"
    )
    print(f"     tokens: {cached}")
    if not same:
        print(f"     full:   {full_ids}")
    if want_ids is not None:
        want = [int(i) for i in want_ids]
        match = cached[: len(want)] == want
        ok &= match
        print(f"{'ok  ' if match else 'FAIL'} greedy tokens equal the reference's {want}")
    return ok


def padded_batch_check(runner: Runner, prompt: np.ndarray, tol: float) -> bool:
    """Row 0 = prompt, row 1 = its tail left-padded; then one decode step for both."""
    t = len(prompt)
    cut = max(1, t // 3)
    ids = np.stack([prompt, np.concatenate([np.zeros(cut, np.int64), prompt[cut:]])])
    mask = np.ones((2, t), dtype=np.int64)
    mask[1, :cut] = 0
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)  # Optimum's position_ids
    logits, past = runner.run(ids, mask=mask, positions=positions)
    full0, _ = runner.run(prompt[None])
    full1, _ = runner.run(prompt[None, cut:])
    ok = compare("left-padded batch, row 0", logits[0], full0[0], tol)
    ok &= compare("left-padded batch, row 1 (real tokens)", logits[1, cut:], full1[0], tol)
    nxt = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
    mask2 = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
    pos2 = positions[:, -1:] + 1
    step, _ = runner.run(nxt, past=past, mask=mask2, positions=pos2)
    ref0, _ = runner.run(np.concatenate([prompt, nxt[0]])[None])
    ref1, _ = runner.run(np.concatenate([prompt[cut:], nxt[1]])[None])
    ok &= compare("left-padded batch, decode step", step[:, 0], np.stack([ref0[0, -1], ref1[0, -1]]), tol)
    return ok


def cpu_name() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def bench(runner: Runner, args) -> None:
    if not runner.kv:
        sys.exit("--bench needs a model exported with the KV cache")
    vocab = runner.session.get_outputs()[0].shape[2]
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, vocab, size=(1, args.prompt), dtype=np.int64)
    runner.run(prompt)  # warm-up
    prefill = []
    cpu_start = time.process_time()
    for _ in range(args.repeats):
        start = time.perf_counter()
        logits, past = runner.run(prompt)
        prefill.append(time.perf_counter() - start)
    prefill_cpu = (time.process_time() - cpu_start) / args.repeats
    decode = []
    nxt = logits[:, -1:].argmax(-1).astype(np.int64)
    cpu_start = time.process_time()
    for _ in range(args.decode):
        start = time.perf_counter()
        logits, past = runner.run(nxt, past=past)
        decode.append(time.perf_counter() - start)
        nxt = logits[:, -1:].argmax(-1).astype(np.int64)
    cpu = (time.process_time() - cpu_start) / args.decode
    p, d = statistics.median(prefill), statistics.median(decode)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"onnxruntime {ort.__version__}, {args.threads} threads, {cpu_name()} "
        f"({os.cpu_count()} CPUs, load average {load} after the run):\n"
        f"  prefill {args.prompt} tokens: {p * 1e3:.1f} ms median of {args.repeats} "
        f"({args.prompt / p:.0f} tokens/s); CPU time {prefill_cpu * 1e3:.0f} ms\n"
        f"  decode with KV cache ({args.decode} tokens after the prompt): {d * 1e3:.2f} ms/token "
        f"median ({1 / d:.1f} tokens/s; mean {statistics.mean(decode) * 1e3:.2f} ms); "
        f"CPU time {cpu * 1e3:.1f} ms/token\n"
        f"  (CPU time summed over threads: on a busy machine wall time / CPU time shows the share "
        f"of the {args.threads} threads the process got)"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("--reference", type=Path, help=".npz or .json: input_ids, logits[, greedy_ids]")
    ap.add_argument("--numpy-model", type=Path, help="onnx_random's output directory")
    ap.add_argument("--save-reference", type=Path, help="write the NumPy reference as .npz")
    ap.add_argument("--golden", type=Path, help="llama_gguf_ref.py's --json output")
    ap.add_argument("--kv-cache", action="store_true", help="require past/present inputs and outputs")
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--steps", type=int, default=16, help="greedy decoding steps")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bench", action="store_true")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    onnx.checker.check_model(str(args.model), full_check=True)
    meta = {p.key: p.value for p in onnx.load(str(args.model), load_external_data=False).metadata_props}
    print(f"ok   onnx.checker.check_model(full_check=True) {args.model} {meta}")
    runner = Runner(args.model, args.threads)
    if args.kv_cache and not runner.kv:
        print("FAIL --kv-cache given but the model has no past_key_values inputs")
        return 1
    if args.bench:
        bench(runner, args)
        return 0

    greedy = None
    if args.reference and args.reference.suffix == ".json":
        # Kiln's own logits (tests/kiln/export.rs): {"input_ids": [[..]], "logits": [..flat..],
        # "greedy_ids": [..]}.
        ref = json.loads(args.reference.read_text())
        ids = np.array(ref["input_ids"], dtype=np.int64)
        want = np.array(ref["logits"], dtype=np.float32).reshape(*ids.shape, -1)
        greedy = np.array(ref["greedy_ids"]) if "greedy_ids" in ref else None
    elif args.reference:
        ref = np.load(args.reference)
        ids, want = ref["input_ids"].astype(np.int64), ref["logits"]
        greedy = ref["greedy_ids"] if "greedy_ids" in ref else None
    elif args.numpy_model:
        model = NumpyModel(args.numpy_model)
        vocab = model.spec["vocab_size"]
        ids = np.random.default_rng(1).integers(0, vocab, size=(2, 11), dtype=np.int64)
        want = model.forward(ids)
        seq = list(ids[0])
        greedy = []
        for _ in range(args.steps):
            greedy.append(int(model.forward(np.array([seq]))[0, -1].argmax()))
            seq.append(greedy[-1])
        if args.save_reference:
            np.savez(args.save_reference, input_ids=ids, logits=want.astype(np.float32), greedy_ids=np.array(greedy))
    elif args.golden:
        golden = json.loads(args.golden.read_text())
        ids = np.array([golden["prompt_ids"]], dtype=np.int64)
        greedy = golden["greedy_ids"]
        want = None
    else:
        ap.error("give --reference, --numpy-model or --golden (or --bench)")

    logits, _ = runner.run(ids)
    if want is None:
        top = golden["top5_per_position"]
        got = np.array([[logits[0, t, i] for i, _ in row] for t, row in enumerate(top)])
        ref = np.array([[v for _, v in row] for row in top])
        ok = compare(f"logits at the golden top-5 ids of {len(top)} positions", got, ref, args.tol)
        top1 = [int(r[0][0]) for r in top] == [int(x) for x in logits[0].argmax(-1)]
        ok &= top1
        print(f"{'ok  ' if top1 else 'FAIL'} argmax at every prompt position equals the golden top-1")
    else:
        ok = compare(f"logits {tuple(logits.shape)} against the reference", logits, want, args.tol)
    if runner.kv:
        steps = len(greedy) if args.golden else args.steps
        ok &= greedy_check(runner, ids[0], steps, args.tol, greedy)
        ok &= padded_batch_check(runner, ids[0], args.tol)
    elif greedy is not None:
        # Without a cache: greedy by full reruns must still give the reference's tokens.
        seq = list(ids[0])
        for _ in range(len(greedy)):
            seq.append(int(runner.run(np.array([seq]))[0][0, -1].argmax()))
        same = seq[len(ids[0]) :] == [int(g) for g in greedy]
        ok &= same
        print(f"{'ok  ' if same else 'FAIL'} greedy tokens (full reruns) equal the reference's")
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
