"""The NSA configuration (docs/SPEC.md section 2): the contract's knobs, the paper's defaults."""
from __future__ import annotations

import dataclasses

from . import _core


@dataclasses.dataclass(frozen=True)
class Config:
    """Native Sparse Attention's knobs, with the defaults of the paper's Section 4.1.

    Attributes:
        cmp_block: ``l``, raw tokens per compression block (32).
        cmp_stride: ``d``, stride between compression blocks, ``1 <= d <= l`` (16).
        slc_block: ``l'``, raw tokens per selection block (64).
        slc_count: ``n``, blocks selected per query, forced blocks included (16).
        slc_init: ``n_init``, leading blocks always selected (1).
        slc_local: ``n_local``, most recent blocks always selected (2).
        window: ``w``, sliding-window length, the query's own token included (512).
        scale: softmax scale; ``0`` means ``1/sqrt(Dk)`` (0).

    Frozen (hashable), so that ``torch.compile`` treats it as a constant. ``validate()`` applies
    the library's ranges and raises ``ValueError`` naming the field.
    """

    cmp_block: int = 32
    cmp_stride: int = 16
    slc_block: int = 64
    slc_count: int = 16
    slc_init: int = 1
    slc_local: int = 2
    window: int = 512
    scale: float = 0.0

    def ints(self) -> list[int]:
        """The seven integer fields in the C struct's order (the ops' ``cfg`` argument)."""
        return [self.cmp_block, self.cmp_stride, self.slc_block, self.slc_count, self.slc_init,
                self.slc_local, self.window]

    def as_tuple(self) -> tuple:
        """All eight fields in the C struct's order (``nsa._core``'s config argument)."""
        return (*self.ints(), float(self.scale))

    def cmp_len(self, t: int) -> int:
        """Compressed tokens of a sequence of ``t`` tokens: ``(t - l) // d + 1`` if ``t >= l``."""
        return (t - self.cmp_block) // self.cmp_stride + 1 if t >= self.cmp_block else 0

    def validate(self) -> "Config":
        """Raises ``ValueError`` naming the first field outside the library's ranges (the C
        library's own check, ``nsa_config_validate``, so the rules live in one place)."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            ok = (isinstance(value, (int, float)) if f.name == "scale" else
                  isinstance(value, int)) and not isinstance(value, bool)
            if not ok:
                raise TypeError(f"config.{f.name}: expected {f.type}, got {value!r}")
        _core.config_validate(self.as_tuple())
        return self
