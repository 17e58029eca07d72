"""The torch ops' forward against the oracle (nsa_contract, float64), on awkward shapes."""
import pytest
import torch

import nsa
from nsa.functional import compress, dense_attention, native_sparse_attention
from conftest import (BF16_TOL, F32_TOL, SMALL, assert_close, f64, make_inputs, make_mlp, oracle,
                      oracle_cfg)

# (name, B, T, Hq, Hkv, Dk, Dv)
SHAPES = [
    ("T below l", 2, 5, 4, 2, 16, 16),
    ("T = 1", 1, 1, 2, 1, 8, 8),
    ("odd T, G = 3", 1, 77, 3, 1, 8, 8),
    ("G = 1, Dk != Dv", 2, 50, 2, 2, 16, 8),
    ("G = 16", 1, 64, 16, 1, 8, 12),
    ("Dk != Dv", 1, 100, 4, 2, 24, 16),
]


def run_oracle(q, k, v, gates, cfg, k_mlp=None, v_mlp=None, cu=None, k_cmp=None, v_cmp=None,
               **kw):
    """The oracle's forward in float64 on the same input values (its own compression unless
    k_cmp/v_cmp are given)."""
    oc = oracle_cfg(cfg)
    if k_cmp is None:
        if k_mlp is None:
            k_cmp, v_cmp = oracle.compress_mean(f64(k), oc, cu), oracle.compress_mean(f64(v), oc, cu)
        else:
            k_cmp = oracle.compress_mlp(f64(k), *map(f64, k_mlp), oc, cu)
            v_cmp = oracle.compress_mlp(f64(v), *map(f64, v_mlp), oc, cu)
    kw = {n: f64(t) for n, t in kw.items()}
    return oracle.forward(f64(q), f64(k), f64(v), f64(k_cmp), f64(v_cmp), *map(f64, gates), oc,
                          cu_seqlens=cu, **kw)


def check(out, ref, tol, what=""):
    o, lse, idx = out
    assert torch.equal(idx.long(), ref["indices"]), f"{what}: selections differ"
    assert_close(o, ref["o"], tol, f"{what} o")
    for i, b in enumerate(("cmp", "slc", "win")):
        assert_close(lse[i], ref[f"lse_{b}"], F32_TOL, f"{what} lse_{b}")


@pytest.mark.parametrize("compression", ["mean", "mlp"])
@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
def test_forward_matches_oracle(shape, compression):
    _, B, T, Hq, Hkv, Dk, Dv = shape
    q, k, v, g = make_inputs(B, T, Hq, Hkv, Dk, Dv)
    mlp = {}
    if compression == "mlp":
        mlp = dict(k_mlp=make_mlp(Hkv, SMALL.cmp_block, Dk, 16),
                   v_mlp=make_mlp(Hkv, SMALL.cmp_block, Dv, 16))
    out = native_sparse_attention(q, k, v, *g, config=SMALL, return_lse=True, return_indices=True,
                                  **mlp)
    check(out, run_oracle(q, k, v, g, SMALL, **mlp), F32_TOL, shape[0])


def test_paper_config():
    """The paper's defaults (l = 32, d = 16, l' = 64, n = 16, w = 512) at T = 1100."""
    q, k, v, g = make_inputs(1, 1100, 4, 1, 16, 16)
    out = native_sparse_attention(q, k, v, *g, return_lse=True, return_indices=True)
    check(out, run_oracle(q, k, v, g, nsa.Config()), F32_TOL, "paper config")


def test_varlen_with_empty_and_single_token_sequences():
    cu = torch.tensor([0, 0, 1, 40, 40, 95], dtype=torch.int32)
    q, k, v, g = make_inputs(1, 95, 6, 2, 8, 8)
    for mlp in ({}, dict(k_mlp=make_mlp(2, 8, 8, 8), v_mlp=make_mlp(2, 8, 8, 8))):
        out = native_sparse_attention(q, k, v, *g, config=SMALL, cu_seqlens=cu, return_lse=True,
                                      return_indices=True, **mlp)
        assert not torch.isnan(out[0]).any()
        check(out, run_oracle(q, k, v, g, SMALL, cu=cu.tolist(), **mlp), F32_TOL, "varlen")


