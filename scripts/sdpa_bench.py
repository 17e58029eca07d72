#!/usr/bin/env python3
"""The dense baselines of the CUDA benchmark: causal torch.nn.functional.scaled_dot_product_attention
with one backend forced (FlashAttention-2, cuDNN), bf16, B = 1, timed with CUDA events (median of
--repeats after a warm-up). One JSON object per line, the same shape fields as nsa_cuda_bench.

GQA: K/V are expanded to Hq heads before timing (the expansion is not timed), so every backend
sees plain multi-head attention. A backend that refuses a shape (FlashAttention-2 needs Dk == Dv)
gets a row with "error" instead of "ms".
"""
import argparse
import json
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}


def median_ms(fn, repeats):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--lengths", default="8192,16384,32768,65536")
    ap.add_argument("--hq", type=int, default=64)
    ap.add_argument("--hkv", type=int, default=4)
    ap.add_argument("--dk", type=int, default=128)
    ap.add_argument("--dv", type=int, default=128)
    ap.add_argument("--backends", default="flash,cudnn")
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    dev = torch.device("cuda")
    for T in [int(t) for t in a.lengths.split(",")]:
        q = torch.randn(1, a.hq, T, a.dk, device=dev, dtype=torch.bfloat16)
        k = torch.randn(1, a.hkv, T, a.dk, device=dev, dtype=torch.bfloat16)
        v = torch.randn(1, a.hkv, T, a.dv, device=dev, dtype=torch.bfloat16)
        g = a.hq // a.hkv
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
        for name in a.backends.split(","):
            row = {"op": "sdpa", "backend": name, "T": T, "Hq": a.hq, "Hkv": a.hkv, "Dk": a.dk,
                   "Dv": a.dv, "dtype": "bf16", "device": torch.cuda.get_device_name()}
            print(f"sdpa_bench: {name} T = {T} ...", file=sys.stderr, flush=True)
            try:
                with sdpa_kernel([BACKENDS[name]]):
                    row["ms"] = median_ms(lambda: F.scaled_dot_product_attention(
                        q, k, v, is_causal=True), a.repeats)
            except RuntimeError as e:  # the backend refuses the shape: say so, go on
                row["error"] = str(e).splitlines()[0][:200]
            print(json.dumps(row), flush=True)
        del q, k, v
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
