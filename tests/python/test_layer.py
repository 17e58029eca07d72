"""nsa.nn.NativeSparseAttention: shapes, decode equals forward, torch.compile without graph
breaks, thread-count independence, and a model that trains."""
import pytest
import torch
from torch import nn

import nsa
from nsa.nn import NativeSparseAttention
from conftest import SMALL

# Decode and the forward run the same f32 arithmetic in different orders (split keys merged by
# LSE, against one pass): outputs O(1) after two projections differ by ~1e-7.
STEP_TOL = 1e-5


def layer(**kw):
    args = dict(config=SMALL)
    args.update(kw)
    return NativeSparseAttention(64, 8, 2, **args)


@pytest.mark.parametrize("kw", [{}, dict(compression="mean"), dict(separate_kv=True),
                                dict(rope=False, head_dim=12, head_dim_v=6),
                                dict(cmp_hidden=5)], ids=["mlp", "mean", "separate_kv",
                                                          "no_rope_dk_ne_dv", "hidden5"])
def test_shapes_and_backward(kw):
    m = layer(**kw)
    x = torch.randn(2, 70, 64, requires_grad=True)
    y = m(x)
    assert y.shape == x.shape
    y.square().mean().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name}: zero gradient"


def test_varlen_rows_equal_separate_calls():
    m = layer()
    a, b = torch.randn(1, 37, 64), torch.randn(1, 50, 64)
    cu = torch.tensor([0, 37, 87], dtype=torch.int32)
    packed = m(torch.cat([a, b], 1), cu_seqlens=cu)
    assert torch.allclose(packed[:, :37], m(a), atol=STEP_TOL)
    assert torch.allclose(packed[:, 37:], m(b), atol=STEP_TOL)


@pytest.mark.parametrize("compression", ["mlp", "mean"])
def test_decode_steps_equal_forward(compression):
    torch.manual_seed(1)
    m = layer(compression=compression)
    B, T = 2, 90
    x = torch.randn(B, T, 64)
    with torch.no_grad():
        full = m(x)
    cache = m.new_cache(B, 128)
    steps = torch.cat([m.step(x[:, t:t + 1], cache) for t in range(T)], 1)
    assert (steps - full).abs().max() <= STEP_TOL
    assert cache.lengths.tolist() == [T, T]
    # Prefill a prompt, then step: the same rows.
    cache = m.new_cache(B, 128)
    head = m.prefill(x[:, :41], cache)
    tail = torch.cat([m.step(x[:, t:t + 1], cache) for t in range(41, T)], 1)
    assert (torch.cat([head, tail], 1) - full).abs().max() <= STEP_TOL


def test_decode_sequences_at_different_lengths():
    m = layer()
    x = torch.randn(2, 60, 64)
    with torch.no_grad():
        full = m(x)
    cache = m.new_cache(2, 64)
    m.prefill(x[:1, :30], cache)  # sequence 0 holds 30 tokens
    out = m.step(x[1:, :1], cache, seq_ids=torch.tensor([1], dtype=torch.int32))  # seq 1: first
    assert (out[0, 0] - full[1, 0]).abs().max() <= STEP_TOL
    both = m.step(torch.stack([x[0, 30], x[1, 1]]).unsqueeze(1), cache)
    assert (both[0, 0] - full[0, 30]).abs().max() <= STEP_TOL
    assert (both[1, 0] - full[1, 1]).abs().max() <= STEP_TOL


def test_same_bits_with_one_and_two_threads():
    m = layer()
    x = torch.randn(2, 80, 64, requires_grad=True)
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        m.zero_grad()
        x.grad = None
        y = m(x)
        y.square().sum().backward()
        results.append([y.detach().clone(), x.grad.clone()] +
                       [p.grad.clone() for p in m.parameters()])
    for a, b in zip(*results):
        assert torch.equal(a, b)


class TinyModel(nn.Module):
    def __init__(self, vocab=32, dim=64, config=SMALL):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.attn = NativeSparseAttention(dim, 4, 2, config=config)
        self.norm = nn.RMSNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens):
        h = self.emb(tokens)
        h = h + self.attn(self.norm(h))
        return self.head(h)


def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    model = TinyModel()
    tokens = torch.randint(0, 32, (2, 70))
    compiled = torch.compile(model, fullgraph=True)  # fullgraph: a graph break is an error

    def run(f):
        model.zero_grad()
        out = f(tokens)
        out.square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    eager_out, eager_grads = run(model)
    comp_out, comp_grads = run(compiled)
    # Inductor fuses the projections and norms differently: f32 rounding only.
    assert torch.allclose(comp_out, eager_out, atol=1e-5, rtol=1e-5)
    for n in eager_grads:
        assert torch.allclose(comp_grads[n], eager_grads[n], atol=1e-5, rtol=1e-4), n


