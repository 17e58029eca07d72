#!/usr/bin/env python3
"""Plots for docs/benchmarks.md from `nsa bench --json` rows (matplotlib; in .venv).

    build/tools/nsa bench --lengths 4096,8192,16384,32768 --repeats 1 --json > fwd.json
    build/tools/nsa bench --pass bwd --lengths 4096,8192,16384,32768 --repeats 1 --json > bwd.json
    build/tools/nsa bench decode --lengths 4096,8192,16384,32768,65536 --batch 1 --json > dec.json
    .venv/bin/python scripts/plot_bench.py --fwd fwd.json --bwd bwd.json --decode dec.json \\
        --out docs/img --title "2-core AMD EPYC, f32, 2 threads"

Writes speedup.png (NSA against the dense baseline, per pass, with the paper's ratio model
drawn in: the keys dense attention reads over the keys NSA reads) and stages.png (where the
forward's and the backward's time goes, per T).
"""
import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

FWD_STAGES = ["compress", "pack", "cmp", "scores", "topn", "slc", "win", "combine"]
BWD_STAGES = ["compress_bwd_ms", "cmp_ms", "slc_ms", "win_ms"]


def load(path):
    if not path:
        return []
    with open(path) as f:
        return json.load(f)


def speedup_plot(panels, title, out):
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, (name, rows) in zip(axes[0], panels):
        rows = sorted(rows, key=lambda r: r["T"])
        for dtype in sorted({r["dtype"] for r in rows}):
            mine = [r for r in rows if r["dtype"] == dtype]
            ax.plot([r["T"] for r in mine], [r["dense_ms"] / r["ms"] for r in mine], "o-",
                    label=f"measured, {dtype}")
        model = {r["T"]: r["model_ratio"] for r in rows}
        ax.plot(sorted(model), [model[t] for t in sorted(model)], "--", color="gray",
                label="ratio model")
        ax.axhline(1.0, color="black", linewidth=0.6)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("T (tokens)")
        ax.set_ylabel("speedup over dense")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def stacked(ax, rows, names, values, title):
    rows = sorted(rows, key=lambda r: r["T"])
    labels = [str(r["T"]) for r in rows]
    bottom = [0.0] * len(rows)
    for name in names:
        frac = []
        for r, b in zip(rows, bottom):
            total = sum(values(r, n) for n in names)
            frac.append(values(r, name) / total if total else 0.0)
        ax.bar(labels, frac, bottom=bottom, label=name)
        bottom = [b + f for b, f in zip(bottom, frac)]
    ax.set_ylabel("share of the time")
    ax.set_xlabel("T (tokens)")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))


def stages_plot(fwd, bwd, title, out):
    panels = [p for p in (("forward", fwd), ("backward", bwd)) if p[1]]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.6), squeeze=False)
    for ax, (name, rows) in zip(axes[0], panels):
        if name == "forward":
            stacked(ax, rows, FWD_STAGES,
                    lambda r, n: r["compress_ms"] if n == "compress" else r["stage_ms"][n],
                    "forward: where the time goes")
        else:
            stacked(ax, rows, BWD_STAGES, lambda r, n: r.get(n) or 0.0,
                    "backward: where the time goes")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fwd")
    p.add_argument("--bwd")
    p.add_argument("--decode")
    p.add_argument("--out", default="docs/img")
    p.add_argument("--title", default="")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    fwd, bwd, dec = load(args.fwd), load(args.bwd), load(args.decode)
    panels = [(n, r) for n, r in (("forward", fwd), ("backward", bwd), ("decode", dec)) if r]
    speedup_plot(panels, args.title, os.path.join(args.out, "speedup.png"))
    stages_plot(fwd, bwd, args.title, os.path.join(args.out, "stages.png"))
    print(f"wrote {args.out}/speedup.png and {args.out}/stages.png")


if __name__ == "__main__":
    main()
