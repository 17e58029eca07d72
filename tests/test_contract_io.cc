// Contract tests of the float64 reference, part 2: variable-length packing (SPEC 1, 3), caller-
// supplied selections (nsa.h, slc_indices_in) and the compression functions (SPEC 5), all through
// the public C API with backend NSA_BACKEND_REF, on inputs whose answers are known by hand.
// Part 1 (the steps of SPEC 4) is test_contract.cc.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "contract_util.h"

using namespace nsa_test;

namespace {

// Copies tokens [s0, s0 + len) of batch row 0 of src to [d0, d0 + len) of dst (same dtype and
// inner dimensions), exactly.
void copy_tokens(const Tensor& src, int64_t s0, Tensor& dst, int64_t d0, int64_t len) {
  const nsa_tensor& d = src.desc();
  const int64_t H = d.ndim > 2 ? d.shape[2] : 1, D = d.ndim > 3 ? d.shape[3] : 1;
  for (int64_t t = 0; t < len; ++t)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t e = 0; e < D; ++e)
        dst.set_raw(dst.logical_offset(0, d0 + t, h, e),
                    src.get_raw(src.logical_offset(0, s0 + t, h, e)));
}

// Overwrites tokens [s0, s0 + len) of batch row 0 with new values from U(-1, 1).
void perturb_tokens(Tensor& x, int64_t s0, int64_t len, std::mt19937_64& rng) {
  std::uniform_real_distribution<double> u(-1.0, 1.0);
  const nsa_tensor& d = x.desc();
  const int64_t H = d.ndim > 2 ? d.shape[2] : 1, D = d.ndim > 3 ? d.shape[3] : 1;
  for (int64_t t = 0; t < len; ++t)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t e = 0; e < D; ++e) x.set_raw(x.logical_offset(0, s0 + t, h, e), u(rng));
}

// Sequences of lengths 70, 0, 20, 113 (one empty, one shorter than a selection block pair): with
// l=16, d=8, l'=32, n=3, w=24 every branch is non-trivial inside the long ones.
const std::vector<int32_t> kCu = {0, 70, 70, 90, 203};
nsa_config varlen_cfg() { return config(16, 8, 32, 3, 1, 1, 24); }
Shape varlen_shape() {
  Shape s;
  s.B = 1;
  s.T = 203;
  s.Hq = 4;
  s.Hkv = 2;
  s.Dk = 16;
  s.Dv = 8;
  return s;
}

// ---- SPEC 1: no branch looks across a sequence boundary. ----

// Each packed sequence gives exactly the outputs of running it alone (B = 1, its own k_cmp rows).
// Bit for bit: the reference does the same float64 operations for a query whichever way it is
// packed, because positions restart at 0 in every sequence.
TEST(ContractVarlen, PackedSequenceEqualsItRunAlone) {
  for (nsa_dtype dt : {NSA_DTYPE_F32, NSA_DTYPE_BF16}) {
    SCOPED_TRACE(nsa_dtype_name(dt));
    const nsa_config cfg = varlen_cfg();
    FwdCase packed = make_case(varlen_shape(), cfg, dt, 11, /*padded=*/dt == NSA_DTYPE_F32, kCu);
    ASSERT_EQ(run_ref(packed), NSA_OK);
    const std::vector<Dense> whole = snapshot(packed);
    int64_t cmp = 0;
    for (size_t s = 0; s + 1 < kCu.size(); ++s) {
      const int64_t start = kCu[s], len = kCu[s + 1] - kCu[s], tc = nsa_cmp_len(&cfg, len);
      if (len == 0) continue;
      Shape one = varlen_shape();
      one.T = len;
      FwdCase alone = make_case(one, cfg, dt, 99 + s);
      const std::vector<std::pair<Tensor*, Tensor*>> per_token = {
          {&packed.q, &alone.q},         {&packed.k, &alone.k},
          {&packed.v, &alone.v},         {&packed.g_cmp, &alone.g_cmp},
          {&packed.g_slc, &alone.g_slc}, {&packed.g_win, &alone.g_win}};
      for (auto [from, to] : per_token) copy_tokens(*from, start, *to, 0, len);
      copy_tokens(packed.k_cmp, cmp, alone.k_cmp, 0, tc);
      copy_tokens(packed.v_cmp, cmp, alone.v_cmp, 0, tc);
      ASSERT_EQ(run_ref(alone), NSA_OK);
      expect_same_rows(whole, start, snapshot(alone), 0, len, "sequence " + std::to_string(s));
      cmp += tc;
    }
  }
}

