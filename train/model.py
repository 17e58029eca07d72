"""The GPT the experiments train: RMSNorm, rotary embeddings, SwiGLU, tied embeddings, and one of
three attentions (``nsa``, ``full``, ``window``) that differ in nothing else.

All three share the q/k/v/output projections (same names, shapes and initial values, GQA with the
same Hkv); the NSA twin adds the paper's gates and learned mlp compressors (§3.3), nothing more.
Rotary embeddings are ``nsa.nn.rotary`` for all three. The parameters are initialised by name from
the seed (``init_parameters``), so two twins built from one seed hold bit-equal values in every
parameter they share, whatever the construction order.
"""
from __future__ import annotations

import dataclasses
import math
import zlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import nsa
from nsa.nn import NativeSparseAttention, rotary

ATTENTIONS = ("nsa", "full", "window")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab: int = 256          # bytes
    dim: int = 128
    layers: int = 4
    heads: int = 4            # Hq
    kv_heads: int = 1         # Hkv (GQA), shared by the three twins
    attention: str = "nsa"
    nsa: nsa.Config = nsa.Config(cmp_block=16, cmp_stride=8, slc_block=32, slc_count=8,
                                 window=128)
    rope_base: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def hidden(self) -> int:
        """SwiGLU width: 8/3 of dim (the parameter count of a 4x GELU MLP), a multiple of 32."""
        return 32 * math.ceil(8 * self.dim / 3 / 32)


