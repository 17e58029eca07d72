"""The paper's attention layer as a ``torch.nn.Module``, with a KV-cache generation step."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from .cache import KVCache
from .config import Config
from .functional import native_sparse_attention

__all__ = ["NativeSparseAttention", "KVCache", "rotary"]


def rotary(x: Tensor, positions: Tensor, base: float = 10000.0) -> Tensor:
    """Rotary position embedding (rotate-half form) of ``x [..., T, H, D]`` at integer
    ``positions [..., T]``, computed in float32 and returned in x's dtype."""
    half = x.shape[-1] // 2
    inv = base ** (-torch.arange(half, dtype=torch.float32, device=x.device) / half)
    angle = positions.to(torch.float32)[..., None] * inv
    cos, sin = angle.cos()[..., None, :], angle.sin()[..., None, :]
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


def _positions(T: int, B: int, cu_seqlens: Optional[Tensor], device) -> Tensor:
    """Each token's position in its own sequence: ``[B, T]`` (with cu_seqlens, B = 1 and
    positions restart at 0 at every sequence start)."""
    t = torch.arange(T, device=device)
    if cu_seqlens is None:
        return t.expand(B, T)
    cu = cu_seqlens.to(device=device, dtype=torch.int64)
    seq = torch.searchsorted(cu[1:], t, right=True).clamp_max(cu.numel() - 2)
    return (t - cu[seq]).unsqueeze(0)


def _cache_dtype(dtype: torch.dtype) -> torch.dtype:
    """A cache's storage for a layer of ``dtype``: its own, float32 for float16 (nsa.h: a cache
    holds float32 or bfloat16; float16 widens into float32 exactly)."""
    return torch.float32 if dtype == torch.float16 else dtype


