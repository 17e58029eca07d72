"""Invalid arguments raise Python exceptions whose message names the argument; nothing is written
on failure."""
import pytest
import torch

import nsa
from nsa._torch_io import check_device
from nsa.functional import native_sparse_attention as nsa_attn
from conftest import SMALL, make_inputs


@pytest.fixture
def inputs():
    return make_inputs(1, 40, 4, 2, 8, 8)


def test_shape_names_the_argument(inputs):
    q, k, v, g = inputs
    with pytest.raises(ValueError, match=r"^v: expected shape"):
        nsa_attn(q, k, v[:, :, :1], *g, config=SMALL)
    with pytest.raises(ValueError, match=r"g_slc"):
        nsa_attn(q, k, v, g[0], g[1][:, :, :2], g[2], config=SMALL)


def test_dtype_names_the_argument(inputs):
    q, k, v, g = inputs
    with pytest.raises(TypeError, match=r"q has dtype torch.float64"):
        nsa_attn(q.double(), k, v, *g, config=SMALL)
    with pytest.raises(ValueError, match=r"k:.*f32"):
        nsa_attn(q.half(), k, v, *g, config=SMALL)  # k must follow q's float16
    with pytest.raises(ValueError, match=r"k:"):
        nsa_attn(q, k.bfloat16(), v, *g, config=SMALL)


def test_config_errors(inputs):
    q, k, v, g = inputs
    with pytest.raises(TypeError, match="config"):
        nsa_attn(q, k, v, *g, config={"window": 3})
    with pytest.raises(ValueError, match="cmp_stride"):
        nsa_attn(q, k, v, *g, config=nsa.Config(cmp_block=4, cmp_stride=8))
    with pytest.raises(ValueError, match="config.window"):
        nsa.Config(window=0).validate()


def test_seqlens_and_indices_errors(inputs):
    q, k, v, g = inputs
    with pytest.raises(ValueError, match="cu_seqlens"):
        nsa_attn(q, k, v, *g, config=SMALL, cu_seqlens=torch.tensor([0, 10, 39]))
    with pytest.raises(TypeError, match="cu_seqlens"):
        nsa_attn(q, k, v, *g, config=SMALL, cu_seqlens=torch.tensor([0.0, 40.0]))
    idx = torch.full((1, 40, 2, SMALL.slc_count), 3, dtype=torch.int32)  # block 3 > t // l' early
    with pytest.raises(ValueError, match="slc_indices_in"):
        nsa_attn(q, k, v, *g, config=SMALL, block_indices=idx)


def test_gate_alias(inputs):
    q, k, v, g = inputs
    assert torch.equal(nsa_attn(q, k, v, g[0], g[1], g_swa=g[2], config=SMALL),
                       nsa_attn(q, k, v, *g, config=SMALL))
    with pytest.raises(ValueError, match="g_win/g_swa"):
        nsa_attn(q, k, v, *g, g_swa=g[2], config=SMALL)
    with pytest.raises(ValueError, match="g_win"):
        nsa_attn(q, k, v, g[0], g[1], config=SMALL)


def test_compression_argument_errors(inputs):
    q, k, v, g = inputs
    kc = torch.zeros(1, SMALL.cmp_len(40), 2, 8)
    with pytest.raises(ValueError, match="k_cmp/v_cmp"):
        nsa_attn(q, k, v, *g, config=SMALL, k_cmp=kc)
    with pytest.raises(ValueError, match="k_mlp/v_mlp"):
        nsa_attn(q, k, v, *g, config=SMALL, k_mlp=[kc] * 5)
    with pytest.raises(ValueError, match="k_cmp: expected shape"):
        nsa_attn(q, k, v, *g, config=SMALL, k_cmp=kc[:, :1], v_cmp=kc[:, :1])


def test_output_untouched_on_error(inputs):
    """The C API writes nothing on error; the op allocates its outputs, so a failed call leaves
    the caller's tensors as they were."""
    q, k, v, g = inputs
    before = [t.clone() for t in (q, k, v, *g)]
    with pytest.raises(ValueError):
        nsa_attn(q, k, v[:, :, :1], *g, config=SMALL)
    for a, b in zip(before, (q, k, v, *g)):
        assert torch.equal(a, b)


def test_device_error_names_the_backend():
    """A tensor on another device names the missing backend. No GPU here: a meta tensor stands
    in for a CUDA one (the check is the same: device type not cpu)."""
    with pytest.raises(NotImplementedError, match=r"nsa.fwd: q is a meta tensor.*no META backend"):
        check_device(torch.empty(1, device="meta"), "q", "nsa.fwd")


def test_cache_errors():
    cache = nsa.cache.KVCache(1, 8, 2, 8, config=SMALL)
    q, k, v, g = make_inputs(1, 9, 4, 2, 8, 8)
    with pytest.raises(ValueError, match=r"k:.*capacity|T.*capacity|capacity"):
        cache.prefill(0, q[0], k[0], v[0], *(x[0] for x in g))
    assert cache.lengths.tolist() == [0] and cache._cache.len(0) == 0
    with pytest.raises(ValueError, match="seq_ids"):
        cache.decode(q[0, :1], *(x[0, :1] for x in g), k=k[0, :1], v=v[0, :1],
                     seq_ids=torch.tensor([3], dtype=torch.int32))
    with pytest.raises(TypeError, match="dtype"):
        nsa.cache.KVCache(1, 8, 2, 8, dtype=torch.float16)


def test_config_defaults_and_rules_are_the_c_librarys():
    assert nsa.Config().as_tuple() == nsa._core.config_default()
    with pytest.raises(TypeError, match="config.window"):
        nsa.Config(window=2.5).validate()
    with pytest.raises(ValueError, match="config.cmp_stride: must not exceed cmp_block"):
        nsa.Config(cmp_stride=33).validate()
