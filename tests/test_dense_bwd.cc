// The dense backward (FlashAttention-2's, the baseline of NSA's backward): the float64 reference
// against central finite differences of the reference forward, every backend under test
// (backend_harness.h) against the reference on awkward shapes, and argument validation; for the
// CPU backend alone, bitwise equality across thread counts and every Highway target.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <ostream>
#include <string>
#include <tuple>

#include "backend_harness.h"
#include "nsa/nsa.hpp"
#include "test_util.h"

namespace {
using namespace nsa_test;

constexpr double kEps = 1.0 / (1 << 24);  // f32 unit roundoff

// A forward case (q, k, v from make_case) with its forward outputs and a random dO.
struct BwdCase {
  FwdCase c;
  int32_t window = 0;
  Tensor o, lse, d_o;
  Tensor dq, dk, dv;
};

nsa_context* context(nsa_backend backend, int threads) {
  nsa_context* ctx = nullptr;
  nsa_context_create(&ctx);
  nsa_context_set_backend(ctx, backend);
  nsa_context_set_num_threads(ctx, threads);
  return ctx;
}

nsa_dense_bwd_params params(BwdCase& b) {
  nsa_dense_bwd_params p;
  nsa_dense_bwd_params_init(&p);
  p.q = b.c.q.desc();
  p.k = b.c.k.desc();
  p.v = b.c.v.desc();
  p.o = b.o.desc();
  p.lse = b.lse.desc();
  p.d_o = b.d_o.desc();
  p.window = b.window;
  if (!b.c.cu_seqlens.empty()) {
    p.cu_seqlens = b.c.cu_seqlens.data();
    p.num_seqs = static_cast<int64_t>(b.c.cu_seqlens.size()) - 1;
  }
  p.dq = b.dq.desc();
  p.dk = b.dk.desc();
  p.dv = b.dv.desc();
  return p;
}

// The forward of the case into o (and lse when given).
nsa_dense_fwd_params fwd_params(BwdCase& b, Tensor& o, Tensor* lse) {
  nsa_dense_fwd_params f;
  nsa_dense_fwd_params_init(&f);
  f.q = b.c.q.desc();
  f.k = b.c.k.desc();
  f.v = b.c.v.desc();
  f.window = b.window;
  f.o = o.desc();
  if (lse != nullptr) f.lse = lse->desc();
  if (!b.c.cu_seqlens.empty()) {
    f.cu_seqlens = b.c.cu_seqlens.data();
    f.num_seqs = static_cast<int64_t>(b.c.cu_seqlens.size()) - 1;
  }
  return f;
}

// Inputs, backend `be`'s forward o and lse (what a training step saves), and dO ~ U(-1, 1).
BwdCase make_bwd(const BackendUnderTest& be, const Shape& s, int32_t window, nsa_dtype dtype,
                 uint64_t seed, bool padded = false, std::vector<int32_t> cu = {},
                 nsa_dtype out_dtype = NSA_DTYPE_F32) {
  BwdCase b;
  b.c = make_case(s, config(32, 16, 64, 16, 1, 2, 512), dtype, seed, padded, std::move(cu));
  b.window = window;
  b.o = Tensor(NSA_DTYPE_F32, {s.B, s.T, s.Hq, s.Dv}, padded);
  b.lse = Tensor(NSA_DTYPE_F32, {s.B, s.T, s.Hq}, padded);
  b.d_o = Tensor(dtype, {s.B, s.T, s.Hq, s.Dv}, padded);
  std::mt19937_64 rng(seed + 1000);
  b.d_o.fill_uniform(rng, -1.0, 1.0);
  b.dq = Tensor(out_dtype, {s.B, s.T, s.Hq, s.Dk}, padded);
  b.dk = Tensor(out_dtype, {s.B, s.T, s.Hkv, s.Dk}, padded);
  b.dv = Tensor(out_dtype, {s.B, s.T, s.Hkv, s.Dv}, padded);
  // The forward in f32 arithmetic: these tests measure the backward's own error, and a bf16
  // arithmetic forward's o (nsa_bf16_math) is off by up to 2^-8 max|v|, which reaches every
  // gradient through D = rowsum(dO * O).
  std::string msg;
  EXPECT_EQ(run_on(be, fwd_params(b, b.o, &b.lse), 0, &msg, NSA_BF16_MATH_F32), NSA_OK) << msg;
  return b;
}

nsa_status run_bwd(const BackendUnderTest& be, int threads, BwdCase& b) {
  std::string msg;
  const nsa_status st = run_on(be, params(b), threads, &msg);
  if (st != NSA_OK) ADD_FAILURE() << msg;
  return st;
}

struct Case {
  Shape s;
  int32_t window = 0;
  nsa_dtype dtype = NSA_DTYPE_F32;
  bool padded = false;
  std::vector<int32_t> cu;
  nsa_dtype out_dtype = NSA_DTYPE_F32;
};

void PrintTo(const Case& c, std::ostream* os) {
  *os << "B" << c.s.B << " T" << c.s.T << " Hq" << c.s.Hq << " Hkv" << c.s.Hkv << " Dk" << c.s.Dk
      << " Dv" << c.s.Dv << " w" << c.window << (c.dtype == NSA_DTYPE_BF16 ? " bf16" : " f32")
      << (c.out_dtype == NSA_DTYPE_BF16 ? "->bf16" : "") << (c.padded ? " padded" : "")
      << (c.cu.empty() ? "" : " varlen");
}

class DenseBwdVsRef : public ::testing::TestWithParam<std::tuple<BackendUnderTest, Case>> {};

TEST_P(DenseBwdVsRef, MatchesReference) {
  const BackendUnderTest& be = std::get<0>(GetParam());
  const Case& k = std::get<1>(GetParam());
  BwdCase cpu = make_bwd(be, k.s, k.window, k.dtype, 21, k.padded, k.cu, k.out_dtype);
  BwdCase ref = make_bwd(be, k.s, k.window, k.dtype, 21, false, k.cu, NSA_DTYPE_F32);
  ASSERT_EQ(run_bwd(oracle(), 0, ref), NSA_OK);
  ASSERT_EQ(run_bwd(be, 0, cpu), NSA_OK);
  // f32 rounding, relative to the gradient's own size M: an entry is a sum over at most G * keys
  // (query, key) pairs of terms built from dots of Dk (scores) and Dv (dP) products, so
  // n = 4 Dk + Dv + G * keys roundings of 2^-24 reach it; with random signs they grow as sqrt(n)
  // (Higham, "Accuracy and Stability", 2.8), margin 16. The worst-case n * 2^-24 bound would be
  // too loose to catch one wrongly masked key (an error of about M / keys). A bf16 output adds
  // its own rounding, 2^-8 of M.
  const double keys = k.window > 0 ? std::min<int64_t>(k.window, k.s.T) : k.s.T;
  const double G = static_cast<double>(k.s.Hq / k.s.Hkv);
  const double bf = k.out_dtype == NSA_DTYPE_BF16 ? 1.0 / 256 : 0.0;
  const std::pair<const Tensor*, const Tensor*> pairs[] = {
      {&cpu.dq, &ref.dq}, {&cpu.dk, &ref.dk}, {&cpu.dv, &ref.dv}};
  const char* names[] = {"dq", "dk", "dv"};
  for (int i = 0; i < 3; ++i) {
    const double m = std::max(1.0, max_abs(*pairs[i].second));
    const double tol = (16 * std::sqrt(4 * k.s.Dk + k.s.Dv + G * keys) * kEps + bf) * m;
    double worst = 0;
    EXPECT_EQ(count_far(*pairs[i].first, *pairs[i].second, tol, &worst), 0)
        << names[i] << " worst " << worst << " tol " << tol << " max " << m;
  }
}

std::vector<Case> cases() {
  std::vector<Case> v;
  for (int64_t T : {1, 17, 100, 333}) {
    for (int64_t G : {1, 3, 16}) {
      Case c;
      c.s = {1, T, G * (G == 16 ? 1 : 2), G == 16 ? 1 : 2, 24, 40};  // Dk != Dv
      v.push_back(c);
      c.window = T == 333 ? 70 : 5;  // windows starting mid-tile and before the tile
      v.push_back(c);
    }
  }
  Case w1;  // window 1: each row sees itself only
  w1.s = {2, 100, 3, 1, 17, 33};
  w1.window = 1;
  v.push_back(w1);
  Case big;  // whole-vector head dims, Dk > Dv
  big.s = {1, 150, 2, 1, 128, 64};
  v.push_back(big);
  Case bf = big;  // bf16 inputs (widened exactly), f32 and bf16 outputs
  bf.dtype = NSA_DTYPE_BF16;
  v.push_back(bf);
  bf.s = {1, 100, 6, 2, 40, 24};
  bf.out_dtype = NSA_DTYPE_BF16;
  bf.window = 37;
  v.push_back(bf);
  Case pad;  // strided views of every tensor (NaN in the gaps)
  pad.s = {2, 70, 6, 2, 24, 20};
  pad.padded = true;
  v.push_back(pad);
  Case packed;  // varlen: an empty sequence, lengths not multiples of a tile
  packed.s = {1, 250, 4, 2, 24, 16};
  packed.cu = {0, 33, 33, 180, 250};
  v.push_back(packed);
  packed.window = 20;
  packed.padded = true;
  v.push_back(packed);
  return v;
}

INSTANTIATE_TEST_SUITE_P(Shapes, DenseBwdVsRef,
                         ::testing::Combine(::testing::ValuesIn(backends_under_test(kOpDenseBwd)),
                                            ::testing::ValuesIn(cases())),
                         backend_case_name<Case>);

// The kernel is generic in the vector length (tiles of 4 vectors: 64 positions with AVX-512,
// 32 with AVX2, 16 with SSE4, 4 scalar): every target this machine runs matches the reference.
// CPU only: targets are a CPU notion.
TEST(DenseBwd, EveryTargetMatchesReference) {
  const BackendUnderTest cpu = backend(NSA_BACKEND_CPU);
  const Shape s{1, 75, 6, 2, 20, 12};
  for (int32_t window : {0, 9}) {
    BwdCase ref = make_bwd(cpu, s, window, NSA_DTYPE_F32, 13);
    ASSERT_EQ(run_bwd(oracle(), 0, ref), NSA_OK);
    const double m = std::max({1.0, max_abs(ref.dq), max_abs(ref.dk), max_abs(ref.dv)});
    const double tol = 16 * std::sqrt(4 * s.Dk + s.Dv + 3.0 * s.T) * kEps * m;  // as above
    for_each_hwy_target([&] {
      BwdCase got = make_bwd(cpu, s, window, NSA_DTYPE_F32, 13);
      ASSERT_EQ(run_bwd(cpu, 0, got), NSA_OK);
      double worst = 0;
      EXPECT_EQ(count_far(got.dq, ref.dq, tol, &worst), 0);
      EXPECT_EQ(count_far(got.dk, ref.dk, tol, &worst), 0);
      EXPECT_EQ(count_far(got.dv, ref.dv, tol, &worst), 0);
    });
  }
}

// Seeded random small cases (batch or packed sequences, group sizes, head dims, windows, dtypes,
// strided views, thread counts): the CPU matches the reference, and the outputs' padding (NaN
// bytes between the rows of a strided view) is never written.
class DenseBwdRandom : public ::testing::TestWithParam<BackendUnderTest> {};
INSTANTIATE_TEST_SUITE_P(Backends, DenseBwdRandom, ::testing::ValuesIn(backends_under_test(kOpDenseBwd)),
                         backend_test_name);

TEST_P(DenseBwdRandom, CasesMatchReferenceAndKeepPadding) {
  const BackendUnderTest& be = GetParam();
  std::mt19937_64 rng(20250211);
  auto uni = [&](int64_t lo, int64_t hi) {
    return std::uniform_int_distribution<int64_t>(lo, hi)(rng);
  };
  for (int iter = 0; iter < 30; ++iter) {
    Shape s;
    s.Hkv = uni(1, 2);
    s.Hq = s.Hkv * uni(1, 5);
    s.Dk = uni(1, 40);
    s.Dv = uni(1, 40);
    s.T = uni(1, 150);
    std::vector<int32_t> cu;
    if (uni(0, 2) == 0) {  // packed sequences, some possibly empty
      s.B = 1;
      cu = {0};
      while (cu.back() < s.T)
        cu.push_back(static_cast<int32_t>(std::min<int64_t>(s.T, cu.back() + uni(0, 60))));
    } else {
      s.B = uni(1, 2);
    }
    const int32_t window = uni(0, 1) ? 0 : static_cast<int32_t>(uni(1, 40));
    const nsa_dtype dt = uni(0, 1) ? NSA_DTYPE_F32 : NSA_DTYPE_BF16;
    const bool padded = uni(0, 1) == 1;
    SCOPED_TRACE("iter " + std::to_string(iter) + " T " + std::to_string(s.T) + " Hq " +
                 std::to_string(s.Hq) + " Hkv " + std::to_string(s.Hkv) + " Dk " +
                 std::to_string(s.Dk) + " Dv " + std::to_string(s.Dv) + " window " +
                 std::to_string(window) + (padded ? " padded" : "") +
                 (cu.empty() ? "" : " varlen"));
    BwdCase ref = make_bwd(be, s, window, dt, 100 + iter, false, cu);
    BwdCase cpu = make_bwd(be, s, window, dt, 100 + iter, padded, cu);
    ASSERT_EQ(run_bwd(oracle(), 0, ref), NSA_OK);
    const Tensor dq0 = cpu.dq, dk0 = cpu.dk, dv0 = cpu.dv;
    ASSERT_EQ(run_bwd(be, static_cast<int>(uni(1, 3)), cpu), NSA_OK);
    const double keys = window > 0 ? std::min<int64_t>(window, s.T) : s.T;
    const double G = static_cast<double>(s.Hq / s.Hkv);
    const std::tuple<const Tensor*, const Tensor*, const Tensor*> outs[] = {
        {&cpu.dq, &ref.dq, &dq0}, {&cpu.dk, &ref.dk, &dk0}, {&cpu.dv, &ref.dv, &dv0}};
    for (const auto& out : outs) {
      // Named, not a structured binding: clang < 16 cannot capture one in a lambda.
      const Tensor *got = std::get<0>(out), *want = std::get<1>(out), *before = std::get<2>(out);
      const double m = std::max(1.0, max_abs(*want));
      const double tol = 16 * std::sqrt(4 * s.Dk + s.Dv + G * keys) * kEps * m;  // as above
      double worst = 0;
      EXPECT_EQ(count_far(*got, *want, tol, &worst), 0) << "worst " << worst << " tol " << tol;
      // The bytes before the call with every logical element replaced by the result: equal to
      // the result's storage exactly when nothing outside the view's elements was written.
      Tensor expect = *before;
      got->for_each([&](int64_t a, int64_t b, int64_t c, int64_t d) {
        const int64_t off = got->logical_offset(a, b, c, d);
        expect.set_raw(off, got->get_raw(off));
      });
      EXPECT_EQ(expect.storage(), got->storage());
    }
  }
}

// The float64 reference is the gradient of L = sum(dO * o) through the reference forward: central
// differences with step h = 1e-2 on a tiny shape. The difference quotient's truncation error is
// O(h^2) ~ 1e-4 and the forward's f32 storage of o adds ~ 2^-24 * |L| / h ~ 1e-5: tolerance 2e-3.
TEST(DenseBwd, ReferenceMatchesFiniteDifferences) {
  for (int32_t window : {0, 3}) {
    const Shape s{1, 6, 4, 2, 3, 2};
    BwdCase b = make_bwd(backend(NSA_BACKEND_CPU), s, window, NSA_DTYPE_F32, 3);
    ASSERT_EQ(run_bwd(oracle(), 0, b), NSA_OK);
    auto loss = [&]() {
      Tensor o(NSA_DTYPE_F32, {s.B, s.T, s.Hq, s.Dv});
      nsa_dense_fwd_params f = fwd_params(b, o, nullptr);
      nsa_context* ctx = context(NSA_BACKEND_REF, 1);
      EXPECT_EQ(nsa_dense_fwd(ctx, &f), NSA_OK);
      nsa_context_destroy(ctx);
      double l = 0;
      o.for_each([&](int64_t a, int64_t t, int64_t h, int64_t c) {
        l += o.at({a, t, h, c}) * b.d_o.at({a, t, h, c});
      });
      return l;
    };
    const std::pair<Tensor*, const Tensor*> args[] = {
        {&b.c.q, &b.dq}, {&b.c.k, &b.dk}, {&b.c.v, &b.dv}};
    for (const auto& arg : args) {
      Tensor* x = arg.first;  // not a structured binding: clang < 16 cannot capture one
      const Tensor* grad = arg.second;
      x->for_each([&](int64_t a, int64_t t, int64_t h, int64_t c) {
        const double x0 = x->at({a, t, h, c});
        x->set({a, t, h, c}, x0 + 1e-2);
        const double up = x->at({a, t, h, c});
        const double l_up = loss();
        x->set({a, t, h, c}, x0 - 1e-2);
        const double down = x->at({a, t, h, c});
        const double l_down = loss();
        x->set({a, t, h, c}, x0);
        const double fd = (l_up - l_down) / (up - down);
        EXPECT_NEAR(grad->at({a, t, h, c}), fd, 2e-3)
            << "window " << window << " at " << t << "," << h << "," << c;
      });
    }
  }
}

// CPU only: the thread count is the CPU kernels' notion.
TEST(DenseBwd, ThreadCountDoesNotChangeBits) {
  const BackendUnderTest cpu = backend(NSA_BACKEND_CPU);
  for (Shape s : {Shape{1, 200, 16, 1, 64, 32}, Shape{2, 131, 4, 2, 24, 40}}) {
    BwdCase one = make_bwd(cpu, s, 0, NSA_DTYPE_F32, 5);
    BwdCase two = make_bwd(cpu, s, 0, NSA_DTYPE_F32, 5);
    BwdCase three = make_bwd(cpu, s, 0, NSA_DTYPE_F32, 5);
    ASSERT_EQ(run_bwd(cpu, 1, one), NSA_OK);
    ASSERT_EQ(run_bwd(cpu, 2, two), NSA_OK);
    ASSERT_EQ(run_bwd(cpu, 3, three), NSA_OK);
    for (const BwdCase* other : {&two, &three}) {
      EXPECT_EQ(one.dq.storage(), other->dq.storage());
      EXPECT_EQ(one.dk.storage(), other->dk.storage());
      EXPECT_EQ(one.dv.storage(), other->dv.storage());
    }
  }
}

// Every rejected call names the argument and leaves the outputs untouched.
TEST(DenseBwd, BadArgumentsAreRejectedAndNamed) {
  const Shape s{1, 40, 4, 2, 16, 8};
  BwdCase b = make_bwd(backend(NSA_BACKEND_CPU), s, 0, NSA_DTYPE_F32, 9);
  b.dq.fill(7.0);
  b.dk.fill(7.0);
  b.dv.fill(7.0);
  const auto before = b.dq.storage(), before_k = b.dk.storage(), before_v = b.dv.storage();
  nsa_context* ctx = context(NSA_BACKEND_AUTO, 0);
  auto expect = [&](nsa_dense_bwd_params p, nsa_status want, const std::string& word) {
    EXPECT_EQ(nsa_dense_bwd(ctx, &p), want) << word;
    EXPECT_NE(std::string(nsa_last_error(ctx)).find(word), std::string::npos)
        << nsa_last_error(ctx);
    EXPECT_EQ(b.dq.storage(), before);
    EXPECT_EQ(b.dk.storage(), before_k);
    EXPECT_EQ(b.dv.storage(), before_v);
  };
  EXPECT_EQ(nsa_dense_bwd(ctx, nullptr), NSA_ERR_NULL_POINTER);
  EXPECT_EQ(nsa_dense_bwd(nullptr, nullptr), NSA_ERR_NULL_POINTER);
  nsa_dense_bwd_params p = params(b);
  p.q.data = nullptr;
  expect(p, NSA_ERR_NULL_POINTER, "q");
  p = params(b);
  p.lse = nsa_tensor{};  // the backward needs the forward's lse
  expect(p, NSA_ERR_NULL_POINTER, "lse");
  p = params(b);
  p.d_o.shape[3] = 9;
  expect(p, NSA_ERR_INVALID_SHAPE, "d_o");
  p = params(b);
  p.dk.shape[2] = 4;
  expect(p, NSA_ERR_INVALID_SHAPE, "dk");
  p = params(b);
  p.lse.dtype = NSA_DTYPE_BF16;
  expect(p, NSA_ERR_INVALID_DTYPE, "lse");
  p = params(b);
  p.k.dtype = NSA_DTYPE_BF16;  // q f32, k bf16
  expect(p, NSA_ERR_INVALID_DTYPE, "k");
  p = params(b);
  p.window = -2;
  expect(p, NSA_ERR_INVALID_ARGUMENT, "window");
  p = params(b);
  p.dq = b.c.q.desc();  // an output over an input
  expect(p, NSA_ERR_INVALID_ARGUMENT, "dq");
  p = params(b);
  p.dv.data = b.dk.desc().data;  // two outputs over each other
  p.dv.dtype = b.dk.desc().dtype;
  expect(p, NSA_ERR_INVALID_ARGUMENT, "shares memory");
  nsa_context_destroy(ctx);
}

// The C++ wrapper runs the call and throws nsa::Error on a rejected one.
TEST(DenseBwd, CppWrapper) {
  BwdCase b = make_bwd(backend(NSA_BACKEND_CPU), Shape{1, 20, 2, 1, 8, 8}, 0, NSA_DTYPE_F32, 4);
  nsa::Context ctx(NSA_BACKEND_CPU);
  nsa_dense_bwd_params p = params(b);
  EXPECT_NO_THROW(ctx.dense_bwd(p));
  p.lse.data = nullptr;
  EXPECT_THROW(ctx.dense_bwd(p), nsa::Error);
}

}  // namespace