class NativeSparseAttention(nn.Module):
    """Native Sparse Attention (arXiv 2502.11089, §3): projections, gates, compression, RoPE.

    ``x [B, T, dim] -> [B, T, dim]``. Queries ``Hq = num_heads`` and keys/values
    ``Hkv = num_kv_heads`` (GQA: any ``Hq % Hkv == 0``); the slc branch's blocks are chosen once
    per KV group. Each branch's gate is ``sigmoid(Linear(x))`` per query head (§3.3). The cmp
    branch's tokens come from the learned mlp compressor with its intra-block position encoding
    (§3.3.1; ``compression="mean"`` for the block mean).

    Args:
        dim: model width.
        num_heads, num_kv_heads: Hq and Hkv.
        head_dim: Dk (default ``dim // num_heads``); head_dim_v: Dv (default Dk).
        config: :class:`nsa.Config` (default: the paper's).
        compression: ``"mlp"`` (default) or ``"mean"``.
        cmp_hidden: the mlp compressor's hidden width Dh (default: its head dim).
        separate_kv: independent K/V projections for the three branches (§3.3.3), as the paper
            does to keep the branches' gradients apart; default shares one K/V.
        rope: apply rotary embeddings to queries and keys (before compression; the compressed
            keys carry them through the mlp); rope_base: its base.
        bias: biases in the q/k/v/output projections.

    Generation: ``cache = layer.new_cache(batch, capacity)``, ``layer.prefill(x, cache)`` for a
    prompt, then ``layer.step(x_t, cache)`` per token; each gives the rows the full forward gives
    (tested). The cache copies the compressor's parameters when made (see :class:`KVCache`).
    """

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, *,
                 head_dim: Optional[int] = None, head_dim_v: Optional[int] = None,
                 config: Optional[Config] = None, compression: str = "mlp",
                 cmp_hidden: Optional[int] = None, separate_kv: bool = False, rope: bool = True,
                 rope_base: float = 10000.0, bias: bool = False, device=None, dtype=None):
        super().__init__()
        if num_heads < 1 or num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a positive multiple of "
                             f"num_kv_heads ({num_kv_heads})")
        if compression not in ("mlp", "mean"):
            raise ValueError(f"compression: 'mlp' or 'mean', not {compression!r}")
        self.config = (config or Config()).validate()
        self.dim, self.num_heads, self.num_kv_heads = dim, num_heads, num_kv_heads
        self.head_dim = head_dim or dim // num_heads
        self.head_dim_v = head_dim_v or self.head_dim
        if rope and self.head_dim % 2:
            raise ValueError(f"head_dim: rotary embeddings need an even head_dim, got "
                             f"{self.head_dim}")
        self.compression, self.separate_kv, self.rope, self.rope_base = (
            compression, separate_kv, rope, rope_base)
        kw = dict(device=device, dtype=dtype)
        branches = 3 if separate_kv else 1
        Hq, Hkv, Dk, Dv = num_heads, num_kv_heads, self.head_dim, self.head_dim_v
        self.q_proj = nn.Linear(dim, Hq * Dk, bias=bias, **kw)
        self.k_proj = nn.Linear(dim, branches * Hkv * Dk, bias=bias, **kw)
        self.v_proj = nn.Linear(dim, branches * Hkv * Dv, bias=bias, **kw)
        self.gate = nn.Linear(dim, 3 * Hq, **kw)
        self.o_proj = nn.Linear(Hq * Dv, dim, bias=bias, **kw)
        if compression == "mlp":
            l = self.config.cmp_block
            for prefix, D in (("k_", Dk), ("v_", Dv)):
                Dh = cmp_hidden or D
                shapes = {"pos": (Hkv, l, D), "w1": (Hkv, Dh, l * D), "b1": (Hkv, Dh),
                          "w2": (Hkv, D, Dh), "b2": (Hkv, D)}
                for name, shape in shapes.items():
                    self.register_parameter(prefix + name, nn.Parameter(torch.empty(shape, **kw)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.gate, self.o_proj):
            lin.reset_parameters()
        if self.compression == "mlp":
            for p in ("k_", "v_"):
                # As nn.Linear initialises a layer of that fan-in; pos starts small.
                w1, w2 = getattr(self, p + "w1"), getattr(self, p + "w2")
                nn.init.uniform_(w1, -1 / math.sqrt(w1.shape[2]), 1 / math.sqrt(w1.shape[2]))
                nn.init.uniform_(w2, -1 / math.sqrt(w2.shape[2]), 1 / math.sqrt(w2.shape[2]))
                nn.init.normal_(getattr(self, p + "pos"), std=0.02)
                nn.init.zeros_(getattr(self, p + "b1"))
                nn.init.zeros_(getattr(self, p + "b2"))

    def mlp_params(self, which: str):
        """The compressor's ``(pos, w1, b1, w2, b2)`` for ``"k"`` or ``"v"`` (None for mean)."""
        if self.compression != "mlp":
            return None
        return tuple(getattr(self, f"{which}_{n}") for n in ("pos", "w1", "b1", "w2", "b2"))

    def _project(self, x: Tensor, positions: Tensor):
        """q [.., Hq, Dk], k/v [.., branches, Hkv, D] and the three gates [.., Hq], RoPE applied.
        x is [B, T, dim] (positions [B, T]) or [S, dim] (positions [S])."""
        lead = x.shape[:-1]
        Hq, Hkv, Dk, Dv = self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim_v
        q = self.q_proj(x).view(*lead, Hq, Dk)
        k = self.k_proj(x).view(*lead, -1, Hkv, Dk)
        v = self.v_proj(x).view(*lead, -1, Hkv, Dv)
        if self.rope:
            q = rotary(q, positions, self.rope_base)
            k = rotary(k.flatten(-3, -2), positions, self.rope_base).view(k.shape)
        g = torch.sigmoid(self.gate(x)).view(*lead, 3, Hq)
        return q, k, v, g.unbind(-2)

    def forward(self, x: Tensor, cu_seqlens: Optional[Tensor] = None) -> Tensor:
        """``x [B, T, dim] -> [B, T, dim]``; with ``cu_seqlens`` (int32 ``[S + 1]``, B = 1) the
        rows hold S packed sequences, each attending only to itself, positions restarting."""
        B, T, _ = x.shape
        q, k, v, (g_cmp, g_slc, g_win) = self._project(x, _positions(T, B, cu_seqlens, x.device))
        per_branch = {}
        if self.separate_kv:
            per_branch = dict(k_slc=k[:, :, 1], v_slc=v[:, :, 1], k_win=k[:, :, 2],
                              v_win=v[:, :, 2])
        o = native_sparse_attention(q, k[:, :, 0], v[:, :, 0], g_cmp, g_slc, g_win,
                                    config=self.config, k_mlp=self.mlp_params("k"),
                                    v_mlp=self.mlp_params("v"), cu_seqlens=cu_seqlens,
                                    **per_branch)
        return self.o_proj(o.reshape(B, T, -1))

    def new_cache(self, batch_size: int, capacity: int,
                  dtype: Optional[torch.dtype] = None) -> KVCache:
        """A cache for ``batch_size`` sequences of up to ``capacity`` tokens, holding this
        layer's compressor parameters as they are now; dtype: the layer's by default (float32
        for a float16 layer: a cache stores float32 or bfloat16)."""
        if self.separate_kv:
            raise NotImplementedError("separate_kv: the KV cache holds one K/V for the three "
                                      "branches (nsa_decode); decode needs separate_kv=False")
        return KVCache(batch_size, capacity, self.num_kv_heads, self.head_dim, self.head_dim_v,
                       config=self.config, dtype=dtype or _cache_dtype(self.q_proj.weight.dtype),
                       k_mlp=self.mlp_params("k"), v_mlp=self.mlp_params("v"))

    @torch.no_grad()
    def prefill(self, x: Tensor, cache: KVCache) -> Tensor:
        """Runs a prompt ``x [B, T, dim]`` into the empty sequences ``0..B-1`` of ``cache`` and
        returns its outputs ``[B, T, dim]`` (the forward's)."""
        B, T, _ = x.shape
        q, k, v, g = self._project(x, _positions(T, B, None, x.device))
        dt = cache.dtype
        rows = [cache.prefill(b, q[b].to(dt), k[b, :, 0].to(dt), v[b, :, 0].to(dt),
                              *(gi[b].to(dt) for gi in g))[0] for b in range(B)]
        return self.o_proj(torch.stack(rows).to(x.dtype).reshape(B, T, -1))

    @torch.no_grad()
    def step(self, x: Tensor, cache: KVCache, seq_ids: Optional[Tensor] = None) -> Tensor:
        """One generation step: ``x [S, 1, dim]`` (or ``[S, dim]``), the next token of sequences
        ``seq_ids`` (default ``0..S-1``), is appended to the cache and attended from; returns
        ``[S, 1, dim]``."""
        xs = x.reshape(-1, self.dim)
        S = xs.shape[0]
        ids = torch.arange(S) if seq_ids is None else seq_ids.to(torch.int64)
        q, k, v, g = self._project(xs, cache.lengths[ids])
        o, _, _ = cache.decode(q, *g, k=k[:, 0], v=v[:, 0], seq_ids=seq_ids)
        return self.o_proj(o.to(x.dtype).reshape(S, -1)).view(S, 1, self.dim)
