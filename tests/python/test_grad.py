"""Every gradient of the autograd ops against torch autograd of the oracle (float64). The oracle's
own gradients are checked against finite differences in test_contract_selfcheck.py."""
import pytest
import torch

from nsa.functional import dense_attention, native_sparse_attention
from conftest import SMALL, assert_close, f64, make_inputs, make_mlp, oracle, oracle_cfg
from test_forward import run_oracle

# The backward accumulates dk/dv over every query that reads a key (up to T (n l' + w + Tc)
# f32 products per KV head) and the mlp's parameter gradients over every compressed token:
# 1e-4 relative to the largest gradient leaves room for that f32 rounding.
GRAD_TOL = 1e-4


def grads_of(o, weight, inputs):
    loss = (o.to(torch.float64) * weight).sum()
    return torch.autograd.grad(loss, inputs, allow_unused=True)


def compare(names, inputs, run_nsa, run_ref, tol=None):
    """Runs both with the same loss sum(o * w) and compares each named gradient."""
    out = run_nsa(inputs)
    o, idx = out
    weight = torch.randn(o.shape, dtype=torch.float64)
    got = grads_of(o, weight, inputs)
    refs = [f64(t) for t in inputs]
    ref = run_ref(refs)
    assert torch.equal(idx.long(), ref["indices"]), "selections differ"
    want = grads_of(ref["o"], weight, refs)
    for name, g, w in zip(names, got, want):
        assert g is not None, f"{name}: no gradient"
        # The oracle's graph skips an input nothing reads (the mlp at T < l): its gradient is 0.
        assert_close(g, torch.zeros_like(g) if w is None else w, tol or GRAD_TOL, f"d{name}")


@pytest.mark.parametrize("compression", ["mean", "mlp"])
@pytest.mark.parametrize("shape", [(2, 61, 6, 2, 8, 12), (1, 50, 3, 3, 8, 8), (1, 40, 16, 1, 8, 8),
                                   (1, 5, 2, 1, 8, 8)], ids=["G=3", "G=1", "G=16", "T<l"])
def test_gradients(shape, compression):
    B, T, Hq, Hkv, Dk, Dv = shape
    q, k, v, g = make_inputs(B, T, Hq, Hkv, Dk, Dv, requires_grad=True)
    names = ["q", "k", "v", "g_cmp", "g_slc", "g_win"]
    inputs = [q, k, v, *g]
    if compression == "mlp":
        k_mlp = make_mlp(Hkv, SMALL.cmp_block, Dk, 8, requires_grad=True)
        v_mlp = make_mlp(Hkv, SMALL.cmp_block, Dv, 8, requires_grad=True)
        inputs += k_mlp + v_mlp
        names += [p + n for p in ("k_", "v_") for n in ("pos", "w1", "b1", "w2", "b2")]

    def split(xs):
        mlp = {}
        if compression == "mlp":
            mlp = dict(k_mlp=xs[6:11], v_mlp=xs[11:16])
        return xs[0], xs[1], xs[2], xs[3:6], mlp

    def run_nsa(xs):
        q, k, v, g, mlp = split(xs)
        return native_sparse_attention(q, k, v, *g, config=SMALL, return_indices=True, **mlp)

    def run_ref(xs):
        q, k, v, g, mlp = split(xs)
        return run_oracle(q, k, v, g, SMALL, **mlp)

    compare(names, inputs, run_nsa, run_ref)


def test_gradients_per_branch_kv_and_varlen():
    cu = torch.tensor([0, 1, 30, 30, 70], dtype=torch.int32)
    q, k, v, g = make_inputs(1, 70, 4, 2, 8, 8, requires_grad=True)
    own = [torch.randn_like(t).requires_grad_() for t in (k, v, k, v)]
    names = ["q", "k", "v", "g_cmp", "g_slc", "g_win", "k_slc", "v_slc", "k_win", "v_win"]
    kw = lambda xs: dict(zip(names[6:], xs[6:]))  # noqa: E731

    def run_nsa(xs):
        return native_sparse_attention(*xs[:6], config=SMALL, cu_seqlens=cu, return_indices=True,
                                       **kw(xs))

    def run_ref(xs):
        return run_oracle(xs[0], xs[1], xs[2], xs[3:6], SMALL, cu=cu.tolist(), **kw(xs))

    compare(names, [q, k, v, *g, *own], run_nsa, run_ref)


