"""nsa.np: the NumPy forward, compression and decode, without torch."""
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import nsa
from nsa.functional import native_sparse_attention
from conftest import SMALL, make_mlp


def test_import_and_use_without_torch():
    """`import nsa` and nsa.np never import torch (checked in a fresh interpreter)."""
    code = textwrap.dedent("""
        import sys, numpy as np, nsa
        from nsa import np as nnp
        x = np.ones((1, 20, 2, 4), np.float32)
        out = nnp.compress(x, nsa.Config(cmp_block=8, cmp_stride=4))
        assert out.shape == (1, 4, 2, 4) and (out == 1).all()
        assert "torch" not in sys.modules, "torch was imported"
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def arrays(B, T, Hq, Hkv, D, seed=0):
    rng = np.random.default_rng(seed)
    f = lambda *s: rng.standard_normal(s, dtype=np.float32)  # noqa: E731
    return (f(B, T, Hq, D), f(B, T, Hkv, D), f(B, T, Hkv, D),
            [rng.random((B, T, Hq), dtype=np.float32) for _ in range(3)])


@pytest.mark.parametrize("mlp", [False, True])
def test_forward_equals_torch_op(mlp):
    q, k, v, g = arrays(1, 90, 4, 2, 8)
    params = {}
    if mlp:
        params = {"k_mlp": make_mlp(2, SMALL.cmp_block, 8, 8),
                  "v_mlp": make_mlp(2, SMALL.cmp_block, 8, 8)}
    o, lse, idx = nsa.np.forward(q, k, v, *g, config=SMALL, return_lse=True, return_indices=True,
                                 **{n: [t.numpy() for t in p] for n, p in params.items()})
    to = native_sparse_attention(*map(torch.from_numpy, (q, k, v, *g)), config=SMALL,
                                 return_lse=True, return_indices=True, **params)
    for a, b in zip((o, lse, idx), to):
        assert np.array_equal(a, b.numpy())  # the same C call on the same values


def test_float16_arrays():
    """float16 arrays widen exactly: the float32 result of the same values, rounded to float16
    (the compressed tokens given, float16 in both: compressing in float16 rounds them)."""
    q, k, v, g = arrays(1, 60, 4, 2, 8)
    h = [x.astype(np.float16) for x in (q, k, v, *g)]
    kc, vc = (nsa.np.compress(x, SMALL) for x in h[1:3])
    o16 = nsa.np.forward(*h, config=SMALL, k_cmp=kc, v_cmp=vc)
    o32 = nsa.np.forward(*(x.astype(np.float32) for x in h), config=SMALL,
                         k_cmp=kc.astype(np.float32), v_cmp=vc.astype(np.float32))
    assert kc.dtype == o16.dtype == np.float16
    assert np.array_equal(o16, o32.astype(np.float16))


def test_reference_backend_agrees():
    """backend="ref" runs the float64 reference; the CPU kernels agree to f32 rounding."""
    q, k, v, g = arrays(2, 70, 6, 3, 8)
    cu = None
    cpu = nsa.np.forward(q, k, v, *g, config=SMALL, cu_seqlens=cu)
    ref = nsa.np.forward(q, k, v, *g, config=SMALL, backend="ref")
    assert np.abs(cpu - ref).max() < 2e-5  # f32 sums of a few hundred terms, values O(1)


def test_decode_equals_forward_varlen_cache():
    q, k, v, g = arrays(1, 80, 4, 2, 8)
    full = nsa.np.forward(q, k, v, *g, config=SMALL)
    cache = nsa.np.KVCache(2, 96, 2, 8, config=SMALL)
    cache.prefill(1, q[0, :30], k[0, :30], v[0, :30], *(x[0, :30] for x in g))
    for t in range(80):
        o, _, _ = cache.decode(q[0, t:t + 1], *(x[0, t:t + 1] for x in g), k=k[0, t:t + 1],
                               v=v[0, t:t + 1], seq_ids=[0])
        assert np.abs(o[0] - full[0, t]).max() < 1e-5  # split-key LSE merge vs one pass (f32)
    assert cache.lengths(0) == 80 and cache.lengths(1) == 30


def test_numpy_errors():
    q, k, v, g = arrays(1, 20, 4, 2, 8)
    with pytest.raises(TypeError, match="q: dtype float64"):
        nsa.np.forward(q.astype(np.float64), k, v, *g, config=SMALL)
    with pytest.raises(ValueError, match="g_win"):
        nsa.np.forward(q, k, v, g[0], g[1], g[2][:, :3], config=SMALL)
    with pytest.raises(ValueError, match="stride"):
        nsa.np.forward(q[..., ::-1], k, v, *g, config=SMALL)
