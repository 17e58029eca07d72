"""Torch tensors to nsa._core descriptors: zero copies, strides passed as they are."""
from __future__ import annotations

from typing import Optional

import torch

from . import _core
from ._desc import Descs

# nsa_dtype codes (nsa.h): data tensors are float32, bfloat16 or float16 (widened exactly to
# float32 for the arithmetic); indices and cu_seqlens int32.
_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.int32: 3}


def threads() -> int:
    """The thread count the CPU ops use: torch's intra-op count (``torch.set_num_threads``)."""
    return torch.get_num_threads()


def check_device(t: Optional[torch.Tensor], name: str, op: str) -> None:
    if t is not None and t.device.type != "cpu":
        raise NotImplementedError(
            f"{op}: {name} is a {t.device.type} tensor, and this build of nsa has no "
            f"{t.device.type.upper()} backend (backends: cpu, ref); move the tensors to the CPU")


def desc(t: Optional[torch.Tensor], name: str, op: str):
    """The (data_ptr, dtype, shape, strides) tuple of ``t`` for nsa._core; None stays None."""
    if t is None:
        return None
    check_device(t, name, op)
    code = _DTYPES.get(t.dtype)
    if code is None:
        raise TypeError(f"{op}: {name} has dtype {t.dtype}; nsa takes float32, bfloat16 or float16 "
                        "(int32 for indices and cu_seqlens)")
    return (t.data_ptr(), code, tuple(t.shape), t.stride())


def descs(op: str, **tensors) -> Descs:
    """Descriptors for the given tensors (None is left out); see Descs."""
    return Descs(lambda t, k: desc(t, k, op), tensors)


def inner_contiguous(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``t``, or a copy when its last dimension is strided (the C API needs unit inner stride,
    as FlashAttention does); any other strides go through as they are."""
    if t is None or t.dim() == 0 or t.shape[-1] <= 1 or t.stride(-1) == 1:
        return t
    return t.contiguous()


def host_int32(t: Optional[torch.Tensor], name: str, op: str) -> Optional[torch.Tensor]:
    """cu_seqlens or seq_ids as a contiguous int32 CPU tensor (other integer dtypes converted)."""
    if t is None:
        return None
    check_device(t, name, op)
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.dim() != 1:
        raise TypeError(f"{op}: {name} must be a 1-D integer tensor, got {t.dtype} of shape "
                        f"{tuple(t.shape)}")
    return t.to(torch.int32).contiguous()


def cmp_total(cfg_tuple: tuple, cu_seqlens: torch.Tensor) -> tuple[int, torch.Tensor]:
    """(Tc, cu_cmp) for packed sequences: the compressed rows each sequence owns (nsa_cmp_seqlens)."""
    cu_cmp = torch.empty_like(cu_seqlens)
    _core.cmp_seqlens(cfg_tuple, desc(cu_seqlens, "cu_seqlens", "nsa"),
                      desc(cu_cmp, "cu_cmp", "nsa"))
    return int(cu_cmp[-1]), cu_cmp


def empty(like: torch.Tensor) -> torch.Tensor:
    """The placeholder an op returns for an output the call does not have (a schema's outputs
    cannot be None): a 0-element tensor of ``like``'s dtype."""
    return like.new_empty((0,))


def cfg_tuple(cfg: list[int], scale: float) -> tuple:
    """nsa._core's config tuple from an op's ``cfg`` (seven ints) and ``scale``."""
    return (*[int(c) for c in cfg], float(scale))