def test_torch_compile_varlen_functional():
    """Packed sequences: the compressed row count depends on cu_seqlens's contents (a dynamic
    size in the fake implementation); still one graph."""
    torch._dynamo.reset()
    from nsa.functional import native_sparse_attention
    q = torch.randn(1, 60, 4, 8, requires_grad=True)
    k, v = torch.randn(1, 60, 2, 8), torch.randn(1, 60, 2, 8)
    g = [torch.rand(1, 60, 4) for _ in range(3)]
    cu = torch.tensor([0, 25, 60], dtype=torch.int32)

    def f(q):
        return native_sparse_attention(q, k, v, *g, config=SMALL, cu_seqlens=cu)

    eager = f(q)
    compiled = torch.compile(f, fullgraph=True)(q)
    assert torch.equal(eager, compiled)


def test_small_model_trains():
    """100 AdamW steps on a fixed batch of random tokens: the loss falls (memorisation)."""
    torch.manual_seed(0)
    model = TinyModel()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    tokens = torch.randint(0, 32, (4, 65))
    losses = []
    for _ in range(100):
        logits = model(tokens[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, 32), tokens[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], f"loss {losses[0]:.3f} -> {losses[-1]:.3f}"


def test_constructor_checks():
    with pytest.raises(ValueError, match="num_kv_heads"):
        NativeSparseAttention(64, 6, 4)
    with pytest.raises(ValueError, match="compression"):
        NativeSparseAttention(64, 4, 2, compression="max")
    with pytest.raises(ValueError, match=r"config.slc_count: must be at least"):
        NativeSparseAttention(64, 4, 2, config=nsa.Config(slc_count=2))
    with pytest.raises(NotImplementedError, match="separate_kv"):
        NativeSparseAttention(64, 4, 2, separate_kv=True).new_cache(1, 16)


def test_bf16_layer_trains_and_decodes():
    """A bf16 layer: finite gradients for every parameter, and decode on a bf16 cache within two
    bf16 steps of the forward at |y| < 1 (both round the attention output, then the projection's
    result, to bf16: 2 * 2^-8)."""
    torch.manual_seed(2)
    m = layer(dtype=torch.bfloat16)
    x = torch.randn(2, 50, 64, dtype=torch.bfloat16)
    y = m(x)
    y.float().square().mean().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad.float()).all(), name
    cache = m.new_cache(2, 64)
    assert cache.dtype == torch.bfloat16
    steps = torch.cat([m.step(x[:, t:t + 1], cache) for t in range(50)], 1)
    assert y.detach().abs().max() < 1
    assert (steps.float() - y.detach().float()).abs().max() <= 2 * 2.0 ** -8


def test_torch_compile_decode_step():
    """The generation step compiles as one graph (the decode op's fake, and the cache's lengths
    declared mutated), and its steps equal the eager forward's rows; the mutation is not dropped
    (the cache's lengths advance)."""
    torch._dynamo.reset()
    m = layer()
    x = torch.randn(2, 40, 64)
    with torch.no_grad():
        full = m(x)
    cache = m.new_cache(2, 64)
    step = torch.compile(m.step, fullgraph=True)
    steps = torch.cat([step(x[:, t:t + 1], cache) for t in range(40)], 1)
    assert cache.lengths.tolist() == [40, 40]
    assert (steps - full).abs().max() <= STEP_TOL


def test_f16_layer_decodes_on_a_float32_cache():
    """A float16 layer: its cache stores float32 (a cache holds float32 or bfloat16), prefill and
    steps take float16 queries, and both equal the forward within two float16 roundings of the
    output at |y| < 1 (the attention output, then the projection's result: 2 * 2^-11), plus the
    float32 cache's own compressed tokens against the forward's float16 ones (2^-11)."""
    torch.manual_seed(3)
    m = layer(dtype=torch.float16)
    x = torch.randn(2, 40, 64, dtype=torch.float16)
    y = m(x)
    cache = m.new_cache(2, 64)
    assert cache.dtype == torch.float32
    pre = m.prefill(x[:, :20], cache)
    steps = torch.cat([pre] + [m.step(x[:, t:t + 1], cache) for t in range(20, 40)], 1)
    assert steps.dtype == torch.float16 and y.abs().max() < 1
    assert (steps.float() - y.float()).abs().max() <= 4 * 2.0 ** -11
