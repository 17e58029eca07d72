// Shared test fixtures: owned tensors with optional strided (padded) layouts, and a random forward
// case that fills nsa_fwd_params. Padding is filled with NaN, so a kernel that reads outside a
// view poisons its own result and the comparison fails.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "nsa/nsa.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace nsa_test {

inline float bf16_bits_to_float(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t float_to_bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if (std::isnan(f)) return static_cast<uint16_t>((u >> 16) | 0x40);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// f16 through the CPU's own conversion instructions (F16C), an oracle independent of the
// library's bit arithmetic (common/dtype.h); every x86-64 machine these tests run on has F16C.
#if defined(__x86_64__)
__attribute__((target("f16c"))) inline float f16_bits_to_float(uint16_t h) { return _cvtsh_ss(h); }
__attribute__((target("f16c"))) inline uint16_t float_to_f16_bits(float f) {
  return static_cast<uint16_t>(_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT));
}
#else
inline float f16_bits_to_float(uint16_t h) {
  _Float16 x;
  std::memcpy(&x, &h, 2);
  return static_cast<float>(x);
}
inline uint16_t float_to_f16_bits(float f) {
  const _Float16 x = static_cast<_Float16>(f);
  uint16_t h;
  std::memcpy(&h, &x, 2);
  return h;
}
#endif

// An owned buffer and its descriptor. With `padded`, every dimension but the last gets extra room
// (stride > extent), which makes the descriptor a strided view into a larger buffer.
class Tensor {
 public:
  Tensor() { std::memset(&desc_, 0, sizeof desc_); }

  Tensor(nsa_dtype dtype, std::vector<int64_t> shape, bool padded = false) : Tensor() {
    desc_.dtype = dtype;
    desc_.ndim = static_cast<int32_t>(shape.size());
    int64_t stride = 1;
    for (int i = desc_.ndim - 1; i >= 0; --i) {
      desc_.shape[i] = shape[i];
      desc_.stride[i] = stride;
      // Padding: 3 extra elements per innermost row, one extra slot for every other dimension.
      const int64_t extent = shape[i] + (padded ? (i == desc_.ndim - 1 ? 3 : 1) : 0);
      stride *= std::max<int64_t>(extent, 1);
    }
    elements_ = stride;
    bytes_.assign(static_cast<size_t>(elements_ * nsa_dtype_size(dtype)), 0);
    desc_.data = bytes_.data();
    if (padded) fill_storage(std::numeric_limits<double>::quiet_NaN());
  }

  const nsa_tensor& desc() const { return desc_; }
  nsa_tensor& desc() { return desc_; }
  int64_t numel() const {
    int64_t n = 1;
    for (int i = 0; i < desc_.ndim; ++i) n *= desc_.shape[i];
    return n;
  }
  // The whole backing store, padding included (for "untouched" checks).
  const std::vector<unsigned char>& storage() const { return bytes_; }

  int64_t offset(std::initializer_list<int64_t> idx) const {
    int64_t off = 0;
    int i = 0;
    for (int64_t v : idx) off += v * desc_.stride[i++];
    return off;
  }
  double at(std::initializer_list<int64_t> idx) const { return get_raw(offset(idx)); }
  void set(std::initializer_list<int64_t> idx, double v) { set_raw(offset(idx), v); }
  int32_t at_i32(std::initializer_list<int64_t> idx) const {
    return reinterpret_cast<const int32_t*>(bytes_.data())[offset(idx)];
  }

  // Calls f(i0, i1, i2, i3) for every logical element (unused trailing indices are 0).
  template <typename F>
  void for_each(F&& f) const {
    int64_t s[4] = {1, 1, 1, 1};
    for (int i = 0; i < desc_.ndim; ++i) s[i] = desc_.shape[i];
    for (int64_t a = 0; a < s[0]; ++a)
      for (int64_t b = 0; b < s[1]; ++b)
        for (int64_t c = 0; c < s[2]; ++c)
          for (int64_t d = 0; d < s[3]; ++d) f(a, b, c, d);
  }
  int64_t logical_offset(int64_t a, int64_t b, int64_t c, int64_t d) const {
    const int64_t idx[4] = {a, b, c, d};
    int64_t off = 0;
    for (int i = 0; i < desc_.ndim; ++i) off += idx[i] * desc_.stride[i];
    return off;
  }
  double get_raw(int64_t off) const {
    switch (desc_.dtype) {
      case NSA_DTYPE_BF16:
        return bf16_bits_to_float(reinterpret_cast<const uint16_t*>(bytes_.data())[off]);
      case NSA_DTYPE_F16:
        return f16_bits_to_float(reinterpret_cast<const uint16_t*>(bytes_.data())[off]);
      case NSA_DTYPE_I32: return reinterpret_cast<const int32_t*>(bytes_.data())[off];
      default: return reinterpret_cast<const float*>(bytes_.data())[off];
    }
  }
  void set_raw(int64_t off, double v) {
    switch (desc_.dtype) {
      case NSA_DTYPE_BF16:
        reinterpret_cast<uint16_t*>(bytes_.data())[off] = float_to_bf16_bits(static_cast<float>(v));
        break;
      case NSA_DTYPE_F16:
        reinterpret_cast<uint16_t*>(bytes_.data())[off] = float_to_f16_bits(static_cast<float>(v));
        break;
      case NSA_DTYPE_I32:
        // NaN has no int32 value; padding of index tensors gets INT32_MIN, which no index is.
        reinterpret_cast<int32_t*>(bytes_.data())[off] =
            std::isnan(v) ? std::numeric_limits<int32_t>::min() : static_cast<int32_t>(v);
        break;
      default: reinterpret_cast<float*>(bytes_.data())[off] = static_cast<float>(v);
    }
  }
  // Every logical element from U(lo, hi).
  void fill_uniform(std::mt19937_64& rng, double lo, double hi) {
    std::uniform_real_distribution<double> dist(lo, hi);
    for_each([&](int64_t a, int64_t b, int64_t c, int64_t d) {
      set_raw(logical_offset(a, b, c, d), dist(rng));
    });
  }
  void fill(double v) {
    for_each([&](int64_t a, int64_t b, int64_t c, int64_t d) {
      set_raw(logical_offset(a, b, c, d), v);
    });
  }