def test_gradients_with_caller_indices():
    T, Hkv, n = 64, 2, SMALL.slc_count
    q, k, v, g = make_inputs(1, T, 4, Hkv, 8, 8, requires_grad=True)
    t = torch.arange(T).view(1, T, 1, 1)
    idx = (torch.rand(1, T, Hkv, n) * (t // SMALL.slc_block + 1)).floor().to(torch.int32)
    idx[..., 0] = -1

    def run_nsa(xs):
        return native_sparse_attention(*xs, config=SMALL, block_indices=idx, return_indices=True)

    def run_ref(xs):
        return run_oracle(xs[0], xs[1], xs[2], xs[3:6], SMALL, slc_indices=idx.long())

    compare(["q", "k", "v", "g_cmp", "g_slc", "g_win"], [q, k, v, *g], run_nsa, run_ref)


def test_recompute_path_equals_saved_path():
    """Without the forward's saved branch outputs (save=False) the C backward recomputes them:
    the same gradients."""
    import nsa.ops  # noqa: F401
    q, k, v, g = make_inputs(1, 50, 4, 2, 8, 8)
    cfg, kc, vc = SMALL.ints(), torch.randn(1, 11, 2, 8), torch.randn(1, 11, 2, 8)
    o, lse, obr, idx = torch.ops.nsa.fwd(q, k, v, None, None, None, None, kc, vc, *g, None, None,
                                         cfg, 0.0, True)
    d_o = torch.randn_like(o)
    saved = torch.ops.nsa.bwd(d_o, q, k, v, None, None, None, None, kc, vc, *g, None, idx, lse,
                              obr, cfg, 0.0)
    rerun = torch.ops.nsa.bwd(d_o, q, k, v, None, None, None, None, kc, vc, *g, None, idx, None,
                              None, cfg, 0.0)
    for a, b in zip(saved, rerun):
        assert torch.equal(a, b)


@pytest.mark.parametrize("window", [0, 9])
def test_dense_gradients(window):
    q, k, v, _ = make_inputs(1, 40, 4, 2, 8, 12, requires_grad=True)
    o = dense_attention(q, k, v, window=window)
    w = torch.randn(o.shape, dtype=torch.float64)
    got = grads_of(o, w, [q, k, v])
    refs = [f64(t) for t in (q, k, v)]
    want = grads_of(oracle.dense(*refs, window=window)[0], w, refs)
    for name, a, b in zip("qkv", got, want):
        assert_close(a, b, GRAD_TOL, f"d{name}")


def test_compress_gradients_varlen():
    from nsa.functional import compress
    x = torch.randn(1, 45, 2, 8, requires_grad=True)
    params = make_mlp(2, SMALL.cmp_block, 8, 6, requires_grad=True)
    cu = [0, 9, 9, 45]
    got_out = compress(x, SMALL, params, torch.tensor(cu, dtype=torch.int32))
    w = torch.randn(got_out.shape, dtype=torch.float64)
    got = grads_of(got_out, w, [x, *params])
    refs = [f64(t) for t in (x, *params)]
    want = grads_of(oracle.compress_mlp(refs[0], *refs[1:], oracle_cfg(SMALL), cu), w, refs)
    for name, a, b in zip(["x", "pos", "w1", "b1", "w2", "b2"], got, want):
        assert_close(a, b, GRAD_TOL, f"d{name}")


def test_bf16_gradients():
    """bf16 inputs and precomputed compressed tokens (leaves, so that both sides select from the
    same values). Each gradient is rounded to bf16 once (relative 2^-8) after f32 accumulation,
    and the saved branch outputs are bf16 (D = rowsum(d_o * o_c) off by up to 2^-8 relative):
    2 % of the largest gradient."""
    q, k, v, g = make_inputs(1, 70, 4, 2, 16, 16, dtype=torch.bfloat16, requires_grad=True)
    tc = SMALL.cmp_len(70)
    kc = torch.randn(1, tc, 2, 16).bfloat16().requires_grad_()
    vc = torch.randn(1, tc, 2, 16).bfloat16().requires_grad_()
    names = ["q", "k", "v", "g_cmp", "g_slc", "g_win", "k_cmp", "v_cmp"]

    def run_nsa(xs):
        return native_sparse_attention(*xs[:6], config=SMALL, k_cmp=xs[6], v_cmp=xs[7],
                                       return_indices=True)

    def run_ref(xs):
        return run_oracle(xs[0], xs[1], xs[2], xs[3:6], SMALL, k_cmp=xs[6], v_cmp=xs[7])

    compare(names, [q, k, v, *g, kc, vc], run_nsa, run_ref, tol=2e-2)


def test_f16_equals_f32_of_the_same_values():
    """float16 widens exactly to float32 (nsa.h): the forward of float16 inputs is the float32
    run's on the same values rounded once to float16, bit for bit. The gradients differ by what
    the float16 run rounds before its backward: d_o and the saved branch outputs (D = rowsum(d_o
    o_c)), 2^-11 relative each, then the gradient's own rounding; 2.5e-3 of the largest gradient
    (test_bf16_gradients' 2e-2 for bf16's 2^-8, scaled by the 8x finer f16 step). The compressed
    tokens are given (leaves), so that both runs read the same values."""
    q, k, v, g = make_inputs(1, 70, 6, 2, 16, 12, dtype=torch.float16)
    tc = SMALL.cmp_len(70)
    kc, vc = torch.randn(1, tc, 2, 16).half(), torch.randn(1, tc, 2, 12).half()
    h = [x.detach().requires_grad_() for x in (q, k, v, *g, kc, vc)]
    f = [x.detach().float().requires_grad_() for x in (q, k, v, *g, kc, vc)]
    outs = []
    for xs in (h, f):
        o, lse, idx = native_sparse_attention(*xs[:6], config=SMALL, k_cmp=xs[6], v_cmp=xs[7],
                                              return_lse=True, return_indices=True)
        assert o.dtype == xs[0].dtype
        w = torch.linspace(-1, 1, o.numel()).reshape(o.shape)
        (o.float() * w).sum().backward()
        outs.append((o, lse, idx))
    assert torch.equal(outs[0][0], outs[1][0].half())
    assert torch.equal(outs[0][1], outs[1][1]) and torch.equal(outs[0][2], outs[1][2])
    names = ["q", "k", "v", "g_cmp", "g_slc", "g_win", "k_cmp", "v_cmp"]
    for name, a, b in zip(names, h, f):
        assert a.grad.dtype == torch.float16, name
        assert_close(a.grad.float(), b.grad, 2.5e-3, f"d{name}")
