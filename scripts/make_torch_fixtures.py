#!/usr/bin/env python3
"""Generates the PyTorch checkpoint fixtures of kiln-gguf's `torch` module with real torch.

Writes under crates/gguf/tests/fixtures/torch/ (read by crates/gguf/tests/torch_fixtures.rs):

  nanogpt/ckpt.pt           nanoGPT's train.py checkpoint dict for a tiny GPT: `model` (the
                            state dict of the torch.compile'd model, keys prefixed `_orig_mod.`,
                            wte/lm_head tied), `optimizer` (AdamW with nanoGPT's two parameter
                            groups, state after one step), `model_args`, `iter_num`,
                            `best_val_loss` (a 0-dim tensor, as nanoGPT stores it), `config`.
  gpt2/pytorch_model.bin    A Hugging Face GPT-2-style state dict (Conv1D weights, `attn.bias`
                            bool mask buffer, `attn.masked_bias`), lm_head tied to wte (one
                            storage), plus views into shared storages: a transpose
                            (non-contiguous), a row slice (storage offset) and a strided slice.
  dtypes.pt                 One tensor per dtype (F32 F16 BF16 F64 I64 I32 I16 I8 U8 BOOL), a
                            0-dim and an empty tensor, an nn.Parameter, special floats, and the
                            scalar/container values a checkpoint holds (int keys, nested lists
                            and tuples, big ints, unicode, bytes).
  legacy.pt                 The pre-1.6 non-zip format (`_use_new_zipfile_serialization=False`)
                            with a shared storage and views.
  protocol4.pt              A zip checkpoint pickled with protocol 4 (FRAME, SHORT_BINUNICODE,
                            MEMOIZE, STACK_GLOBAL), which torch's weights_only loader refuses.
  expected.json             For each file, the summary of what `torch.load` returns
                            (scripts/check_torch_export.py's encoding: dtype, shape, stride,
                            storage offset, storage identity, values or head/sum/abs-sum per
                            tensor; every scalar and container).

Seeded; reruns give the same values (the zip bytes differ: torch writes a serialization id).
Usage: python3 scripts/make_torch_fixtures.py   (needs `pip install torch`)
"""

from __future__ import annotations

import collections
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from check_torch_export import summarize  # noqa: E402

OUT = Path(__file__).resolve().parent.parent / "crates" / "gguf" / "tests" / "fixtures" / "torch"


# --- nanoGPT (model.py / train.py, cut down to what shapes the checkpoint) -------------------


