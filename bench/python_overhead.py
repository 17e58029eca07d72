"""The torch op's per-call overhead over the bare C call (docs/benchmarks.md, "Python").

For each length, torch.ops.nsa.fwd runs on fixed inputs (compressed tokens given, outputs
allocated by the op each call, as in a model). The C call inside each op call is timed in C++
(nsa._core returns the seconds spent in nsa_fwd), so the overhead of one call is its wall time
minus its own C time: descriptors, the output allocations, torch's dispatcher and the Python
around them. Reported as medians, and relative to the median C time.

    .venv/bin/python bench/python_overhead.py --lengths 1024,8192 --threads 2
"""
import argparse
import json
import statistics
import time

import torch

import nsa
import nsa.ops  # noqa: F401
from nsa import _core


def measure(T, args):
    gen = torch.Generator().manual_seed(0)
    dt = {"f32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    r = lambda *s: torch.randn(*s, generator=gen).to(dt)  # noqa: E731
    cfg = nsa.Config()
    tc = cfg.cmp_len(T)
    q, k, v = r(1, T, args.hq, args.dk), r(1, T, args.hkv, args.dk), r(1, T, args.hkv, args.dv)
    kc, vc = r(1, tc, args.hkv, args.dk), r(1, tc, args.hkv, args.dv)
    g = [torch.rand(1, T, args.hq, generator=gen).to(dt) for _ in range(3)]
    c_seconds = []
    real_fwd = _core.fwd

    def recording_fwd(*a, **kw):
        c_seconds.append(real_fwd(*a, **kw))
        return c_seconds[-1]

    _core.fwd = recording_fwd
    try:
        walls = []
        for i in range(args.warmup + args.repeats):
            start = time.perf_counter()
            torch.ops.nsa.fwd(q, k, v, None, None, None, None, kc, vc, *g, None, None,
                              cfg.ints(), 0.0, args.save)
            walls.append(time.perf_counter() - start)
    finally:
        _core.fwd = real_fwd
    walls, cs = walls[args.warmup:], c_seconds[args.warmup:]
    over = [w - c for w, c in zip(walls, cs)]
    c_med = statistics.median(cs)
    return {"T": T, "c_ms": c_med * 1e3, "op_ms": statistics.median(walls) * 1e3,
            "overhead_us": statistics.median(over) * 1e6,
            "overhead_pct": 100 * statistics.median(over) / c_med}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="1024,8192")
    p.add_argument("--hq", type=int, default=16)
    p.add_argument("--hkv", type=int, default=1)
    p.add_argument("--dk", type=int, default=192)
    p.add_argument("--dv", type=int, default=128)
    p.add_argument("--dtype", choices=["f32", "bf16"], default="bf16")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=21)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--save", action="store_true", help="also write the branch outputs (training)")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = [measure(int(t), args) for t in args.lengths.split(",")]
    print(f"nsa {nsa.__version__}, torch {torch.__version__}, {args.threads} threads, "
          f"Hq={args.hq} Hkv={args.hkv} Dk={args.dk} Dv={args.dv} {args.dtype}, "
          f"save={args.save}, medians of {args.repeats}")
    print(f"{'T':>6} {'C call ms':>10} {'op ms':>10} {'overhead us':>12} {'overhead %':>11}")
    for r in rows:
        print(f"{r['T']:>6} {r['c_ms']:>10.3f} {r['op_ms']:>10.3f} {r['overhead_us']:>12.1f} "
              f"{r['overhead_pct']:>10.2f}%")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
