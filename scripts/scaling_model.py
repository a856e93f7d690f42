#!/usr/bin/env python3
"""Data-parallel scaling model for Kiln (docs/distributed.md): expected efficiency of N ranks.

A step on N ranks takes T(N) = T_compute + T_allreduce(N) (Kiln does not yet overlap communication
with the backward pass), with a ring all-reduce of S bytes in B buckets:

    T_allreduce(N) = 2 (N - 1) / N * S / bandwidth  +  2 (N - 1) * B * latency

and efficiency E(N) = T_compute / T(N). ZeRO-1/2/3 move twice DDP's bytes on Burn 0.21 (its
all-gather and reduce-scatter are all-reduces), so their S is 2x.

    scripts/scaling_model.py --bandwidth-gbs 0.30 --latency-ms 5 --compute-s 20
"""
import argparse

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--params", type=float, default=124.4e6, help="parameters (GPT-2 124M)")
p.add_argument("--grad-bytes", type=float, default=4, help="bytes per gradient element (f32: 4)")
p.add_argument("--bandwidth-gbs", type=float, required=True, help="achieved all-reduce bus bandwidth per rank, GB/s")
p.add_argument("--latency-ms", type=float, required=True, help="latency of one ring step, ms")
p.add_argument("--bucket-mb", type=float, default=25.0, help="all-reduce bucket size, MB")
p.add_argument("--compute-s", type=float, required=True, help="one rank's forward+backward+update time, s")
p.add_argument("--zero", action="store_true", help="ZeRO-1/2/3 (2x the bytes on Burn 0.21)")
p.add_argument("--ranks", type=int, nargs="+", default=[2, 8, 64, 512])
a = p.parse_args()

size = a.params * a.grad_bytes * (2 if a.zero else 1)
buckets = max(1, round(size / (a.bucket_mb * 1e6)))
print(f"S = {size / 1e6:.0f} MB in {buckets} buckets; bandwidth {a.bandwidth_gbs} GB/s, "
      f"latency {a.latency_ms} ms, compute {a.compute_s} s")
print(f"{'ranks':>6} {'bandwidth s':>12} {'latency s':>10} {'step s':>8} {'efficiency':>10}")
for n in a.ranks:
    bw = 2 * (n - 1) / n * size / (a.bandwidth_gbs * 1e9)
    lat = 2 * (n - 1) * buckets * a.latency_ms / 1e3
    step = a.compute_s + bw + lat
    print(f"{n:>6} {bw:>12.3f} {lat:>10.3f} {step:>8.3f} {a.compute_s / step:>10.1%}")
