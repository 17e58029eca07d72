// Shared by the decode tests: a KV cache built from a forward case, row views of the case's
// tensors, and the comparison of decode outputs with the float64 reference forward.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <memory>
#include <random>
#include <string>

#include "cpu/kv_cache.h"
#include "test_util.h"

namespace nsa_test {

constexpr double kF32Eps = 1.0 / (1 << 24);  // f32 unit roundoff, 2^-24

// Rows [t0, t0 + n) of a [1, T, ...] tensor as a [n, ...] view (one dimension fewer).
inline nsa_tensor rows(const Tensor& t, int64_t t0, int64_t n) {
  const nsa_tensor& d = t.desc();
  nsa_tensor v;
  std::memset(&v, 0, sizeof v);
  v.dtype = d.dtype;
  v.ndim = d.ndim - 1;
  v.data = static_cast<char*>(d.data) + t0 * d.stride[1] * nsa_dtype_size(d.dtype);
  for (int i = 1; i < d.ndim; ++i) {
    v.shape[i - 1] = d.shape[i];
    v.stride[i - 1] = d.stride[i];
  }
  v.shape[0] = n;
  return v;
}

struct Context {
  nsa_context* ctx = nullptr;
  explicit Context(int threads = 0) {
    nsa_context_create(&ctx);
    nsa_context_set_num_threads(ctx, threads);
  }
  ~Context() { nsa_context_destroy(ctx); }
  std::string error() const { return nsa_last_error(ctx); }
};

struct CacheDeleter {
  void operator()(nsa_kv_cache* c) const { nsa_kv_cache_destroy(c); }
};
using CachePtr = std::unique_ptr<nsa_kv_cache, CacheDeleter>;

// Random mlp parameters for keys and values (scaled so that phi's outputs are O(1)).
struct MlpTensors {
  Tensor k[5], v[5];  // pos, w1, b1, w2, b2
};

inline void make_mlp(Tensor* t, int64_t H, int64_t l, int64_t D, int64_t Dh, nsa_dtype dt,
                     std::mt19937_64& rng) {
  t[0] = Tensor(dt, {H, l, D});
  t[1] = Tensor(dt, {H, Dh, l * D});
  t[2] = Tensor(dt, {H, Dh});
  t[3] = Tensor(dt, {H, D, Dh});
  t[4] = Tensor(dt, {H, D});
  t[0].fill_uniform(rng, -0.5, 0.5);
  t[1].fill_uniform(rng, -2.0 / std::sqrt(double(l * D)), 2.0 / std::sqrt(double(l * D)));
  t[2].fill_uniform(rng, -0.1, 0.1);
  t[3].fill_uniform(rng, -2.0 / std::sqrt(double(Dh)), 2.0 / std::sqrt(double(Dh)));
  t[4].fill_uniform(rng, -0.1, 0.1);
}

inline CachePtr make_cache(nsa_context* ctx, const nsa_config& cfg, int64_t seqs,
                           int64_t capacity, const Shape& s, nsa_dtype dt, nsa_cmp_kind kind,
                           MlpTensors* mlp = nullptr, std::string* err = nullptr) {
  nsa_kv_cache_params p;
  nsa_kv_cache_params_init(&p);
  p.cfg = cfg;
  p.num_seqs = seqs;
  p.capacity = capacity;
  p.num_kv_heads = s.Hkv;
  p.head_dim_k = s.Dk;
  p.head_dim_v = s.Dv;
  p.dtype = dt;
  p.cmp_kind = kind;
  if (kind == NSA_CMP_MLP) {
    nsa_tensor* k[5] = {&p.k_pos, &p.k_w1, &p.k_b1, &p.k_w2, &p.k_b2};
    nsa_tensor* v[5] = {&p.v_pos, &p.v_w1, &p.v_b1, &p.v_w2, &p.v_b2};
    for (int i = 0; i < 5; ++i) {
      *k[i] = mlp->k[i].desc();
      *v[i] = mlp->v[i].desc();
    }
  }
  nsa_kv_cache* c = nullptr;
  const nsa_status st = nsa_kv_cache_create(ctx, &p, &c);
  if (err) *err = nsa_last_error(ctx);
  EXPECT_EQ(st, NSA_OK) << nsa_last_error(ctx);
  return CachePtr(c);
}

// The cache's compressed tokens of sequence seq, written into rows [0, Tc) of batch row b of
// k_cmp / v_cmp ([B, Tc, Hkv, D] tensors of the case), so the reference forward reads exactly
// what decode reads.
inline void export_cmp(const nsa_kv_cache& c, int64_t seq, int64_t b, Tensor& k_cmp,
                       Tensor& v_cmp) {
  const int64_t Tc = c.cmp_len(seq);
  std::vector<float> row(static_cast<size_t>(std::max(c.Dk, c.Dv)));
  for (int64_t i = 0; i < Tc; ++i) {
    for (int64_t h = 0; h < c.Hkv; ++h) {
      nsa::cpu::storage(c).cmp.read_k(seq, h, i, row.data());
      for (int64_t x = 0; x < c.Dk; ++x) k_cmp.set({b, i, h, x}, row[x]);
      nsa::cpu::storage(c).cmp.read_v(seq, h, i, row.data());
      for (int64_t x = 0; x < c.Dv; ++x) v_cmp.set({b, i, h, x}, row[x]);
    }
  }
}

// One decode step's params for row t of a case (batch row 0), writing into row t of `out`
// (a case of the same shape used as the output holder).
inline nsa_decode_params decode_row(FwdCase& c, FwdCase& out, int64_t t, bool append) {
  nsa_decode_params p;
  nsa_decode_params_init(&p);
  p.q = rows(c.q, t, 1);
  if (append) {
    p.k = rows(c.k, t, 1);
    p.v = rows(c.v, t, 1);
  }
  p.g_cmp = rows(c.g_cmp, t, 1);
  p.g_slc = rows(c.g_slc, t, 1);
  p.g_win = rows(c.g_win, t, 1);
  p.o = rows(out.o, t, 1);
  p.lse_cmp = rows(out.lse_cmp, t, 1);
  p.lse_slc = rows(out.lse_slc, t, 1);
  p.lse_win = rows(out.lse_win, t, 1);
  p.slc_indices_out = rows(out.idx_out, t, 1);
  return p;
}

// Element-wise |got - want| <= abs_tol + rel_tol |want| over rows [t0, t1) of [1, T, ...]
// tensors; infinities must match exactly. Returns the number of elements off.
inline int64_t count_off(const Tensor& got, const Tensor& want, int64_t t0, int64_t t1,
                         double abs_tol, double rel_tol, std::string* first) {
  int64_t bad = 0;
  got.for_each([&](int64_t a, int64_t b, int64_t c, int64_t d) {
    if (b < t0 || b >= t1) return;
    const int64_t off = got.logical_offset(a, b, c, d);
    const double x = got.get_raw(off), y = want.get_raw(off);
    const bool ok = std::isinf(y) ? x == y : std::fabs(x - y) <= abs_tol + rel_tol * std::fabs(y);
    if (!ok && bad++ == 0) {
      *first = "[" + std::to_string(a) + "," + std::to_string(b) + "," + std::to_string(c) + "," +
               std::to_string(d) + "] got " + std::to_string(x) + " want " + std::to_string(y);
    }
  });
  return bad;
}

}  // namespace nsa_test
