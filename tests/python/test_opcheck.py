"""torch.library.opcheck on every op: schema (declared mutations only), fake implementations
(shapes, dtypes, strides), autograd registration and AOT dispatch with dynamic shapes."""
import pytest
import torch
from torch.library import opcheck as torch_opcheck

import nsa
from nsa.cache import KVCache
from conftest import SMALL, make_inputs, make_mlp

CFG = SMALL.ints()


def opcheck(op, args, **kw):
    """torch.library.opcheck, which raises on a failed check; its report is asserted too, so
    that a check skipped or reported as anything but SUCCESS fails the test."""
    report = torch_opcheck(op, args, **kw)
    assert report, f"{op}: opcheck ran no check"
    for check, result in report.items():
        assert result == "SUCCESS", f"{op}: {check}: {result}"


def fwd_args(requires_grad, save, cu=None, T=40, per_branch=False):
    q, k, v, g = make_inputs(1, T, 4, 2, 8, 12, requires_grad=requires_grad)
    tc = SMALL.cmp_len(T) if cu is None else nsa.np.compress(
        k.detach().numpy(), SMALL, cu_seqlens=cu.numpy()).shape[1]
    kc = torch.randn(1, tc, 2, 8, requires_grad=requires_grad)
    vc = torch.randn(1, tc, 2, 12, requires_grad=requires_grad)
    own = [None] * 4
    if per_branch:
        own = [torch.randn_like(t).requires_grad_(requires_grad) for t in (k, v, k, v)]
    return (q, k, v, *own, kc, vc, *g, cu, None, CFG, 0.0, save)


@pytest.mark.parametrize("save", [True, False])
@pytest.mark.parametrize("variant", ["plain", "varlen", "per_branch", "no_grad"])
def test_fwd(variant, save):
    cu = torch.tensor([0, 3, 40], dtype=torch.int32) if variant == "varlen" else None
    opcheck(torch.ops.nsa.fwd.default,
            fwd_args(variant != "no_grad", save, cu, per_branch=variant == "per_branch"))


def test_fwd_caller_indices():
    args = list(fwd_args(True, True))
    args[13] = torch.zeros(1, 40, 2, SMALL.slc_count, dtype=torch.int32)
    opcheck(torch.ops.nsa.fwd.default, tuple(args))


def test_bwd():
    q, k, v, ks, vs, kw, vw, kc, vc, gc, gs, gw, cu, _, cfg, scale, _ = fwd_args(False, True)
    o, lse, obr, idx = torch.ops.nsa.fwd(q, k, v, None, None, None, None, kc, vc, gc, gs, gw,
                                         None, None, cfg, scale, True)
    d_o = torch.randn_like(o)
    for saved in ((lse, obr), (None, None)):
        opcheck(torch.ops.nsa.bwd.default, (d_o, q, k, v, None, None, None, None, kc, vc, gc, gs,
                                            gw, None, idx, *saved, cfg, scale))


@pytest.mark.parametrize("cu", [None, [0, 20, 20, 53]])
def test_compress(cu):
    cu = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    x = torch.randn(1, 53, 2, 8, requires_grad=True)
    opcheck(torch.ops.nsa.compress_mean.default, (x, cu, 8, 4))
    mlp = make_mlp(2, 8, 8, 6, requires_grad=True)
    opcheck(torch.ops.nsa.compress_mlp.default, (x, *mlp, cu, 8, 4))
    tc = torch.ops.nsa.compress_mean(x, cu, 8, 4).shape[1]
    dout = torch.randn(1, tc, 2, 8)
    opcheck(torch.ops.nsa.compress_bwd.default, (dout, x.detach(), None, None, None, None, None,
                                                 cu, 8, 4))
    opcheck(torch.ops.nsa.compress_bwd.default,
            (dout, x.detach(), *[p.detach() for p in mlp], cu, 8, 4))


def test_dense():
    q, k, v, _ = make_inputs(2, 30, 4, 2, 8, 12, requires_grad=True)
    opcheck(torch.ops.nsa.dense_fwd.default, (q, k, v, None, 0.0, 5))
    with torch.no_grad():
        o, lse = torch.ops.nsa.dense_fwd(q, k, v, None, 0.0, 5)
    opcheck(torch.ops.nsa.dense_bwd.default,
            (torch.randn_like(o), q.detach(), k.detach(), v.detach(), o, lse, None, 0.0, 5))


def test_decode():
    """Decode without new tokens reads the cache and changes nothing, so every opcheck run sees
    the same state."""
    cache = KVCache(2, 64, 2, 8, 12, config=SMALL)
    q, k, v, g = make_inputs(2, 30, 4, 2, 8, 12)
    for s in range(2):
        cache.prefill(s, q[s], k[s], v[s], *(x[s] for x in g))
    qd = torch.randn(2, 4, 8)
    gd = [torch.rand(2, 4) for _ in range(3)]
    opcheck(torch.ops.nsa.decode.default,
            (cache.lengths, cache.handle, "auto", qd, None, None, None, *gd, 2, 12,
             SMALL.slc_count))
    ids = torch.tensor([1], dtype=torch.int32)
    opcheck(torch.ops.nsa.decode.default,
            (cache.lengths, cache.handle, "auto", qd[:1], None, None, ids, *(x[:1] for x in gd),
             2, 12, SMALL.slc_count))


def test_decode_and_prefill_that_append():
    """Steps that append change the cache, so each check gets a fresh cache: the schema check
    (lengths is the only tensor written) and the fake implementation."""
    q, k, v, g = make_inputs(1, 20, 4, 2, 8, 12)
    for test in ("test_schema", "test_faketensor"):
        cache = KVCache(1, 64, 2, 8, 12, config=SMALL)
        opcheck(torch.ops.nsa.prefill.default,
                (cache.lengths, cache.handle, "auto", 0, q[0], k[0], v[0], *(x[0] for x in g), 2,
                 SMALL.slc_count), test_utils=test)
        opcheck(torch.ops.nsa.decode.default,
                (cache.lengths, cache.handle, "auto", q[0, :1], k[0, :1], v[0, :1], None,
                 *(x[0, :1] for x in g), 2, 12, SMALL.slc_count), test_utils=test)