// Changing every input of one sequence (raw tokens, gates and its k_cmp/v_cmp rows) leaves the
// other sequences' outputs unchanged bit for bit, in both directions.
TEST(ContractVarlen, PerturbingOneSequenceLeavesOthersUnchanged) {
  const nsa_config cfg = varlen_cfg();
  FwdCase c = make_case(varlen_shape(), cfg, NSA_DTYPE_F32, 12, /*padded=*/true, kCu);
  ASSERT_EQ(run_ref(c), NSA_OK);
  const std::vector<Dense> before = snapshot(c);
  const int64_t tc0 = nsa_cmp_len(&cfg, 70), tc2 = nsa_cmp_len(&cfg, 20),
                tc3 = nsa_cmp_len(&cfg, 113);
  ASSERT_EQ(c.k_cmp.desc().shape[1], tc0 + tc2 + tc3);
  std::mt19937_64 rng(13);
  auto perturb = [&](int64_t start, int64_t len, int64_t cmp_start, int64_t tc) {
    for (Tensor* x : {&c.q, &c.k, &c.v, &c.g_cmp, &c.g_slc, &c.g_win})
      perturb_tokens(*x, start, len, rng);
    perturb_tokens(c.k_cmp, cmp_start, tc, rng);
    perturb_tokens(c.v_cmp, cmp_start, tc, rng);
  };
  // Sequence 0 (tokens 0..69, k_cmp rows 0..tc0-1).
  perturb(0, 70, 0, tc0);
  ASSERT_EQ(run_ref(c), NSA_OK);
  const std::vector<Dense> after0 = snapshot(c);
  expect_same_rows(before, 70, after0, 70, 203 - 70, "sequences 1-3 after changing sequence 0");
  // The perturbation is real: sequence 0's output moved.
  int64_t moved = 0;
  for (int64_t t = 0; t < 70; ++t) moved += before[0](0, t, 0, 0) != after0[0](0, t, 0, 0);
  EXPECT_GT(moved, 60);
  // The last sequence (tokens 90..202, the last tc3 k_cmp rows): earlier ones must not move.
  perturb(90, 113, tc0 + tc2, tc3);
  ASSERT_EQ(run_ref(c), NSA_OK);
  expect_same_rows(after0, 0, snapshot(c), 0, 90, "sequences 0-2 after changing sequence 3");
}

// ---- nsa.h slc_indices_in: the caller's set is used as given. ----

