"""Item 4 of the trainability experiments: how fast the NSA twin trains and generates against its
full-attention twin, on this machine, at lengths beyond the experiments' 2048.

Training: one step (forward with the loss, then backward) of the shakespeare preset's model on
random tokens at each length, both twins, torch's thread count; the median of ``reps`` timed steps
after one untimed one. Generation: each twin's shakespeare checkpoint, a prompt of the
tinyshakespeare text cut to the context length, run into the layers' KV caches (NSA: the library's
prefill and decode through ``NativeSparseAttention.step``; full: SDPA over a growing K/V cache),
then ``new`` sampled tokens, timed one by one (median).
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .data import shakespeare_path
from .model import GPT, extend, new_caches
from .presets import preset


def step_times(model: GPT, T: int, reps: int = 3) -> dict:
    """Median forward (logits and loss) and backward seconds of one step on ``[1, T]``."""
    tokens = torch.randint(0, 256, (1, T + 1), generator=torch.Generator().manual_seed(T))
    fwd, bwd = [], []
    for i in range(reps + 1):
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[0, 1:])
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        if i:                                       # the first step warms caches and allocators
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
    f, b = statistics.median(fwd), statistics.median(bwd)
    return {"T": T, "fwd_s": f, "bwd_s": b, "step_s": f + b, "tokens_per_s": T / (f + b)}


@torch.no_grad()
def decode_times(model: GPT, context: int, new: int = 32) -> dict:
    """Prefill seconds for ``context`` tokens of text, then the median seconds per sampled token."""
    text = torch.tensor(list(shakespeare_path().read_bytes()[:context]), dtype=torch.int64)
    caches = new_caches(model, context + new)
    t0 = time.perf_counter()
    logits = extend(model, text[None], caches)
    prefill = time.perf_counter() - t0
    g = torch.Generator().manual_seed(0)
    times, out = [], []
    for _ in range(new):
        tok = torch.multinomial(torch.softmax(logits, -1), 1, generator=g)
        out.append(int(tok))
        t0 = time.perf_counter()
        logits = extend(model, tok.view(1, 1), caches)
        times.append(time.perf_counter() - t0)
    step = statistics.median(times)
    return {"context": context, "prefill_s": prefill, "step_s": step, "tokens_per_s": 1 / step,
            "sample": bytes(out).decode("latin-1")}


def _sweep(model: GPT, measure, values, describe) -> list:
    """``measure(model, v)`` for each value, each result printed as it comes (a long run's
    progress) and returned."""
    results = []
    for v in values:
        r = measure(model, v)
        print(f"{model.cfg.attention} {describe(r)}", flush=True)
        results.append(r)
    return results


def main(a) -> None:
    from .trainer import load_model
    result = {"threads": torch.get_num_threads(), "train": {}, "decode": {}}
    for attn in ("nsa", "full"):
        result["train"][attn] = _sweep(
            GPT(preset("shakespeare", attn).model), step_times, a.lengths,
            lambda r: f"train T={r['T']}: fwd {r['fwd_s']:.2f} s, bwd {r['bwd_s']:.2f} s, "
                      f"{r['tokens_per_s']:.0f} tokens/s")
    for attn in ("nsa", "full"):
        run = Path(a.runs) / f"shakespeare-{attn}"
        model = load_model(run) if (run / "ckpt.pt").exists() else GPT(
            preset("shakespeare", attn).model).eval()
        result["decode"][attn] = _sweep(
            model, decode_times, a.contexts,
            lambda r: f"decode context={r['context']}: prefill {r['prefill_s']:.2f} s, "
                      f"{r['step_s'] * 1e3:.2f} ms/token ({r['tokens_per_s']:.0f} tokens/s)")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))
