#!/usr/bin/env python3
"""Generates the PyTorch model fixtures of kiln-transformer's tests with real PyTorch, nanoGPT
and Hugging Face transformers, each with the logits its own code computes.

Writes under crates/transformer/tests/data/pt/ (read by crates/transformer/tests/transformer/torch_checkpoints.rs):

  nanogpt/ckpt.pt        nanoGPT's train.py checkpoint of its own `GPT` (model.py from --nanogpt):
                         `model` (state dict of the torch.compile'd model: keys prefixed
                         `_orig_mod.`, no biases), `optimizer` (AdamW after one step), `model_args`,
                         `iter_num`, `best_val_loss` (a 0-dim tensor, as train.py stores it), `config`.
  nanogpt/meta.pkl       The character vocabulary, as nanoGPT's data/*/prepare.py pickles it.
  nanogpt/expected.json  The text, its ids through meta.pkl's `stoi`, and GPT.forward's logits.
  hf-gpt2/               GPT2LMHeadModel's config.json and its state dict in PyTorch shards as
                         transformers 4.x's save_pretrained(safe_serialization=False) wrote them
                         (torch.save of each shard's dict, tied lm_head.weight left out):
                         pytorch_model-0000k-of-0000n.bin + pytorch_model.bin.index.json; a
                         tokenizer_config.json with a chat template; expected.json.
  hf-llama/              LlamaForCausalLM (grouped-query attention) saved as sharded safetensors:
                         model-0000k-of-0000n.safetensors + model.safetensors.index.json; expected.json.
  hf-qwen2/, hf-phi3/,   Qwen2 (Q/K/V biases, tied head), Phi-3 (fused qkv_proj / gate_up_proj, a
  hf-mistral/,           12-token sliding window), Mistral (a 16-token window), Gemma (GeGLU, `1 +
  hf-gemma/              weight` norms, √d-scaled embeddings): model.safetensors, config.json,
                         expected.json.

Weights are seeded and scaled up from the initializers' tiny values so the logits are far from
uniform. Usage:
  python3 scripts/make_pt_model_fixtures.py [--nanogpt DIR]   (needs torch and transformers;
  DIR holds nanoGPT's model.py, default $NANOGPT_DIR or /tmp/nanogpt)
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parent.parent / "crates" / "transformer" / "tests" / "data" / "pt"
TEXT = "the cat sat.\nthé mat"


def perturb(model: torch.nn.Module, seed: int) -> None:
    """Every parameter drawn again: norms near 1, everything else N(0, 0.2)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "ln" in name or "norm" in name:
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(0.2 * noise)


def save_expected(path: Path, ids: list[int], logits: torch.Tensor, **extra) -> None:
    data = {"ids": ids, "vocab": int(logits.shape[-1]),
            "logits": [float(v) for v in logits.reshape(-1).tolist()], **extra}
    path.write_text(json.dumps(data))