// q = 0 makes o_slc the plain mean of v over the selected positions p <= t and lse_slc the log of
// their count. KV head 0 gets unsorted entries with duplicates and -1 (and never block 0 once
// J >= 2, so a forced block would show); KV head 1 gets only -1: an empty selected branch.
TEST(ContractIndicesIn, UsedAsGivenAndNormalized) {
  const nsa_config cfg = config(32, 16, 64, 4, 1, 2, 16);
  Shape s;
  s.B = 1;
  s.T = 200;
  s.Hq = 2;
  s.Hkv = 2;
  s.Dk = 8;
  s.Dv = 4;
  FwdCase c = make_case(s, cfg, NSA_DTYPE_F32, 21, /*padded=*/true);
  c.q.fill(0.0);
  Tensor idx(NSA_DTYPE_I32, {1, 200, 2, 4});
  auto given = [](int64_t J) {
    return J >= 2 ? std::vector<int32_t>{int32_t(J), 1, -1, 1}
                  : std::vector<int32_t>{int32_t(J), -1, int32_t(J), -1};
  };
  for (int64_t t = 0; t < 200; ++t) {
    const std::vector<int32_t> g = given(t / 64);
    for (int64_t k = 0; k < 4; ++k) {
      idx.set({0, t, 0, k}, g[k]);
      idx.set({0, t, 1, k}, -1);
    }
  }
  nsa_fwd_params p = c.params();
  p.slc_indices_in = idx.desc();
  ASSERT_EQ(run_ref(c, &p), NSA_OK);
  for (int64_t t = 0; t < 200; ++t) {
    const int64_t J = t / 64;
    const std::vector<int32_t> set =
        J >= 2 ? std::vector<int32_t>{1, int32_t(J)} : std::vector<int32_t>{int32_t(J)};
    std::vector<int32_t> want_out = set;
    want_out.resize(4, -1);
    std::vector<int32_t> out0, out1;
    for (int64_t k = 0; k < 4; ++k) {
      out0.push_back(c.idx_out.at_i32({0, t, 0, k}));
      out1.push_back(c.idx_out.at_i32({0, t, 1, k}));
    }
    EXPECT_EQ(out0, want_out) << "t=" << t;
    EXPECT_EQ(out1, (std::vector<int32_t>{-1, -1, -1, -1})) << "t=" << t;
    int64_t count = 0;
    std::vector<double> mean(4, 0.0);
    for (int32_t j : set)
      for (int64_t pos = j * 64; pos < (j + 1) * 64 && pos <= t; ++pos, ++count)
        for (int64_t e = 0; e < 4; ++e) mean[e] += c.v.at({0, pos, 0, e});
    EXPECT_NEAR(c.lse_slc.at({0, t, 0}), std::log(double(count)), lse_tol(std::log(double(count))));
    EXPECT_EQ(c.lse_slc.at({0, t, 1}), kNegInf) << "t=" << t;
    for (int64_t e = 0; e < 4; ++e) {
      // A mean of f32 values in [-1, 1] stored as f32: 2^-24 plus float64 summation noise.
      EXPECT_NEAR(c.o_slc.at({0, t, 0, e}), mean[e] / count, 1e-7) << "t=" << t;
      EXPECT_EQ(c.o_slc.at({0, t, 1, e}), 0.0) << "t=" << t;
      const double o1 = c.g_cmp.at({0, t, 1}) * c.o_cmp.at({0, t, 1, e}) +
                        c.g_win.at({0, t, 1}) * c.o_win.at({0, t, 1, e});
      // Branch outputs re-read from f32 storage: each off by 2^-24 relative, |o| <= 2.
      EXPECT_NEAR(c.o.at({0, t, 1, e}), o1, 1e-6) << "t=" << t;
    }
  }
}

// ---- SPEC 5: compression. ----

nsa_status run_compress(const nsa_compress_params& p) {
  nsa_context* ctx = nullptr;
  nsa_context_create(&ctx);
  nsa_context_set_backend(ctx, NSA_BACKEND_REF);
  const nsa_status s = nsa_compress(ctx, &p);
  EXPECT_EQ(s, NSA_OK) << nsa_last_error(ctx);
  nsa_context_destroy(ctx);
  return s;
}

