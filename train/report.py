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
        rows.append(f"| {attn} | {steps[-1]} | {sum(e['loss'] for e in log[-10:]) / 10:.4f} | "
                    f"{'' if full is None else f'{full:.4f}'} | {log[-1]['elapsed_s'] / 60:.1f} min |")
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
    fig, ax = plt.subplots(figsize=(7, 4))
    rows = ["| twin | T | samples | accuracy | per depth decile (0-10 % ... 90-100 %) |",
            "|---|---|---|---|---|"]
    gates = ["| layer | cmp | slc | win |", "|---|---|---|---|"]
    for attn in ATTENTIONS:
        f = runs / f"passkey-{attn}" / "passkey_eval.json"
        if not f.exists():
            continue
        for r in json.loads(f.read_text()):
            rows.append(f"| {attn} | {r['T']} | {r['samples']} | {100 * r['accuracy']:.1f} % | "
                        + " ".join(f"{100 * a:.0f}" for a in r["per_decile"]) + " |")
            if r["T"] == min(x["T"] for x in json.loads(f.read_text())):
                ax.plot([10 * d + 5 for d in range(10)], [100 * a for a in r["per_decile"]],
                        "o-", color=COLORS[attn], label=f"{attn}, T = {r['T']}")
                for layer, g in r.get("gates_cmp_slc_win", {}).items():
                    gates.append(f"| {layer} | " + " | ".join(f"{x:.3f}" for x in g) + " |")
    ax.set_xlabel("depth of the key in the filler (%)")
    ax.set_ylabel("exact match (%)")
    ax.set_ylim(-5, 105)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("passkey retrieval by depth")
    fig.tight_layout()
    fig.savefig(img, dpi=110)
    plt.close(fig)
    return "\n".join(rows) + "\n\nNSA's mean gates at T = 2048:\n\n" + "\n".join(gates)


def main(a) -> None:
    runs, img = Path(a.runs), Path(a.docs) / "img"
    img.mkdir(parents=True, exist_ok=True)
    print(loss_plot(runs, "shakespeare", img / "train_shakespeare.png"), end="\n\n")
    print(loss_plot(runs, "passkey", img / "train_passkey.png"), end="\n\n")
    print(passkey_plot(runs, img / "passkey_depth.png"))
