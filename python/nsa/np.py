"""NSA on NumPy arrays, without torch: the forward, the compression and KV-cache decode.

Arrays are float32 or float16 (bfloat16 through ``ml_dtypes`` where installed) and int32 for
indices and ``cu_seqlens``; strided views go to the C API as they are (strides must be
non-negative and the last dimension contiguous). Outputs are new arrays. ``threads`` 0 uses
OpenMP's default; the GIL is released during each C call. Shapes and semantics are those of
:func:`nsa.functional.native_sparse_attention` and nsa.h.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from . import _bf16, _core
from ._desc import Descs
from .config import Config

__all__ = ["compress", "forward", "KVCache"]

_MLP = ("pos", "w1", "b1", "w2", "b2")


def _code(a: np.ndarray, name: str) -> int:
    if a.dtype == np.float32:
        return 0
    if a.dtype.name == "bfloat16":
        return 1
    if a.dtype == np.float16:
        return 2
    if a.dtype == np.int32:
        return 3
    raise TypeError(f"{name}: dtype {a.dtype} is not accepted; nsa takes float32, float16 (bfloat16 "
                    "via ml_dtypes) and int32 for indices; convert with .astype(np.float32)")


def _desc(a: np.ndarray, name: str) -> tuple:
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name}: expected a numpy.ndarray, got {type(a).__name__}")
    if any(s % a.itemsize for s in a.strides):
        raise ValueError(f"{name}: strides {a.strides} are not multiples of the element size")
    return (a.ctypes.data, _code(a, name), a.shape, tuple(s // a.itemsize for s in a.strides))


def _descs(**arrays) -> Descs:
    return Descs(_desc, arrays)


def _seqlens(cu_seqlens) -> Optional[np.ndarray]:
    return None if cu_seqlens is None else np.ascontiguousarray(cu_seqlens, dtype=np.int32)


def _mlp(params: Optional[Sequence[np.ndarray]], prefix: str = "") -> dict:
    if params is None:
        return {}
    if len(params) != 5:
        raise ValueError(f"{prefix or 'mlp'}: expected (pos, w1, b1, w2, b2)")
    return {prefix + n: p for n, p in zip(_MLP, params)}


def compress(x: np.ndarray, config: Optional[Config] = None,
             mlp: Optional[Sequence[np.ndarray]] = None, cu_seqlens=None, *,
             backend: str = "auto", threads: int = 0) -> np.ndarray:
    """Compressed tokens ``[B, Tc, H, D]`` of ``x [B, T, H, D]`` (SPEC 5): the block mean, or
    the learned compressor ``mlp = (pos, w1, b1, w2, b2)``; packed per sequence with
    ``cu_seqlens``."""
    cfg = config or Config()
    cu = _seqlens(cu_seqlens)
    if cu is None:
        tc = cfg.cmp_len(x.shape[1])
    else:
        cu_cmp = np.empty_like(cu)
        _core.cmp_seqlens(cfg.as_tuple(), _desc(cu, "cu_seqlens"), _desc(cu_cmp, "cu_cmp"))
        tc = int(cu_cmp[-1])
    out = np.empty((x.shape[0], tc, x.shape[2], x.shape[3]), dtype=x.dtype)
    _core.compress(backend, threads, cfg.as_tuple(), "mean" if mlp is None else "mlp",
                   _descs(x=x, cu_seqlens=cu, out=out, **_mlp(mlp)))
    return out


def forward(q: np.ndarray, k: np.ndarray, v: np.ndarray, g_cmp: np.ndarray, g_slc: np.ndarray,
            g_win: np.ndarray, *, config: Optional[Config] = None,
            k_mlp: Optional[Sequence[np.ndarray]] = None,
            v_mlp: Optional[Sequence[np.ndarray]] = None, k_cmp: Optional[np.ndarray] = None,
            v_cmp: Optional[np.ndarray] = None, k_slc=None, v_slc=None, k_win=None, v_win=None,
            block_indices: Optional[np.ndarray] = None, cu_seqlens=None,
            return_lse: bool = False, return_indices: bool = False, backend: str = "auto",
            threads: int = 0):
    """The NSA forward (nsa_fwd) on NumPy arrays; arguments and results as in
    :func:`nsa.functional.native_sparse_attention` (``lse`` is ``[3, B, T, Hq]``: cmp, slc,
    win). ``backend="ref"`` runs the float64 reference."""
    cfg = config or Config()
    if k_cmp is None:
        k_cmp = compress(k, cfg, k_mlp, cu_seqlens, backend=backend, threads=threads)
        v_cmp = compress(v, cfg, v_mlp, cu_seqlens, backend=backend, threads=threads)
    B, T, Hq, _ = q.shape
    o = np.empty((B, T, Hq, v.shape[3]), dtype=q.dtype)
    lse = np.empty((3, B, T, Hq), dtype=np.float32)
    idx = np.empty((B, T, k.shape[2], cfg.slc_count), dtype=np.int32)
    _core.fwd(backend, threads, cfg.as_tuple(),
              _descs(q=q, k=k, v=v, k_slc=k_slc, v_slc=v_slc, k_win=k_win, v_win=v_win,
                     k_cmp=k_cmp, v_cmp=v_cmp, g_cmp=g_cmp, g_slc=g_slc, g_win=g_win,
                     cu_seqlens=_seqlens(cu_seqlens), slc_indices_in=block_indices, o=o,
                     lse_cmp=lse[0], lse_slc=lse[1], lse_win=lse[2], slc_indices_out=idx),
              bf16_math=_bf16.code())
    extra = ([lse] if return_lse else []) + ([idx] if return_indices else [])
    return (o, *extra) if extra else o


class KVCache:
    """The KV cache for decode (nsa_kv_cache) on NumPy arrays; see :class:`nsa.cache.KVCache`
    for the semantics. ``dtype`` is ``"f32"`` or ``"bf16"``; ``k_mlp``/``v_mlp`` are copied at
    creation."""

    def __init__(self, num_seqs: int, capacity: int, num_kv_heads: int, head_dim_k: int,
                 head_dim_v: Optional[int] = None, *, config: Optional[Config] = None,
                 dtype: str = "f32", k_mlp=None, v_mlp=None, backend: str = "auto",
                 threads: int = 0):
        if dtype not in ("f32", "bf16"):
            raise ValueError(f"dtype: 'f32' or 'bf16', not {dtype!r}")
        if (k_mlp is None) != (v_mlp is None):
            raise ValueError("k_mlp/v_mlp: give both (mlp compression) or neither (mean)")
        self.config = config or Config()
        self.num_kv_heads, self.head_dim_v = num_kv_heads, head_dim_v or head_dim_k
        self.threads = threads
        self._cache = _core.Cache(backend, threads, self.config.as_tuple(), num_seqs, capacity,
                                  num_kv_heads, head_dim_k, self.head_dim_v,
                                  0 if dtype == "f32" else 1,
                                  "mean" if k_mlp is None else "mlp",
                                  _descs(**_mlp(k_mlp, "k_"), **_mlp(v_mlp, "v_")))

    def lengths(self, seq: int) -> int:
        """Tokens held by sequence ``seq``."""
        return self._cache.len(seq)

    def _outputs(self, rows: int, q: np.ndarray):
        Hq = q.shape[-2]
        return (np.empty((rows, Hq, self.head_dim_v), dtype=np.float32),
                np.empty((3, rows, Hq), dtype=np.float32),
                np.empty((rows, self.num_kv_heads, self.config.slc_count), dtype=np.int32))

    def prefill(self, seq: int, q, k, v, g_cmp, g_slc, g_win):
        """Appends a prompt to the empty sequence ``seq`` and returns its forward's
        ``(o [T, Hq, Dv], lse [3, T, Hq], indices [T, Hkv, n])``."""
        o, lse, idx = self._outputs(q.shape[0], q)
        _core.prefill(self._cache.handle, self._cache.backend, self.threads, seq,
                      _descs(q=q, k=k, v=v, g_cmp=g_cmp, g_slc=g_slc, g_win=g_win, o=o,
                             lse_cmp=lse[0], lse_slc=lse[1], lse_win=lse[2],
                             slc_indices_out=idx))
        return o, lse, idx

    def decode(self, q, g_cmp, g_slc, g_win, k=None, v=None, seq_ids=None):
        """One decode step (nsa_decode) for ``q [S, Hq, Dk]``; ``k``/``v [S, Hkv, D]`` appended
        first when given. Returns ``(o [S, Hq, Dv], lse [3, S, Hq], indices [S, Hkv, n])``."""
        o, lse, idx = self._outputs(q.shape[0], q)
        _core.decode(self._cache.handle, self._cache.backend, self.threads,
                     _descs(q=q, k=k, v=v, seq_ids=_seqlens(seq_ids), g_cmp=g_cmp, g_slc=g_slc,
                            g_win=g_win, o=o, lse_cmp=lse[0], lse_slc=lse[1], lse_win=lse[2],
                            slc_indices_out=idx))
        return o, lse, idx

    def reset(self, seq: int) -> None:
        """Empties sequence ``seq``."""
        self._cache.reset(seq)
