#!/usr/bin/env python3
"""Break-even lengths: the smallest T at which NSA beats the dense baseline (docs/benchmarks.md).

For each pass (forward, forward+backward, decode of one token), runs `nsa bench --json` at
T = 256, 512, 1024, ... until NSA's time is below dense's, then bisects between the last length
it lost at and the first it won at, down to `--resolution` (relative). Every measurement is the
CLI's median of --repeats runs; the table shows the bracket and the speedups measured at its
ends, because near break-even the two times are within the machine's noise of each other.

usage: scripts/break_even.py [--nsa build/tools/nsa] [--hq 16 --hkv 1] [--dtype f32]
                             [--threads 2] [--repeats 3] [--passes fwd,fwdbwd,decode] [--json F]
Progress goes to stderr; the table to stdout.
"""
import argparse
import json
import subprocess
import sys


def measure(args, pass_, T):
    """(nsa_ms, dense_ms) of one length, from the CLI's JSON row."""
    shape = ["--hq", str(args.hq), "--hkv", str(args.hkv), "--dk", str(args.dk), "--dv",
             str(args.dv), "--threads", str(args.threads), "--repeats", str(args.repeats),
             "--lengths", str(T), "--dtype", args.dtype, "--json"]
    if pass_ == "decode":
        cmd = [args.nsa, "bench", "decode", "--batch", "1", "--steps", "20"] + shape
    else:
        cmd = [args.nsa, "bench", "--pass", pass_] + shape
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    row = json.loads(out)[0]
    print(f"  {pass_:>6} T={T:>6}: nsa {row['ms']:9.3f} ms, dense {row['dense_ms']:9.3f} ms, "
          f"speedup {row['dense_ms'] / row['ms']:.2f}x", file=sys.stderr, flush=True)
    return row["ms"], row["dense_ms"]


def break_even(args, pass_):
    """The bracket (lost_T, won_T) and the speedups measured at each end."""
    seen = {}

    def wins(T):
        seen[T] = measure(args, pass_, T)
        return seen[T][0] < seen[T][1]

    lost, T = None, args.start
    while T <= args.max_length and not wins(T):
        lost, T = T, T * 2
    if T > args.max_length:
        return {"pass": pass_, "break_even": None, "lost_at": lost,
                "note": f"dense still faster at {lost}"}
    won = T
    while lost is not None and won - lost > max(args.min_step, args.resolution * lost):
        mid = (lost + won) // 2 // args.min_step * args.min_step
        if mid <= lost or mid >= won:
            break
        if wins(mid):
            won = mid
        else:
            lost = mid
    speed = lambda t: None if t is None else seen[t][1] / seen[t][0]  # noqa: E731
    return {"pass": pass_, "break_even": won, "lost_at": lost, "speedup_at_break_even":
            speed(won), "speedup_at_lost": speed(lost)}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nsa", default="build/tools/nsa")
    p.add_argument("--hq", type=int, default=16)
    p.add_argument("--hkv", type=int, default=1)
    p.add_argument("--dk", type=int, default=192)
    p.add_argument("--dv", type=int, default=128)
    p.add_argument("--dtype", default="f32", choices=["f32", "bf16"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--passes", default="fwd,fwdbwd,decode")
    p.add_argument("--start", type=int, default=256)
    p.add_argument("--max-length", type=int, default=65536)
    p.add_argument("--resolution", type=float, default=0.125, help="bracket width / its start")
    p.add_argument("--min-step", type=int, default=64)
    p.add_argument("--json", help="write the results here too")
    args = p.parse_args()
    results = []
    for pass_ in args.passes.split(","):
        print(f"break-even: {pass_}", file=sys.stderr, flush=True)
        results.append(break_even(args, pass_))
    print(f"Hq={args.hq} Hkv={args.hkv} Dk={args.dk} Dv={args.dv} {args.dtype}, "
          f"{args.threads} threads, medians of {args.repeats}")
    print("| pass | NSA faster from T = | speedup there | dense faster at T = | speedup there |")
    print("|---|---:|---:|---:|---:|")
    fmt = lambda x: "-" if x is None else f"{x:.2f}x"  # noqa: E731
    for r in results:
        print(f"| {r['pass']} | {r['break_even'] or '> ' + str(args.max_length)} | "
              f"{fmt(r.get('speedup_at_break_even'))} | {r['lost_at'] or '-'} | "
              f"{fmt(r.get('speedup_at_lost'))} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