 private:
  void fill_storage(double v) {
    for (int64_t i = 0; i < elements_; ++i) set_raw(i, v);
  }
  nsa_tensor desc_;
  std::vector<unsigned char> bytes_;
  int64_t elements_ = 0;
};

struct Shape {
  int64_t B = 1, T = 64, Hq = 2, Hkv = 1, Dk = 16, Dv = 16;
};

// Everything one forward call needs, owned. Inputs are random; k_cmp/v_cmp are random too (the
// contract lets the caller supply them), so the forward is tested independently of compression.
struct FwdCase {
  Shape shape;
  nsa_config cfg{};
  nsa_dtype dtype = NSA_DTYPE_F32;
  std::vector<int32_t> cu_seqlens;  // empty: fixed-length batch
  Tensor q, k, v, k_cmp, v_cmp, g_cmp, g_slc, g_win;
  Tensor o, o_cmp, o_slc, o_win, lse_cmp, lse_slc, lse_win, idx_out;

  // Params with every output requested.
  nsa_fwd_params params() {
    nsa_fwd_params p;
    nsa_fwd_params_init(&p);
    p.in.cfg = cfg;
    p.in.q = q.desc();
    p.in.k = k.desc();
    p.in.v = v.desc();
    p.in.k_cmp = k_cmp.desc();
    p.in.v_cmp = v_cmp.desc();
    p.in.g_cmp = g_cmp.desc();
    p.in.g_slc = g_slc.desc();
    p.in.g_win = g_win.desc();
    p.o = o.desc();
    p.o_cmp = o_cmp.desc();
    p.o_slc = o_slc.desc();
    p.o_win = o_win.desc();
    p.lse_cmp = lse_cmp.desc();
    p.lse_slc = lse_slc.desc();
    p.lse_win = lse_win.desc();
    p.slc_indices_out = idx_out.desc();
    if (!cu_seqlens.empty()) {
      p.in.cu_seqlens = cu_seqlens.data();
      p.in.num_seqs = static_cast<int64_t>(cu_seqlens.size()) - 1;
    }
    return p;
  }
};

// Tc of the whole case: per sequence with cu_seqlens, else of T.
inline int64_t cmp_rows(const nsa_config& cfg, int64_t T, const std::vector<int32_t>& cu) {
  if (cu.empty()) return nsa_cmp_len(&cfg, T);
  int64_t n = 0;
  for (size_t s = 0; s + 1 < cu.size(); ++s) n += nsa_cmp_len(&cfg, cu[s + 1] - cu[s]);
  return n;
}