class LayerNorm(nn.Module):
    def __init__(self, ndim: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self, c: dict) -> None:
        super().__init__()
        self.c_attn = nn.Linear(c["n_embd"], 3 * c["n_embd"], bias=c["bias"])
        self.c_proj = nn.Linear(c["n_embd"], c["n_embd"], bias=c["bias"])
        self.n_head = c["n_head"]

    def forward(self, x):
        b, t, e = x.shape
        q, k, v = self.c_attn(x).split(e, dim=2)
        q, k, v = (z.view(b, t, self.n_head, e // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(b, t, e))


class MLP(nn.Module):
    def __init__(self, c: dict) -> None:
        super().__init__()
        self.c_fc = nn.Linear(c["n_embd"], 4 * c["n_embd"], bias=c["bias"])
        self.c_proj = nn.Linear(4 * c["n_embd"], c["n_embd"], bias=c["bias"])

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, c: dict) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(c["n_embd"], c["bias"])
        self.attn = CausalSelfAttention(c)
        self.ln_2 = LayerNorm(c["n_embd"], c["bias"])
        self.mlp = MLP(c)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, c: dict) -> None:
        super().__init__()
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(c["vocab_size"], c["n_embd"]),
                wpe=nn.Embedding(c["block_size"], c["n_embd"]),
                drop=nn.Dropout(c["dropout"]),
                h=nn.ModuleList([Block(c) for _ in range(c["n_layer"])]),
                ln_f=LayerNorm(c["n_embd"], c["bias"]),
            )
        )
        self.lm_head = nn.Linear(c["n_embd"], c["vocab_size"], bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying, as nanoGPT does

    def forward(self, idx):
        pos = torch.arange(idx.shape[1])
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))

    def configure_optimizers(self, weight_decay, learning_rate, betas):
        params = {n: p for n, p in self.named_parameters() if p.requires_grad}
        groups = [
            {"params": [p for p in params.values() if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params.values() if p.dim() < 2], "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas)


def nanogpt_checkpoint() -> dict:
    torch.manual_seed(1337)
    config = {
        "out_dir": "out-tiny", "eval_interval": 250, "log_interval": 10, "eval_iters": 20,
        "eval_only": False, "always_save_checkpoint": True, "init_from": "scratch",
        "wandb_log": False, "wandb_project": "owt", "wandb_run_name": "gpt2",
        "dataset": "shakespeare_char", "gradient_accumulation_steps": 1, "batch_size": 2,
        "block_size": 8, "n_layer": 1, "n_head": 2, "n_embd": 8, "dropout": 0.0, "bias": True,
        "learning_rate": 1e-3, "max_iters": 5000, "weight_decay": 0.1, "beta1": 0.9,
        "beta2": 0.99, "grad_clip": 1.0, "decay_lr": True, "warmup_iters": 100,
        "lr_decay_iters": 5000, "min_lr": 1e-4, "backend": "nccl", "device": "cpu",
        "dtype": "float32", "compile": True,
    }
    model_args = dict(
        n_layer=config["n_layer"], n_head=config["n_head"], n_embd=config["n_embd"],
        block_size=config["block_size"], bias=config["bias"], vocab_size=None,
        dropout=config["dropout"],
    )
    model_args["vocab_size"] = 16
    model = GPT(model_args)
    optimizer = model.configure_optimizers(
        config["weight_decay"], config["learning_rate"], (config["beta1"], config["beta2"])
    )
    x = torch.randint(0, model_args["vocab_size"], (config["batch_size"], config["block_size"]))
    logits = model(x)
    loss = F.cross_entropy(logits.view(-1, logits.size(-1)), x.roll(-1, 1).view(-1))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    # train.py compiles the model and saves the compiled module's state dict: `_orig_mod.` keys.
    compiled = torch.compile(model)
    state = compiled.state_dict()
    assert all(k.startswith("_orig_mod.") for k in state), list(state)[:3]
    return {
        "model": state,
        "optimizer": optimizer.state_dict(),
        "model_args": model_args,
        "iter_num": 250,
        "best_val_loss": loss.detach().clone(),
        "config": config,
    }


# --- Hugging Face GPT-2 -------------------------------------------------------------------------


class Conv1D(nn.Module):
    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.02)
        self.bias = nn.Parameter(torch.randn(nf) * 0.02)


class HFAttention(nn.Module):
    def __init__(self, n_embd: int, n_ctx: int) -> None:
        super().__init__()
        mask = torch.tril(torch.ones((n_ctx, n_ctx), dtype=torch.bool)).view(1, 1, n_ctx, n_ctx)
        self.register_buffer("bias", mask)
        self.register_buffer("masked_bias", torch.tensor(-1e4))
        self.c_attn = Conv1D(3 * n_embd, n_embd)
        self.c_proj = Conv1D(n_embd, n_embd)


class HFMLP(nn.Module):
    def __init__(self, n_embd: int) -> None:
        super().__init__()
        self.c_fc = Conv1D(4 * n_embd, n_embd)
        self.c_proj = Conv1D(n_embd, 4 * n_embd)


class HFBlock(nn.Module):
    def __init__(self, n_embd: int, n_ctx: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = HFAttention(n_embd, n_ctx)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = HFMLP(n_embd)


class HFTransformer(nn.Module):
    def __init__(self, vocab: int, n_embd: int, n_ctx: int, n_layer: int) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, n_embd)
        self.wpe = nn.Embedding(n_ctx, n_embd)
        self.h = nn.ModuleList([HFBlock(n_embd, n_ctx) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd)


class GPT2LMHeadModel(nn.Module):
    def __init__(self, vocab: int = 16, n_embd: int = 8, n_ctx: int = 8, n_layer: int = 2):
        super().__init__()
        self.transformer = HFTransformer(vocab, n_embd, n_ctx, n_layer)
        self.lm_head = nn.Linear(n_embd, vocab, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tie_weights()


def gpt2_state_dict() -> collections.OrderedDict:
    torch.manual_seed(2)
    state = GPT2LMHeadModel().state_dict()  # an OrderedDict with `_metadata`: pickled via BUILD
    wte, wpe = state["transformer.wte.weight"], state["transformer.wpe.weight"]
    assert wte.untyped_storage().data_ptr() == state["lm_head.weight"].untyped_storage().data_ptr()
    state["extra.wte_t"] = wte.t()  # non-contiguous view of the shared storage
    state["extra.wpe_rows"] = wpe[2:5]  # storage offset 16
    state["extra.wpe_strided"] = wpe[1:, ::3]  # offset and strides (8, 3)
    return state


# --- dtypes and plain values --------------------------------------------------------------------


def dtypes_dict() -> dict:
    g = torch.Generator().manual_seed(3)
    f = torch.randn(2, 3, generator=g)
    return {
        "f32": f,
        "f16": torch.randn(2, 3, generator=g).half(),
        "bf16": torch.randn(2, 3, generator=g).bfloat16(),
        "f64": torch.randn(3, generator=g).double(),
        "i64": torch.tensor([-(2**40), -1, 0, 1, 2**62]),
        "i32": torch.tensor([-(2**31), -1, 0, 7, 2**31 - 1], dtype=torch.int32),
        "i16": torch.tensor([-(2**15), -1, 0, 2**15 - 1], dtype=torch.int16),
        "i8": torch.tensor([-128, -1, 0, 127], dtype=torch.int8),
        "u8": torch.tensor([0, 1, 128, 255], dtype=torch.uint8),
        "bool": torch.tensor([[True, False], [False, True]]),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 3),
        "big": torch.arange(100, dtype=torch.float32).reshape(10, 10) / 7,
        "specials": torch.tensor([float("inf"), -float("inf"), float("nan"), -0.0, 1e-45]),
        "f16_t": torch.randn(3, 2, generator=g).half().t(),
        "param": nn.Parameter(torch.randn(2, 2, generator=g)),
        "int_keys": {0: "zero", 1: [1, 2.5, None], -5: (True, False)},
        "nested": [[1, [2, [3]]], (), (1,), (1, 2), (1, 2, 3), (1, 2, 3, 4), {"a": {}}, []],
        "unicode": "h\u00e9llo \u2713 \U0001d11e",
        "ints": [0, 255, 256, 65535, 65536, -1, 2**31 - 1, -(2**31), 2**31, 2**40, -(2**40),
                 2**63 - 1, -(2**63)],
        "floats": [0.0, -0.0, 1.5, 1e300, -1e-300, math.pi],
        "bytes": b"\x00\x01\xfe\xff",
    }


def legacy_dict() -> dict:
    g = torch.Generator().manual_seed(4)
    w = torch.randn(4, 3, generator=g)
    return {
        "w": w,
        "w_t": w.t(),
        "row": w[1],
        "ids": torch.tensor([3, 1, 2], dtype=torch.int64),
        "half": torch.randn(5, generator=g).half(),
        "meta": {"step": 7, "name": "legacy"},
    }


def protocol4_dict() -> dict:
    g = torch.Generator().manual_seed(5)
    w = torch.randn(3, 2, generator=g)
    return collections.OrderedDict(
        [("w", w), ("w_again", w), ("b", torch.tensor([1, 2], dtype=torch.int32)),
         ("cfg", {"lr": 0.5, "tags": ["a", "b"], "ok": True})]
    )


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "nanogpt").mkdir(exist_ok=True)
    (OUT / "gpt2").mkdir(exist_ok=True)
    files = {
        "nanogpt/ckpt.pt": (nanogpt_checkpoint(), {}),
        "gpt2/pytorch_model.bin": (gpt2_state_dict(), {}),
        "dtypes.pt": (dtypes_dict(), {}),
        "legacy.pt": (legacy_dict(), {"_use_new_zipfile_serialization": False}),
        "protocol4.pt": (protocol4_dict(), {"pickle_protocol": 4}),
    }
    expected = {"torch_version": torch.__version__, "files": {}}
    for name, (obj, kwargs) in files.items():
        path = OUT / name
        torch.save(obj, path, **kwargs)
        weights_only = name != "protocol4.pt"  # torch's weights_only unpickler lacks protocol 4
        loaded = torch.load(path, weights_only=weights_only)
        expected["files"][name] = {
            "format": "legacy" if "_use_new_zipfile_serialization" in kwargs else "zip",
            "weights_only": weights_only,
            "summary": summarize(loaded),
        }
        print(f"{name}: {path.stat().st_size} bytes")
    text = json.dumps(expected, sort_keys=True, separators=(",", ":"))
    (OUT / "expected.json").write_text(text + "\n")
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"total {total} bytes under {OUT}")
    assert total < 200_000, "fixtures must stay under 200 KB"
    return 0


if __name__ == "__main__":
    sys.exit(main())
