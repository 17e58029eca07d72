# example_python.py: Native Sparse Attention from PyTorch. The differentiable op on random tensors,
# then the layer in a small model: one compiled training step, and generation on a KV cache.
import torch

import nsa
from nsa.nn import NativeSparseAttention

# The op: q [B, T, Hq, Dk], k/v [B, T, Hkv, D] (any group size Hq / Hkv), gates [B, T, Hq].
B, T, Hq, Hkv, D = 1, 2048, 16, 4, 64
q = torch.randn(B, T, Hq, D, requires_grad=True)
k = torch.randn(B, T, Hkv, D, requires_grad=True)
v = torch.randn(B, T, Hkv, D, requires_grad=True)
g_cmp, g_slc, g_win = torch.rand(3, B, T, Hq).unbind(0)  # gate values, as after a sigmoid
o = nsa.native_sparse_attention(q, k, v, g_cmp, g_slc, g_win, config=nsa.Config(window=256))
o.square().mean().backward()  # gradients for q, k and v (and the gates when they need them)
print(f"nsa {nsa.__version__}: o {tuple(o.shape)}, |dq| = {q.grad.norm():.4f}")

# The layer: projections with GQA, sigmoid gates, learned mlp compression, RoPE.
model = torch.nn.Sequential(
    torch.nn.Embedding(256, 128),
    NativeSparseAttention(128, num_heads=8, num_kv_heads=2, config=nsa.Config(window=128)),
    torch.nn.Linear(128, 256),
)
tokens = torch.randint(0, 256, (2, 513))
step = torch.compile(model, fullgraph=True)  # the nsa ops trace without graph breaks
loss = torch.nn.functional.cross_entropy(step(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
loss.backward()
print(f"training step: loss {loss.item():.4f}")

# Generation: prefill a prompt into a KV cache, then one token at a time (the library's decode).
embed, attn, head = model
cache = attn.new_cache(batch_size=2, capacity=1024)
with torch.no_grad():
    attn.prefill(embed(tokens[:, :500]), cache)
    for t in range(500, 513):
        logits = head(attn.step(embed(tokens[:, t:t + 1]), cache))
print(f"decoded to {cache.lengths.tolist()} tokens; next-token logits {tuple(logits.shape)}")