class DenseAttention(nn.Module):
    """Causal GQA attention through ``scaled_dot_product_attention``; ``window`` > 0 keeps only
    the last ``window`` keys, the query's own included (the win branch's rule, docs/SPEC.md step 5).
    Projections named and shaped as in ``NativeSparseAttention``."""

    def __init__(self, cfg: ModelConfig, window: int = 0):
        super().__init__()
        H, Hkv, D = cfg.heads, cfg.kv_heads, cfg.head_dim
        self.heads, self.kv_heads, self.head_dim, self.window = H, Hkv, D, window
        self.rope_base = cfg.rope_base
        self.q_proj = nn.Linear(cfg.dim, H * D, bias=False)
        self.k_proj = nn.Linear(cfg.dim, Hkv * D, bias=False)
        self.v_proj = nn.Linear(cfg.dim, Hkv * D, bias=False)
        self.o_proj = nn.Linear(H * D, cfg.dim, bias=False)

    def qkv(self, x: Tensor, positions: Tensor):
        """q [B, T, H, D], k/v [B, T, Hkv, D], rotary applied at ``positions [B, T]``."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.kv_heads, self.head_dim)
        return (rotary(q, positions, self.rope_base), rotary(k, positions, self.rope_base), v)

    def forward(self, x: Tensor) -> Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv(x, torch.arange(T, device=x.device).expand(B, T))
        if self.window and self.window < T:
            o = banded_attention(q, k, v, self.window)
        else:
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                               v.transpose(1, 2), is_causal=True,
                                               enable_gqa=True).transpose(1, 2)
        return self.o_proj(o.reshape(B, T, -1))


def banded_attention(q: Tensor, k: Tensor, v: Tensor, w: int) -> Tensor:
    """Causal attention to the last ``w`` keys, the query's own included, in O(T w): the queries
    in chunks of w, each chunk against its own and the previous chunk's keys under a band mask
    (a [T, T] mask would cost T^2 time and memory: 4 GiB per layer at 16k).
    q [B, T, H, D], k/v [B, T, Hkv, D] -> [B, T, H, D]."""
    B, T, H, D = q.shape
    n = -(-T // w)
    pad = n * w - T
    q = F.pad(q, (0, 0, 0, 0, 0, pad)).view(B, n, w, H, D).transpose(2, 3)

    def chunks(x):  # keys padded by one chunk in front: chunk c reads padded rows [cw, cw + 2w)
        x = F.pad(x, (0, 0, 0, 0, w, pad))
        return x.unfold(1, 2 * w, w).permute(0, 1, 2, 4, 3)      # [B, n, Hkv, 2w, D]

    i = torch.arange(w)[:, None] + w                              # the query's padded row
    j = torch.arange(2 * w)[None, :]
    first = (torch.arange(n) == 0)[:, None, None]
    band = (j <= i) & (i - j < w) & ~(first & (j < w))            # no key before position 0
    o = F.scaled_dot_product_attention(q, chunks(k), chunks(v), attn_mask=band[:, None],
                                       enable_gqa=True)           # [B, n, H, w, D]
    return o.transpose(2, 3).reshape(B, n * w, H, D)[:, :T]


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w_gate = nn.Linear(dim, hidden, bias=False)
        self.w_up = nn.Linear(dim, hidden, bias=False)
        self.w_down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


def make_attention(cfg: ModelConfig) -> nn.Module:
    if cfg.attention == "nsa":
        return NativeSparseAttention(cfg.dim, cfg.heads, cfg.kv_heads, config=cfg.nsa,
                                     compression="mlp", rope=True, rope_base=cfg.rope_base)
    if cfg.attention == "full":
        return DenseAttention(cfg)
    if cfg.attention == "window":
        return DenseAttention(cfg, window=cfg.nsa.window)
    raise ValueError(f"attention: one of {ATTENTIONS}, not {cfg.attention!r}")


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.dim, eps=1e-6)
        self.attn = make_attention(cfg)
        self.mlp_norm = nn.RMSNorm(cfg.dim, eps=1e-6)
        self.mlp = SwiGLU(cfg.dim, cfg.hidden)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig, seed: int = 0):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = nn.RMSNorm(cfg.dim, eps=1e-6)
        init_parameters(self, seed)

    def forward(self, tokens: Tensor) -> Tensor:
        """``tokens [B, T]`` int64 -> logits ``[B, T, vocab]`` (the head is the embedding)."""
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return F.linear(self.norm(x), self.embed.weight)


def init_parameters(model: GPT, seed: int) -> None:
    """Every parameter drawn from its own generator, seeded by ``(seed, name)``: GPT-2's scheme
    (normal, std 0.02; the residual outputs scaled by 1/sqrt(2 * layers)), norms at one, the NSA
    gate's bias at zero (each gate starts at sigmoid(0) = 1/2), the compressors as
    ``NativeSparseAttention.reset_parameters`` draws them."""
    layers = model.cfg.layers
    with torch.no_grad():
        for name, p in model.named_parameters():
            g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            leaf = name.rsplit(".", 1)[-1]
            if "norm" in name:
                p.fill_(1.0)
            elif leaf in ("bias", "b1", "b2"):
                p.zero_()
            elif leaf in ("k_w1", "k_w2", "v_w1", "v_w2"):
                bound = 1 / math.sqrt(p.shape[2])
                p.copy_(torch.rand(p.shape, generator=g) * 2 * bound - bound)
            else:
                std = 0.02 / math.sqrt(2 * layers) if ("o_proj" in name or "w_down" in name) \
                    else 0.02
                p.copy_(torch.randn(p.shape, generator=g) * std)


def parameter_counts(model: GPT) -> dict:
    """Parameters in total and in the NSA-only parts (gates and compressors)."""
    total = sum(p.numel() for p in model.parameters())
    extra = sum(p.numel() for n, p in model.named_parameters()
                if ".attn.gate." in n or n.rsplit(".", 1)[-1].startswith(("k_", "v_")))
    return {"total": total, "nsa_only": extra}


# ---- generation: one KV cache per layer ----------------------------------------------------------

class DenseCache:
    """K/V of the dense twins for ``capacity`` tokens of one sequence, appended a step at a time;
    the step attends with ``scaled_dot_product_attention`` over the whole past (the dense decode
    NSA's is measured against)."""

    def __init__(self, attn: DenseAttention, capacity: int):
        shape = (1, attn.kv_heads, capacity, attn.head_dim)
        self.k, self.v, self.length = torch.empty(shape), torch.empty(shape), 0

    def append(self, k: Tensor, v: Tensor) -> None:
        """k, v: [1, T, Hkv, D]."""
        T = k.shape[1]
        self.k[:, :, self.length:self.length + T] = k.transpose(1, 2)
        self.v[:, :, self.length:self.length + T] = v.transpose(1, 2)
        self.length += T


def _dense_step(attn: DenseAttention, x: Tensor, cache: DenseCache) -> Tensor:
    """x [1, T, dim] appended at the cache's end (T > 1: a prompt, causal within itself)."""
    T, start = x.shape[1], cache.length
    q, k, v = attn.qkv(x, torch.arange(start, start + T).unsqueeze(0))
    cache.append(k, v)
    end, lo = cache.length, max(0, start - attn.window + 1) if attn.window else 0
    mask = None
    if T > 1 or attn.window:
        i = torch.arange(start, end)[:, None]
        j = torch.arange(lo, end)[None, :]
        mask = (j <= i) & ((i - j < attn.window) if attn.window else True)
    o = F.scaled_dot_product_attention(q.transpose(1, 2), cache.k[:, :, lo:end],
                                       cache.v[:, :, lo:end], attn_mask=mask, enable_gqa=True)
    return attn.o_proj(o.transpose(1, 2).reshape(1, T, -1))


@torch.no_grad()
def new_caches(model: GPT, capacity: int) -> list:
    """One cache per layer for a single sequence of up to ``capacity`` tokens."""
    return [b.attn.new_cache(1, capacity) if isinstance(b.attn, NativeSparseAttention)
            else DenseCache(b.attn, capacity) for b in model.blocks]


@torch.no_grad()
def extend(model: GPT, tokens: Tensor, caches: list) -> Tensor:
    """Runs ``tokens [1, T]`` through the model after what the caches hold (a prompt into empty
    caches, or one token per generation step); returns the last position's logits ``[vocab]``."""
    x = model.embed(tokens)
    for block, cache in zip(model.blocks, caches):
        h = block.attn_norm(x)
        if isinstance(block.attn, NativeSparseAttention):
            if x.shape[1] == 1 and int(cache.lengths[0]) > 0:
                a = block.attn.step(h[0], cache)
            else:
                a = block.attn.prefill(h, cache)
        else:
            a = _dense_step(block.attn, h, cache)
        x = x + a
        x = x + block.mlp(block.mlp_norm(x))
    return F.linear(model.norm(x[0, -1]), model.embed.weight)
