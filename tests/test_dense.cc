// Dense causal (optionally windowed) attention, the baseline op: every backend under test
// (backend_harness.h; the CPU's: Highway SIMD, f32 accumulation) against the float64 reference
// on awkward shapes, and the reference against NSA's own window branch, which is the same
// function (SPEC 4.5). Thread-count determinism is the CPU backend's alone.
#include <gtest/gtest.h>

#include <cmath>
#include <sstream>
#include <string>

#include "backend_harness.h"
#include "test_util.h"

namespace {
using namespace nsa_test;

constexpr double kEps = 1.0 / (1 << 24);  // f32 unit roundoff

struct DenseCase {
  Shape s;
  int32_t window = 0;
  nsa_dtype dtype = NSA_DTYPE_F32;
  bool padded = false;
  std::vector<int32_t> cu;
};

struct DenseRun {
  Tensor o, lse;
};

nsa_status run_dense(const BackendUnderTest& be, int threads, const FwdCase& c, int32_t window,
                     DenseRun* out, nsa_dtype out_dtype = NSA_DTYPE_F32, bool padded = false) {
  out->o = Tensor(out_dtype, {c.shape.B, c.shape.T, c.shape.Hq, c.shape.Dv}, padded);
  out->lse = Tensor(NSA_DTYPE_F32, {c.shape.B, c.shape.T, c.shape.Hq}, padded);
  nsa_dense_fwd_params p;
  nsa_dense_fwd_params_init(&p);
  p.q = c.q.desc();
  p.k = c.k.desc();
  p.v = c.v.desc();
  p.window = window;
  p.o = out->o.desc();
  p.lse = out->lse.desc();
  if (!c.cu_seqlens.empty()) {
    p.cu_seqlens = c.cu_seqlens.data();
    p.num_seqs = static_cast<int64_t>(c.cu_seqlens.size()) - 1;
  }
  std::string msg;
  const nsa_status st = run_on(be, p, threads, &msg);
  if (st != NSA_OK) ADD_FAILURE() << msg;
  return st;
}

class DenseVsRef : public ::testing::TestWithParam<std::tuple<BackendUnderTest, DenseCase>> {};

TEST_P(DenseVsRef, MatchesReference) {
  const BackendUnderTest& be = std::get<0>(GetParam());
  const DenseCase& dc = std::get<1>(GetParam());
  const FwdCase c =
      make_case(dc.s, config(32, 16, 64, 16, 1, 2, 512), dc.dtype, 7, dc.padded, dc.cu);
  DenseRun ref, cpu;
  ASSERT_EQ(run_dense(oracle(), 0, c, dc.window, &ref), NSA_OK);
  ASSERT_EQ(run_dense(be, 0, c, dc.window, &cpu, NSA_DTYPE_F32, dc.padded), NSA_OK);
  // f32 accumulation: a dot of Dk terms of size <= 4 and a softmax-weighted sum of up to T
  // values of size <= 1; each term carries <= (Dk + T) * 2^-24 relative error, with margin 16.
  const double keys = dc.window > 0 ? dc.window : dc.s.T;
  const double tol = 16 * (4 * dc.s.Dk + keys) * kEps;
  double worst = 0;
  EXPECT_EQ(count_far(cpu.o, ref.o, tol, &worst), 0) << "o worst " << worst;
  EXPECT_EQ(count_far(cpu.lse, ref.lse, tol, &worst), 0) << "lse worst " << worst;
}

std::vector<DenseCase> cases() {
  std::vector<DenseCase> v;
  for (int64_t T : {1, 31, 32, 33, 64, 65, 300}) {
    for (int64_t G : {1, 3, 16}) {
      DenseCase c;
      c.s = {1, T, G * (G == 16 ? 1 : 2), G == 16 ? 1 : 2, 24, 16};
      v.push_back(c);
    }
  }
  DenseCase odd;  // head dims that fill no vector evenly, Dk != Dv both ways
  odd.s = {2, 97, 4, 2, 17, 33};
  v.push_back(odd);
  odd.s = {1, 70, 2, 1, 40, 8};
  v.push_back(odd);
  DenseCase big;  // the paper's head dims
  big.s = {1, 130, 2, 1, 192, 128};
  v.push_back(big);
  DenseCase win = big;  // windowed: rows whose window starts mid-tile and before the tile
  win.window = 37;
  v.push_back(win);
  win.s = {1, 200, 3, 1, 24, 16};
  win.window = 1;
  v.push_back(win);
  DenseCase bf = big;
  bf.dtype = NSA_DTYPE_BF16;
  v.push_back(bf);
  DenseCase pad;
  pad.s = {2, 50, 6, 2, 24, 20};
  pad.padded = true;
  v.push_back(pad);
  DenseCase packed;
  packed.s = {1, 150, 4, 2, 24, 16};
  packed.cu = {0, 33, 33, 100, 150};
  packed.window = 20;
  v.push_back(packed);
  // Groups that fill the SIMD lanes (the heads-in-lanes kernels): the paper's group, windowed,
  // bf16, padding lanes (G = 8, 24), odd head dims, strided views, packed sequences.
  DenseCase lanes;
  lanes.s = {1, 130, 16, 1, 192, 128};
  v.push_back(lanes);
  lanes.dtype = NSA_DTYPE_BF16;
  v.push_back(lanes);
  lanes = DenseCase{};
  lanes.s = {1, 200, 16, 1, 24, 16};
  lanes.window = 37;
  v.push_back(lanes);
  lanes.s = {2, 97, 48, 2, 17, 33};
  lanes.window = 0;
  v.push_back(lanes);
  lanes.s = {2, 50, 16, 2, 24, 20};
  lanes.padded = true;
  v.push_back(lanes);
  lanes.s = {1, 150, 32, 2, 24, 16};
  lanes.padded = false;
  lanes.cu = {0, 33, 33, 100, 150};
  lanes.window = 20;
  v.push_back(lanes);
  return v;
}

INSTANTIATE_TEST_SUITE_P(Shapes, DenseVsRef,
                         ::testing::Combine(::testing::ValuesIn(backends_under_test(kOpDense)),
                                            ::testing::ValuesIn(cases())),
                         backend_case_name<DenseCase>);

TEST(Dense, WindowedReferenceEqualsNsaWindowBranch) {
  // Dense attention with window w is SPEC 4.5's window branch: both references must agree to
  // float64 rounding, stored as f32 (2^-24 relative).
  Shape s{1, 150, 4, 2, 24, 16};
  FwdCase c = make_case(s, config(32, 16, 64, 16, 1, 2, 40), NSA_DTYPE_F32, 3);
  ASSERT_EQ(run_fwd(NSA_BACKEND_REF, c), NSA_OK);
  DenseRun d;
  ASSERT_EQ(run_dense(oracle(), 0, c, 40, &d), NSA_OK);
  double worst = 0;
  EXPECT_EQ(count_far(d.o, c.o_win, 4 * kEps, &worst), 0);
  EXPECT_EQ(count_far(d.lse, c.lse_win, 16 * kEps, &worst), 0);
}

// CPU only: the thread count is the CPU kernels' notion.
TEST(Dense, ThreadCountDoesNotChangeBits) {
  const BackendUnderTest cpu = backend(NSA_BACKEND_CPU);
  for (Shape s : {Shape{1, 200, 4, 1, 64, 32}, Shape{1, 201, 16, 1, 64, 32}}) {
    const FwdCase c = make_case(s, config(32, 16, 64, 16, 1, 2, 512), NSA_DTYPE_F32, 5);
    DenseRun one, two, three;
    ASSERT_EQ(run_dense(cpu, 1, c, 0, &one), NSA_OK);
    ASSERT_EQ(run_dense(cpu, 2, c, 0, &two), NSA_OK);
    ASSERT_EQ(run_dense(cpu, 3, c, 0, &three), NSA_OK);
    EXPECT_EQ(one.o.storage(), two.o.storage());
    EXPECT_EQ(one.o.storage(), three.o.storage());
    EXPECT_EQ(one.lse.storage(), two.lse.storage());
  }
}

TEST(Dense, BadArgumentsAreRejectedAndNamed) {
  Shape s{1, 40, 4, 3, 16, 16};  // Hq % Hkv != 0
  const FwdCase c = make_case(s, config(32, 16, 64, 16, 1, 2, 512), NSA_DTYPE_F32, 5);
  nsa_dense_fwd_params p;
  nsa_dense_fwd_params_init(&p);
  p.q = c.q.desc();
  p.k = c.k.desc();
  p.v = c.v.desc();
  Tensor o(NSA_DTYPE_F32, {1, 40, 4, 16});
  p.o = o.desc();
  nsa_context* ctx = nullptr;
  nsa_context_create(&ctx);
  EXPECT_EQ(nsa_dense_fwd(ctx, &p), NSA_ERR_INVALID_SHAPE);
  EXPECT_NE(std::string(nsa_last_error(ctx)).find("not a multiple"), std::string::npos);
  p.window = -1;
  EXPECT_NE(nsa_dense_fwd(ctx, &p), NSA_OK);
  nsa_dense_fwd_params_init(&p);
  EXPECT_EQ(nsa_dense_fwd(ctx, &p), NSA_ERR_NULL_POINTER);
  EXPECT_NE(std::string(nsa_last_error(ctx)).find("q"), std::string::npos);
  nsa_context_destroy(ctx);
}

// The non-finite rule of the README holds for the dense op too: a NaN value reaches exactly the
// rows whose key set holds it (that channel only), a NaN key or query poisons exactly the rows
// that score it, and every other row is bit-identical to a clean run (on the backend under test;
// the oracle's NaN pattern is checked alongside).
class DenseNan : public ::testing::TestWithParam<BackendUnderTest> {};
INSTANTIATE_TEST_SUITE_P(Backends, DenseNan, ::testing::ValuesIn(backends_under_test(kOpDense)),
                         backend_test_name);

TEST_P(DenseNan, NanReachesExactlyTheRowsThatSeeIt) {
  const BackendUnderTest& be = GetParam();
  for (Shape s : {Shape{1, 100, 2, 1, 24, 16}, Shape{1, 100, 16, 1, 24, 16}}) {  // both kernels
    const int32_t window = 30;
    const int64_t p = 45;  // poisoned position
    FwdCase clean = make_case(s, config(32, 16, 64, 16, 1, 2, 512), NSA_DTYPE_F32, 11);
    DenseRun base;
    ASSERT_EQ(run_dense(be, 0, clean, window, &base), NSA_OK);
    auto sees = [&](int64_t t) { return p <= t && p > t - window; };
    for (int what = 0; what < 3; ++what) {  // 0: v channel 3, 1: k, 2: q row of head 1
      FwdCase c = make_case(s, config(32, 16, 64, 16, 1, 2, 512), NSA_DTYPE_F32, 11);
      if (what == 0) c.v.set({0, p, 0, 3}, NAN);
      if (what == 1) c.k.set({0, p, 0, 5}, NAN);
      if (what == 2) c.q.set({0, p, 1, 0}, NAN);
      for (const BackendUnderTest& run_be : {be, oracle()}) {
        DenseRun r;
        ASSERT_EQ(run_dense(run_be, 0, c, window, &r), NSA_OK);
        for (int64_t t = 0; t < s.T; ++t) {
          for (int64_t h = 0; h < s.Hq; ++h) {
            const bool hit = what == 2 ? (t == p && h == 1) : sees(t);
            for (int64_t ch = 0; ch < s.Dv; ++ch) {
              const double x = r.o.at({0, t, h, ch});
              const bool nan_expected = hit && (what != 0 || ch == 3);
              ASSERT_EQ(std::isnan(x), nan_expected)
                  << "case " << what << " backend " << run_be.name << " t=" << t << " h=" << h
                  << " ch=" << ch;
              if (!hit && run_be.id == be.id) {
                ASSERT_EQ(x, base.o.at({0, t, h, ch}));
              }
            }
            ASSERT_EQ(std::isnan(r.lse.at({0, t, h})), hit && what != 0);
          }
        }
      }
    }
  }
}

}  // namespace