// mean, l=4, d=2, T=9: Tc = 3 blocks of tokens 2i .. 2i+3. x = t + 10h + 100c + 1000b, so the
// mean is 2i + 1.5 + 10h + 100c + 1000b, exact in f32.
TEST(ContractCompress, MeanHandComputed) {
  for (bool padded : {false, true}) {
    nsa_compress_params p;
    nsa_compress_params_init(&p);
    p.cfg = config(4, 2, 64, 16, 1, 2, 512);
    p.kind = NSA_CMP_MEAN;
    ASSERT_EQ(nsa_cmp_len(&p.cfg, 9), 3);
    Tensor x(NSA_DTYPE_F32, {2, 9, 2, 3}, padded), out(NSA_DTYPE_F32, {2, 3, 2, 3}, padded);
    x.for_each([&](int64_t b, int64_t t, int64_t h, int64_t c) {
      x.set({b, t, h, c}, t + 10 * h + 100 * c + 1000 * b);
    });
    p.x = x.desc();
    p.out = out.desc();
    ASSERT_EQ(run_compress(p), NSA_OK);
    out.for_each([&](int64_t b, int64_t i, int64_t h, int64_t c) {
      EXPECT_EQ(out.at({b, i, h, c}), 2 * i + 1.5 + 10 * h + 100 * c + 1000 * b)
          << b << i << h << c;
    });
  }
}

// Packed sequences of lengths 9, 3, 6 (l=4, d=2): Tc = 3, 0, 2, packed as rows 0-2 and 3-4, each
// block inside its own sequence. x = global token index + 100c. And T < l gives Tc = 0.
TEST(ContractCompress, MeanVarlenAndShortSequences) {
  const nsa_config cfg = config(4, 2, 64, 16, 1, 2, 512);
  const std::vector<int32_t> cu = {0, 9, 12, 18};
  int32_t cu_cmp[4];
  nsa_context* ctx = nullptr;
  nsa_context_create(&ctx);
  ASSERT_EQ(nsa_cmp_seqlens(ctx, &cfg, cu.data(), 3, cu_cmp), NSA_OK);
  nsa_context_destroy(ctx);
  EXPECT_EQ(std::vector<int32_t>(cu_cmp, cu_cmp + 4), (std::vector<int32_t>{0, 3, 3, 5}));

  nsa_compress_params p;
  nsa_compress_params_init(&p);
  p.cfg = cfg;
  Tensor x(NSA_DTYPE_F32, {1, 18, 1, 2}), out(NSA_DTYPE_F32, {1, 5, 1, 2}, true);
  x.for_each([&](int64_t, int64_t t, int64_t, int64_t c) { x.set({0, t, 0, c}, t + 100 * c); });
  p.x = x.desc();
  p.out = out.desc();
  p.cu_seqlens = cu.data();
  p.num_seqs = 3;
  ASSERT_EQ(run_compress(p), NSA_OK);
  const double first[5] = {0, 2, 4, 12, 14};  // first raw token of each packed block
  for (int64_t i = 0; i < 5; ++i)
    for (int64_t c = 0; c < 2; ++c) EXPECT_EQ(out.at({0, i, 0, c}), first[i] + 1.5 + 100 * c) << i;

  // T = 3 < l: no compressed token, and the call succeeds on an empty output.
  Tensor xs(NSA_DTYPE_F32, {1, 3, 1, 2}), outs(NSA_DTYPE_F32, {1, 0, 1, 2});
  nsa_compress_params ps = p;
  ps.cu_seqlens = nullptr;
  ps.num_seqs = 0;
  ps.x = xs.desc();
  ps.out = outs.desc();
  EXPECT_EQ(nsa_cmp_len(&cfg, 3), 0);
  EXPECT_EQ(run_compress(ps), NSA_OK);
}

