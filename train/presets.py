"""Named presets: the model, the task and the optimisation of each experiment (docs/training.md
says why these sizes). ``--attn`` picks the twin; every other field is shared by the twins."""
from __future__ import annotations

import dataclasses

import nsa

from .model import ModelConfig

# NSA scaled to T = 2048 (the paper's l = 32, d = 16, l' = 64, n = 16, w = 512 are for 64k): a
# query reads at most 2048 / 8 compressed tokens, 8 blocks of 32 keys and 128 window keys.
NSA_2K = nsa.Config(cmp_block=16, cmp_stride=8, slc_block=32, slc_count=8, slc_init=1,
                    slc_local=2, window=128)
# For the tests: real selection at T = 128.
NSA_TINY = nsa.Config(cmp_block=8, cmp_stride=4, slc_block=16, slc_count=4, slc_init=1,
                      slc_local=1, window=32)


@dataclasses.dataclass(frozen=True)
class Preset:
    task: str                       # "shakespeare" or "passkey"
    model: ModelConfig
    T: int
    batch: int                      # global batch, sequences per step
    steps: int
    lr: float = 3e-3
    min_lr_ratio: float = 0.1       # cosine decay to lr * this
    warmup: int = 20
    weight_decay: float = 0.1
    clip: float = 1.0
    seed: int = 0
    eval_every: int = 50            # steps between validation passes (shakespeare)
    eval_windows: int = 16          # validation windows in the passes during training
    ckpt_every: int = 50
    # A shorter-context start (passkey): the first ``short_steps`` steps at ``short_T`` with
    # ``short_batch`` sequences, the rest at T.
    short_steps: int = 0
    short_T: int = 0
    short_batch: int = 0
    recall_only: bool = False       # passkey: the loss only on the digits a model can know

    def shape_at(self, step: int) -> tuple:
        """(T, batch) of a step."""
        return (self.short_T, self.short_batch) if step < self.short_steps else (self.T, self.batch)


_SMALL = ModelConfig(dim=128, layers=4, heads=4, kv_heads=2, nsa=NSA_2K)
_TINY = ModelConfig(dim=32, layers=2, heads=4, kv_heads=2, nsa=NSA_TINY)

PRESETS = {
    "shakespeare": Preset("shakespeare", _SMALL, T=2048, batch=4, steps=300),
    "passkey": Preset("passkey", _SMALL, T=2048, batch=4, steps=750, eval_every=0, short_steps=600,
                      short_T=256, short_batch=16, recall_only=True),
    "tiny": Preset("shakespeare", _TINY, T=128, batch=4, steps=30, lr=1e-2, warmup=5,
                   eval_every=10, eval_windows=4, ckpt_every=10),
    "tiny-passkey": Preset("passkey", _TINY, T=256, batch=4, steps=20, lr=1e-2, warmup=5,
                           eval_every=0, ckpt_every=10, short_steps=10, short_T=192,
                           short_batch=8, recall_only=True),
}


def preset(name: str, attn: str = "nsa", **overrides) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"preset: one of {sorted(PRESETS)}, not {name!r}")
    p = PRESETS[name]
    p = dataclasses.replace(p, model=dataclasses.replace(p.model, attention=attn))
    return dataclasses.replace(p, **{k: v for k, v in overrides.items() if v is not None})
