"""The training loop: AdamW with warm-up and cosine decay, gradient clipping, checkpoints that
resume bit for bit, and data parallelism over ``torchrun`` (DDP, gloo).

A run writes ``out/log.jsonl`` (one line per step: loss, lr, tokens/s; validation lines beside
them) and ``out/ckpt.pt`` (model, optimiser, step, the log so far). Resuming loads the checkpoint
and replays nothing: batches are functions of ``(seed, step)``, and the model holds no random
state, so the resumed run computes what the uninterrupted one computes (tested bit for bit).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from .data import make_dataset
import nsa

from .model import GPT, ModelConfig, parameter_counts
from .presets import Preset


def lr_at(p: Preset, step: int) -> float:
    """Linear warm-up over ``p.warmup`` steps, then cosine decay to ``p.lr * p.min_lr_ratio``."""
    if step < p.warmup:
        return p.lr * (step + 1) / p.warmup
    frac = (step - p.warmup) / max(1, p.steps - p.warmup)
    return p.lr * (p.min_lr_ratio + (1 - p.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def make_optimizer(model: torch.nn.Module, p: Preset) -> torch.optim.AdamW:
    """Weight decay on matrices only (not norms, biases, the compressors' position encodings)."""
    decay = [q for n, q in model.named_parameters() if q.dim() >= 2 and not n.endswith("pos")]
    rest = [q for n, q in model.named_parameters() if not (q.dim() >= 2 and not n.endswith("pos"))]
    return torch.optim.AdamW([{"params": decay, "weight_decay": p.weight_decay},
                              {"params": rest, "weight_decay": 0.0}],
                             lr=p.lr, betas=(0.9, 0.95), eps=1e-8)


def loss_fn(model: torch.nn.Module, batch: dict, recall_only: bool = False) -> torch.Tensor:
    """Mean next-token loss; for passkey batches, plus (or, ``recall_only``, instead) the mean
    loss on the digits a model can know: the key's restatement and the answer, 10 of 2048
    targets, which the mean alone drowns out (docs/training.md: with the filler's loss in, the
    small model learnt neither in our trials)."""
    tokens = batch["tokens"]
    logits = model(tokens[:, :-1])
    targets = tokens[:, 1:]
    if "recall" not in batch:
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    mask = batch["recall"]
    recall = F.cross_entropy(logits[mask], targets[mask])
    return recall if recall_only else recall + F.cross_entropy(logits.flatten(0, 1),
                                                               targets.flatten())


@torch.no_grad()
def validate(model: torch.nn.Module, data, p: Preset, limit: Optional[int]) -> float:
    """Mean next-token loss over the validation windows (all of them when ``limit`` is None)."""
    total, n = 0.0, 0
    for batch in data.val_batches(p.T, p.batch, limit):
        tokens = batch["tokens"]
        logits = model(tokens[:, :-1])
        total += F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(),
                                 reduction="sum").item()
        n += tokens[:, 1:].numel()
    return total / n


