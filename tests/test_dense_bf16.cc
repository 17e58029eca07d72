// bf16 arithmetic in the CPU dense forward (nsa_bf16_math): the native AVX512_BF16 path and its
// AVX-512F emulation against the float64 reference on awkward shapes, against each other bit for
// bit, across thread counts, and the context setting's errors. Each variant that this CPU cannot
// run is reported as not run (the test says which), never passed silently.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <utility>
#include <vector>

#include "api_util.h"
#include "backend_harness.h"
#include "test_util.h"

namespace {
using namespace nsa_test;

constexpr double kEps = 1.0 / (1 << 24);   // f32 unit roundoff
constexpr double kBf16U = 1.0 / (1 << 8);  // bf16 unit roundoff (8-bit significand, nearest)

struct Out {
  Tensor o, lse;
};

// nsa_dense_fwd of case c on `backend` with the given bf16 arithmetic and thread count.
Out dense_on(nsa_backend backend, const FwdCase& c, int32_t window, nsa_bf16_math math,
             int threads, bool padded) {
  Out r;
  r.o = Tensor(NSA_DTYPE_F32, {c.shape.B, c.shape.T, c.shape.Hq, c.shape.Dv}, padded);
  r.lse = Tensor(NSA_DTYPE_F32, {c.shape.B, c.shape.T, c.shape.Hq}, padded);
  nsa_dense_fwd_params p;
  nsa_dense_fwd_params_init(&p);
  p.q = c.q.desc();
  p.k = c.k.desc();
  p.v = c.v.desc();
  p.window = window;
  p.o = r.o.desc();
  p.lse = r.lse.desc();
  if (!c.cu_seqlens.empty()) {
    p.cu_seqlens = c.cu_seqlens.data();
    p.num_seqs = static_cast<int64_t>(c.cu_seqlens.size()) - 1;
  }
  Ctx ctx(backend);
  EXPECT_EQ(nsa_context_set_bf16_math(ctx.get(), math), NSA_OK) << ctx.error();
  EXPECT_EQ(nsa_context_set_num_threads(ctx.get(), threads), NSA_OK);
  EXPECT_EQ(nsa_dense_fwd(ctx.get(), &p), NSA_OK) << ctx.error();
  return r;
}

Out dense(const FwdCase& c, int32_t window, nsa_bf16_math math, int threads, bool padded) {
  return dense_on(NSA_BACKEND_CPU, c, window, math, threads, padded);
}

// The float64 reference (which computes in float64 whatever the bf16 setting).
Out reference(const FwdCase& c, int32_t window) {
  return dense_on(NSA_BACKEND_REF, c, window, NSA_BF16_MATH_AUTO, 0, false);
}

struct Case {
  Shape s;
  int32_t window = 0;
  bool padded = false;
  std::vector<int32_t> cu;
};

// T below, at and past the 64-key tile; G = 1, 3, 16; odd Dk (an unpaired last dim) and Dv off
// the vector; the paper's dims; windows that start mid-tile and of one key; strided views;
// packed sequences.
Case make(Shape s, int32_t window = 0, bool padded = false, std::vector<int32_t> cu = {}) {
  Case c;
  c.s = s, c.window = window, c.padded = padded, c.cu = std::move(cu);
  return c;
}

std::vector<Case> cases() {
  std::vector<Case> v;
  for (int64_t T : {1, 63, 64, 65, 300}) {
    for (int64_t G : {1, 3, 16})
      v.push_back(make({1, T, G * (G == 16 ? 1 : 2), G == 16 ? 1 : 2, 24, 16}));
  }
  v.push_back(make({2, 97, 4, 2, 17, 33}));
  v.push_back(make({1, 130, 2, 1, 192, 128}));
  v.push_back(make({1, 130, 2, 1, 192, 128}, 37));
  v.push_back(make({1, 200, 3, 1, 24, 16}, 1));
  v.push_back(make({2, 50, 6, 2, 24, 20}, 0, true));
  v.push_back(make({1, 150, 4, 2, 24, 16}, 20, false, {0, 33, 33, 100, 150}));
  return v;
}

TEST(DenseBf16Math, MatchesReferenceOnAwkwardShapes) {
  const std::vector<nsa_bf16_math> maths = runnable_bf16_maths();
  if (maths.empty()) GTEST_SKIP() << "no bf16 arithmetic variant runs on this CPU (no AVX-512)";
  uint64_t seed = 900;
  for (const Case& k : cases()) {
    const FwdCase c =
        make_case(k.s, config(32, 16, 64, 16, 1, 2, 512), NSA_DTYPE_BF16, ++seed, k.padded, k.cu);
    const Out ref = reference(c, k.window);
    // f32 accumulation as in DenseVsRef (QK^T of bf16 elements is exact term by term), plus the
    // rounding of each softmax weight to bf16 for P V: sum_j p_j d_j v_j with |d_j| <= 2^-8 and
    // sum_j p_j = 1 moves an output by at most 2^-8 max|v|. The lse is not touched by it.
    const double keys = k.window > 0 ? k.window : k.s.T;
    const double tol_f32 = 16 * (4 * k.s.Dk + keys) * kEps;
    const double tol_o = tol_f32 + kBf16U * max_abs(c.v);
    for (nsa_bf16_math m : maths) {
      SCOPED_TRACE("math " + std::to_string(m) + " T=" + std::to_string(k.s.T) +
                   " Hq=" + std::to_string(k.s.Hq) + " Dk=" + std::to_string(k.s.Dk) +
                   " window=" + std::to_string(k.window));
      const Out got = dense(c, k.window, m, 0, k.padded);
      double worst = 0;
      EXPECT_EQ(count_far(got.o, ref.o, tol_o, &worst), 0) << "o worst " << worst;
      EXPECT_EQ(count_far(got.lse, ref.lse, tol_f32, &worst), 0) << "lse worst " << worst;
    }
  }
}

// The emulation is the same arithmetic: equal bits where both run (no subnormal values here).
TEST(DenseBf16Math, EmulationEqualsNativeBitForBit) {
  if (!nsa_bf16_math_available(NSA_BF16_MATH_NATIVE) ||
      !nsa_bf16_math_available(NSA_BF16_MATH_EMULATED)) {
    GTEST_SKIP() << "needs both NATIVE (AVX512_BF16) and EMULATED (AVX-512) on this CPU";
  }
  uint64_t seed = 950;
  for (const Case& k : cases()) {
    const FwdCase c =
        make_case(k.s, config(32, 16, 64, 16, 1, 2, 512), NSA_DTYPE_BF16, ++seed, k.padded, k.cu);
    const Out a = dense(c, k.window, NSA_BF16_MATH_NATIVE, 0, k.padded);
    const Out b = dense(c, k.window, NSA_BF16_MATH_EMULATED, 0, k.padded);
    EXPECT_EQ(a.o.storage(), b.o.storage()) << "T=" << k.s.T << " Hq=" << k.s.Hq;
    EXPECT_EQ(a.lse.storage(), b.lse.storage()) << "T=" << k.s.T << " Hq=" << k.s.Hq;
  }
}

// The path runs (its rounding of P changes bits against F32), and the bits do not depend on the
// thread count.
TEST(DenseBf16Math, TakesTheBf16PathWithBitsIndependentOfThreads) {
  const std::vector<nsa_bf16_math> maths = runnable_bf16_maths();
  if (maths.empty()) GTEST_SKIP() << "no bf16 arithmetic variant runs on this CPU (no AVX-512)";
  const FwdCase c =
      make_case({1, 301, 4, 1, 64, 32}, config(32, 16, 64, 16, 1, 2, 512), NSA_DTYPE_BF16, 990);
  const Out f32 = dense(c, 0, NSA_BF16_MATH_F32, 0, false);
  for (nsa_bf16_math m : maths) {
    const Out one = dense(c, 0, m, 1, false), two = dense(c, 0, m, 2, false),
              three = dense(c, 0, m, 3, false);
    EXPECT_NE(one.o.storage(), f32.o.storage()) << "math " << m << " computed as F32";
    EXPECT_EQ(one.o.storage(), two.o.storage());
    EXPECT_EQ(one.o.storage(), three.o.storage());
    EXPECT_EQ(one.lse.storage(), three.lse.storage());
  }
}

// A NaN value at one position reaches exactly the rows that attend it, in the channel it is in:
// the pairs of keys in P V must not carry it to a row whose partner key it is.
TEST(DenseBf16Math, NanValueReachesOnlyTheRowsThatSeeIt) {
  const std::vector<nsa_bf16_math> maths = runnable_bf16_maths();
  if (maths.empty()) GTEST_SKIP() << "no bf16 arithmetic variant runs on this CPU (no AVX-512)";
  const int32_t window = 30;
  for (int64_t p : {44, 45, 100}) {  // an even and an odd key of a pair; one in a full tile
    FwdCase c =
        make_case({1, 200, 2, 1, 24, 16}, config(32, 16, 64, 16, 1, 2, 512), NSA_DTYPE_BF16, 995);
    c.v.set({0, p, 0, 3}, NAN);
    for (nsa_bf16_math m : maths) {
      const Out r = dense(c, window, m, 0, false);
      for (int64_t t = 0; t < 200; ++t) {
        const bool sees = p <= t && p > t - window;
        for (int64_t h = 0; h < 2; ++h) {
          for (int64_t ch = 0; ch < 16; ++ch) {
            ASSERT_EQ(std::isnan(r.o.at({0, t, h, ch})), sees && ch == 3)
                << "math " << m << " p=" << p << " t=" << t << " ch=" << ch;
          }
        }
      }
    }
  }
}

TEST(DenseBf16Math, ContextSettingIsCheckedAndKept) {
  Ctx ctx(NSA_BACKEND_CPU);
  EXPECT_EQ(nsa_context_bf16_math(ctx.get()), NSA_BF16_MATH_AUTO);
  EXPECT_EQ(nsa_context_set_bf16_math(ctx.get(), NSA_BF16_MATH_F32), NSA_OK);
  EXPECT_EQ(nsa_context_set_bf16_math(ctx.get(), static_cast<nsa_bf16_math>(7)),
            NSA_ERR_INVALID_ARGUMENT);
  EXPECT_NE(ctx.error().find("bf16_math"), std::string::npos) << ctx.error();
  EXPECT_EQ(nsa_context_bf16_math(ctx.get()), NSA_BF16_MATH_F32);
  for (nsa_bf16_math m : {NSA_BF16_MATH_NATIVE, NSA_BF16_MATH_EMULATED}) {
    const nsa_status st = nsa_context_set_bf16_math(ctx.get(), m);
    EXPECT_EQ(st, nsa_bf16_math_available(m) ? NSA_OK : NSA_ERR_UNSUPPORTED);
  }
  EXPECT_EQ(nsa_bf16_math_available(static_cast<nsa_bf16_math>(-1)), 0);
  EXPECT_EQ(nsa_bf16_math_available(NSA_BF16_MATH_AUTO), 1);
  EXPECT_EQ(nsa_bf16_math_auto(), nsa_bf16_math_available(NSA_BF16_MATH_NATIVE)
                                      ? NSA_BF16_MATH_NATIVE
                                      : NSA_BF16_MATH_F32);
  EXPECT_EQ(nsa_context_set_bf16_math(nullptr, NSA_BF16_MATH_F32), NSA_ERR_NULL_POINTER);
}

}  // namespace
