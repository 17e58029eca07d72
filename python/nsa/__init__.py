"""nsa: Native Sparse Attention (Yuan et al., arXiv 2502.11089) on nsa's C++ kernels.

``import nsa`` needs only NumPy:

- :class:`nsa.Config`: the contract's knobs (docs/SPEC.md section 2), the paper's defaults.
- :func:`nsa.set_bf16_math` / :func:`nsa.bf16_math`: the forward's arithmetic for bf16 inputs.
- :mod:`nsa.np`: the forward, the compression and KV-cache decode on NumPy arrays.

With torch installed (imported on first use):

- :mod:`nsa.ops`: the ops registered under ``torch.ops.nsa`` (fake implementations for
  ``torch.compile``, autograd for the forward, compression and dense baseline).
- :func:`nsa.native_sparse_attention` (:mod:`nsa.functional`): the differentiable NSA forward.
- :class:`nsa.nn.NativeSparseAttention`: the paper's attention layer, with a KV-cache step.
"""
from __future__ import annotations

import importlib

from . import _core
from ._bf16 import bf16_math, bf16_math_resolved, set_bf16_math
from .config import Config

__version__ = _core.version()
__all__ = ["Config", "np", "ops", "functional", "nn", "cache", "native_sparse_attention",
           "build_info", "backend_available", "set_bf16_math", "bf16_math", "bf16_math_resolved",
           "__version__"]

_LAZY = {"np", "ops", "functional", "nn", "cache"}


def build_info() -> str:
    """The C library's build facts (compiler, build type, options)."""
    return _core.build_info()


def backend_available(name: str) -> bool:
    """Whether this build has the backend ``"ref"``, ``"cpu"`` or ``"cuda"``."""
    return _core.backend_available(name)


def __getattr__(name: str):
    # The torch modules import torch, which takes a second or two and is optional: load on use.
    if name in _LAZY:
        return importlib.import_module(f".{name}", __name__)
    if name == "native_sparse_attention":
        return importlib.import_module(".functional", __name__).native_sparse_attention
    raise AttributeError(f"module 'nsa' has no attribute {name!r}")
