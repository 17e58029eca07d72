"""torch.ops.nsa: compression and its backward (SPEC section 5). See nsa.ops."""

from typing import Optional

import torch
from torch import Tensor

from . import _core
from ._torch_io import cmp_total, descs, empty, host_int32, inner_contiguous as ic, threads


def _cmp_cfg(cmp_block: int, cmp_stride: int) -> tuple:
    # Compression reads only l and d; the rest of the config must merely be valid.
    return (cmp_block, cmp_stride, 64, 16, 1, 2, 512, 0.0)


def _cmp_rows(t, cmp_block: int, cmp_stride: int):
    """Tc for one sequence of t tokens, for ints and symbolic sizes alike:
    (t - l) // d + 1 when t >= l, else 0, written without a branch on t."""
    return torch.sym_max(0, (t - cmp_block + cmp_stride) // cmp_stride)


# ------------------------------------------------------------------------------------------------
# Compression (SPEC section 5)
# ------------------------------------------------------------------------------------------------

def _compress(x, mlp, cu_seqlens, cmp_block, cmp_stride, op):
    cfg = _cmp_cfg(cmp_block, cmp_stride)
    cu = host_int32(cu_seqlens, "cu_seqlens", op)
    tc = _cmp_rows(x.shape[1], cmp_block, cmp_stride) if cu is None else cmp_total(cfg, cu)[0]
    out = x.new_empty((x.shape[0], tc, x.shape[2], x.shape[3]))
    kind = "mean" if mlp is None else "mlp"
    names = dict(zip(("pos", "w1", "b1", "w2", "b2"), mlp or ()))
    _core.compress("auto", threads(), cfg, kind,
                   descs(op, x=ic(x), cu_seqlens=cu, out=out,
                         **{k: ic(t) for k, t in names.items()}))
    return out


def _compress_fake(x, cu_seqlens, cmp_block, cmp_stride):
    if cu_seqlens is None:
        tc = _cmp_rows(x.shape[1], cmp_block, cmp_stride)
    else:  # the packed row count depends on cu_seqlens's contents
        tc = torch.library.get_ctx().new_dynamic_size()
    return x.new_empty((x.shape[0], tc, x.shape[2], x.shape[3]))


@torch.library.custom_op("nsa::compress_mean", mutates_args=())
def compress_mean(x: Tensor, cu_seqlens: Optional[Tensor], cmp_block: int,
                  cmp_stride: int) -> Tensor:
    """Mean compression: ``[B, T, H, D] -> [B, Tc, H, D]`` (packed per sequence with
    ``cu_seqlens``); token ``i`` is the mean of keys ``i*d .. i*d + l - 1``."""
    return _compress(x, None, cu_seqlens, cmp_block, cmp_stride, "nsa.compress_mean")


@torch.library.custom_op("nsa::compress_mlp", mutates_args=())
def compress_mlp(x: Tensor, pos: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
                 cu_seqlens: Optional[Tensor], cmp_block: int, cmp_stride: int) -> Tensor:
    """The paper's learned compression phi: ``W2 relu(W1 flatten(X + P) + b1) + b2`` per KV head
    (pos ``[H, l, D]``, w1 ``[H, Dh, l*D]``, b1 ``[H, Dh]``, w2 ``[H, D, Dh]``, b2 ``[H, D]``)."""
    return _compress(x, (pos, w1, b1, w2, b2), cu_seqlens, cmp_block, cmp_stride,
                     "nsa.compress_mlp")


@compress_mean.register_fake
def _(x, cu_seqlens, cmp_block, cmp_stride):
    return _compress_fake(x, cu_seqlens, cmp_block, cmp_stride)


@compress_mlp.register_fake
def _(x, pos, w1, b1, w2, b2, cu_seqlens, cmp_block, cmp_stride):
    return _compress_fake(x, cu_seqlens, cmp_block, cmp_stride)


@torch.library.custom_op("nsa::compress_bwd", mutates_args=())
def compress_bwd(dout: Tensor, x: Tensor, pos: Optional[Tensor], w1: Optional[Tensor],
                 b1: Optional[Tensor], w2: Optional[Tensor], b2: Optional[Tensor],
                 cu_seqlens: Optional[Tensor], cmp_block: int,
                 cmp_stride: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of the compression: ``(dx, dpos, dw1, db1, dw2, db2)``; the mlp's parameter
    gradients are empty tensors for the mean (``pos`` None)."""
    op = "nsa.compress_bwd"
    mlp = None if pos is None else (pos, w1, b1, w2, b2)
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    grads = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in mlp or ()]
    names = ("pos", "w1", "b1", "w2", "b2")
    _core.compress_bwd(
        "auto", threads(), _cmp_cfg(cmp_block, cmp_stride), "mean" if mlp is None else "mlp",
        descs(op, x=ic(x), cu_seqlens=host_int32(cu_seqlens, "cu_seqlens", op), dout=ic(dout),
              dx=dx, **{n: ic(t) for n, t in zip(names, mlp or ())},
              **{"d" + n: g for n, g in zip(names, grads)}))
    return (dx, *(grads or [empty(x) for _ in names]))


@compress_bwd.register_fake
def _(dout, x, pos, w1, b1, w2, b2, cu_seqlens, cmp_block, cmp_stride):
    mlp = None if pos is None else (pos, w1, b1, w2, b2)
    grads = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in mlp or ()]
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            *(grads or [empty(x) for _ in range(5)]))


def _compress_setup(ctx, inputs, output):
    x, *rest = inputs
    ctx.mlp = len(rest) == 8
    mlp = tuple(rest[:5]) if ctx.mlp else (None,) * 5
    cu, l, d = rest[-3:]
    ctx.l, ctx.d = l, d
    ctx.save_for_backward(x, *mlp, cu)


def _compress_backward(ctx, dout):
    x, pos, w1, b1, w2, b2, cu = ctx.saved_tensors
    dx, *dmlp = torch.ops.nsa.compress_bwd(dout, x, pos, w1, b1, w2, b2, cu, ctx.l, ctx.d)
    if ctx.mlp:
        return (dx, *dmlp, None, None, None)
    return dx, None, None, None


torch.library.register_autograd("nsa::compress_mean", _compress_backward,
                                setup_context=_compress_setup)
torch.library.register_autograd("nsa::compress_mlp", _compress_backward,
                                setup_context=_compress_setup)
