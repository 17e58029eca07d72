"""docs/training.md's plots (PNG) and tables (Markdown, printed) from the runs' logs."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .model import ATTENTIONS  # noqa: E402

COLORS = {"nsa": "tab:red", "full": "tab:blue", "window": "tab:green"}


def _log(run: Path) -> list:
    f = run / "log.jsonl"
    return [json.loads(s) for s in f.read_text().splitlines()] if f.exists() else []


def _smooth(xs: list, k: int = 10) -> list:
    return [sum(xs[max(0, i - k + 1):i + 1]) / len(xs[max(0, i - k + 1):i + 1])
            for i in range(len(xs))]


def loss_plot(runs: Path, task: str, img: Path) -> str:
    fig, ax = plt.subplots(figsize=(7, 4))
    rows = ["| twin | steps | last train loss (mean of 10) | validation loss | wall time |",
            "|---|---|---|---|---|"]
    for attn in ATTENTIONS:
        log = _log(runs / f"{task}-{attn}")
        if not log:
            continue
        steps = [e["step"] for e in log]
        ax.plot(steps, _smooth([e["loss"] for e in log]), color=COLORS[attn], alpha=0.8,
                label=f"{attn} train (mean of 10)")
        val = [(e["step"], e["val_loss"]) for e in log if "val_loss" in e]
        if val:
            ax.plot(*zip(*val), "o--", color=COLORS[attn], label=f"{attn} validation")
        full = log[-1].get("val_loss_full")
        final = "" if full is None else f"{full:.4f}"
        rows.append(f"| {attn} | {steps[-1]} | {sum(e['loss'] for e in log[-10:]) / 10:.4f} | "
                    f"{final} | {log[-1]['elapsed_s'] / 60:.1f} min |")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per byte)")
    ax.set_title(f"{task}: NSA against its twins")
    ax.grid(alpha=0.3)
    ax.legend()
    lo = min(l.get_ydata().min() for l in ax.get_lines())
    ax.set_ylim(lo - 0.1, lo + 2.0)
    fig.tight_layout()
    fig.savefig(img, dpi=110)
    plt.close(fig)
    return "\n".join(rows)


def passkey_plot(runs: Path, img: Path) -> str:
    """Exact match and digits right by depth at the training length (two panels); the table of
    every length, and NSA's mean gates."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
    rows = ["| twin | T | samples | exact match | digits right | exact match by depth decile (%) "
            "| digits right by depth decile (%) |", "|---|---|---|---|---|---|---|"]
    gates = ["| layer | cmp | slc | win |", "|---|---|---|---|"]
    for attn in ATTENTIONS:
        f = runs / f"passkey-{attn}" / "passkey_eval.json"
        if not f.exists():
            continue
        results = json.loads(f.read_text())
        for r in results:
            digits = r.get("digits_per_decile", [])
            rows.append(f"| {attn} | {r['T']} | {r['samples']} | {100 * r['accuracy']:.1f} % | "
                        + (f"{100 * r['digit_accuracy']:.1f} %" if digits else "") + " | "
                        + " ".join(f"{100 * a:.0f}" for a in r["per_decile"]) + " | "
                        + " ".join(f"{100 * a:.0f}" for a in digits) + " |")
        r = min(results, key=lambda x: x["T"])
        depth = [10 * d + 5 for d in range(10)]
        axes[0].plot(depth, [100 * a for a in r["per_decile"]], "o-", color=COLORS[attn],
                     label=f"{attn}, T = {r['T']}")
        if "digits_per_decile" in r:
            axes[1].plot(depth, [100 * a for a in r["digits_per_decile"]], "o-",
                         color=COLORS[attn], label=f"{attn}, T = {r['T']}")
        for layer, g in r.get("gates_cmp_slc_win", {}).items():
            gates.append(f"| {layer} | " + " | ".join(f"{x:.3f}" for x in g) + " |")
    axes[1].axhline(10, color="gray", ls=":", label="chance (1 in 10)")
    for ax, what in zip(axes, ("exact match (%)", "digits right (%)")):
        ax.set_xlabel("depth of the key in the filler (%)")
        ax.set_ylabel(what)
        ax.set_ylim(-5, 105)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("passkey retrieval by depth")
    fig.tight_layout()
    fig.savefig(img, dpi=110)
    plt.close(fig)
    return "\n".join(rows) + "\n\nNSA's mean gates at T = 2048:\n\n" + "\n".join(gates)


def _ratio_rows(results: dict, key: str, cells) -> list:
    """Table rows for both twins, each with its tokens/s as a multiple of full attention's."""
    full = {r[key]: r for r in results["full"]}
    return [f"| {r[key]} | {attn} | " + " | ".join(cells(r)) +
            f" | {r['tokens_per_s'] / full[r[key]]['tokens_per_s']:.2f}x |"
            for attn in ("nsa", "full") for r in results[attn]]


def speed_tables(runs: Path) -> str:
    f = runs / "speed.json"
    if not f.exists():
        return ""
    d = json.loads(f.read_text())
    rows = [f"Training step ({d['threads']} threads):", "",
            "| T | twin | forward | backward | step | tokens/s | NSA / full |",
            "|---|---|---|---|---|---|---|"]
    rows += _ratio_rows(d["train"], "T", lambda r: (
        f"{r['fwd_s']:.2f} s", f"{r['bwd_s']:.2f} s", f"{r['step_s']:.2f} s",
        f"{r['tokens_per_s']:.0f}"))
    rows += ["", "Generation (one sequence, sampled token by token after the prompt):", "",
             "| context | twin | prefill | per token | tokens/s | NSA / full |",
             "|---|---|---|---|---|---|"]
    rows += _ratio_rows(d["decode"], "context", lambda r: (
        f"{r['prefill_s']:.2f} s", f"{r['step_s'] * 1e3:.2f} ms", f"{r['tokens_per_s']:.0f}"))
    return "\n".join(rows)


def main(a) -> None:
    runs, img = Path(a.runs), Path(a.docs) / "img"
    img.mkdir(parents=True, exist_ok=True)
    print(loss_plot(runs, "shakespeare", img / "train_shakespeare.png"), end="\n\n")
    print(loss_plot(runs, "passkey", img / "train_passkey.png"), end="\n\n")
    print(passkey_plot(runs, img / "passkey_depth.png"), end="\n\n")
    print(speed_tables(runs))
