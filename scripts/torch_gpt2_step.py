"""The PyTorch peer of scripts/gpu_train.sh: one GPT-2 124M training step (bf16 autocast, SDPA causal
attention, fused AdamW, tied embeddings, random tokens), timed after warm-up. Prints tokens/s and MFU
with Kiln's FLOP count (6·N + 6·L·C·T per token, N = all parameters).

    python3 scripts/torch_gpt2_step.py [--batch 16] [--steps 30] [--peak-tflops 989] [--small]
"""
import argparse
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.down(F.gelu(self.up(self.ln2(x)), approximate="tanh"))


class Gpt(nn.Module):
    def __init__(self, vocab, ctx, layers, d, heads):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(ctx, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)

    def forward(self, idx, targets):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        logits = self.ln_f(x) @ self.tok.weight.T
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.view(-1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--small", action="store_true", help="a 2-layer model on the CPU (a smoke test)")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    vocab, ctx, layers, d, heads = (50257, 1024, 12, 768, 12) if not args.small else (512, 64, 2, 64, 4)
    torch.manual_seed(0)
    model = Gpt(vocab, ctx, layers, d, heads).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=6e-4, fused=device == "cuda")
    n_params = sum(p.numel() for p in model.parameters())
    flops_per_token = 6 * n_params + 6 * layers * d * ctx
    x = torch.randint(vocab, (args.batch, ctx), device=device)
    y = torch.randint(vocab, (args.batch, ctx), device=device)
    times = []
    for step in range(args.steps):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if step >= 5:
            times.append(time.perf_counter() - start)
    step_s = sorted(times)[len(times) // 2]
    tps = args.batch * ctx / step_s
    mfu = tps * flops_per_token / (args.peak_tflops * 1e12)
    print(f"pytorch {torch.__version__} gpt2 bf16 on {device}: {step_s * 1e3:.1f} ms/step, "
          f"{tps:.0f} tokens/s, MFU {100 * mfu:.1f}% of {args.peak_tflops:g} TFLOP/s "
          f"(loss {loss.item():.3f}, {n_params / 1e6:.1f}M parameters)")


if __name__ == "__main__":
    main()
