// Helpers for the contract and property tests of the float64 reference (test_contract.cc,
// test_properties.cc): an independent float64 attention, dense copies of tensors, the sequence
// layout of a case, and exact comparisons. Nothing here calls into src/ref, so the tests compare
// the reference against a second, separately written implementation of SPEC.md section 4.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "test_util.h"

namespace nsa_test {

constexpr double kNegInf = -std::numeric_limits<double>::infinity();

// The logical elements of a tensor as doubles, in row-major order of its shape (the padding of a
// strided view is dropped). bf16 and f32 elements are converted exactly.
struct Dense {
  int64_t s[4] = {1, 1, 1, 1};
  std::vector<double> v;
  explicit Dense(const Tensor& t) {
    const nsa_tensor& d = t.desc();
    for (int i = 0; i < d.ndim; ++i) s[i] = d.shape[i];
    v.reserve(static_cast<size_t>(t.numel()));
    t.for_each([&](int64_t a, int64_t b, int64_t c, int64_t e) {
      v.push_back(t.get_raw(t.logical_offset(a, b, c, e)));
    });
  }
  int64_t index(int64_t a, int64_t b, int64_t c = 0, int64_t e = 0) const {
    return ((a * s[1] + b) * s[2] + c) * s[3] + e;
  }
  double operator()(int64_t a, int64_t b, int64_t c = 0, int64_t e = 0) const {
    return v[index(a, b, c, e)];
  }
  const double* row(int64_t a, int64_t b, int64_t c) const { return &v[index(a, b, c, 0)]; }
};

// softmax(scale q.k) attention over the given key rows, written independently of src/ref.
struct Att {
  std::vector<double> o;
  double lse = kNegInf;
  std::vector<double> p;
};
inline Att attention(const double* q, int64_t dk, const std::vector<const double*>& keys,
                     const std::vector<const double*>& vals, int64_t dv, double scale) {
  Att a;
  a.o.assign(dv, 0.0);
  if (keys.empty()) return a;  // SPEC 4.1: an empty branch gives o = 0, lse = -inf
  std::vector<double> s(keys.size());
  double m = kNegInf;
  for (size_t j = 0; j < keys.size(); ++j) {
    double dot = 0.0;
    for (int64_t c = 0; c < dk; ++c) dot += q[c] * keys[j][c];
    s[j] = scale * dot;
    m = std::max(m, s[j]);
  }
  double z = 0.0;
  a.p.resize(keys.size());
  for (size_t j = 0; j < keys.size(); ++j) z += (a.p[j] = std::exp(s[j] - m));
  for (size_t j = 0; j < keys.size(); ++j) {
    a.p[j] /= z;
    for (int64_t c = 0; c < dv; ++c) a.o[c] += a.p[j] * vals[j][c];
  }
  a.lse = m + std::log(z);
  return a;
}

// The scale the op uses: the f32 config field (nsa.h), 0 meaning 1/sqrt(Dk) rounded to f32.
inline double effective_scale(const nsa_config& cfg, int64_t dk) {
  const float s = cfg.scale == 0.0f ? static_cast<float>(1.0 / std::sqrt(double(dk))) : cfg.scale;
  return static_cast<double>(s);
}

// One independent sequence of a case (SPEC 1): batch row, first token, length, first k_cmp row.
struct Seq {
  int64_t b, start, len, cmp_start;
};
inline std::vector<Seq> sequences(const FwdCase& c) {
  std::vector<Seq> out;
  if (c.cu_seqlens.empty()) {
    for (int64_t b = 0; b < c.shape.B; ++b) out.push_back({b, 0, c.shape.T, 0});
    return out;
  }
  int64_t cmp = 0;
  for (size_t s = 0; s + 1 < c.cu_seqlens.size(); ++s) {
    const int64_t len = c.cu_seqlens[s + 1] - c.cu_seqlens[s];
    out.push_back({0, c.cu_seqlens[s], len, cmp});
    cmp += nsa_cmp_len(&c.cfg, len);
  }
  return out;
}

// Every output of a case (o, o_cmp, o_slc, o_win, lse_cmp, lse_slc, lse_win, slc_indices_out),
// copied, so that a later run can be compared against it.
inline std::vector<Dense> snapshot(const FwdCase& c) {
  std::vector<Dense> out;
  for (const Tensor* t :
       {&c.o, &c.o_cmp, &c.o_slc, &c.o_win, &c.lse_cmp, &c.lse_slc, &c.lse_win, &c.idx_out}) {
    out.emplace_back(*t);
  }
  return out;
}

// Bit-for-bit equality of tokens [a0, a0 + len) of snapshot a with [b0, b0 + len) of b, every
// batch row, head and channel (-inf equals -inf; two NaN count as equal).
inline void expect_same_rows(const std::vector<Dense>& a, int64_t a0, const std::vector<Dense>& b,
                             int64_t b0, int64_t len, const std::string& what) {
  static const char* names[] = {"o",       "o_cmp",   "o_slc",   "o_win",
                                "lse_cmp", "lse_slc", "lse_win", "slc_indices_out"};
  int64_t bad = 0;
  for (size_t n = 0; n < a.size(); ++n) {
    const Dense &x = a[n], &y = b[n];
    for (int64_t r = 0; r < x.s[0]; ++r)
      for (int64_t t = 0; t < len; ++t)
        for (int64_t h = 0; h < x.s[2]; ++h)
          for (int64_t e = 0; e < x.s[3]; ++e) {
            const double u = x(r, a0 + t, h, e), v = y(r, b0 + t, h, e);
            if (!(u == v || (std::isnan(u) && std::isnan(v))) && bad++ < 5) {
              ADD_FAILURE() << what << ": " << names[n] << "[" << r << ", " << t << ", " << h
                            << ", " << e << "] = " << u << " vs " << v;
            }
          }
  }
  EXPECT_EQ(bad, 0) << what;
}

// Collects mismatches of many elements, reports the first few, asserts at the end.
class Checker {
 public:
  explicit Checker(std::string what) : what_(std::move(what)) {}
  ~Checker() { EXPECT_EQ(bad_, 0) << what_ << ": mismatches out of " << checked_ << " checked"; }
  void near(double got, double want, double tol, const char* name, int64_t b, int64_t t, int64_t h,
            int64_t e = 0) {
    ++checked_;
    const bool ok = got == want || std::fabs(got - want) <= tol;  // got == want: -inf == -inf
    if (!ok && bad_++ < 5) {
      ADD_FAILURE() << what_ << ": " << name << "[" << b << ", " << t << ", " << h << ", " << e
                    << "] = " << got << ", expected " << want << " (tol " << tol << ")";
    }
  }
  void expect(bool ok, const std::string& msg) {
    ++checked_;
    if (!ok && bad_++ < 5) ADD_FAILURE() << what_ << ": " << msg;
  }

 private:
  std::string what_;
  int64_t bad_ = 0, checked_ = 0;
};

// Tolerance for an output stored in dtype dt against its float64 value. f32 storage rounds to
// 2^-24 relative; 1e-6 relative adds room for float64 summation-order differences. bf16 keeps 8
// significant bits (2^-9 relative rounding); 2^-8 for the same margin. The 1e-9 floor covers
// results near zero, where float64 rounding of the sum is absolute (~1e-16), not relative.
inline double out_tol(nsa_dtype dt, double want) {
  return (dt == NSA_DTYPE_BF16 ? std::ldexp(1.0, -8) : 1e-6) * std::fabs(want) + 1e-9;
}
// lse is stored as f32 (nsa.h): 2^-24 relative rounding, 1e-6 for margin; absolute below 1.
inline double lse_tol(double want) { return 1e-6 * std::max(1.0, std::fabs(want)); }

inline nsa_status run_ref(FwdCase& c, const nsa_fwd_params* p = nullptr) {
  std::string msg;
  const nsa_status s = run_fwd(NSA_BACKEND_REF, c, &msg, p);
  EXPECT_EQ(s, NSA_OK) << msg;
  return s;
}

}  // namespace nsa_test