def nanogpt(nanogpt_dir: str) -> None:
    sys.path.insert(0, nanogpt_dir)
    from model import GPT, GPTConfig  # nanoGPT's own model.py

    out = OUT / "nanogpt"
    out.mkdir(parents=True, exist_ok=True)
    chars = sorted(set(TEXT))
    stoi = {c: i for i, c in enumerate(chars)}
    itos = {i: c for i, c in enumerate(chars)}
    with open(out / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": itos, "stoi": stoi}, f)

    torch.manual_seed(1337)
    model_args = dict(n_layer=2, n_head=2, n_embd=16, block_size=32, bias=False,
                      vocab_size=len(chars), dropout=0.0)
    model = GPT(GPTConfig(**model_args))
    perturb(model, 7)
    ids = [stoi[c] for c in TEXT]
    idx = torch.tensor([ids])
    model.eval()
    with torch.no_grad():
        logits, _ = model(idx, targets=idx)  # with targets, GPT returns every position's logits

    # One AdamW step, so the checkpoint carries optimizer state as train.py's does.
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu")
    model.train()
    _, loss = model(idx, targets=idx)
    loss.backward()
    optimizer.zero_grad(set_to_none=True)  # keep the weights the logits came from
    state = {"_orig_mod." + k: v for k, v in model.state_dict().items()}
    config = {"out_dir": "out-fixture", "dataset": "fixture_chars", "batch_size": 1,
              "block_size": 32, "n_layer": 2, "n_head": 2, "n_embd": 16, "dropout": 0.0,
              "bias": False, "learning_rate": 1e-3, "max_iters": 10, "compile": True}
    torch.save({"model": state, "optimizer": optimizer.state_dict(), "model_args": model_args,
                "iter_num": 250, "best_val_loss": torch.tensor(1.4321), "config": config},
               out / "ckpt.pt")
    save_expected(out / "expected.json", ids, logits, text=TEXT)


def hf_gpt2() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    out = OUT / "hf-gpt2"
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(1)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_positions=32, n_embd=16, n_layer=2,
                                       n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    perturb(model, 11)
    model.eval()
    model.config.save_pretrained(out)
    # transformers 5 writes only safetensors; shard the state dict as 4.x did for .bin files.
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    names = list(state)
    shards = [names[: len(names) // 2], names[len(names) // 2:]]
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"pytorch_model-{i + 1:05d}-of-{len(shards):05d}.bin"
        torch.save({k: state[k].contiguous() for k in shard}, out / file)
        weight_map.update({k: file for k in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    (out / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"}))
    ids = [3, 17, 0, 39, 8, 22, 5, 5, 31]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    save_expected(out / "expected.json", ids, logits)


def hf_llama() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    out = OUT / "hf-llama"
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(2)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=48, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
        rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False))
    perturb(model, 13)
    model.eval()
    model.save_pretrained(out, safe_serialization=True, max_shard_size="20KB")
    (out / "generation_config.json").unlink(missing_ok=True)  # not read; keep the fixture small
    ids = [1, 40, 7, 7, 19, 46, 2, 30, 11, 0]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    save_expected(out / "expected.json", ids, logits)


def hf_family(name: str) -> None:
    """Qwen2 (Q/K/V biases, tied head), Phi-3 (fused qkv_proj and gate_up_proj, a sliding window),
    Mistral (a sliding window) and Gemma as transformers saves them, with its logits."""
    import transformers

    common = dict(vocab_size=48, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                  rms_norm_eps=1e-6)
    config = {
        "qwen2": lambda: transformers.Qwen2Config(**common, tie_word_embeddings=True,
                                                  rope_theta=1e6),
        "phi3": lambda: transformers.Phi3Config(**common, sliding_window=12, pad_token_id=0,
                                                bos_token_id=1, eos_token_id=2),
        "mistral": lambda: transformers.MistralConfig(**common, sliding_window=16),
        "gemma": lambda: transformers.GemmaConfig(**common, head_dim=4,
                                                  hidden_activation="gelu_pytorch_tanh"),
    }[name]()
    out = OUT / f"hf-{name}"
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(3)
    model = transformers.AutoModelForCausalLM.from_config(config)
    perturb(model, 17)
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    (out / "generation_config.json").unlink(missing_ok=True)
    ids = [1, 40, 7, 7, 19, 46, 2, 30, 11, 0]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    save_expected(out / "expected.json", ids, logits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nanogpt", default=os.environ.get("NANOGPT_DIR", "/tmp/nanogpt"),
                        help="directory holding nanoGPT's model.py")
    args = parser.parse_args()
    nanogpt(args.nanogpt)
    hf_gpt2()
    hf_llama()
    for name in ("qwen2", "phi3", "mistral", "gemma"):
        hf_family(name)
    for path in sorted(OUT.rglob("*")):
        if path.is_file():
            print(f"{path.relative_to(OUT)}: {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
