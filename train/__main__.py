"""``python -m train <command>``: the trainability experiments (docs/training.md).

    python -m train run --preset shakespeare --attn nsa        # train one twin
    python -m train passkey-eval --run runs/passkey-nsa        # accuracy by depth and length
    python -m train speed                                      # training and decode tokens/s
    python -m train report                                     # docs/training.md's plots, tables
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .model import ATTENTIONS
from .presets import PRESETS, preset


def _run(a) -> None:
    from .trainer import train
    p = preset(a.preset, a.attn, steps=a.steps, batch=a.batch)
    out = Path(a.out or f"runs/{a.preset}-{a.attn}")
    log = train(p, out, resume=a.resume, stop_at=a.stop_at, threads=a.threads)
    if log:
        last = log[-1]
        print(json.dumps({k: last[k] for k in last if k in ("step", "loss", "val_loss_full")}))


def _passkey_eval(a) -> None:
    from .evaluate import passkey_accuracy
    from .trainer import load_model
    torch.set_num_threads(a.threads or torch.get_num_threads())
    model = load_model(Path(a.run))
    results = []
    for T, per in zip(a.lengths, a.per_decile):
        r = passkey_accuracy(model, T, per, batch=a.eval_batch)
        print(json.dumps({k: r[k] for k in ("T", "accuracy", "digit_accuracy", "samples",
                                             "seconds")}), flush=True)
        results.append(r)
    (Path(a.run) / "passkey_eval.json").write_text(json.dumps(results, indent=1))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="train one twin of a preset")
    r.add_argument("--preset", default="shakespeare", choices=sorted(PRESETS))
    r.add_argument("--attn", default="nsa", choices=ATTENTIONS)
    r.add_argument("--out", help="run directory (default runs/<preset>-<attn>)")
    r.add_argument("--steps", type=int, help="override the preset's step count")
    r.add_argument("--batch", type=int, help="override the preset's global batch")
    r.add_argument("--resume", action="store_true", help="continue from out/ckpt.pt")
    r.add_argument("--stop-at", type=int, help="stop after this step (as if interrupted)")
    r.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    r.set_defaults(fn=_run)
    e = sub.add_parser("passkey-eval", help="passkey accuracy of a trained run")
    e.add_argument("--run", required=True)
    e.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    e.add_argument("--per-decile", type=int, nargs="+", default=[200, 10, 5, 2],
                   help="samples per depth decile, one per length")
    e.add_argument("--eval-batch", type=int, default=8)
    e.add_argument("--threads", type=int)
    e.set_defaults(fn=_passkey_eval)
    s = sub.add_parser("speed", help="training-step and decode tokens/s, NSA against full")
    s.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384])
    s.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768])
    s.add_argument("--runs", default="runs", help="where the shakespeare checkpoints are")
    s.add_argument("--out", default="runs/speed.json")
    s.set_defaults(fn=lambda a: __import__("train.speed", fromlist=["main"]).main(a))
    p = sub.add_parser("report", help="plots and tables for docs/training.md")
    p.add_argument("--runs", default="runs")
    p.add_argument("--docs", default="docs")
    p.set_defaults(fn=lambda a: __import__("train.report", fromlist=["main"]).main(a))
    a = ap.parse_args(argv)
    a.fn(a)


if __name__ == "__main__":
    sys.exit(main())
