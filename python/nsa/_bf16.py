"""The bf16 arithmetic of the forward ops (``nsa_bf16_math``, nsa.h), one setting per process.

With bf16 q, k and v, the CPU forward (NSA and dense) multiplies bf16 pairs into f32 sums where
the CPU has AVX512_BF16 (``"native"``, what ``"auto"`` picks there), or an AVX-512F emulation of
the same arithmetic (``"emulated"``), or widens to f32 (``"f32"``). It rounds each softmax weight
to bf16 for P V, which moves an output by at most 2^-8 of the values' size (docs/benchmarks.md,
"bf16 arithmetic"). The backward always computes in f32.
"""
from __future__ import annotations

from . import _core

_MODES = {"auto": 0, "f32": 1, "native": 2, "emulated": 3}
_mode = "auto"


def set_bf16_math(mode: str) -> None:
    """Sets the bf16 arithmetic of every later forward call: ``"auto"`` (the default), ``"f32"``,
    ``"native"`` or ``"emulated"``. ValueError for another name, RuntimeError for a mode this CPU
    cannot run (``"native"`` needs AVX512_BF16, ``"emulated"`` AVX-512)."""
    global _mode
    if mode not in _MODES:
        raise ValueError(f"set_bf16_math: mode {mode!r} is not one of auto, f32, native, emulated")
    if not _core.bf16_math_available(_MODES[mode]):
        raise RuntimeError(f"set_bf16_math: this CPU cannot run mode {mode!r} "
                           "(native needs AVX512_BF16, emulated AVX-512)")
    _mode = mode


def bf16_math() -> str:
    """The bf16 arithmetic set by :func:`set_bf16_math` (``"auto"`` unless changed)."""
    return _mode


def bf16_math_resolved() -> str:
    """What ``"auto"`` means on this CPU (``"native"`` or ``"f32"``), or the mode set."""
    if _mode != "auto":
        return _mode
    return {v: k for k, v in _MODES.items()}[_core.bf16_math_auto()]


def code() -> int:
    """The setting as the nsa_bf16_math value the C calls take."""
    return _MODES[_mode]