// mlp, l=2, d=1, D=2, Dh=2 (SPEC 5): phi(X) = W2 relu(W1 flatten(X + P) + b1) + b2, flatten
// row-major over [l, D]. With x rows (1,2), (3,4), (5,6) and P = [[0.5,0],[0,-1]]:
//   block 0: flat = (1.5, 2, 3, 3); block 1: flat = (3.5, 4, 5, 5).
// W1 rows (0,1,0,0) and (0,0,1,0), b1 = (0.5, -4): hidden (2.5, relu(-1)=0) and (4.5, 1).
// W2 = [[1,2],[-1,0.5]], b2 = (0.25,-0.5): out (2.75, -3) and (6.75, -4.5).
// Head 1 differs only in b2 = (1, 1): out (3.5, -1.5) and (7.5, -3). A column-major flatten, a
// transposed W1/W2 or shared per-head parameters would all give other numbers.
void fill_mlp_params(Tensor& pos, Tensor& w1, Tensor& b1, Tensor& w2, Tensor& b2) {
  for (int64_t h = 0; h < 2; ++h) {
    pos.set({h, 0, 0}, 0.5);
    pos.set({h, 0, 1}, 0.0);
    pos.set({h, 1, 0}, 0.0);
    pos.set({h, 1, 1}, -1.0);
    for (int64_t k = 0; k < 4; ++k) {
      w1.set({h, 0, k}, k == 1);
      w1.set({h, 1, k}, k == 2);
    }
    b1.set({h, 0}, 0.5);
    b1.set({h, 1}, -4.0);
    w2.set({h, 0, 0}, 1.0);
    w2.set({h, 0, 1}, 2.0);
    w2.set({h, 1, 0}, -1.0);
    w2.set({h, 1, 1}, 0.5);
    b2.set({h, 0}, h == 0 ? 0.25 : 1.0);
    b2.set({h, 1}, h == 0 ? -0.5 : 1.0);
  }
}

TEST(ContractCompress, MlpHandComputedFixedAndVarlen) {
  Tensor pos(NSA_DTYPE_F32, {2, 2, 2}), w1(NSA_DTYPE_F32, {2, 2, 4}), b1(NSA_DTYPE_F32, {2, 2});
  Tensor w2(NSA_DTYPE_F32, {2, 2, 2}), b2(NSA_DTYPE_F32, {2, 2});
  fill_mlp_params(pos, w1, b1, w2, b2);
  const double want[2][2][2] = {{{2.75, -3.0}, {6.75, -4.5}},
                                {{3.5, -1.5}, {7.5, -3.0}}};  // [h][i][c]
  // Fixed length T=3: rows 0-2. Varlen: lengths 3, 1, 3 with rows 4-6 a copy of rows 0-2 and row
  // 3 (a sequence shorter than l, Tc = 0) a poison value: outputs rows 0-1 and 2-3 must agree.
  for (bool varlen : {false, true}) {
    SCOPED_TRACE(varlen ? "varlen" : "fixed");
    const int64_t T = varlen ? 7 : 3, Tc = varlen ? 4 : 2;
    Tensor x(NSA_DTYPE_F32, {1, T, 2, 2}), out(NSA_DTYPE_F32, {1, Tc, 2, 2}, true);
    const double rows[3][2] = {{1, 2}, {3, 4}, {5, 6}};
    for (int64_t t = 0; t < T; ++t)
      for (int64_t h = 0; h < 2; ++h)
        for (int64_t c = 0; c < 2; ++c) {
          const int64_t r = t < 3 ? t : t - 4;
          x.set({0, t, h, c}, t == 3 ? 1000.0 : rows[r][c]);
        }
    const std::vector<int32_t> cu = {0, 3, 4, 7};
    nsa_compress_params p;
    nsa_compress_params_init(&p);
    p.cfg = config(2, 1, 64, 16, 1, 2, 512);
    p.kind = NSA_CMP_MLP;
    p.x = x.desc();
    p.pos = pos.desc();
    p.w1 = w1.desc();
    p.b1 = b1.desc();
    p.w2 = w2.desc();
    p.b2 = b2.desc();
    p.out = out.desc();
    if (varlen) {
      p.cu_seqlens = cu.data();
      p.num_seqs = 3;
    }
    ASSERT_EQ(run_compress(p), NSA_OK);
    // Every intermediate is a small dyadic rational: exact in f32 and float64.
    for (int64_t i = 0; i < Tc; ++i)
      for (int64_t h = 0; h < 2; ++h)
        for (int64_t c = 0; c < 2; ++c)
          EXPECT_EQ(out.at({0, i, h, c}), want[h][i % 2][c]) << i << h << c;
  }
}

}  // namespace
