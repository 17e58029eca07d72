// Shared by the decode tests: a KV cache built from a forward case, row views of the case's
// tensors, and the comparison of decode outputs with the float64 reference forward.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <memory>
#include <random>
#include <sstream>
#include <string>

#include "backend_harness.h"
#include "common/kv_cache.h"
#include "test_util.h"

namespace nsa_test {

constexpr double kF32Eps = 1.0 / (1 << 24);  // f32 unit roundoff, 2^-24

// Rows [t0, t0 + n) of a [1, T, ...] view as a [n, ...] view (one dimension fewer). Only the
// data pointer moves, so this works on a backend's descriptors as well as on host ones.
inline nsa_tensor rows(const nsa_tensor& d, int64_t t0, int64_t n) {
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
inline nsa_tensor rows(const Tensor& t, int64_t t0, int64_t n) { return rows(t.desc(), t0, n); }

struct Context {
  nsa_context* ctx = nullptr;
  explicit Context(int threads = 0, nsa_backend backend = NSA_BACKEND_AUTO,
                   nsa_bf16_math math = NSA_BF16_MATH_AUTO) {
    nsa_context_create(&ctx);
    nsa_context_set_num_threads(ctx, threads);
    EXPECT_EQ(nsa_context_set_backend(ctx, backend), NSA_OK) << nsa_last_error(ctx);
    EXPECT_EQ(nsa_context_set_bf16_math(ctx, math), NSA_OK) << nsa_last_error(ctx);
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

// phi's parameters for the keys and the values of shape s (hidden width Dh).
inline void make_mlps(MlpTensors* m, const Shape& s, int64_t l, int64_t Dh, nsa_dtype dt,
                      std::mt19937_64& rng) {
  make_mlp(m->k, s.Hkv, l, s.Dk, Dh, dt, rng);
  make_mlp(m->v, s.Hkv, l, s.Dv, Dh, dt, rng);
}

inline CachePtr make_cache(nsa_context* ctx, const nsa_config& cfg, int64_t seqs, int64_t capacity,
                           const Shape& s, nsa_dtype dt, nsa_cmp_kind kind,
                           MlpTensors* mlp = nullptr, std::string* err = nullptr,
                           const BufferHelper& buffers = host_buffers()) {
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
  Staging staged(buffers);  // the parameters are copied at creation (nsa.h)
  const nsa_kv_cache_params sp = stage(staged, p);
  const nsa_status st = nsa_kv_cache_create(ctx, &sp, &c);
  if (err) *err = nsa_last_error(ctx);
  EXPECT_EQ(st, NSA_OK) << nsa_last_error(ctx);
  return CachePtr(c);
}

// The tensors of a decode run, as descriptors: the inputs of case `c` (batch row 0) and the
// outputs of `out` (a case of the same shape used as the output holder), either the host
// tensors themselves or copies in a backend's memory (staged(): downloaded by
// download_outputs() of the Staging given).
struct DecodeTensors {
  nsa_tensor q, k, v, g_cmp, g_slc, g_win;
  nsa_tensor o, lse_cmp, lse_slc, lse_win, idx_out;

  static DecodeTensors host(const FwdCase& c, const FwdCase& out) {
    return {c.q.desc(),         c.k.desc(),         c.v.desc(),        c.g_cmp.desc(),
            c.g_slc.desc(),     c.g_win.desc(),     out.o.desc(),      out.lse_cmp.desc(),
            out.lse_slc.desc(), out.lse_win.desc(), out.idx_out.desc()};
  }
  static DecodeTensors staged(Staging& s, const FwdCase& c, const FwdCase& out) {
    const DecodeTensors h = host(c, out);
    return {s.in(h.q),        s.in(h.k),        s.in(h.v),       s.in(h.g_cmp),
            s.in(h.g_slc),    s.in(h.g_win),    s.out(h.o),      s.out(h.lse_cmp),
            s.out(h.lse_slc), s.out(h.lse_win), s.out(h.idx_out)};
  }
};

// One decode step's params for row t.
inline nsa_decode_params decode_row(const DecodeTensors& x, int64_t t, bool append) {
  nsa_decode_params p;
  nsa_decode_params_init(&p);
  p.q = rows(x.q, t, 1);
  if (append) {
    p.k = rows(x.k, t, 1);
    p.v = rows(x.v, t, 1);
  }
  p.g_cmp = rows(x.g_cmp, t, 1);
  p.g_slc = rows(x.g_slc, t, 1);
  p.g_win = rows(x.g_win, t, 1);
  p.o = rows(x.o, t, 1);
  p.lse_cmp = rows(x.lse_cmp, t, 1);
  p.lse_slc = rows(x.lse_slc, t, 1);
  p.lse_win = rows(x.lse_win, t, 1);
  p.slc_indices_out = rows(x.idx_out, t, 1);
  return p;
}
inline nsa_decode_params decode_row(FwdCase& c, FwdCase& out, int64_t t, bool append) {
  return decode_row(DecodeTensors::host(c, out), t, append);
}

// Prefill params for rows [0, n).
inline nsa_prefill_params prefill_rows(const DecodeTensors& x, int64_t n) {
  nsa_prefill_params p;
  nsa_prefill_params_init(&p);
  p.q = rows(x.q, 0, n), p.k = rows(x.k, 0, n), p.v = rows(x.v, 0, n);
  p.g_cmp = rows(x.g_cmp, 0, n), p.g_slc = rows(x.g_slc, 0, n), p.g_win = rows(x.g_win, 0, n);
  p.o = rows(x.o, 0, n), p.lse_cmp = rows(x.lse_cmp, 0, n), p.lse_slc = rows(x.lse_slc, 0, n);
  p.lse_win = rows(x.lse_win, 0, n);
  p.slc_indices_out = rows(x.idx_out, 0, n);
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
      std::ostringstream os;  // (string + to_string chains trip GCC 12's -Wrestrict when inlined)
      os << "[" << a << "," << b << "," << c << "," << d << "] got " << x << " want " << y;
      *first = os.str();
    }
  });
  return bad;
}

}  // namespace nsa_test
