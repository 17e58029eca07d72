"""Passkey evaluation: exact-match accuracy per depth decile, and the NSA gates' mean values.

A sample counts as retrieved when the model's greedy prediction at each of the answer's five
positions is the key's digit, given the correct digits before it (teacher forcing). This is exactly
greedy generation's exact match: greedy decoding emits the key iff every one of these five argmaxes
is right, and it costs one forward instead of five. Also reported: the fraction of the five digits
right (chance: 1/10), which shows partial retrieval where exact match shows none.
"""
from __future__ import annotations

import time
from collections import defaultdict

import torch
from tqdm import tqdm

from .data import KEY_DIGITS, Passkey
from .model import GPT


def _gate_hooks(model: GPT, sums: dict):
    """Forward hooks accumulating each NSA layer's mean gate per branch (cmp, slc, win)."""
    handles = []
    for i, block in enumerate(model.blocks):
        gate = getattr(block.attn, "gate", None)
        if gate is None:
            continue

        def hook(mod, inp, out, i=i):
            g = torch.sigmoid(out.detach()).view(*out.shape[:-1], 3, -1)
            sums[i] += g.mean(dim=tuple(range(g.dim() - 2)) + (g.dim() - 1,)).double()
            sums["n", i] += 1
        sums[i] = torch.zeros(3, dtype=torch.float64)
        sums["n", i] = 0
        handles.append(gate.register_forward_hook(hook))
    return handles


@torch.no_grad()
def passkey_accuracy(model: GPT, T: int, per_decile: int, batch: int = 4,
                     progress: bool = True) -> dict:
    """Exact-match accuracy per depth decile at length T, the mean gates, and the wall time."""
    model.eval()
    hits, counts, digits = defaultdict(int), defaultdict(int), defaultdict(float)
    sums = {}
    handles = _gate_hooks(model, sums)
    samples = list(Passkey.eval_set(T, per_decile))
    t0 = time.perf_counter()
    try:
        for i in tqdm(range(0, len(samples), batch), disable=not progress,
                      desc=f"passkey T={T} {model.cfg.attention}", dynamic_ncols=True):
            chunk = samples[i:i + batch]
            tokens = torch.stack([s.tokens for _, s in chunk])
            logits = model(tokens[:, :-1])[:, -KEY_DIGITS:]
            right = logits.argmax(-1) == tokens[:, -KEY_DIGITS:]
            for (decile, _), row in zip(chunk, right.tolist()):
                hits[decile] += all(row)
                digits[decile] += sum(row) / KEY_DIGITS
                counts[decile] += 1
    finally:
        for h in handles:
            h.remove()
    per = [hits[d] / counts[d] for d in range(10)]
    per_digit = [digits[d] / counts[d] for d in range(10)]
    gates = {f"layer{i}": (sums[i] / sums["n", i]).tolist()
             for i in range(len(model.blocks)) if i in sums}
    return {"T": T, "per_decile": per, "accuracy": sum(hits.values()) / sum(counts.values()),
            "digits_per_decile": per_digit,
            "digit_accuracy": sum(digits.values()) / sum(counts.values()),
            "samples": sum(counts.values()), "gates_cmp_slc_win": gates,
            "seconds": time.perf_counter() - t0}
