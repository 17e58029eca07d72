"""nsa's torch ops, registered by schema under ``torch.ops.nsa``.

Each op calls the C API through ``nsa._core`` (no torch headers: one build serves every torch),
has a fake implementation (so ``torch.compile`` traces it without running it) and, where it is
differentiable, an autograd formula built on the backward ops. Tensors go to the C API as
(pointer, shape, strides): a strided view is not copied unless its last dimension is strided.
Outputs are allocated by torch. The CPU ops run on ``torch.get_num_threads()`` threads with the
GIL released. A CUDA tensor raises ``NotImplementedError`` naming the missing backend.

The ops (shapes as in nsa.h; ``cfg`` is the seven integer fields of :class:`nsa.Config` in order,
``scale`` its eighth):

- ``compress_mean(x, cu_seqlens, cmp_block, cmp_stride) -> k_cmp``
- ``compress_mlp(x, pos, w1, b1, w2, b2, cu_seqlens, cmp_block, cmp_stride) -> k_cmp``
- ``compress_bwd(dout, x, pos, w1, b1, w2, b2, cu_seqlens, cmp_block, cmp_stride)
  -> (dx, dpos, dw1, db1, dw2, db2)`` (mean: the parameter gradients are empty)
- ``fwd(q, k, v, k_slc, v_slc, k_win, v_win, k_cmp, v_cmp, g_cmp, g_slc, g_win, cu_seqlens,
  slc_indices_in, cfg, scale, save) -> (o, lse [3, B, T, Hq] f32, o_branches [3, B, T, Hq, Dv]
  in q's dtype (empty unless save), indices [B, T, Hkv, n] int32)``
- ``bwd(d_o, <fwd's inputs>, indices, lse, o_branches, cfg, scale)
  -> (dq, dk, dv, dk_slc, dv_slc, dk_win, dv_win, dk_cmp, dv_cmp, dg_cmp, dg_slc, dg_win)``
- ``dense_fwd(q, k, v, cu_seqlens, scale, window) -> (o, lse)`` and
  ``dense_bwd(d_o, q, k, v, o, lse, cu_seqlens, scale, window) -> (dq, dk, dv)``
- ``prefill`` and ``decode`` on a cache (:class:`nsa.nn.KVCache` holds it): they mutate the
  cache's ``lengths`` tensor, which is how torch sees their side effect.
"""
from __future__ import annotations

from ._ops_attn import bwd, dense_bwd, dense_fwd, fwd
from ._ops_compress import compress_bwd, compress_mean, compress_mlp
from ._ops_decode import decode, prefill

__all__ = ["compress_mean", "compress_mlp", "compress_bwd", "fwd", "bwd", "dense_fwd",
           "dense_bwd", "prefill", "decode"]
