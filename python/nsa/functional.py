"""The differentiable NSA forward on torch tensors: compression, selection, the three branches and
the gates, in one call (docs/SPEC.md sections 3-5)."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from . import ops
from .config import Config

__all__ = ["native_sparse_attention", "compress", "dense_attention"]

MlpParams = Sequence[Tensor]  # (pos [H, l, D], w1 [H, Dh, l*D], b1 [H, Dh], w2 [H, D, Dh], b2 [H, D])


def compress(x: Tensor, config: Optional[Config] = None, mlp: Optional[MlpParams] = None,
             cu_seqlens: Optional[Tensor] = None) -> Tensor:
    """Compressed tokens of raw keys or values (SPEC 5), differentiable in ``x`` and ``mlp``.

    Args:
        x: ``[B, T, H, D]`` float32, bfloat16 or float16.
        config: uses ``cmp_block`` (l) and ``cmp_stride`` (d); default :class:`Config`.
        mlp: None for the mean of each block, or the learned compressor's parameters
            ``(pos [H, l, D], w1 [H, Dh, l*D], b1 [H, Dh], w2 [H, D, Dh], b2 [H, D])``,
            x's dtype: token ``i`` is ``w2 relu(w1 flatten(x[i*d : i*d+l] + pos) + b1) + b2``.
        cu_seqlens: optional int32 ``[S + 1]`` (B = 1): the output is then packed per sequence.

    Returns:
        ``[B, Tc, H, D]``, ``Tc = (T - l) // d + 1`` for ``T >= l`` (else 0), or the sum over
        sequences when packed.
    """
    cfg = _config(config)
    if mlp is None:
        return ops.compress_mean(x, cu_seqlens, cfg.cmp_block, cfg.cmp_stride)
    pos, w1, b1, w2, b2 = _mlp(mlp, "mlp")
    return ops.compress_mlp(x, pos, w1, b1, w2, b2, cu_seqlens, cfg.cmp_block, cfg.cmp_stride)


def native_sparse_attention(
        q: Tensor, k: Tensor, v: Tensor, g_cmp: Tensor, g_slc: Tensor,
        g_win: Optional[Tensor] = None, *, g_swa: Optional[Tensor] = None,
        config: Optional[Config] = None,
        k_mlp: Optional[MlpParams] = None, v_mlp: Optional[MlpParams] = None,
        k_cmp: Optional[Tensor] = None, v_cmp: Optional[Tensor] = None,
        k_slc: Optional[Tensor] = None, v_slc: Optional[Tensor] = None,
        k_win: Optional[Tensor] = None, v_win: Optional[Tensor] = None,
        block_indices: Optional[Tensor] = None, cu_seqlens: Optional[Tensor] = None,
        return_lse: bool = False, return_indices: bool = False,
) -> Union[Tensor, tuple]:
    """Native Sparse Attention (arXiv 2502.11089), differentiable in every float input.

    Each query attends through three branches, mixed by the gates (SPEC 4):
    ``o = g_cmp * o_cmp + g_slc * o_slc + g_win * o_win``. **cmp** attends to compressed tokens
    (one per block of ``l`` keys, stride ``d``); **slc** to the ``n`` blocks of ``l'`` raw keys
    its GQA group's compressed scores rank highest (plus the forced first and local blocks);
    **win** to the last ``w`` keys. Causal throughout.

    Args:
        q: ``[B, T, Hq, Dk]`` float32, bfloat16 or float16.
        k, v: ``[B, T, Hkv, Dk]`` and ``[B, T, Hkv, Dv]``, q's dtype, ``Hq % Hkv == 0`` (any
            group size). The compressor's input, and the slc/win branches' K/V unless those
            branches get their own.
        g_cmp, g_slc, g_win: gate values ``[B, T, Hq]``, float32 or q's dtype, used as given
            (apply the sigmoid before). ``g_swa`` is accepted for ``g_win`` (the name in
            flash-linear-attention's ``parallel_nsa``).
        config: :class:`Config` (default: the paper's).
        k_mlp, v_mlp: the learned compressors' parameters for keys and values (see
            :func:`compress`); both None: mean compression.
        k_cmp, v_cmp: precomputed compressed K/V ``[B, Tc, Hkv, D]`` instead of compressing
            ``k``/``v`` (then ``k_mlp``/``v_mlp`` must be None).
        k_slc, v_slc, k_win, v_win: optional independent K/V for the slc and win branches
            (paper §3.3.3), each pair given together.
        block_indices: optional ``[B, T, Hkv, n]`` int32 caller selection ("bring your own
            selector"): -1 unused, each entry a block in ``[0, t // l']``; used as given (the
            forced blocks are not added). Not differentiated.
        cu_seqlens: optional ``[S + 1]`` int32 CPU tensor packing S sequences along T (B = 1).
        return_lse: also return the per-branch log-sum-exps ``[3, B, T, Hq]`` float32 (cmp,
            slc, win; -inf for an empty branch). Not differentiable.
        return_indices: also return the selected blocks ``[B, T, Hkv, n]`` int32 (sorted
            ascending, -1 padded). Selection is a constant of the backward (SPEC 6).

    Returns:
        ``o [B, T, Hq, Dv]`` in q's dtype; with a flag, the tuple ``(o, lse?, indices?)``.

    Raises:
        ValueError: a shape, stride, dtype, config or content rule of nsa.h is broken; the
            message names the argument.
        NotImplementedError: a CUDA tensor (this build has no CUDA backend).
    """
    cfg = _config(config)
    g_win = _gate_alias(g_win, g_swa)
    if (k_cmp is None) != (v_cmp is None):
        raise ValueError("k_cmp/v_cmp: give both or neither")
    if k_cmp is None:
        if (k_mlp is None) != (v_mlp is None):
            raise ValueError("k_mlp/v_mlp: give both (mlp compression) or neither (mean)")
        k_cmp = _compress_named(k, cfg, k_mlp, cu_seqlens, "k", "k_mlp")
        v_cmp = _compress_named(v, cfg, v_mlp, cu_seqlens, "v", "v_mlp")
    elif k_mlp is not None or v_mlp is not None:
        raise ValueError("k_mlp/v_mlp: not used when k_cmp/v_cmp are given")
    inputs = (q, k, v, k_slc, v_slc, k_win, v_win, k_cmp, v_cmp, g_cmp, g_slc, g_win)
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
    o, lse, _, idx = ops.fwd(*inputs, cu_seqlens, block_indices, cfg.ints(), float(cfg.scale),
                             save)
    extra = ([lse.detach()] if return_lse else []) + ([idx] if return_indices else [])
    return (o, *extra) if extra else o


def dense_attention(q: Tensor, k: Tensor, v: Tensor, *, scale: float = 0.0, window: int = 0,
                    cu_seqlens: Optional[Tensor] = None) -> Tensor:
    """The dense causal baseline (nsa_dense_fwd), differentiable: softmax attention of each
    query over every earlier key (``window`` >= 1: the last ``window`` keys), GQA as in NSA.
    ``scale`` 0 means ``1/sqrt(Dk)``. Shapes as in :func:`native_sparse_attention`."""
    return ops.dense_fwd(q, k, v, cu_seqlens, float(scale), int(window))[0]


def _compress_named(x, cfg, mlp, cu_seqlens, name, mlp_name):
    """compress(), with the C API's names for its arguments (x, pos, ...) told as the caller's."""
    try:
        return compress(x, cfg, mlp, cu_seqlens)
    except ValueError as e:
        raise ValueError(f"{name} (compressed for the cmp branch, with {mlp_name} as its "
                         f"parameters): {e}") from None


def _config(config: Optional[Config]) -> Config:
    if config is None:
        return Config()
    if not isinstance(config, Config):
        raise TypeError(f"config: expected nsa.Config, got {type(config).__name__}")
    return config


def _gate_alias(g_win: Optional[Tensor], g_swa: Optional[Tensor]) -> Tensor:
    if g_win is not None and g_swa is not None:
        raise ValueError("g_win/g_swa: the same gate under two names; give one")
    g = g_win if g_win is not None else g_swa
    if g is None:
        raise ValueError("g_win: required (or g_swa)")
    return g


def _mlp(params: MlpParams, name: str) -> tuple:
    if len(params) != 5:
        raise ValueError(f"{name}: expected (pos, w1, b1, w2, b2), got {len(params)} tensors")
    return tuple(params)