// A random case. `padded` makes every tensor a strided view; `out_dtype` is the dtype of o and
// the per-branch outputs. Queries and keys are U(-1, 1) scaled so that scores are O(1).
inline FwdCase make_case(const Shape& s, const nsa_config& cfg, nsa_dtype dtype, uint64_t seed,
                         bool padded = false, std::vector<int32_t> cu_seqlens = {},
                         nsa_dtype out_dtype = NSA_DTYPE_F32) {
  FwdCase c;
  c.shape = s;
  c.cfg = cfg;
  c.dtype = dtype;
  c.cu_seqlens = std::move(cu_seqlens);
  std::mt19937_64 rng(seed);
  const int64_t Tc = cmp_rows(cfg, s.T, c.cu_seqlens);
  c.q = Tensor(dtype, {s.B, s.T, s.Hq, s.Dk}, padded);
  c.k = Tensor(dtype, {s.B, s.T, s.Hkv, s.Dk}, padded);
  c.v = Tensor(dtype, {s.B, s.T, s.Hkv, s.Dv}, padded);
  c.k_cmp = Tensor(dtype, {s.B, Tc, s.Hkv, s.Dk}, padded);
  c.v_cmp = Tensor(dtype, {s.B, Tc, s.Hkv, s.Dv}, padded);
  // Scores of size O(1) with some spread: q.k ~ U(-2,2)^2 * Dk / 3, scaled by 1/sqrt(Dk).
  for (Tensor* t : {&c.q, &c.k, &c.k_cmp}) t->fill_uniform(rng, -2.0, 2.0);
  for (Tensor* t : {&c.v, &c.v_cmp}) t->fill_uniform(rng, -1.0, 1.0);
  for (Tensor* g : {&c.g_cmp, &c.g_slc, &c.g_win}) {
    *g = Tensor(dtype, {s.B, s.T, s.Hq}, padded);
    g->fill_uniform(rng, 0.0, 1.0);
  }
  for (Tensor* o : {&c.o, &c.o_cmp, &c.o_slc, &c.o_win})
    *o = Tensor(out_dtype, {s.B, s.T, s.Hq, s.Dv}, padded);
  for (Tensor* l : {&c.lse_cmp, &c.lse_slc, &c.lse_win})
    *l = Tensor(NSA_DTYPE_F32, {s.B, s.T, s.Hq}, padded);
  c.idx_out = Tensor(NSA_DTYPE_I32, {s.B, s.T, s.Hkv, cfg.slc_count}, padded);
  return c;
}

// The dense forward over case c's q, k and v into its o and lse_win (window 0: every key).
inline nsa_dense_fwd_params dense_params(FwdCase& c, int32_t window) {
  nsa_dense_fwd_params p;
  nsa_dense_fwd_params_init(&p);
  p.q = c.q.desc(), p.k = c.k.desc(), p.v = c.v.desc(), p.o = c.o.desc();
  p.lse = c.lse_win.desc();
  p.window = window;
  return p;
}

inline nsa_config config(int32_t l, int32_t d, int32_t lp, int32_t n, int32_t n_init,
                         int32_t n_local, int32_t w) {
  nsa_config c;
  nsa_config_default(&c);
  c.cmp_block = l;
  c.cmp_stride = d;
  c.slc_block = lp;
  c.slc_count = n;
  c.slc_init = n_init;
  c.slc_local = n_local;
  c.window = w;
  return c;
}

// Runs the forward on `backend`; returns the status, and the message through `message`.
inline nsa_status run_fwd(nsa_backend backend, FwdCase& c, std::string* message = nullptr,
                          const nsa_fwd_params* override_params = nullptr) {
  nsa_context* ctx = nullptr;
  nsa_context_create(&ctx);
  nsa_context_set_backend(ctx, backend);
  nsa_fwd_params p = override_params ? *override_params : c.params();
  const nsa_status s = nsa_fwd(ctx, &p);
  if (message) *message = nsa_last_error(ctx);
  nsa_context_destroy(ctx);
  return s;
}

// Entries of `got` with |got - want| > tol (absolute); infinities must match exactly. The two
// tensors may have different strides (a padded view against a plain one). *worst gets the largest
// finite difference.
// The largest |element| of t's logical elements.
// The bf16 arithmetic variants (nsa_bf16_math NATIVE, EMULATED) this CPU runs; prints the ones
// it cannot (a test over them is then partial, and says so).
inline std::vector<nsa_bf16_math> runnable_bf16_maths() {
  std::vector<nsa_bf16_math> v;
  for (nsa_bf16_math m : {NSA_BF16_MATH_NATIVE, NSA_BF16_MATH_EMULATED}) {
    if (nsa_bf16_math_available(m)) {
      v.push_back(m);
    } else {
      std::printf("[ not run  ] bf16 math %s: this CPU cannot run it\n",
                  m == NSA_BF16_MATH_NATIVE ? "NATIVE (no AVX512_BF16)" : "EMULATED (no AVX-512)");
    }
  }
  return v;
}

inline double max_abs(const Tensor& t) {
  double m = 0;
  t.for_each([&](int64_t a, int64_t b, int64_t c, int64_t d) {
    m = std::max(m, std::fabs(t.get_raw(t.logical_offset(a, b, c, d))));
  });
  return m;
}

inline int64_t count_far(const Tensor& got, const Tensor& want, double tol, double* worst) {
  int64_t bad = 0;
  got.for_each([&](int64_t a, int64_t b, int64_t c, int64_t d) {
    const double x = got.get_raw(got.logical_offset(a, b, c, d));
    const double y = want.get_raw(want.logical_offset(a, b, c, d));
    const bool ok = std::isinf(y) ? x == y : std::fabs(x - y) <= tol;
    if (!ok) ++bad;
    if (std::isfinite(y)) *worst = std::max(*worst, std::fabs(x - y));
  });
  return bad;
}

}  // namespace nsa_test
