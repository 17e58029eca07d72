// Contract tests of the float64 reference, part 1: hand-computed cases for the tricky points of
// SPEC.md section 4 (visibility of compressed blocks, overlap weights, forced blocks and ties in
// the selection, empty branches, window clipping). Each point is checked on the step functions of
// ref/ref.h and end to end through nsa_fwd with backend NSA_BACKEND_REF. Inputs are built so that
// the answer is known by hand: q = 0 makes every softmax uniform (o = mean of the values,
// lse = log(count)), and q = (1, 0), k = (log(x), .), scale 1 makes the weights proportional to x.
// Part 2 (varlen, caller-supplied indices, compression) is test_contract_io.cc.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "contract_util.h"
#include "ref/ref.h"

using namespace nsa_test;
namespace ref = nsa::ref;

namespace {

// A one-sequence f32 case with all outputs requested; the random inputs are overwritten by the
// tests that need hand-computable values.
FwdCase hand_case(int64_t T, int64_t Hq, int64_t Hkv, int64_t Dk, int64_t Dv, const nsa_config& cfg,
                  bool padded = false) {
  Shape s;
  s.B = 1;
  s.T = T;
  s.Hq = Hq;
  s.Hkv = Hkv;
  s.Dk = Dk;
  s.Dv = Dv;
  return make_case(s, cfg, NSA_DTYPE_F32, 20250211, padded);
}

void set_gates(FwdCase& c, double g_cmp, double g_slc, double g_win) {
  c.g_cmp.fill(g_cmp);
  c.g_slc.fill(g_slc);
  c.g_win.fill(g_win);
}

// The selected blocks reported at (token, kv head), -1 padding included.
std::vector<int32_t> indices_at(const FwdCase& c, int64_t tok, int64_t hk) {
  std::vector<int32_t> out;
  for (int64_t k = 0; k < c.cfg.slc_count; ++k) out.push_back(c.idx_out.at_i32({0, tok, hk, k}));
  return out;
}

// ---- SPEC 4.1: compressed token i is visible at t iff i*d + l - 1 <= t. ----

TEST(ContractVisibility, CountsAtBlockBoundaries) {
  struct Cfg {
    int32_t l, d;
  };
  for (Cfg k : {Cfg{32, 16}, Cfg{16, 8}, Cfg{64, 64}, Cfg{5, 3}}) {
    SCOPED_TRACE("l=" + std::to_string(k.l) + " d=" + std::to_string(k.d));
    const nsa_config cfg = config(k.l, k.d, 64, 16, 1, 2, 512);
    // The first block covers raw tokens 0 .. l-1: complete only at t = l-1.
    EXPECT_EQ(ref::visible_cmp_count(cfg, k.l - 2), 0);
    EXPECT_EQ(ref::visible_cmp_count(cfg, k.l - 1), 1);
    // The second covers d .. d+l-1: complete at t = l-1+d, not one token earlier.
    EXPECT_EQ(ref::visible_cmp_count(cfg, k.l - 2 + k.d), 1);
    EXPECT_EQ(ref::visible_cmp_count(cfg, k.l - 1 + k.d), 2);
    EXPECT_EQ(ref::visible_cmp_count(cfg, k.l - 1 + 2 * k.d), 3);
    // Every t against the definition, by counting.
    for (int64_t t = 0; t < 400; ++t) {
      int64_t n = 0;
      while (n * k.d + k.l - 1 <= t) ++n;
      ASSERT_EQ(ref::visible_cmp_count(cfg, t), n) << "t=" << t;
    }
  }
}

// Through nsa_fwd with q = 0: o_cmp is the plain mean of the visible v_cmp rows and
// lse_cmp = log(count); with g_cmp = 1 and the other gates 0, o = o_cmp.
TEST(ContractVisibility, UniformCmpBranchEndToEnd) {
  struct Cfg {
    int32_t l, d, lp;
  };
  for (Cfg k : {Cfg{32, 16, 64}, Cfg{16, 8, 32}}) {
    SCOPED_TRACE("l=" + std::to_string(k.l) + " d=" + std::to_string(k.d));
    const int64_t T = k.l + 2 * k.d - 1;  // Tc = 2: the third block is never complete
    FwdCase c = hand_case(T, 2, 1, 8, 4, config(k.l, k.d, k.lp, 16, 1, 2, 512));
    ASSERT_EQ(c.k_cmp.desc().shape[1], 2);
    c.q.fill(0.0);
    set_gates(c, 1.0, 0.0, 0.0);
    for (int64_t i = 0; i < 2; ++i)
      for (int64_t e = 0; e < 4; ++e) c.v_cmp.set({0, i, 0, e}, double((i + 1) * (e + 1)));
    ASSERT_EQ(run_ref(c), NSA_OK);
    for (int64_t t = 0; t < T; ++t) {
      const int64_t n = t < k.l - 1 ? 0 : t < k.l - 1 + k.d ? 1 : 2;
      for (int64_t h = 0; h < 2; ++h) {
        // Means of small integers (1, 2 and 1.5 times e+1) are exact in f32.
        const double lse = n == 0 ? kNegInf : std::log(double(n));
        if (n == 0) {
          EXPECT_EQ(c.lse_cmp.at({0, t, h}), kNegInf) << "t=" << t;
        } else {
          EXPECT_NEAR(c.lse_cmp.at({0, t, h}), lse, lse_tol(lse)) << "t=" << t;
        }
        for (int64_t e = 0; e < 4; ++e) {
          const double want = n == 0 ? 0.0 : n == 1 ? (e + 1) : 1.5 * (e + 1);
          EXPECT_EQ(c.o_cmp.at({0, t, h, e}), want) << "t=" << t;
          EXPECT_EQ(c.o.at({0, t, h, e}), want) << "t=" << t;
        }
      }
    }
  }
}

// Non-uniform weights: q = (1, 0), k_cmp[i] = (log(i+1), 5), scale 1, so p_i is proportional to
// i+1 over exactly the visible tokens; the second key coordinate meets q's zero.
TEST(ContractVisibility, WeightedCmpBranchEndToEnd) {
  struct Cfg {
    int32_t l, d, lp;
  };
  for (Cfg k : {Cfg{32, 16, 64}, Cfg{16, 8, 32}}) {
    SCOPED_TRACE("l=" + std::to_string(k.l) + " d=" + std::to_string(k.d));
    nsa_config cfg = config(k.l, k.d, k.lp, 16, 1, 2, 512);
    cfg.scale = 1.0f;
    const int64_t T = k.l + 4 * k.d;  // Tc = 5
    FwdCase c = hand_case(T, 1, 1, 2, 2, cfg, /*padded=*/true);
    for (int64_t t = 0; t < T; ++t) {
      c.q.set({0, t, 0, 0}, 1.0);
      c.q.set({0, t, 0, 1}, 0.0);
    }
    for (int64_t i = 0; i < 5; ++i) {
      c.k_cmp.set({0, i, 0, 0}, std::log(double(i + 1)));
      c.k_cmp.set({0, i, 0, 1}, 5.0);
      c.v_cmp.set({0, i, 0, 0}, double(i));
      c.v_cmp.set({0, i, 0, 1}, 1.0 - 0.25 * i);
    }
    ASSERT_EQ(run_ref(c), NSA_OK);
    for (int64_t t : {int64_t{k.l - 2}, int64_t{k.l - 1}, int64_t{k.l - 2 + k.d},
                      int64_t{k.l - 1 + k.d}, int64_t{k.l - 1 + 3 * k.d}, T - 1}) {
      int64_t n = 0;
      while (n * k.d + k.l - 1 <= t) ++n;
      double z = 0, o0 = 0, o1 = 0;
      for (int64_t i = 0; i < n; ++i) {
        z += i + 1;
        o0 += (i + 1) * double(i);
        o1 += (i + 1) * (1.0 - 0.25 * i);
      }
      // k_cmp holds log(i+1) rounded to f32: each weight is off by up to ~2^-24 * log(6)
      // relatively, so outputs of size <= 4 are exact to ~1e-6.
      const double tol = 1e-6;
      const double lse = n == 0 ? kNegInf : std::log(z);
      if (n == 0) {
        EXPECT_EQ(c.lse_cmp.at({0, t, 0}), kNegInf) << "t=" << t;
      } else {
        EXPECT_NEAR(c.lse_cmp.at({0, t, 0}), lse, tol) << "t=" << t;
      }
      EXPECT_NEAR(c.o_cmp.at({0, t, 0, 0}), n ? o0 / z : 0.0, tol) << "t=" << t;
      EXPECT_NEAR(c.o_cmp.at({0, t, 0, 1}), n ? o1 / z : 0.0, tol) << "t=" << t;
    }
  }
}

// ---- SPEC 4.2: ov(i, j) = |[i*d, i*d+l) ∩ [j*l', (j+1)*l')| / d. ----

// Weight of compressed token i in selection block j when l' = 4d and l = 2d: block j collects
// tokens 4j-1 .. 4j+3 with weights 1,2,2,2,1 (SPEC 4.2; the printed Eq. 9 would give 4j-4 .. 4j).
double weight_12221(int64_t i, int64_t j) {
  if (i == 4 * j - 1 || i == 4 * j + 3) return 1.0;
  if (i >= 4 * j && i <= 4 * j + 2) return 2.0;
  return 0.0;
}

TEST(ContractOverlap, Weights12221ForDefaultAndHalfSizedConfigs) {
  for (nsa_config cfg : {config(32, 16, 64, 16, 1, 2, 512), config(16, 8, 32, 16, 1, 2, 512)}) {
    SCOPED_TRACE("l=" + std::to_string(cfg.cmp_block));
    for (int64_t j = 0; j < 8; ++j) {
      for (int64_t i = 0; i < 40; ++i) {
        // Weights are small integers: exact in float64.
        EXPECT_EQ(ref::overlap_weight(cfg, i, j), weight_12221(i, j)) << "i=" << i << " j=" << j;
      }
    }
  }
}

TEST(ContractOverlap, FlaLayoutWeighsOnlyTheSameBlock) {
  const nsa_config cfg = config(64, 64, 64, 16, 1, 2, 512);  // l = d = l' = 64
  for (int64_t j = 0; j < 10; ++j)
    for (int64_t i = 0; i < 10; ++i) EXPECT_EQ(ref::overlap_weight(cfg, i, j), i == j ? 1.0 : 0.0);
}

TEST(ContractOverlap, IrregularConfigMatchesCountedOverlap) {
  // l' not a multiple of d, l not a multiple of d: weights are fractions of a stride.
  const nsa_config cfg = config(24, 10, 40, 16, 1, 2, 512);
  for (int64_t j = 0; j < 8; ++j) {
    for (int64_t i = 0; i < 40; ++i) {
      int64_t shared = 0;
      for (int64_t x = i * 10; x < i * 10 + 24; ++x) shared += (x / 40 == j);
      // Both sides are (small integer) / 10: equal up to one float64 rounding.
      EXPECT_NEAR(ref::overlap_weight(cfg, i, j), shared / 10.0, 1e-15) << "i=" << i << " j=" << j;
    }
  }
}

TEST(ContractOverlap, BlockScoresFromOneHotProbabilities) {
  const nsa_config cfg = config(32, 16, 64, 16, 1, 2, 512);
  const int64_t t = 4 * 64 + 40;  // J = 4; visible i = 0 .. 16
  const int64_t n = ref::visible_cmp_count(cfg, t);
  ASSERT_EQ(n, 17);
  for (int64_t i = 0; i < n; ++i) {
    std::vector<std::vector<double>> p(1, std::vector<double>(n, 0.0));
    p[0][i] = 1.0;
    const std::vector<double> s = ref::block_scores(cfg, t, p);
    ASSERT_EQ(s.size(), 5u);  // blocks 0 .. J
    for (int64_t j = 0; j < 5; ++j) EXPECT_EQ(s[j], weight_12221(i, j)) << "i=" << i << " j=" << j;
  }
  // Eq. 10: the heads of a group add up. i=5 gives block 1 weight 2; i=7 gives blocks 1 and 2
  // weight 1 each.
  std::vector<std::vector<double>> p(2, std::vector<double>(n, 0.0));
  p[0][5] = 1.0;
  p[1][7] = 1.0;
  EXPECT_EQ(ref::block_scores(cfg, t, p), (std::vector<double>{0, 3, 1, 0, 0}));
}

// ---- SPEC 4.3: forced blocks, top-n, ties to the lower index, fewer blocks than n. ----

TEST(ContractSelect, ForcedBlocksAndTiesOnHandScores) {
  const int64_t t = 9 * 64 + 10;  // J = 9: ten blocks, more than any n below
  const std::vector<double> equal(10, 1.0);
  auto sel = [&](nsa_config cfg, const std::vector<double>& s) {
    return ref::select_blocks(cfg, t, s);
  };
  using V = std::vector<int32_t>;
  // n=4, n_init=1, n_local=2: forced {0, 8, 9}; all equal -> the lowest free block, 1.
  const nsa_config c412 = config(32, 16, 64, 4, 1, 2, 512);
  EXPECT_EQ(sel(c412, equal), (V{0, 1, 8, 9}));
  // One clear winner.
  std::vector<double> s(10, 0.0);
  s[5] = 3.0;
  EXPECT_EQ(sel(c412, s), (V{0, 5, 8, 9}));
  // The forced blocks hold the top scores: the best free block is 7.
  std::vector<double> rising(10);
  for (int j = 0; j < 10; ++j) rising[j] = j;
  EXPECT_EQ(sel(c412, rising), (V{0, 7, 8, 9}));
  // A tie between 3 and 6 goes to 3; with room for two both are in.
  std::vector<double> tie(10, 1.0);
  tie[3] = tie[6] = 2.0;
  EXPECT_EQ(sel(c412, tie), (V{0, 3, 8, 9}));
  EXPECT_EQ(sel(config(32, 16, 64, 5, 1, 2, 512), tie), (V{0, 3, 6, 8, 9}));
  // A tie below the top: 2 wins outright, then 4 beats 6 at equal score.
  std::vector<double> tie2(10, 0.0);
  tie2[2] = 5.0;
  tie2[4] = tie2[6] = 3.0;
  EXPECT_EQ(sel(config(32, 16, 64, 5, 1, 2, 512), tie2), (V{0, 2, 4, 8, 9}));
  // n_init=2, n_local=3: forced {0, 1, 7, 8, 9}; all equal -> 2 and 3.
  EXPECT_EQ(sel(config(32, 16, 64, 7, 2, 3, 512), equal), (V{0, 1, 2, 3, 7, 8, 9}));
  // Nothing forced: pure top-n; equal scores -> the lowest indices.
  EXPECT_EQ(sel(config(32, 16, 64, 3, 0, 0, 512), equal), (V{0, 1, 2}));
  EXPECT_EQ(sel(config(32, 16, 64, 3, 0, 0, 512), rising), (V{7, 8, 9}));
  // Only the own block forced.
  EXPECT_EQ(sel(config(32, 16, 64, 2, 0, 1, 512), equal), (V{0, 9}));
  // Forced blocks fill n: a much better free block still loses.
  std::vector<double> big(10, 0.0);
  big[4] = 100.0;
  EXPECT_EQ(sel(config(32, 16, 64, 3, 1, 2, 512), big), (V{0, 8, 9}));
}

TEST(ContractSelect, FewerEligibleBlocksThanNSelectsAll) {
  const nsa_config cfg = config(32, 16, 64, 16, 1, 2, 512);
  auto sel = [&](int64_t t) {
    std::vector<double> s(t / 64 + 1);
    for (size_t j = 0; j < s.size(); ++j) s[j] = -double(j);  // scores must not matter
    return ref::select_blocks(cfg, t, s);
  };
  std::vector<int32_t> want(16, -1);
  want[0] = 0;
  EXPECT_EQ(sel(0), want);
  for (int j = 0; j < 4; ++j) want[j] = j;
  EXPECT_EQ(sel(3 * 64 + 5), want);
  // J + 1 == n: all sixteen, no padding.
  for (int j = 0; j < 16; ++j) want[j] = j;
  EXPECT_EQ(sel(15 * 64 + 63), want);
  // J + 1 == n + 1: now one free block is dropped, the lowest-scoring (here the highest index).
  const std::vector<int32_t> got = sel(16 * 64);
  std::vector<int32_t> expect17;
  for (int j = 0; j <= 16; ++j)
    if (j != 14) expect17.push_back(j);
  EXPECT_EQ(got, expect17);
}

TEST(ContractSelect, FewerEligibleBlocksThanNEndToEnd) {
  struct C {
    nsa_config cfg;
    int64_t T;
  };
  for (C k : {C{config(32, 16, 64, 16, 1, 2, 64), 300}, C{config(16, 8, 32, 4, 1, 2, 16), 128},
              C{config(64, 64, 64, 3, 1, 2, 16), 150}}) {
    FwdCase c = hand_case(k.T, 4, 2, 16, 8, k.cfg, /*padded=*/true);
    ASSERT_EQ(run_ref(c), NSA_OK);
    for (int64_t t = 0; t < k.T; ++t) {
      const int64_t J = t / k.cfg.slc_block;
      ASSERT_LE(J + 1, k.cfg.slc_count);
      std::vector<int32_t> want(k.cfg.slc_count, -1);
      for (int64_t j = 0; j <= J; ++j) want[j] = static_cast<int32_t>(j);
      for (int64_t hk = 0; hk < 2; ++hk) ASSERT_EQ(indices_at(c, t, hk), want) << "t=" << t;
    }
  }
}

// End to end: q = 0 gives every visible compressed token the same probability, so blocks 1..7
// (all five contributors visible at t = 639) tie exactly at score 8p; forced blocks 0, 8, 9.
TEST(ContractSelect, EqualScoresEndToEndPickLowestBlocks) {
  FwdCase c = hand_case(640, 2, 1, 8, 8, config(32, 16, 64, 4, 1, 2, 64));
  c.q.fill(0.0);
  ASSERT_EQ(run_ref(c), NSA_OK);
  EXPECT_EQ(indices_at(c, 639, 0), (std::vector<int32_t>{0, 1, 8, 9}));
  EXPECT_EQ(indices_at(c, 9 * 64, 0), (std::vector<int32_t>{0, 1, 8, 9}));
}

// End to end: one k_cmp row aligned with q holds almost all probability, so the block(s) it
// overlaps win; forced blocks are in regardless of their (near-zero) scores.
TEST(ContractSelect, AlignedCompressedRowWinsEndToEnd) {
  struct C {
    nsa_config cfg;
    std::vector<int32_t> want;
  };
  // i* = 17 = 4*4+1 lies inside block 4 (weight 2) only.
  for (C k : {C{config(32, 16, 64, 4, 1, 2, 64), {0, 4, 8, 9}},
              C{config(32, 16, 64, 4, 2, 1, 64), {0, 1, 4, 9}},
              C{config(32, 16, 64, 3, 0, 0, 64), {1, 2, 4}}}) {
    nsa_config cfg = k.cfg;
    cfg.scale = 1.0f;
    FwdCase c = hand_case(640, 1, 1, 4, 4, cfg);
    c.q.fill(0.0);
    c.k_cmp.fill(0.0);
    for (int64_t t = 0; t < 640; ++t) c.q.set({0, t, 0, 0}, 20.0);
    c.k_cmp.set({0, 17, 0, 0}, 1.0);
    ASSERT_EQ(run_ref(c), NSA_OK);
    // Without forced blocks, every other block whose five contributors are all visible (1, 2,
    // 3, 5, 6, 7, 8) scores exactly 8 * p_rest: the tie goes to 1 and 2.
    EXPECT_EQ(indices_at(c, 639, 0), k.want);
  }
}

// Eq. 10: the group's heads add their block scores. Head 0 puts 0.6 on block 3 and 0.4 on
// block 5, head 1 puts 0.6 on block 7 and 0.4 on block 5: block 5 wins (1.6 vs 1.2), though
// neither head alone ranks it first.
TEST(ContractSelect, GroupHeadsSumTheirScores) {
  nsa_config cfg = config(32, 16, 64, 4, 1, 2, 64);
  cfg.scale = 1.0f;
  FwdCase c = hand_case(640, 2, 1, 4, 4, cfg);
  const double S = 30.0, a = 1.0 - std::log(1.5) / S;  // logit gap log(1.5): p ratio 0.6 / 0.4
  c.q.fill(0.0);
  c.k_cmp.fill(0.0);
  for (int64_t t = 0; t < 640; ++t) {
    c.q.set({0, t, 0, 0}, S);
    c.q.set({0, t, 1, 1}, S);
  }
  c.k_cmp.set({0, 13, 0, 0}, 1.0);  // 13 = 4*3+1: block 3, weight 2
  c.k_cmp.set({0, 21, 0, 0}, a);    // 21 = 4*5+1: block 5, weight 2
  c.k_cmp.set({0, 21, 0, 1}, a);
  c.k_cmp.set({0, 29, 0, 1}, 1.0);  // 29 = 4*7+1: block 7, weight 2
  ASSERT_EQ(run_ref(c), NSA_OK);
  EXPECT_EQ(indices_at(c, 639, 0), (std::vector<int32_t>{0, 5, 8, 9}));
}

// ---- SPEC 4.1: before the first complete block the compressed branch is empty. ----

TEST(ContractEmpty, CmpBranchBeforeFirstBlockIsZeroAndNoNaN) {
  struct C {
    nsa_config cfg;
    int64_t T;
  };
  for (C k : {C{config(32, 16, 64, 16, 1, 2, 512), 40}, C{config(16, 8, 32, 16, 1, 2, 8), 20},
              C{config(32, 16, 64, 16, 1, 2, 512), 20}}) {  // the last: T < l, Tc = 0
    SCOPED_TRACE("l=" + std::to_string(k.cfg.cmp_block) + " T=" + std::to_string(k.T));
    FwdCase c = hand_case(k.T, 2, 1, 16, 8, k.cfg, /*padded=*/true);  // NaN padding around views
    ASSERT_EQ(run_ref(c), NSA_OK);
    const int64_t l = k.cfg.cmp_block;
    for (int64_t t = 0; t < k.T; ++t) {
      for (int64_t h = 0; h < 2; ++h) {
        const double lse = c.lse_cmp.at({0, t, h});
        if (t < l - 1) {
          EXPECT_EQ(lse, kNegInf) << "t=" << t;
        } else {
          EXPECT_TRUE(std::isfinite(lse)) << "t=" << t;
        }
        for (int64_t e = 0; e < 8; ++e) {
          const double o = c.o.at({0, t, h, e});
          ASSERT_TRUE(std::isfinite(o)) << "t=" << t;
          if (t < l - 1) {
            EXPECT_EQ(c.o_cmp.at({0, t, h, e}), 0.0) << "t=" << t;
            // o is then the other two branches only (g_cmp is nonzero but meets o_cmp = 0).
            const double want = c.g_slc.at({0, t, h}) * c.o_slc.at({0, t, h, e}) +
                                c.g_win.at({0, t, h}) * c.o_win.at({0, t, h, e});
            // Branch outputs re-read from f32 storage: each off by 2^-24 relative, |o| <= 2.
            EXPECT_NEAR(o, want, 1e-6) << "t=" << t;
          } else if (t < l - 1 + k.cfg.cmp_stride) {
            // One visible token: p = 1 exactly, so o_cmp is v_cmp[0] bit for bit.
            EXPECT_EQ(c.o_cmp.at({0, t, h, e}), c.v_cmp.at({0, 0, 0, e})) << "t=" << t;
          }
        }
      }
    }
  }
}

// ---- SPEC 4.5: the window is max(0, t-w+1) .. t. ----

TEST(ContractWindow, ClippedAtStartAndCutAfterW) {
  const int64_t w = 8, T = 20;
  nsa_config cfg = config(16, 8, 32, 16, 1, 2, w);
  cfg.scale = 1.0f;
  // (a) q = (1, 0), k[p] = (log(p+1), -3): weights proportional to p+1 over the window.
  FwdCase c = hand_case(T, 1, 1, 2, 2, cfg, /*padded=*/true);
  set_gates(c, 0.0, 0.0, 1.0);
  for (int64_t p = 0; p < T; ++p) {
    c.q.set({0, p, 0, 0}, 1.0);
    c.q.set({0, p, 0, 1}, 0.0);
    c.k.set({0, p, 0, 0}, std::log(double(p + 1)));
    c.k.set({0, p, 0, 1}, -3.0);
    c.v.set({0, p, 0, 0}, p / 16.0);
    c.v.set({0, p, 0, 1}, 1.0 - p / 32.0);
  }
  ASSERT_EQ(run_ref(c), NSA_OK);
  for (int64_t t = 0; t < T; ++t) {
    double z = 0, o0 = 0, o1 = 0;
    for (int64_t p = std::max<int64_t>(0, t - w + 1); p <= t; ++p) {
      z += p + 1;
      o0 += (p + 1) * (p / 16.0);
      o1 += (p + 1) * (1.0 - p / 32.0);
    }
    // k holds log(p+1) rounded to f32, so each weight is off by ~2^-24 * log(20) relatively;
    // outputs and lse are O(1), so 1e-6 covers it.
    EXPECT_NEAR(c.lse_win.at({0, t, 0}), std::log(z), 1e-6) << "t=" << t;
    EXPECT_NEAR(c.o_win.at({0, t, 0, 0}), o0 / z, 1e-6) << "t=" << t;
    EXPECT_NEAR(c.o_win.at({0, t, 0, 1}), o1 / z, 1e-6) << "t=" << t;
    EXPECT_NEAR(c.o.at({0, t, 0, 0}), o0 / z, 1e-6) << "t=" << t;
  }
  // (b) q = 0: o_win is the plain mean of v over the window, lse = log(window length); and a
  // window of one token returns v[t] itself.
  for (int64_t ww : {int64_t{8}, int64_t{1}}) {
    FwdCase u = hand_case(T, 2, 1, 4, 3, config(16, 8, 32, 16, 1, 2, ww));
    u.q.fill(0.0);
    ASSERT_EQ(run_ref(u), NSA_OK);
    for (int64_t t = 0; t < T; ++t) {
      const int64_t a = std::max<int64_t>(0, t - ww + 1);
      for (int64_t h = 0; h < 2; ++h) {
        EXPECT_NEAR(u.lse_win.at({0, t, h}), std::log(double(t - a + 1)), 1e-6) << "t=" << t;
        for (int64_t e = 0; e < 3; ++e) {
          double m = 0;
          for (int64_t p = a; p <= t; ++p) m += u.v.at({0, p, 0, e});
          m /= double(t - a + 1);
          // Mean of <= 8 f32 values in [-1, 1], stored as f32: within 2^-24 plus float64 noise.
          EXPECT_NEAR(u.o_win.at({0, t, h, e}), m, 1e-7) << "t=" << t << " w=" << ww;
        }
      }
    }
  }
}

}  // namespace
