"""nsa_contract: an independent pure-PyTorch reading of the NSA contract (docs/SPEC.md).

This module is the oracle of the Python test suite. It is written from docs/SPEC.md (the
restatement of shared/SPEC.md) and include/nsa/nsa.h only, never from the C++ sources, so that a
disagreement between the two is a finding rather than a shared mistake. Citations such as
"SPEC 4.3" name section 4, step 3 of docs/SPEC.md.

Conventions (SPEC 1, nsa.h):
  - tensors are [B, T, H, D]; query head h reads KV head h // G, G = Hq // Hkv;
  - with `cu_seqlens` (S + 1 offsets, B == 1) the T axis packs S sequences back to back; positions
    restart at 0 in each, and compressed tokens are packed per sequence, cmp_len(len_s) rows each;
  - every function computes in the dtype of its inputs (float64 for an oracle, float32 works too)
    and is differentiable by torch autograd with respect to every float input; the top-n selection
    (SPEC 4.2-4.3) is computed under torch.no_grad and is a constant (SPEC 6).

Public API:
  Cfg, cmp_len, cmp_seqlens, compress_mean, compress_mlp, overlap_weights, select_blocks,
  forward, dense.

Ambiguities and how they are settled here (each also noted where it arises):
  - `scale`: the C API carries it as a float32; here it is used as the Python float given. A test
    that compares with the library at a scale other than 0 should pass a float32-representable
    value. scale == 0 means 1/sqrt(Dk) computed in the working dtype.
  - A branch whose scores are all -inf over a non-empty key set is empty (lse = -inf, o = 0 except
    NaN carried by values), as README "Non-finite inputs" states; NaN or +inf anywhere in the set
    makes the branch's lse and all of its o NaN (SPEC 4, "Non-finite inputs").
  - Block scores of blocks j > J (not candidates for query t) are reported as -inf in the
    `scores` output; blocks 0..J that no visible compressed token touches score 0 (SPEC 4.2).
  - Caller-supplied indices are normalised to the width of the given tensor (nsa.h requires it to
    be n = slc_count); the forced blocks are not added (SPEC 4.3, library's choice). An entry
    outside [0, t / l'] other than -1 raises ValueError.
  - k_slc / v_slc (and k_win / v_win) default to k / v independently; nsa.h asks for both of a
    pair or neither.
  - The contract states forward values for non-finite inputs only; gradients with non-finite
    inputs are not specified and this module does not promise them (e.g. a NaN key outside a
    query's set can still reach dq through the masked score product).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "Cfg",
    "cmp_len",
    "cmp_seqlens",
    "compress_mean",
    "compress_mlp",
    "overlap_weights",
    "select_blocks",
    "forward",
    "dense",
]


# ---------------------------------------------------------------------------------------------
# SPEC 2: configuration
# ---------------------------------------------------------------------------------------------


@dataclass
class Cfg:
    cmp_block: int = 32  # l
    cmp_stride: int = 16  # d
    slc_block: int = 64  # l'
    slc_count: int = 16  # n
    slc_init: int = 1  # n_init
    slc_local: int = 2  # n_local
    window: int = 512  # w
    scale: float = 0.0  # 0 -> 1/sqrt(Dk)

    def validate(self) -> None:
        """The library's ranges (SPEC 2). Raises ValueError naming the field."""
        for name in ("cmp_block", "cmp_stride", "slc_block", "slc_count", "window"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.cmp_stride > self.cmp_block:
            raise ValueError("cmp_stride must be <= cmp_block")
        for name in ("slc_init", "slc_local"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.slc_count < self.slc_init + self.slc_local:
            raise ValueError("slc_count must be >= slc_init + slc_local")
        if not (math.isfinite(self.scale) and self.scale >= 0):
            raise ValueError("scale must be finite and >= 0")


def _scale(cfg_scale: float, dk: int) -> float:
    """SPEC 2: scale 0 stands for 1/sqrt(Dk)."""
    return float(cfg_scale) if cfg_scale != 0 else 1.0 / math.sqrt(dk)


def cmp_len(t: int, cfg: Cfg) -> int:
    """SPEC 3: Tc = floor((t - l) / d) + 1 if t >= l, else 0."""
    l, d = cfg.cmp_block, cfg.cmp_stride
    return (t - l) // d + 1 if t >= l else 0


def cmp_seqlens(cu_seqlens, cfg: Cfg) -> list[int]:
    """Cumulative compressed offsets for cu_seqlens (SPEC 3, nsa_cmp_seqlens)."""
    cu = _as_list(cu_seqlens)
    out = [0]
    for s in range(len(cu) - 1):
        out.append(out[-1] + cmp_len(cu[s + 1] - cu[s], cfg))
    return out


# ---------------------------------------------------------------------------------------------
# SPEC 1: sequences (fixed length or packed by cu_seqlens)
# ---------------------------------------------------------------------------------------------


def _as_list(cu_seqlens) -> list[int]:
    if isinstance(cu_seqlens, torch.Tensor):
        return [int(c) for c in cu_seqlens.reshape(-1).tolist()]
    return [int(c) for c in cu_seqlens]


def _segments(B: int, T: int, cfg: Cfg, cu_seqlens=None):
    """Yields (b, start, end, cmp_start, cmp_end) for every sequence (SPEC 1, SPEC 3).

    Without cu_seqlens: B sequences of length T, each with its own cmp_len(T) compressed rows.
    With cu_seqlens: B == 1 and S sequences; sequence s is rows c_s .. c_{s+1} - 1 and owns the
    compressed rows cu_cmp[s] .. cu_cmp[s+1] - 1 (packed in order).
    """
    if cu_seqlens is None:
        tc = cmp_len(T, cfg)
        for b in range(B):
            yield b, 0, T, 0, tc
        return
    cu = _as_list(cu_seqlens)
    if B != 1:
        raise ValueError("cu_seqlens needs B == 1")
    if len(cu) < 2 or cu[0] != 0 or cu[-1] != T or any(a > b for a, b in zip(cu, cu[1:])):
        raise ValueError("cu_seqlens must start at 0, not decrease, and end at T")
    cc = cmp_seqlens(cu, cfg)
    for s in range(len(cu) - 1):
        yield 0, cu[s], cu[s + 1], cc[s], cc[s + 1]


def _total_cmp(B: int, T: int, cfg: Cfg, cu_seqlens=None) -> int:
    if cu_seqlens is None:
        return cmp_len(T, cfg)
    return cmp_seqlens(cu_seqlens, cfg)[-1]


# ---------------------------------------------------------------------------------------------
# SPEC 5: compression functions
# ---------------------------------------------------------------------------------------------


def _blocks(x_seq: torch.Tensor, cfg: Cfg) -> torch.Tensor:
    """The compression blocks of one sequence: x_seq [L, H, D] -> [Tc, l, H, D].

    Compressed token i stands for raw tokens i*d .. i*d + l - 1 (SPEC 3); only complete blocks.
    """
    L = x_seq.shape[0]
    l, d = cfg.cmp_block, cfg.cmp_stride
    tc = cmp_len(L, cfg)
    idx = (torch.arange(tc) * d)[:, None] + torch.arange(l)[None, :]  # [Tc, l]
    return x_seq[idx.reshape(-1)].reshape(tc, l, *x_seq.shape[1:])


def _compress(x: torch.Tensor, cfg: Cfg, cu_seqlens, phi) -> torch.Tensor:
    B, T, H, D = x.shape
    out = x.new_zeros(B, _total_cmp(B, T, cfg, cu_seqlens), H, D)
    for b, s0, s1, c0, c1 in _segments(B, T, cfg, cu_seqlens):
        if c1 > c0:
            out[b, c0:c1] = phi(_blocks(x[b, s0:s1], cfg))  # [Tc_s, H, D]
    return out


def compress_mean(x: torch.Tensor, cfg: Cfg, cu_seqlens=None) -> torch.Tensor:
    """SPEC 5 `mean`: each compressed token is the average of its block's l raw tokens.

    x [B, T, H, D] -> [B, Tc, H, D]; with cu_seqlens (B == 1) -> [1, sum_s cmp_len(len_s), H, D].
    """
    return _compress(x, cfg, cu_seqlens, lambda blk: blk.mean(dim=1))


def compress_mlp(x, pos, w1, b1, w2, b2, cfg: Cfg, cu_seqlens=None) -> torch.Tensor:
    """SPEC 5 `mlp`: phi(X) = W2 relu(W1 flatten(X + P) + b1) + b2, one parameter set per KV head.

    x [B, T, H, D], pos [H, l, D], w1 [H, Dh, l*D], b1 [H, Dh], w2 [H, D, Dh], b2 [H, D].
    flatten is row-major over [l, D] (row = token): element (r, c) goes to r*D + c.
    """
    H, D = x.shape[2], x.shape[3]
    l = cfg.cmp_block
    if tuple(pos.shape) != (H, l, D):
        raise ValueError(f"pos must be [{H}, {l}, {D}]")

    def phi(blk):  # blk [Tc, l, H, D]
        xp = blk + pos.permute(1, 0, 2)[None]  # X + P, P indexed [token, head, channel]
        flat = xp.permute(0, 2, 1, 3).reshape(blk.shape[0], H, l * D)  # [Tc, H, l*D] row-major
        hid = torch.relu(torch.einsum("thk,hjk->thj", flat, w1) + b1[None])  # [Tc, H, Dh]
        return torch.einsum("thj,hdj->thd", hid, w2) + b2[None]  # [Tc, H, D]

    return _compress(x, cfg, cu_seqlens, phi)


# ---------------------------------------------------------------------------------------------
# One softmax branch over an explicit key set (SPEC 4 steps 1, 4, 5 and "Non-finite inputs")
# ---------------------------------------------------------------------------------------------


def _attend(q, k, v, mask, scale):
    """Softmax attention of every query over its own key set.

    q [H, L, Dk], k [H, N, Dk], v [H, N, Dv], mask [H, L, N] (or broadcastable) bool: key n is in
    the set of query (h, t). Returns o [H, L, Dv], lse [H, L], p [H, L, N] (the probabilities, 0
    outside the set, NaN over the set of a NaN branch).

    Rules (SPEC 4, README "Non-finite inputs"):
      - an empty set, or a set whose scores are all -inf: o = 0, lse = -inf, never NaN;
      - a key scoring -inf has weight exactly 0;
      - a NaN or +inf score in the set makes lse and every channel of o NaN;
      - o sums p * v over the whole set, so a NaN value channel of any key in the set reaches o
        even at weight 0; keys outside the set are never read.
    """
    H, L, N = q.shape[0], q.shape[1], k.shape[1]
    mask = mask.expand(H, L, N)
    s = scale * torch.einsum("hld,hnd->hln", q, k)
    s = torch.where(mask, s, torch.full_like(s, -math.inf))  # keys outside the set: weight 0
    with torch.no_grad():  # the shift only stabilises exp; the result does not depend on it
        m = s.amax(dim=-1, keepdim=True) if N > 0 else s.new_zeros(H, L, 1)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)  # exactly 0 for -inf scores and keys outside the set
    z = e.sum(dim=-1, keepdim=True)
    nonempty = z > 0  # some finite score (or NaN / +inf: overwritten below)
    z_safe = torch.where(nonempty, z, torch.ones_like(z))
    p = e / z_safe
    lse = torch.where(nonempty, m + torch.log(z_safe), torch.full_like(z, -math.inf)).squeeze(-1)

    # Values: finite channels by a matrix product; non-finite ones only where they are in the set.
    finite_v = torch.isfinite(v)
    o = torch.einsum("hln,hnd->hld", p, torch.where(finite_v, v, torch.zeros_like(v)))
    if not bool(finite_v.all()):
        bad_keys = (~finite_v).any(dim=-1).any(dim=0).nonzero().reshape(-1).tolist()
        for n in bad_keys:  # add p * v for the non-finite channels of key n, where n is in the set
            vb = torch.where(finite_v[:, n], torch.zeros_like(v[:, n]), v[:, n])  # [H, Dv]
            add = p[:, :, n, None] * vb[:, None, :]
            o = o + torch.where(mask[:, :, n, None], add, torch.zeros_like(add))

    # A NaN or +inf score anywhere in the set: the branch is NaN (its lse and all of its o).
    with torch.no_grad():
        s_in = torch.where(mask, s, torch.zeros_like(s))
        bad = (torch.isnan(s_in) | (s_in == math.inf)).any(dim=-1)  # [H, L]
    if bool(bad.any()):
        nan = torch.full_like(o, math.nan)
        o = torch.where(bad[..., None], nan, o)
        lse = torch.where(bad, torch.full_like(lse, math.nan), lse)
        p = torch.where(bad[..., None] & mask, torch.full_like(p, math.nan), p)
    return o, lse, p


def _heads(x: torch.Tensor, G: int) -> torch.Tensor:
    """[L, Hkv, D] -> [Hq, L, D]: query head h reads KV head h // G (SPEC 1)."""
    return x.repeat_interleave(G, dim=1).permute(1, 0, 2)


# ---------------------------------------------------------------------------------------------
# SPEC 4.2-4.3: block scores and top-n selection (no gradient)
# ---------------------------------------------------------------------------------------------


def overlap_weights(tc: int, nblk: int, cfg: Cfg, dtype=torch.float64) -> torch.Tensor:
    """SPEC 4.2: ov(i, j) = |[i*d, i*d + l) ∩ [j*l', (j+1)*l')| / d, as a [tc, nblk] matrix.

    (Contract's choice: the overlap-consistent reading of Eq. 9; for l=32, d=16, l'=64 block j
    gathers compressed tokens 4j-1 .. 4j+3 with weights 1, 2, 2, 2, 1.)
    """
    l, d, lp = cfg.cmp_block, cfg.cmp_stride, cfg.slc_block
    i0 = torch.arange(tc)[:, None] * d
    j0 = torch.arange(nblk)[None, :] * lp
    inter = (torch.minimum(i0 + l, j0 + lp) - torch.maximum(i0, j0)).clamp(min=0)
    return inter.to(dtype) / d


def select_blocks(scores: torch.Tensor, pos: torch.Tensor, cfg: Cfg) -> torch.Tensor:
    """SPEC 4.3: the selected set I_t of each query, sorted ascending, padded with -1 to n.

    scores [..., L, nblk] (block j of the query at position pos[t]; entries j > J are ignored),
    pos [L] int positions in the sequence. Returns int64 [..., L, n].

    I_t = F_t ∪ R_t with F_t = ({0..n_init-1} ∪ {J-n_local+1..J}) ∩ [0, J] and R_t the
    n - |F_t| other blocks of [0, J] with the highest scores; equal scores go to the lower index
    (contract's choice), and a NaN score ranks below every number (README "Non-finite inputs").
    If [0, J] has at most n blocks, I_t = [0, J].
    """
    n, lp = cfg.slc_count, cfg.slc_block
    nblk = scores.shape[-1]
    with torch.no_grad():
        J = (pos // lp)[:, None]  # [L, 1]
        j = torch.arange(nblk)[None, :]  # [1, nblk]
        forced = ((j < cfg.slc_init) | (j > J - cfg.slc_local)) & (j <= J)
        # Ranking key: forced blocks first, then scores (all >= 0), then NaN scores, and the blocks
        # past J last. A stable descending sort keeps equal keys in index order (lower first).
        key = torch.where(torch.isnan(scores), torch.full_like(scores, -1.0), scores)
        key = torch.where(forced, torch.full_like(key, math.inf), key)
        key = torch.where(j > J, torch.full_like(key, -2.0), key)
        order = torch.sort(key, dim=-1, descending=True, stable=True).indices[..., :n]
        # Keep only real candidates (j <= J), sort ascending, pad with -1.
        big = torch.iinfo(torch.int64).max
        order = torch.where(order <= J, order, torch.full_like(order, big))
        order = torch.sort(order, dim=-1).values
        order = torch.where(order == big, torch.full_like(order, -1), order)
        if order.shape[-1] < n:  # fewer blocks than n in the whole sequence
            pad = order.new_full((*order.shape[:-1], n - order.shape[-1]), -1)
            order = torch.cat([order, pad], dim=-1)
        # The set's own invariants (SPEC 4.3): min(n, J + 1) blocks, each in [0, J], every forced
        # block among them. A reading of the contract that breaks one is a bug in this module.
        count = (order >= 0).sum(-1)
        assert torch.equal(count, torch.minimum(J[:, 0] + 1, torch.tensor(n)).expand_as(count))
        assert bool(((order == -1) | ((order >= 0) & (order <= J))).all())
        chosen = torch.zeros((*order.shape[:-1], nblk + 1), dtype=torch.bool)
        chosen.scatter_(-1, torch.where(order >= 0, order, nblk), True)
        assert bool((chosen[..., :nblk] | ~forced).all()), "a forced block was not selected"
    return order


def _normalise_indices(idx: torch.Tensor, pos: torch.Tensor, lp: int) -> torch.Tensor:
    """Caller-supplied selection (SPEC 4.3, library's choice): read as a set. -1 entries are
    ignored, duplicates count once, every other entry must lie in [0, J]; forced blocks are NOT
    added. Returns the set sorted ascending, padded with -1, same width. idx [..., L, m]."""
    idx = idx.to(torch.int64)
    J = (pos // lp)[:, None]
    bad = (idx != -1) & ((idx < 0) | (idx > J))
    if bool(bad.any()):
        raise ValueError("slc_indices: an entry is outside [0, t / l'] and not -1")
    big = torch.iinfo(torch.int64).max
    s = torch.sort(torch.where(idx < 0, torch.full_like(idx, big), idx), dim=-1).values
    if s.shape[-1] > 1:
        dup = torch.zeros_like(s, dtype=torch.bool)
        dup[..., 1:] = s[..., 1:] == s[..., :-1]
        s = torch.sort(torch.where(dup, torch.full_like(s, big), s), dim=-1).values
    return torch.where(s == big, torch.full_like(s, -1), s)


# ---------------------------------------------------------------------------------------------
# SPEC 4: the forward function
# ---------------------------------------------------------------------------------------------


def forward(q, k, v, k_cmp, v_cmp, g_cmp, g_slc, g_win, cfg: Cfg, k_slc=None, v_slc=None,
            k_win=None, v_win=None, cu_seqlens=None, slc_indices=None) -> dict:
    """NSA forward (SPEC 4). Shapes: q [B,T,Hq,Dk], k [B,T,Hkv,Dk], v [B,T,Hkv,Dv],
    k_cmp [B,Tc,Hkv,Dk], v_cmp [B,Tc,Hkv,Dv], g_* [B,T,Hq] (used as given, no sigmoid),
    optional per-branch k_slc/v_slc, k_win/v_win (default k, v; SPEC 3), cu_seqlens (SPEC 1),
    slc_indices [B,T,Hkv,n] (caller-supplied selection, replaces SPEC 4.2-4.3).

    Returns a dict:
      o [B,T,Hq,Dv];  o_cmp, o_slc, o_win [B,T,Hq,Dv] (ungated);
      lse_cmp, lse_slc, lse_win [B,T,Hq] (natural log of scaled scores, -inf for an empty branch);
      indices [B,T,Hkv,n] int64 (I_t sorted ascending, -1 padded);
      scores [B,T,Hkv,ceil(T/l')] (the SPEC 4.2 block scores, float, no gradient; -inf past J).
    """
    cfg.validate()
    B, T, Hq, Dk = q.shape
    Hkv, Dv = k.shape[2], v.shape[3]
    if Hq % Hkv != 0:
        raise ValueError("Hq must be a multiple of Hkv")
    G = Hq // Hkv
    Tc = _total_cmp(B, T, cfg, cu_seqlens)
    if tuple(k_cmp.shape) != (B, Tc, Hkv, Dk) or tuple(v_cmp.shape) != (B, Tc, Hkv, Dv):
        raise ValueError(f"k_cmp / v_cmp must have {Tc} compressed rows")
    k_slc = k if k_slc is None else k_slc  # SPEC 3: absent per-branch K/V read k/v
    v_slc = v if v_slc is None else v_slc
    k_win = k if k_win is None else k_win
    v_win = v if v_win is None else v_win
    scale = _scale(cfg.scale, Dk)
    l, d, lp, n, w = cfg.cmp_block, cfg.cmp_stride, cfg.slc_block, cfg.slc_count, cfg.window
    n_out = n if slc_indices is None else slc_indices.shape[-1]
    nblk_all = -(-T // lp)

    out = {name: q.new_zeros(B, T, Hq, Dv) for name in ("o", "o_cmp", "o_slc", "o_win")}
    for name in ("lse_cmp", "lse_slc", "lse_win"):
        out[name] = q.new_full((B, T, Hq), -math.inf)
    out["indices"] = torch.full((B, T, Hkv, n_out), -1, dtype=torch.int64)
    out["scores"] = q.new_full((B, T, Hkv, nblk_all), -math.inf).detach()

    for b, s0, s1, c0, c1 in _segments(B, T, cfg, cu_seqlens):
        L = s1 - s0
        if L == 0:
            continue
        tcs = c1 - c0
        t = torch.arange(L)  # positions restart at 0 in each sequence (SPEC 1)
        p_ = torch.arange(L)  # key positions
        qh = q[b, s0:s1].permute(1, 0, 2)  # [Hq, L, Dk]

        # SPEC 4.1, compressed branch: C_t = { i : i*d + l - 1 <= t }.
        ic = torch.arange(tcs)
        cmp_mask = (ic[None, :] * d + l - 1) <= t[:, None]  # [L, Tc_s]
        o_cmp, lse_cmp, p_cmp = _attend(qh, _heads(k_cmp[b, c0:c1], G), _heads(v_cmp[b, c0:c1], G),
                                        cmp_mask[None], scale)

        # SPEC 4.2, block scores: score[j] = sum_{h' in group} sum_{i in C_t} p_cmp[i] ov(i, j),
        # for j = 0 .. J. No gradient (SPEC 4.2, SPEC 6).
        nblk = -(-L // lp)
        with torch.no_grad():
            W = overlap_weights(tcs, nblk, cfg, dtype=p_cmp.dtype)  # [Tc_s, nblk]
            pg = p_cmp.detach().reshape(Hkv, G, L, tcs)
            nan_row = torch.isnan(pg).any(dim=-1).any(dim=1)  # [Hkv, L]: a NaN cmp branch in group
            pg = torch.where(torch.isnan(pg), torch.zeros_like(pg), pg)
            scores = torch.einsum("kgli,ij->klj", pg, W)  # [Hkv, L, nblk]
            # README "Non-finite inputs": a NaN cmp branch in any head of the group makes the
            # group's score NaN for every block that a visible compressed block touches.
            touched = (cmp_mask.to(W.dtype) @ (W > 0).to(W.dtype)) > 0  # [L, nblk]
            scores = torch.where(nan_row[..., None] & touched[None], torch.full_like(scores, math.nan),
                                 scores)
            J = (t // lp)[:, None]
            scores_rep = torch.where(torch.arange(nblk)[None, :] <= J, scores,
                                     torch.full_like(scores, -math.inf))
            out["scores"][b, s0:s1, :, :nblk] = scores_rep.permute(1, 0, 2)

            # SPEC 4.3, selection (or the caller's set, replacing 4.2-4.3).
            if slc_indices is None:
                sel = select_blocks(scores, t, cfg)  # [Hkv, L, n]
            else:
                sel = _normalise_indices(slc_indices[b, s0:s1].permute(1, 0, 2), t, lp)
            out["indices"][b, s0:s1] = sel.permute(1, 0, 2)
            # Block membership per KV head, then per key position (shared by the group, Eq. 10).
            member = torch.zeros(Hkv, L, nblk + 1, dtype=torch.bool)
            member.scatter_(-1, torch.where(sel < 0, torch.full_like(sel, nblk), sel), True)
            member = member[..., :nblk]
            slc_mask = member[:, :, p_ // lp] & (p_[None, None, :] <= t[None, :, None])  # [Hkv,L,L]
            slc_mask = slc_mask.repeat_interleave(G, dim=0)  # [Hq, L, L]

        # SPEC 4.4, selected branch: keys p <= t with floor(p / l') in I_t.
        o_slc, lse_slc, _ = _attend(qh, _heads(k_slc[b, s0:s1], G), _heads(v_slc[b, s0:s1], G),
                                    slc_mask, scale)

        # SPEC 4.5, window branch: keys max(0, t - w + 1) .. t.
        win_mask = (p_[None, :] <= t[:, None]) & (p_[None, :] >= t[:, None] - w + 1)
        o_win, lse_win, _ = _attend(qh, _heads(k_win[b, s0:s1], G), _heads(v_win[b, s0:s1], G),
                                    win_mask[None], scale)

        # SPEC 4.6, output: o = g_cmp o_cmp + g_slc o_slc + g_win o_win (separate softmaxes, Eq. 5).
        def gate(g):
            return g[b, s0:s1].permute(1, 0)[..., None]  # [Hq, L, 1]

        o = gate(g_cmp) * o_cmp + gate(g_slc) * o_slc + gate(g_win) * o_win
        for name, val in (("o", o), ("o_cmp", o_cmp), ("o_slc", o_slc), ("o_win", o_win)):
            out[name][b, s0:s1] = val.permute(1, 0, 2)
        for name, val in (("lse_cmp", lse_cmp), ("lse_slc", lse_slc), ("lse_win", lse_win)):
            out[name][b, s0:s1] = val.permute(1, 0)
    return out


def dense(q, k, v, scale: float = 0.0, window: int = 0, cu_seqlens=None):
    """Causal softmax attention (nsa_dense_fwd): query t sees keys 0 .. t, or with window w >= 1
    keys max(0, t - w + 1) .. t. q [B,T,Hq,Dk], k [B,T,Hkv,Dk], v [B,T,Hkv,Dv].
    Returns (o [B,T,Hq,Dv], lse [B,T,Hq])."""
    B, T, Hq, Dk = q.shape
    Hkv, Dv = k.shape[2], v.shape[3]
    G = Hq // Hkv
    sc = _scale(scale, Dk)
    o_all = q.new_zeros(B, T, Hq, Dv)
    lse_all = q.new_full((B, T, Hq), -math.inf)
    # The sequences of SPEC 1 (the Cfg only feeds the compressed offsets, unused here).
    segs = [(b, 0, T) for b in range(B)] if cu_seqlens is None else \
        [(0, a, c) for (_, a, c, _, _) in _segments(B, T, Cfg(), cu_seqlens)]
    for b, s0, s1 in segs:
        L = s1 - s0
        if L == 0:
            continue
        t = torch.arange(L)
        mask = t[None, :] <= t[:, None]
        if window >= 1:
            mask = mask & (t[None, :] >= t[:, None] - window + 1)
        o, lse, _ = _attend(q[b, s0:s1].permute(1, 0, 2), _heads(k[b, s0:s1], G),
                            _heads(v[b, s0:s1], G), mask[None], sc)
        o_all[b, s0:s1] = o.permute(1, 0, 2)
        lse_all[b, s0:s1] = lse.permute(1, 0)
    return o_all, lse_all
