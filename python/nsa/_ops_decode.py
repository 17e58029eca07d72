"""torch.ops.nsa: prefill and decode on a KV cache (SPEC section 7). See nsa.ops.

The cache is C state torch cannot see; each op takes the cache's handle (an int) and its
``lengths`` tensor ([num_seqs] int64, kept equal to the C cache's lengths), which the op declares
as mutated. That makes the side effect visible: under ``torch.compile`` a step is never dropped
as dead code or reordered past another step on the same cache."""
from typing import Optional

import torch
from torch import Tensor

from . import _core
from ._torch_io import descs, host_int32, inner_contiguous as ic, threads


def _outputs(q, rows, num_kv_heads, head_dim_v, slc_count):
    Hq = q.shape[-2]
    o = q.new_empty((rows, Hq, head_dim_v))
    lse = q.new_empty((3, rows, Hq), dtype=torch.float32)
    idx = q.new_empty((rows, num_kv_heads, slc_count), dtype=torch.int32)
    return o, lse, idx


def _outs(o, lse, idx):
    return dict(o=o, lse_cmp=lse[0], lse_slc=lse[1], lse_win=lse[2], slc_indices_out=idx)


@torch.library.custom_op("nsa::prefill", mutates_args=("lengths",))
def prefill(lengths: Tensor, cache: int, backend: str, seq: int, q: Tensor, k: Tensor,
            v: Tensor, g_cmp: Tensor, g_slc: Tensor, g_win: Tensor, num_kv_heads: int,
            slc_count: int) -> tuple[Tensor, Tensor, Tensor]:
    """Appends a prompt (``q [T, Hq, Dk]``, ``k [T, Hkv, Dk]``, ``v [T, Hkv, Dv]``, gates
    ``[T, Hq]``) to the empty sequence ``seq`` and runs the forward for its queries (nsa_prefill).
    Returns ``(o [T, Hq, Dv], lse [3, T, Hq], indices [T, Hkv, n])``; ``lengths[seq]`` grows by T.
    """
    op = "nsa.prefill"
    o, lse, idx = _outputs(q, q.shape[0], num_kv_heads, v.shape[-1], slc_count)
    _core.prefill(cache, backend, threads(), seq,
                  descs(op, q=ic(q), k=ic(k), v=ic(v), g_cmp=ic(g_cmp), g_slc=ic(g_slc),
                        g_win=ic(g_win), **_outs(o, lse, idx)))
    lengths[seq] += q.shape[0]
    return o, lse, idx


@prefill.register_fake
def _(lengths, cache, backend, seq, q, k, v, g_cmp, g_slc, g_win, num_kv_heads, slc_count):
    return _outputs(q, q.shape[0], num_kv_heads, v.shape[-1], slc_count)


@torch.library.custom_op("nsa::decode", mutates_args=("lengths",))
def decode(lengths: Tensor, cache: int, backend: str, q: Tensor, k: Optional[Tensor],
           v: Optional[Tensor], seq_ids: Optional[Tensor], g_cmp: Tensor, g_slc: Tensor,
           g_win: Tensor, num_kv_heads: int, head_dim_v: int,
           slc_count: int) -> tuple[Tensor, Tensor, Tensor]:
    """One decode step for S sequences (nsa_decode): ``q [S, Hq, Dk]``, optionally the new
    tokens' ``k [S, Hkv, Dk]`` and ``v [S, Hkv, Dv]`` (appended first), ``seq_ids [S]`` (None:
    0..S-1), gates ``[S, Hq]``. Returns ``(o [S, Hq, Dv], lse [3, S, Hq], indices [S, Hkv, n])``;
    with k/v, ``lengths[seq_ids]`` grows by one."""
    op = "nsa.decode"
    o, lse, idx = _outputs(q, q.shape[0], num_kv_heads, head_dim_v, slc_count)
    ids = host_int32(seq_ids, "seq_ids", op)
    _core.decode(cache, backend, threads(),
                 descs(op, q=ic(q), k=ic(k), v=ic(v), seq_ids=ids, g_cmp=ic(g_cmp),
                       g_slc=ic(g_slc), g_win=ic(g_win), **_outs(o, lse, idx)))
    if k is not None:
        if ids is None:
            lengths[: q.shape[0]] += 1
        else:
            lengths[ids.long()] += 1
    return o, lse, idx


@decode.register_fake
def _(lengths, cache, backend, q, k, v, seq_ids, g_cmp, g_slc, g_win, num_kv_heads, head_dim_v,
      slc_count):
    return _outputs(q, q.shape[0], num_kv_heads, head_dim_v, slc_count)
