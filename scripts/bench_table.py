#!/usr/bin/env python3
"""Markdown tables from `nsa bench --json` output files (for docs/benchmarks.md).

usage: scripts/bench_table.py rows.json [more.json ...]
"""
import json
import sys


def fmt(x, spec):
    return "n/a" if x is None else format(x, spec)


def main(paths):
    rows = []
    for path in paths:
        with open(path) as f:
            rows.extend(json.load(f))
    print("| dtype | T | NSA ms | dense ms | speedup | ratio model | NSA GFLOP/s | dense GFLOP/s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['dtype']} | {r['T']} | {fmt(r['ms'], '.1f')} | {fmt(r['dense_ms'], '.1f')} | "
              f"{fmt(r['speedup'], '.2f')}x | {r['model_ratio']:.2f}x | {fmt(r['gflops'], '.1f')} | "
              f"{fmt(r['dense_gflops'], '.1f')} |")
    print()
    stages = ["pack", "cmp", "scores", "topn", "slc", "win", "combine"]
    print("| dtype | T | compress | " + " | ".join(stages) + " |")
    print("|---|---:|" + "---:|" * (len(stages) + 1))
    for r in rows:
        s = r["stage_ms"]
        print(f"| {r['dtype']} | {r['T']} | {r['compress_ms']:.1f} | " +
              " | ".join(f"{s[k]:.1f}" for k in stages) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
