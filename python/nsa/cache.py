"""A KV cache for generation (nsa_kv_cache, SPEC section 7) on torch tensors."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from . import _core, ops
from ._torch_io import _DTYPES, descs, threads
from .config import Config

__all__ = ["KVCache"]

_MLP = ("pos", "w1", "b1", "w2", "b2")


class KVCache:
    """The library-owned KV cache behind :meth:`prefill` and :meth:`decode`.

    Holds, for each of ``num_seqs`` sequences, the raw keys and values of up to ``capacity``
    tokens and their compressed tokens (each computed once, when its block completes, by the
    cache's own mean or mlp compressor). Memory for the whole capacity is reserved here.

    Args:
        num_seqs: sequences (batch slots).
        capacity: tokens per sequence.
        num_kv_heads, head_dim_k, head_dim_v: Hkv, Dk, Dv (``head_dim_v`` default: Dk).
        config: the :class:`Config` every call on the cache uses.
        dtype: storage, ``torch.float32`` or ``torch.bfloat16``.
        k_mlp, v_mlp: the learned compressors' parameters ``(pos, w1, b1, w2, b2)`` for keys and
            values (None: mean compression). **Copied at creation**: a cache made before a
            training step keeps the old parameters.

    ``lengths`` (``[num_seqs]`` int64) mirrors the tokens each sequence holds; the ops update it,
    which is how ``torch.compile`` sees that a step changes the cache.
    """

    def __init__(self, num_seqs: int, capacity: int, num_kv_heads: int, head_dim_k: int,
                 head_dim_v: Optional[int] = None, *, config: Optional[Config] = None,
                 dtype: torch.dtype = torch.float32, k_mlp: Optional[Sequence[Tensor]] = None,
                 v_mlp: Optional[Sequence[Tensor]] = None, backend: str = "auto"):
        self.config = config or Config()
        self.num_kv_heads = num_kv_heads
        self.head_dim_v = head_dim_v or head_dim_k
        if dtype not in (torch.float32, torch.bfloat16):
            raise TypeError(f"dtype: the cache stores float32 or bfloat16, not {dtype}")
        if (k_mlp is None) != (v_mlp is None):
            raise ValueError("k_mlp/v_mlp: give both (mlp compression) or neither (mean)")
        mlp = {}
        if k_mlp is not None:
            for prefix, params in (("k_", k_mlp), ("v_", v_mlp)):
                mlp.update({prefix + n: t.detach() for n, t in zip(_MLP, params)})
        self._cache = _core.Cache(backend, threads(), self.config.as_tuple(), num_seqs, capacity,
                                  num_kv_heads, head_dim_k, self.head_dim_v, _DTYPES[dtype],
                                  "mean" if k_mlp is None else "mlp",
                                  descs("nsa.KVCache", **mlp))
        self.dtype = dtype
        self.lengths = torch.zeros(num_seqs, dtype=torch.int64)
        # Plain Python values (not properties of the extension's object), so that torch.compile
        # traces a step as constants instead of breaking the graph at a C call.
        self.handle: int = self._cache.handle
        self.backend: str = self._cache.backend

    def prefill(self, seq: int, q: Tensor, k: Tensor, v: Tensor, g_cmp: Tensor, g_slc: Tensor,
                g_win: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Appends a prompt to the empty sequence ``seq`` and runs the forward for its queries:
        ``q [T, Hq, Dk]``, ``k [T, Hkv, Dk]``, ``v [T, Hkv, Dv]`` in the cache's dtype, gates
        ``[T, Hq]``. Returns ``(o [T, Hq, Dv], lse [3, T, Hq], indices [T, Hkv, n])``."""
        return ops.prefill(self.lengths, self.handle, self.backend, seq, q, k, v, g_cmp,
                           g_slc, g_win, self.num_kv_heads, self.config.slc_count)

    def decode(self, q: Tensor, g_cmp: Tensor, g_slc: Tensor, g_win: Tensor,
               k: Optional[Tensor] = None, v: Optional[Tensor] = None,
               seq_ids: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
        """One decode step: query ``q[s] [Hq, Dk]`` of sequence ``seq_ids[s]`` (default ``s``)
        at the position after its cached tokens, the new token's ``k``/``v`` (``[S, Hkv, D]``)
        appended first when given. Returns ``(o [S, Hq, Dv], lse [3, S, Hq],
        indices [S, Hkv, n])``, equal to the full forward's rows at those positions."""
        return ops.decode(self.lengths, self.handle, self.backend, q, k, v, seq_ids,
                          g_cmp, g_slc, g_win, self.num_kv_heads, self.head_dim_v,
                          self.config.slc_count)

    def reset(self, seq: int) -> None:
        """Empties sequence ``seq`` (its memory is kept)."""
        self._cache.reset(seq)
        self.lengths[seq] = 0

    def close(self) -> None:
        """Frees the cache now (it is also freed when garbage-collected); later calls on it raise
        ValueError."""
        self._cache.close()
        self.handle = 0