def test_caller_indices():
    """Caller selection: -1 unused, duplicates once, forced blocks not added."""
    B, T, Hkv, n = 1, 90, 2, SMALL.slc_count
    q, k, v, g = make_inputs(B, T, 4, Hkv, 8, 8)
    t = torch.arange(T).view(1, T, 1, 1)
    idx = (torch.rand(B, T, Hkv, n) * (t // SMALL.slc_block + 1)).floor().to(torch.int32)
    idx[..., -1] = -1
    idx[..., 1] = idx[..., 0]  # a duplicate
    out = native_sparse_attention(q, k, v, *g, config=SMALL, block_indices=idx, return_lse=True,
                                  return_indices=True)
    check(out, run_oracle(q, k, v, g, SMALL, slc_indices=idx.long()), F32_TOL, "caller indices")


def test_per_branch_kv():
    q, k, v, g = make_inputs(1, 70, 4, 2, 8, 8)
    own = {n: torch.randn_like(k if n[0] == "k" else v)
           for n in ("k_slc", "v_slc", "k_win", "v_win")}
    out = native_sparse_attention(q, k, v, *g, config=SMALL, return_lse=True, return_indices=True,
                                  **own)
    check(out, run_oracle(q, k, v, g, SMALL, **own), F32_TOL, "per-branch K/V")


def test_strided_views():
    """q/k/v as views of one packed projection, the gates as views of one [B, T, 3, Hq] tensor,
    k's view with a strided last dimension (copied by the op): all go through."""
    B, T, Hq, Hkv, D = 2, 60, 4, 2, 8
    qkv = torch.randn(B, T, Hq + 2 * Hkv, D)
    q, k, v = qkv.split([Hq, Hkv, Hkv], dim=2)
    g = list(torch.rand(B, T, 3, Hq).unbind(2))
    k_t = k.transpose(-1, -2).contiguous().transpose(-1, -2)  # inner stride Hkv != 1
    out = native_sparse_attention(q, k_t, v, *g, config=SMALL, return_lse=True,
                                  return_indices=True)
    check(out, run_oracle(q, k, v, g, SMALL), F32_TOL, "strided views")


def test_bf16():
    """bf16 inputs; the oracle gets the same bf16 values and nsa's bf16 compressed tokens (the
    compression's own rounding is tested in test_compress_matches_oracle)."""
    q, k, v, g = make_inputs(1, 100, 8, 2, 16, 16, dtype=torch.bfloat16)
    k_cmp, v_cmp = compress(k, SMALL), compress(v, SMALL)
    out = native_sparse_attention(q, k, v, *g, config=SMALL, k_cmp=k_cmp, v_cmp=v_cmp,
                                  return_lse=True, return_indices=True)
    assert out[0].dtype == torch.bfloat16
    check(out, run_oracle(q, k, v, g, SMALL, k_cmp=k_cmp, v_cmp=v_cmp), BF16_TOL, "bf16")


def test_bf16_math_setting():
    """nsa.set_bf16_math at G = 16 (the heads-in-lanes forward): "f32" widens bf16 inputs,
    "native" and "emulated" (where this CPU runs them) multiply bf16 pairs; each is within its
    tolerance of the oracle, the two bf16 variants agree bit for bit, and bad modes are refused."""
    q, k, v, g = make_inputs(1, 150, 16, 1, 16, 16, dtype=torch.bfloat16)
    k_cmp, v_cmp = compress(k, SMALL), compress(v, SMALL)
    ref = run_oracle(q, k, v, g, SMALL, k_cmp=k_cmp, v_cmp=v_cmp)
    # bf16 o (rounded: BF16_TOL), plus rounding each softmax weight to bf16 for P V: 2^-8 max|v|
    # per branch, three gated branches.
    tol = BF16_TOL + 3 * 2.0 ** -8 * float(v.abs().max())
    got = {}
    try:
        for mode in ("f32", "native", "emulated"):
            try:
                nsa.set_bf16_math(mode)
            except RuntimeError:
                print(f"bf16 math {mode}: this CPU cannot run it (not tested)")
                continue
            assert nsa.bf16_math() == mode and nsa.bf16_math_resolved() == mode
            out = native_sparse_attention(q, k, v, *g, config=SMALL, k_cmp=k_cmp, v_cmp=v_cmp,
                                          return_lse=True, return_indices=True)
            check(out, ref, BF16_TOL if mode == "f32" else tol, f"bf16 math {mode}")
            got[mode] = out[0]
    finally:
        nsa.set_bf16_math("auto")
    assert nsa.bf16_math() == "auto"
    if "native" in got and "emulated" in got:
        assert torch.equal(got["native"], got["emulated"])
    if "native" in got:  # the path ran: rounding P changes some bits
        assert not torch.equal(got["native"], got["f32"])
    with pytest.raises(ValueError, match="set_bf16_math"):
        nsa.set_bf16_math("fast")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mlp", [False, True])
def test_compress_matches_oracle(dtype, mlp):
    x = torch.randn(1, 83, 3, 8).to(dtype)
    params = make_mlp(3, SMALL.cmp_block, 8, 12, dtype=dtype) if mlp else None
    oc = oracle_cfg(SMALL)
    for cu in (None, [0, 7, 7, 8, 83]):
        cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32)
        got = compress(x, SMALL, params, cu_t)
        want = (oracle.compress_mlp(f64(x), *map(f64, params), oc, cu) if mlp
                else oracle.compress_mean(f64(x), oc, cu))
        # bf16: the output is rounded to bf16 (relative 2^-8); f32: sums of l * D products.
        assert_close(got, want, BF16_TOL if dtype == torch.bfloat16 else F32_TOL, f"cu={cu}")


@pytest.mark.parametrize("window", [0, 7])
def test_dense_matches_oracle(window):
    q, k, v, _ = make_inputs(2, 45, 6, 3, 8, 12)
    o = dense_attention(q, k, v, window=window)
    want, _ = oracle.dense(f64(q), f64(k), f64(v), window=window)
    assert_close(o, want, F32_TOL, "dense")
