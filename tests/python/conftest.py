"""Shared pieces of the Python suite: the oracle (nsa_contract, an independent pure-PyTorch
reading of docs/SPEC.md), random cases, and comparisons with stated tolerances."""
import dataclasses

import pytest
import torch

import nsa
import nsa.ops  # noqa: F401  (registers torch.ops.nsa)
import nsa_contract as oracle

# A config small enough that short sequences have real selection (several selection blocks per
# query beyond the forced ones) and a window shorter than T.
SMALL = nsa.Config(cmp_block=8, cmp_stride=4, slc_block=16, slc_count=4, slc_init=1, slc_local=2,
                   window=24)

# f32 kernels against the float64 oracle: sums of at most a few hundred f32 products and
# exponentials, each off by ~1e-7 relative, scaled by values O(1): 2e-5 leaves margin.
F32_TOL = 2e-5
# bf16 outputs: the result is rounded to bf16 (8 significant bits: relative error up to 2^-8),
# on values O(1) (|o| <= max |v| ~ 4).
BF16_TOL = 4 * 2.0 ** -8


def oracle_cfg(cfg: nsa.Config) -> "oracle.Cfg":
    return oracle.Cfg(**dataclasses.asdict(cfg))


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def randn(*shape, dtype=torch.float32, requires_grad=False):
    return torch.randn(*shape).to(dtype).requires_grad_(requires_grad)


def make_inputs(B, T, Hq, Hkv, Dk, Dv, dtype=torch.float32, gate_dtype=None, requires_grad=False):
    """q, k, v and the three gates (in (0, 1), as after a sigmoid)."""
    q = randn(B, T, Hq, Dk, dtype=dtype, requires_grad=requires_grad)
    k = randn(B, T, Hkv, Dk, dtype=dtype, requires_grad=requires_grad)
    v = randn(B, T, Hkv, Dv, dtype=dtype, requires_grad=requires_grad)
    gd = gate_dtype or dtype
    gates = [torch.rand(B, T, Hq).to(gd).requires_grad_(requires_grad) for _ in range(3)]
    return q, k, v, gates


def make_mlp(H, l, D, Dh, dtype=torch.float32, requires_grad=False):
    """The mlp compressor's (pos, w1, b1, w2, b2), scaled so that outputs stay O(1)."""
    shapes = [(H, l, D), (H, Dh, l * D), (H, Dh), (H, D, Dh), (H, D)]
    scales = [0.1, (l * D) ** -0.5, 0.1, Dh ** -0.5, 0.1]
    return [(torch.randn(s) * c).to(dtype).requires_grad_(requires_grad)
            for s, c in zip(shapes, scales)]


def f64(t):
    """A float64 leaf with t's values (and requires_grad); a float64 tensor is kept as it is, so
    that the oracle's graph reaches the caller's float64 leaves."""
    if t is None or t.dtype == torch.float64:
        return t
    return t.detach().to(torch.float64).requires_grad_(t.requires_grad)


def assert_close(actual, expected, tol, what):
    """Same NaN/inf positions, and on the finite rest max |actual - expected| <=
    tol * max(1, max |expected|)."""
    a = actual.detach().to(torch.float64)
    e = expected.detach().to(torch.float64)
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    for kind, where in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
        assert torch.equal(where(a), where(e)), f"{what}: {kind} positions differ"
    finite = torch.isfinite(e)
    a, e = a[finite], e[finite]
    err = (a - e).abs().max().item() if a.numel() else 0.0
    bound = tol * max(1.0, e.abs().max().item() if e.numel() else 0.0)
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g}"
