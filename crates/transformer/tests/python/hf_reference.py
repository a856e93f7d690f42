"""A Hugging Face checkpoint and its logits, from an independent numpy implementation.

    python hf_reference.py OUT_DIR gpt2|llama

Writes OUT_DIR/config.json and OUT_DIR/model.safetensors in Hugging Face's names and layouts
(GPT-2: Conv1D weights [in, out], fused c_attn; Llama: nn.Linear weights [out, in], rotate-half RoPE,
grouped-query attention, SwiGLU), and OUT_DIR/expected.json: the token ids and the logits of a
numpy forward pass written from the `transformers` modeling code's equations.
"""
import json, math, os, sys

import numpy as np
from safetensors.numpy import save_file

rng = np.random.default_rng(1234)
IDS = [3, 17, 42, 8, 99, 0, 56, 23, 71, 5]


def rand(*shape, std=0.05):
    return (rng.standard_normal(shape) * std).astype(np.float32)


def softmax(x):
    x = x - x.max(-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(-1, keepdims=True)


def causal_attention(q, k, v):
    # q: [H, T, D], k/v: [H, T, D]
    t = q.shape[1]
    s = q @ k.transpose(0, 2, 1) / math.sqrt(q.shape[-1])
    s = s + np.triu(np.full((t, t), -np.inf, dtype=np.float32), 1)
    return softmax(s) @ v


def gpt2(out):
    V, T, L, H, D = 101, 32, 2, 4, 32
    cfg = {"model_type": "gpt2", "vocab_size": V, "n_positions": T, "n_embd": D, "n_layer": L, "n_head": H,
           "layer_norm_epsilon": 1e-5, "activation_function": "gelu_new"}
    w = {"wte.weight": rand(V, D), "wpe.weight": rand(T, D), "ln_f.weight": 1 + rand(D), "ln_f.bias": rand(D)}
    for i in range(L):
        p = f"h.{i}."
        w.update({p + "ln_1.weight": 1 + rand(D), p + "ln_1.bias": rand(D),
                  p + "attn.c_attn.weight": rand(D, 3 * D), p + "attn.c_attn.bias": rand(3 * D),
                  p + "attn.c_proj.weight": rand(D, D), p + "attn.c_proj.bias": rand(D),
                  p + "ln_2.weight": 1 + rand(D), p + "ln_2.bias": rand(D),
                  p + "mlp.c_fc.weight": rand(D, 4 * D), p + "mlp.c_fc.bias": rand(4 * D),
                  p + "mlp.c_proj.weight": rand(4 * D, D), p + "mlp.c_proj.bias": rand(D)})

    def ln(x, g, b):
        m = x.mean(-1, keepdims=True)
        v = ((x - m) ** 2).mean(-1, keepdims=True)
        return (x - m) / np.sqrt(v + 1e-5) * g + b

    def gelu_new(x):
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))

    n = len(IDS)
    x = w["wte.weight"][IDS] + w["wpe.weight"][:n]
    for i in range(L):
        p = f"h.{i}."
        h = ln(x, w[p + "ln_1.weight"], w[p + "ln_1.bias"]) @ w[p + "attn.c_attn.weight"] + w[p + "attn.c_attn.bias"]
        q, k, v = (h[:, j * D:(j + 1) * D].reshape(n, H, D // H).transpose(1, 0, 2) for j in range(3))
        a = causal_attention(q, k, v).transpose(1, 0, 2).reshape(n, D)
        x = x + a @ w[p + "attn.c_proj.weight"] + w[p + "attn.c_proj.bias"]
        h = gelu_new(ln(x, w[p + "ln_2.weight"], w[p + "ln_2.bias"]) @ w[p + "mlp.c_fc.weight"] + w[p + "mlp.c_fc.bias"])
        x = x + h @ w[p + "mlp.c_proj.weight"] + w[p + "mlp.c_proj.bias"]
    logits = ln(x, w["ln_f.weight"], w["ln_f.bias"]) @ w["wte.weight"].T
    # Real GPT-2 checkpoints also carry the (tied) lm_head and attention-mask buffers: ignored.
    w["lm_head.weight"] = w["wte.weight"].copy()
    return cfg, {"transformer." + k if k != "lm_head.weight" else k: v for k, v in w.items()}, logits


def llama(out):
    V, T, L, H, KV, D, FF, theta, eps = 103, 64, 2, 6, 2, 48, 80, 10000.0, 1e-5
    hd = D // H
    cfg = {"model_type": "llama", "vocab_size": V, "max_position_embeddings": T, "hidden_size": D,
           "intermediate_size": FF, "num_hidden_layers": L, "num_attention_heads": H, "num_key_value_heads": KV,
           "rms_norm_eps": eps, "rope_theta": theta, "tie_word_embeddings": False}
    w = {"model.embed_tokens.weight": rand(V, D), "model.norm.weight": 1 + rand(D), "lm_head.weight": rand(V, D)}
    for i in range(L):
        p = f"model.layers.{i}."
        w.update({p + "input_layernorm.weight": 1 + rand(D), p + "post_attention_layernorm.weight": 1 + rand(D),
                  p + "self_attn.q_proj.weight": rand(H * hd, D), p + "self_attn.k_proj.weight": rand(KV * hd, D),
                  p + "self_attn.v_proj.weight": rand(KV * hd, D), p + "self_attn.o_proj.weight": rand(D, H * hd),
                  p + "mlp.gate_proj.weight": rand(FF, D), p + "mlp.up_proj.weight": rand(FF, D),
                  p + "mlp.down_proj.weight": rand(D, FF)})

    def rms(x, g):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * g

    n = len(IDS)
    inv = 1.0 / theta ** (np.arange(0, hd, 2) / hd)
    ang = np.outer(np.arange(n), inv)
    cos = np.concatenate([np.cos(ang)] * 2, -1)
    sin = np.concatenate([np.sin(ang)] * 2, -1)

    def rotate_half(x):
        return np.concatenate([-x[..., hd // 2:], x[..., :hd // 2]], -1)

    def rope(x):  # [heads, T, hd]
        return x * cos + rotate_half(x) * sin

    x = w["model.embed_tokens.weight"][IDS]
    for i in range(L):
        p = f"model.layers.{i}."
        h = rms(x, w[p + "input_layernorm.weight"])
        q = (h @ w[p + "self_attn.q_proj.weight"].T).reshape(n, H, hd).transpose(1, 0, 2)
        k = (h @ w[p + "self_attn.k_proj.weight"].T).reshape(n, KV, hd).transpose(1, 0, 2)
        v = (h @ w[p + "self_attn.v_proj.weight"].T).reshape(n, KV, hd).transpose(1, 0, 2)
        q, k = rope(q), rope(k)
        k, v = np.repeat(k, H // KV, 0), np.repeat(v, H // KV, 0)
        a = causal_attention(q, k, v).transpose(1, 0, 2).reshape(n, H * hd)
        x = x + a @ w[p + "self_attn.o_proj.weight"].T
        h = rms(x, w[p + "post_attention_layernorm.weight"])
        g, u = h @ w[p + "mlp.gate_proj.weight"].T, h @ w[p + "mlp.up_proj.weight"].T
        x = x + ((g / (1 + np.exp(-g))) * u) @ w[p + "mlp.down_proj.weight"].T
    logits = rms(x, w["model.norm.weight"]) @ w["lm_head.weight"].T
    return cfg, w, logits


def main():
    out, arch = sys.argv[1], sys.argv[2]
    os.makedirs(out, exist_ok=True)
    cfg, weights, logits = {"gpt2": gpt2, "llama": llama}[arch](out)
    json.dump(cfg, open(os.path.join(out, "config.json"), "w"))
    save_file({k: np.ascontiguousarray(v) for k, v in weights.items()}, os.path.join(out, "model.safetensors"))
    json.dump({"ids": IDS, "logits": logits.astype(np.float64).ravel().tolist(), "vocab": int(logits.shape[-1])},
              open(os.path.join(out, "expected.json"), "w"))


if __name__ == "__main__":
    main()
