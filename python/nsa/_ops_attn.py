"""torch.ops.nsa: the NSA forward and backward (SPEC sections 4 and 6) and the dense baseline.
See nsa.ops for the schemas."""
from typing import Optional

import torch
from torch import Tensor

from . import _bf16, _core
from ._torch_io import cfg_tuple, descs, empty, host_int32, inner_contiguous as ic, threads

_BRANCHES = ("cmp", "slc", "win")
_INPUTS = ("q", "k", "v", "k_slc", "v_slc", "k_win", "v_win", "k_cmp", "v_cmp", "g_cmp",
           "g_slc", "g_win")


def _fwd_shapes(q, v, save):
    B, T, Hq, _ = q.shape
    Dv = v.shape[3]
    o = q.new_empty((B, T, Hq, Dv))
    lse = q.new_empty((3, B, T, Hq), dtype=torch.float32)
    # The saved branch outputs in q's dtype, as FlashAttention saves o: the backward reads them
    # once (D = rowsum(d_o * o_c)), and in f32 they would double the largest saved tensor.
    o_br = q.new_empty((3, B, T, Hq, Dv)) if save else empty(q)
    return o, lse, o_br


@torch.library.custom_op("nsa::fwd", mutates_args=())
def fwd(q: Tensor, k: Tensor, v: Tensor, k_slc: Optional[Tensor], v_slc: Optional[Tensor],
        k_win: Optional[Tensor], v_win: Optional[Tensor], k_cmp: Tensor, v_cmp: Tensor,
        g_cmp: Tensor, g_slc: Tensor, g_win: Tensor, cu_seqlens: Optional[Tensor],
        slc_indices_in: Optional[Tensor], cfg: list[int], scale: float,
        save: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The NSA forward (nsa_fwd). Returns ``o``, the per-branch LSEs stacked ``[3, B, T, Hq]``
    (cmp, slc, win), the ungated branch outputs stacked ``[3, B, T, Hq, Dv]`` in q's dtype when
    ``save`` (else empty: the backward then recomputes them), and the selected blocks
    ``[B, T, Hkv, n]`` int32 (sorted, -1 padded)."""
    op = "nsa.fwd"
    o, lse, o_br = _fwd_shapes(q, v, save)
    idx = q.new_empty((q.shape[0], q.shape[1], k.shape[2], cfg[3]), dtype=torch.int32)
    ins = dict(zip(_INPUTS, (q, k, v, k_slc, v_slc, k_win, v_win, k_cmp, v_cmp, g_cmp, g_slc,
                             g_win)))
    outs = {f"lse_{b}": lse[i] for i, b in enumerate(_BRANCHES)}
    if save:
        outs.update({f"o_{b}": o_br[i] for i, b in enumerate(_BRANCHES)})
    _core.fwd("auto", threads(), cfg_tuple(cfg, scale),
              descs(op, **{n: ic(t) for n, t in ins.items()},
                    cu_seqlens=host_int32(cu_seqlens, "cu_seqlens", op),
                    slc_indices_in=ic(slc_indices_in), o=o, slc_indices_out=idx, **outs),
              bf16_math=_bf16.code())
    return o, lse, o_br, idx


@fwd.register_fake
def _(q, k, v, k_slc, v_slc, k_win, v_win, k_cmp, v_cmp, g_cmp, g_slc, g_win, cu_seqlens,
      slc_indices_in, cfg, scale, save):
    o, lse, o_br = _fwd_shapes(q, v, save)
    return o, lse, o_br, q.new_empty((q.shape[0], q.shape[1], k.shape[2], cfg[3]),
                                     dtype=torch.int32)


def _like(t: Optional[Tensor], ref: Tensor) -> Tensor:
    return torch.empty_like(t, memory_format=torch.contiguous_format) if t is not None \
        else empty(ref)


@torch.library.custom_op("nsa::bwd", mutates_args=())
def bwd(d_o: Tensor, q: Tensor, k: Tensor, v: Tensor, k_slc: Optional[Tensor],
        v_slc: Optional[Tensor], k_win: Optional[Tensor], v_win: Optional[Tensor],
        k_cmp: Tensor, v_cmp: Tensor, g_cmp: Tensor, g_slc: Tensor, g_win: Tensor,
        cu_seqlens: Optional[Tensor], indices: Tensor, lse: Optional[Tensor],
        o_branches: Optional[Tensor], cfg: list[int], scale: float) -> tuple[
            Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
            Tensor, Tensor]:
    """The NSA backward (nsa_bwd) with the selection ``indices`` fixed. Returns ``dq, dk, dv,
    dk_slc, dv_slc, dk_win, dv_win, dk_cmp, dv_cmp, dg_cmp, dg_slc, dg_win``; the per-branch
    K/V gradients are empty when those K/V were not given. dk/dv hold the slc and win branches'
    shares only: the cmp branch reaches k/v through ``dk_cmp``/``dv_cmp`` and compress_bwd.
    Without ``lse``/``o_branches`` (the forward's, for these inputs) the C backward first reruns
    the forward to recompute them."""
    op = "nsa.bwd"
    ins = (q, k, v, k_slc, v_slc, k_win, v_win, k_cmp, v_cmp, g_cmp, g_slc, g_win)
    grads = [_like(t, q) for t in ins]
    saved = {}
    if lse is not None and o_branches is not None and o_branches.numel() > 0:
        saved = {f"lse_{b}": lse[i] for i, b in enumerate(_BRANCHES)}
        saved.update({f"o_{b}": ic(o_branches[i]) for i, b in enumerate(_BRANCHES)})
    _core.bwd("auto", threads(), cfg_tuple(cfg, scale),
              descs(op, **{n: ic(t) for n, t in zip(_INPUTS, ins)},
                    cu_seqlens=host_int32(cu_seqlens, "cu_seqlens", op),
                    slc_indices=ic(indices), d_o=ic(d_o), **saved,
                    **{"d" + n: g for n, t, g in zip(_INPUTS, ins, grads) if t is not None}))
    return tuple(grads)


@bwd.register_fake
def _(d_o, q, k, v, k_slc, v_slc, k_win, v_win, k_cmp, v_cmp, g_cmp, g_slc, g_win, cu_seqlens,
      indices, lse, o_branches, cfg, scale):
    return tuple(_like(t, q) for t in (q, k, v, k_slc, v_slc, k_win, v_win, k_cmp, v_cmp, g_cmp,
                                       g_slc, g_win))


def _fwd_setup(ctx, inputs, output):
    *tensors, cu, idx_in, cfg, scale, save = inputs
    _, lse, o_br, idx = output
    ctx.cfg, ctx.scale, ctx.save = cfg, scale, save
    ctx.present = [t is not None for t in tensors]
    ctx.save_for_backward(*tensors, cu, idx, lse, o_br if save else None)


def _fwd_backward(ctx, d_o, d_lse, d_obr, d_idx):
    *tensors, cu, idx, lse, o_br = ctx.saved_tensors
    grads = torch.ops.nsa.bwd(d_o, *tensors, cu, idx, lse if ctx.save else None, o_br,
                              ctx.cfg, ctx.scale)
    grads = [g if present else None for g, present in zip(grads, ctx.present)]
    return (*grads, None, None, None, None, None)


torch.library.register_autograd("nsa::fwd", _fwd_backward, setup_context=_fwd_setup)


# ------------------------------------------------------------------------------------------------
# Dense causal attention: the baseline (nsa_dense_fwd / nsa_dense_bwd)
# ------------------------------------------------------------------------------------------------

@torch.library.custom_op("nsa::dense_fwd", mutates_args=())
def dense_fwd(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Optional[Tensor], scale: float,
              window: int) -> tuple[Tensor, Tensor]:
    """Causal (``window`` >= 1: sliding-window) softmax attention: ``(o [B, T, Hq, Dv],
    lse [B, T, Hq] f32)``. ``scale`` 0 means ``1/sqrt(Dk)``; ``window`` 0 means every key."""
    op = "nsa.dense_fwd"
    o = q.new_empty((*q.shape[:3], v.shape[3]))
    lse = q.new_empty(q.shape[:3], dtype=torch.float32)
    _core.dense_fwd("auto", threads(), float(scale), int(window),
                    descs(op, q=ic(q), k=ic(k), v=ic(v), o=o, lse=lse,
                          cu_seqlens=host_int32(cu_seqlens, "cu_seqlens", op)),
                    bf16_math=_bf16.code())
    return o, lse


@dense_fwd.register_fake
def _(q, k, v, cu_seqlens, scale, window):
    return q.new_empty((*q.shape[:3], v.shape[3])), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("nsa::dense_bwd", mutates_args=())
def dense_bwd(d_o: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
              cu_seqlens: Optional[Tensor], scale: float,
              window: int) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of dense_fwd: ``(dq, dk, dv)``."""
    op = "nsa.dense_bwd"
    dq, dk, dv = (torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))
    _core.dense_bwd("auto", threads(), float(scale), int(window),
                    descs(op, q=ic(q), k=ic(k), v=ic(v), o=ic(o), lse=ic(lse), d_o=ic(d_o),
                          cu_seqlens=host_int32(cu_seqlens, "cu_seqlens", op),
                          dq=dq, dk=dk, dv=dv))
    return dq, dk, dv


@dense_bwd.register_fake
def _(d_o, q, k, v, o, lse, cu_seqlens, scale, window):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


def _dense_setup(ctx, inputs, output):
    q, k, v, cu, scale, window = inputs
    ctx.scale, ctx.window = scale, window
    ctx.save_for_backward(q, k, v, cu, *output)


def _dense_backward(ctx, d_o, d_lse):
    q, k, v, cu, o, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.nsa.dense_bwd(d_o, q, k, v, o, lse, cu, ctx.scale, ctx.window)
    return dq, dk, dv, None, None, None


torch.library.register_autograd("nsa::dense_fwd", _dense_backward, setup_context=_dense_setup)