class _Dist:
    """Rank and world size under torchrun (gloo); a single process otherwise."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("gloo")

    def mean(self, x: float) -> float:
        if self.world == 1:
            return x
        t = torch.tensor([x], dtype=torch.float64)
        dist.all_reduce(t)
        return t.item() / self.world


def train(p: Preset, out: Path, *, resume: bool = False, stop_at: Optional[int] = None,
          threads: Optional[int] = None, progress: bool = True) -> list[dict]:
    """Trains ``p`` and returns the log (also in ``out/log.jsonl``). ``stop_at``: stop after that
    many steps, as an interrupted run would (the checkpoint is written there)."""
    out = Path(out)
    ddp = _Dist()
    if threads:
        torch.set_num_threads(threads)
    if p.batch % ddp.world or (p.short_steps and p.short_batch % ddp.world):
        raise ValueError(f"batch ({p.batch}, {p.short_batch}) must divide among {ddp.world} "
                         "processes")
    data = make_dataset(p.task)
    model = GPT(p.model, seed=p.seed)
    opt = make_optimizer(model, p)
    log, start = [], 0
    ckpt = out / "ckpt.pt"
    _check_run_dir(out, p, model, resume)
    if resume and ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start, log = state["step"], state["log"]
    net = model
    if ddp.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model)
    main = ddp.rank == 0
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "preset.json").write_text(json.dumps(_describe(p, model), indent=1, default=str))
    end = min(p.steps, stop_at) if stop_at is not None else p.steps
    bar = tqdm(range(start, end), initial=start, total=p.steps, disable=not (progress and main),
               desc=f"{p.task}/{p.model.attention}", dynamic_ncols=True)
    for step in bar:
        t0 = time.perf_counter()
        T, size = p.shape_at(step)
        batch = data.batch(p.seed, step, size, T)
        batch = {k: v[ddp.rank::ddp.world] for k, v in batch.items()}  # this rank's share
        lr = lr_at(p, step)
        for group in opt.param_groups:
            group["lr"] = lr
        loss = loss_fn(net, batch, p.recall_only)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), p.clip).item()
        opt.step()
        dt = time.perf_counter() - t0
        entry = {"step": step + 1, "loss": ddp.mean(loss.item()), "lr": lr, "grad_norm": gnorm,
                 "tokens_per_s": size * T / dt}
        if main and p.eval_every and (step + 1) % p.eval_every == 0 and p.task == "shakespeare":
            entry["val_loss"] = validate(model, data, p, p.eval_windows)
        entry["elapsed_s"] = (log[-1]["elapsed_s"] if log else 0.0) + time.perf_counter() - t0
        log.append(entry)
        bar.set_postfix(loss=f"{entry['loss']:.4f}", tok_s=f"{entry['tokens_per_s']:.0f}")
        if main and ((step + 1) % p.ckpt_every == 0 or step + 1 == end):
            _save(out, model, opt, step + 1, log)
    if main and p.task == "shakespeare" and end == p.steps and "val_loss_full" not in log[-1]:
        log[-1]["val_loss_full"] = validate(model, data, p, None)
        _save(out, model, opt, end, log)
    return log


def _check_run_dir(out: Path, p: Preset, model, resume: bool) -> None:
    """A run never overwrites another's checkpoint, nor resumes under other settings."""
    if not (out / "ckpt.pt").exists():
        return
    if not resume:
        raise ValueError(f"out: {out} holds a run already; pass resume=True (--resume) to "
                         "continue it, or choose another directory")
    before = json.loads((out / "preset.json").read_text())
    now = json.loads(json.dumps(_describe(p, model), default=str))
    diff = sorted(k for k in now if k != "threads" and before.get(k) != now[k])
    if diff:
        raise ValueError(f"resume: {out} was trained with other settings ({', '.join(diff)})")


def _save(out: Path, model, opt, step: int, log: list) -> None:
    tmp = out / "ckpt.pt.tmp"
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "log": log},
               tmp)
    tmp.replace(out / "ckpt.pt")    # a crash mid-write leaves the previous checkpoint intact
    with open(out / "log.jsonl", "w") as f:
        for e in log:
            f.write(json.dumps(e) + "\n")


def _describe(p: Preset, model) -> dict:
    d = dataclasses.asdict(p)
    d["parameters"] = parameter_counts(model)
    d["threads"] = torch.get_num_threads()
    return d


def load_model(out: Path) -> GPT:
    """The model of a run's checkpoint, its preset read back from ``preset.json``."""
    desc = json.loads((Path(out) / "preset.json").read_text())
    m = dict(desc["model"])
    m["nsa"] = nsa.Config(**m["nsa"])
    model = GPT(ModelConfig(**m), seed=desc["seed"])
    model.load_state_dict(torch.load(Path(out) / "ckpt.pt", weights_only=False)["model"])
    return model.eval()
