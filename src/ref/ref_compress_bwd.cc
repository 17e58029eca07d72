// The compression functions phi (SPEC.md section 5) and their backward (SPEC 6), in float64 on
// Tensor64 arguments. The forward here exists for the backward (which needs the mlp's hidden
// values) and for the finite-difference tests; the C API's forward is ref_compress.cc.
#include <algorithm>

#include "ref/ref.h"
#include "ref/ref_parallel.h"

namespace nsa::ref {
namespace {

// phi's intermediate values for one block, kept for the backward.
struct Block {
  std::vector<double> flat;    // mlp: flatten(X + P), row-major over [l, D]
  std::vector<double> pre;     // mlp: W1 flat + b1, before the relu
  std::vector<double> hidden;  // mlp: relu(pre)
  std::vector<double> out;     // phi(X), [D]
};

// phi of the l tokens starting at row `first` (of the x tensor) of batch row b, KV head h.
Block compress_block(const CompressArgs64& a, int64_t b, int64_t first, int64_t h) {
  const int64_t l = a.cfg.cmp_block, D = a.x.shape[3];
  Block k;
  k.out.assign(D, 0.0);
  if (a.kind == NSA_CMP_MEAN) {
    for (int64_t r = 0; r < l; ++r) {
      for (int64_t i = 0; i < D; ++i) k.out[i] += a.x.at(b, first + r, h, i);
    }
    for (double& v : k.out) v /= static_cast<double>(l);
    return k;
  }
  // mlp: W2 relu(W1 flatten(X + P) + b1) + b2.
  const int64_t Dh = a.w1.shape[1];
  k.flat.resize(l * D);
  for (int64_t r = 0; r < l; ++r) {
    for (int64_t i = 0; i < D; ++i)
      k.flat[r * D + i] = a.x.at(b, first + r, h, i) + a.pos.at(h, r, i);
  }
  k.pre.resize(Dh);
  k.hidden.resize(Dh);
  for (int64_t u = 0; u < Dh; ++u) {
    double acc = a.b1.at(h, u);
    for (int64_t c = 0; c < l * D; ++c) acc += a.w1.at(h, u, c) * k.flat[c];
    k.pre[u] = acc;
    k.hidden[u] = std::max(acc, 0.0);
  }
  for (int64_t i = 0; i < D; ++i) {
    double acc = a.b2.at(h, i);
    for (int64_t u = 0; u < Dh; ++u) acc += a.w2.at(h, i, u) * k.hidden[u];
    k.out[i] = acc;
  }
  return k;
}

// Adds dL/d(the block's inputs) to g, given dout = dL/d(phi of the block).
void block_backward(const CompressArgs64& a, const Block& k, const double* dout, int64_t b,
                    int64_t first, int64_t h, CompressGrads64& g) {
  const int64_t l = a.cfg.cmp_block, D = a.x.shape[3];
  if (a.kind == NSA_CMP_MEAN) {
    // Each of the l tokens contributes 1/l of the mean.
    for (int64_t r = 0; r < l; ++r) {
      for (int64_t i = 0; i < D; ++i)
        g.dx.at(b, first + r, h, i) += dout[i] / static_cast<double>(l);
    }
    return;
  }
  const int64_t Dh = a.w1.shape[1];
  // out = W2 hidden + b2.
  std::vector<double> d_hidden(Dh, 0.0);
  for (int64_t i = 0; i < D; ++i) {
    g.db2.at(h, i) += dout[i];
    for (int64_t u = 0; u < Dh; ++u) {
      g.dw2.at(h, i, u) += dout[i] * k.hidden[u];
      d_hidden[u] += a.w2.at(h, i, u) * dout[i];
    }
  }
  // hidden = relu(pre): the gradient passes where pre > 0 (0 at the kink, as relu'(0) = 0).
  // pre = W1 flat + b1.
  std::vector<double> d_flat(l * D, 0.0);
  for (int64_t u = 0; u < Dh; ++u) {
    const double d_pre = k.pre[u] > 0.0 ? d_hidden[u] : 0.0;
    g.db1.at(h, u) += d_pre;
    for (int64_t c = 0; c < l * D; ++c) {
      g.dw1.at(h, u, c) += d_pre * k.flat[c];
      d_flat[c] += a.w1.at(h, u, c) * d_pre;
    }
  }
  // flat = flatten(X + P): the same gradient reaches the token and its position encoding.
  for (int64_t r = 0; r < l; ++r) {
    for (int64_t i = 0; i < D; ++i) {
      g.dx.at(b, first + r, h, i) += d_flat[r * D + i];
      g.dpos.at(h, r, i) += d_flat[r * D + i];
    }
  }
}

Tensor64 zeros_like(const Tensor64& x) {
  return Tensor64(x.shape[0], x.shape[1], x.shape[2], x.shape[3]);
}

}  // namespace

Status compress64(const CompressArgs64& a, int32_t num_threads, Tensor64* out) {
  const int64_t Hkv = a.x.shape[2], D = a.x.shape[3], d = a.cfg.cmp_stride;
  int64_t Tc = 0;  // rows of out: packed sequences follow each other, batch rows restart at 0
  for (const Sequence& s : a.seqs) Tc = std::max(Tc, s.cmp_start + s.cmp_len);
  *out = Tensor64(a.x.shape[0], Tc, Hkv, D);
  return parallel_for(Hkv, num_threads, [&](int64_t h) {
    for (const Sequence& s : a.seqs) {
      for (int64_t i = 0; i < s.cmp_len; ++i) {
        // Compressed token i summarises raw tokens i*d .. i*d + l - 1 of its sequence (SPEC 3).
        const Block k = compress_block(a, s.batch, s.start + i * d, h);
        std::copy(k.out.begin(), k.out.end(), out->row(s.batch, s.cmp_start + i, h));
      }
    }
  });
}

Status compress_backward64(const CompressArgs64& a, const Tensor64& dout, int32_t num_threads,
                           CompressGrads64* grads) {
  CompressGrads64& g = *grads;
  g.dx = zeros_like(a.x);
  if (a.kind == NSA_CMP_MLP) {
    g.dpos = zeros_like(a.pos);
    g.dw1 = zeros_like(a.w1);
    g.db1 = zeros_like(a.b1);
    g.dw2 = zeros_like(a.w2);
    g.db2 = zeros_like(a.b2);
  }
  const int64_t Hkv = a.x.shape[2], d = a.cfg.cmp_stride;
  // One thread per KV head: a head's parameters and dx rows receive only from its own blocks, and
  // each thread adds them up in a fixed order.
  return parallel_for(Hkv, num_threads, [&](int64_t h) {
    for (const Sequence& s : a.seqs) {
      for (int64_t i = 0; i < s.cmp_len; ++i) {
        const int64_t first = s.start + i * d;
        const Block k = compress_block(a, s.batch, first, h);
        block_backward(a, k, dout.row(s.batch, s.cmp_start + i, h), s.batch, first, h, g);
      }
    }
  });
}

}  // namespace nsa::ref
