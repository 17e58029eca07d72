"""The experiments' data: byte-level tinyshakespeare and the passkey retrieval task.

Both are byte-level (a token is a byte, vocabulary 256), so the twins see the same tokens and a
passkey's answer is exactly five tokens, its five ASCII digits. Every batch is a pure function of
``(seed, step)``: resuming from a checkpoint, or splitting the batch across DDP ranks, needs no
data-loader state.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

REPO = Path(__file__).resolve().parent.parent
# The project's shared copy (read-only, never copied into this repository).
SHAKESPEARE_SHARED = REPO.parent / "shared/data/tinyshakespeare.txt"


def shakespeare_path() -> Path:
    """``$NSA_SHAKESPEARE`` if set, else the project's shared copy."""
    return Path(os.environ.get("NSA_SHAKESPEARE") or SHAKESPEARE_SHARED)


def _generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 7 + stream)


class Shakespeare:
    """tinyshakespeare as bytes: the first 90 % trains, the last 10 % validates."""

    def __init__(self, path: Optional[Path] = None):
        path = Path(path or shakespeare_path())
        if not path.exists():
            raise FileNotFoundError(f"{path}: tinyshakespeare not found (set NSA_SHAKESPEARE to "
                                    "karpathy/char-rnn's data/tinyshakespeare/input.txt)")
        data = torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=torch.uint8)
        split = int(0.9 * data.numel())
        self.train, self.val = data[:split].long(), data[split:].long()

    def batch(self, seed: int, step: int, batch: int, T: int) -> dict:
        """``batch`` random windows of T + 1 bytes from the training split."""
        starts = torch.randint(0, self.train.numel() - T - 1, (batch,),
                               generator=_generator(seed, step))
        tokens = torch.stack([self.train[s:s + T + 1] for s in starts.tolist()])
        return {"tokens": tokens}

    def val_batches(self, T: int, batch: int, limit: Optional[int] = None):
        """The validation split cut into consecutive windows of T + 1 bytes, in batches."""
        n = (self.val.numel() - 1) // T
        if limit is not None:
            n = min(n, limit)
        windows = [self.val[i * T:i * T + T + 1] for i in range(n)]
        for i in range(0, n, batch):
            yield {"tokens": torch.stack(windows[i:i + batch])}


# The passkey task (after Mohtashami and Jaggi, 2023): repetitive filler with no digit in it, the
# key stated once at a random depth (and repeated right after, as in the original prompt, which
# also lets a model learn copying within its window), and a question at the end.
INTRO = "There is a pass key hidden in this text. Find it and remember it.\n"
FILLER = ("The grass is green. ", "The sky is blue. ", "The sun is yellow. ", "Here we go. ",
          "There and back again. ", "The river runs to the sea. ", "A bird sings in the tree. ",
          "The night is dark and long. ")
KEY = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\nWhat is the pass key? The pass key is "
KEY_DIGITS = 5


@dataclasses.dataclass
class PasskeySample:
    tokens: Tensor      # [T + 1] int64: the text, ending with the answer's five digits
    key: str            # the five digits
    key_pos: int        # index of the key's first digit in tokens (its first statement)
    depth: float        # key_pos / T

    again_pos: int      # index of the key's first digit in its restatement, in the same sentence

    def recall_targets(self) -> Tensor:
        """``[T]`` bool over the next-token targets (target i is token i + 1): the digits a model
        can know, the key's restatement and the answer (not its first statement: random)."""
        mask = torch.zeros(self.tokens.numel() - 1, dtype=torch.bool)
        mask[self.again_pos - 1:self.again_pos - 1 + KEY_DIGITS] = True
        mask[-KEY_DIGITS:] = True
        return mask


def passkey_sample(T: int, depth: float, g: torch.Generator) -> PasskeySample:
    """One sequence of ``T + 1`` tokens whose last five are the key's digits; the key sentence
    starts at the sentence boundary nearest ``depth`` (0..1) of the filler."""
    key = "".join(str(int(d)) for d in torch.randint(0, 10, (KEY_DIGITS,), generator=g))
    key_sentence = KEY.format(key=key)
    fill = T + 1 - len(INTRO) - len(key_sentence) - len(QUESTION) - KEY_DIGITS
    if fill < 0:
        raise ValueError(f"T = {T} is too short for a passkey sample")
    pieces, used = [], 0
    while used < fill:
        s = FILLER[int(torch.randint(0, len(FILLER), (1,), generator=g))]
        pieces.append(s)
        used += len(s)
    # Insert the key at the boundary nearest the requested depth (boundaries before the cut).
    bounds, acc = [0], 0
    for s in pieces:
        acc += len(s)
        if acc <= fill:
            bounds.append(acc)
    cut = min(bounds, key=lambda b: abs(b - depth * fill))
    filler = "".join(pieces)[:fill]
    text = INTRO + filler[:cut] + key_sentence + filler[cut:] + QUESTION + key
    tokens = torch.tensor(list(text.encode("ascii")), dtype=torch.int64)
    key_pos = len(INTRO) + cut + KEY.index("{key}")
    again_pos = len(INTRO) + cut + key_sentence.index(key, KEY.index("{key}") + KEY_DIGITS)
    return PasskeySample(tokens, key, key_pos, key_pos / T, again_pos)


class Passkey:
    """Training batches of passkey samples at uniformly random depths."""

    answer_tokens = KEY_DIGITS

    def batch(self, seed: int, step: int, batch: int, T: int) -> dict:
        g = _generator(seed, step, stream=1)
        samples = [passkey_sample(T, d, g) for d in torch.rand(batch, generator=g).tolist()]
        return {"tokens": torch.stack([s.tokens for s in samples]),
                "recall": torch.stack([s.recall_targets() for s in samples])}

    @staticmethod
    def eval_set(T: int, per_decile: int, seed: int = 1234):
        """``per_decile`` samples in each depth decile: depth uniform within the decile."""
        g = _generator(seed, T, stream=2)
        for decile in range(10):
            for _ in range(per_decile):
                u = float(torch.rand((), generator=g))
                yield decile, passkey_sample(T, (decile + u) / 10, g)


def make_dataset(name: str):
    if name == "shakespeare":
        return Shakespeare()
    if name == "passkey":
        return Passkey()
    raise ValueError(f"task: 'shakespeare' or 'passkey', not {name!r}")
