// The float64 reference backward (SPEC.md section 6) against finite differences of the float64
// forward with the selection held fixed, and against properties that pin the gradients down
// independently: dg_c = sum(do * o_c), empty cmp rows, one shared block set for every query, and
// the compression backward.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "backward_util.h"

namespace nsa_test {
namespace {

using nsa::ref::CompressArgs64;
using nsa::ref::CompressGrads64;

Shape shape(int64_t B, int64_t T, int64_t Hq, int64_t Hkv, int64_t Dk, int64_t Dv) {
  Shape s;
  s.B = B;
  s.T = T;
  s.Hq = Hq;
  s.Hkv = Hkv;
  s.Dk = Dk;
  s.Dv = Dv;
  return s;
}

// Small blocks, so that selection, overlap and the window all matter within T = 40: l = 4, d = 2,
// l' = 8, n = 3 of up to 5 blocks, w = 6.
nsa_config small_cfg() { return config(4, 2, 8, 3, 1, 1, 6); }

TEST(BackwardFd, GroupOfThreeOverlappingBlocks) {
  expect_all_grads_match_fd(make_case64(shape(1, 40, 3, 1, 4, 3), small_cfg(), 1));
}

TEST(BackwardFd, StrideEqualsBlockMhaDkNeDv) {
  // d == l (no overlap), G = 1 with two KV heads, Dk != Dv.
  expect_all_grads_match_fd(make_case64(shape(1, 37, 2, 2, 5, 2), config(4, 4, 8, 3, 1, 1, 5), 2));
}

TEST(BackwardFd, OwnBranchKvAndBatch) {
  // Separate k_slc/v_slc and k_win/v_win, two batch rows, G = 3, and a scale that is not the
  // default.
  nsa_config cfg = config(4, 2, 4, 4, 1, 2, 9);
  cfg.scale = 0.3f;
  expect_all_grads_match_fd(make_case64(shape(2, 23, 3, 1, 3, 4), cfg, 3, {}, true));
}

TEST(BackwardFd, Varlen) {
  // Packed sequences of 13, 1, 5 (shorter than l: no compressed token) and 21 tokens; no
  // gradient may cross a boundary, which the full finite-difference sweep would show.
  expect_all_grads_match_fd(
      make_case64(shape(1, 40, 2, 1, 4, 3), small_cfg(), 4, {0, 13, 14, 19, 40}));
}

TEST(BackwardFd, ForwardFixed64IsTheReferenceForward) {
  // The finite differences above differentiate forward_fixed64; it must be the contract's
  // forward, i.e. agree with the reference forward (C API) given the same selection.
  const Case64 c = make_case64(shape(1, 40, 3, 1, 4, 3), small_cfg(), 5, {0, 17, 40});
  const FwdResult ref = reference_forward(c, true);
  nsa::ref::NsaOutputs64 out;
  ASSERT_TRUE(nsa::ref::forward_fixed64(c.args, 2, &out).is_ok());
  const Tensor64 o = from_tensor(ref.o);
  ASSERT_EQ(o.data.size(), out.o.data.size());
  for (size_t i = 0; i < o.data.size(); ++i) {
    // The API rounds its float64 result to f32 once: half an ulp, about 6e-8 relative.
    EXPECT_NEAR(out.o.data[i], o.data[i], 1e-7 * (1.0 + std::abs(o.data[i]))) << i;
  }
}

TEST(BackwardProperties, GateGradientIsDoDotBranchOutput) {
  const Case64 c = make_case64(shape(1, 40, 3, 1, 4, 3), small_cfg(), 6);
  const nsa::ref::NsaGrads64 g = grads64(c);
  const FwdResult fwd = reference_forward(c, true);
  const Tensor64 o_cmp = from_tensor(fwd.o_cmp), o_slc = from_tensor(fwd.o_slc),
                 o_win = from_tensor(fwd.o_win);
  const Shape& s = c.shape;
  for (int64_t t = 0; t < s.T; ++t) {
    for (int64_t h = 0; h < s.Hq; ++h) {
      double want[3] = {0, 0, 0};
      for (int64_t i = 0; i < s.Dv; ++i) {
        want[0] += c.d_o.at(0, t, h, i) * o_cmp.at(0, t, h, i);
        want[1] += c.d_o.at(0, t, h, i) * o_slc.at(0, t, h, i);
        want[2] += c.d_o.at(0, t, h, i) * o_win.at(0, t, h, i);
      }
      // The forward's o_c are f32 (relative 6e-8 each); Dv = 3 products of O(1) terms.
      EXPECT_NEAR(g.dg_cmp.at(0, t, h), want[0], 1e-6) << t << " " << h;
      EXPECT_NEAR(g.dg_slc.at(0, t, h), want[1], 1e-6) << t << " " << h;
      EXPECT_NEAR(g.dg_win.at(0, t, h), want[2], 1e-6) << t << " " << h;
    }
  }
}

TEST(BackwardProperties, EmptyCmpRowsGetNoCmpGradient) {
  // With the slc and win gates at 0, only the cmp branch reaches q. Rows t < l - 1 = 5 see no
  // compressed token: their dq and dg_cmp must be exactly 0, and nothing anywhere NaN. (Rows
  // 5 .. 7 see one token, whose softmax weight is 1 whatever q is: dq = 0 there too.)
  Case64 c = make_case64(shape(1, 20, 3, 1, 4, 3), config(6, 3, 8, 3, 1, 1, 6), 7);
  for (double& x : c.args.g_slc.data) x = 0.0;
  for (double& x : c.args.g_win.data) x = 0.0;
  const nsa::ref::NsaGrads64 g = grads64(c);
  for (const Tensor64* t : {&g.dq, &g.dk_slc, &g.dv_slc, &g.dk_win, &g.dv_win, &g.dk_cmp, &g.dv_cmp,
                            &g.dg_cmp, &g.dg_slc, &g.dg_win}) {
    for (double x : t->data) ASSERT_FALSE(std::isnan(x));
  }
  for (int64_t t = 0; t < 20; ++t) {
    for (int64_t h = 0; h < 3; ++h) {
      const bool empty = t < 5;
      EXPECT_EQ(g.dg_cmp.at(0, t, h) == 0.0, empty) << t;
      double norm = 0.0;
      for (int64_t i = 0; i < 4; ++i) norm += std::abs(g.dq.at(0, t, h, i));
      if (empty) {
        EXPECT_EQ(norm, 0.0) << t;
      }
      if (t >= 8) {
        EXPECT_GT(norm, 0.0) << t;  // two or more compressed tokens
      }
    }
  }
  expect_all_grads_match_fd(c);
}

TEST(BackwardProperties, NoCompressedTokenAtAll) {
  // T < l: Tc = 0, the cmp branch is empty everywhere, k_cmp/v_cmp have no rows.
  const Case64 c = make_case64(shape(1, 5, 2, 1, 3, 3), config(8, 4, 4, 2, 1, 1, 3), 8);
  ASSERT_EQ(c.args.k_cmp.data.size(), 0u);
  expect_all_grads_match_fd(c);
  for (double x : grads64(c).dg_cmp.data) EXPECT_EQ(x, 0.0);
}

// Every query t >= 16 selects the same blocks {0, 1} (keys 0 .. 15), so dk_slc/dv_slc of those
// keys sum over a hundred queries and more. Checked against a separate, matrix-form computation of
// softmax attention's backward over that fixed key set.
TEST(BackwardProperties, EveryQuerySelectsTheSameBlocks) {
  const int64_t T = 120, G = 3, Dk = 4, Dv = 3, keys = 16;
  Case64 c = make_case64(shape(1, T, G, 1, Dk, Dv), config(4, 2, 8, 2, 1, 0, 4), 9);
  nsa::ref::NsaArgs64& a = c.args;
  for (int64_t t = 0; t < T; ++t) {
    // Blocks 0 and 1; queries t < 16 get the valid part only (their gates are 0 below).
    a.slc_indices[2 * t] = 0;
    a.slc_indices[2 * t + 1] = t >= 8 ? 1 : -1;
    for (int64_t h = 0; h < G; ++h) {
      a.g_cmp.at(0, t, h) = 0.0;
      a.g_win.at(0, t, h) = 0.0;
      if (t < keys) a.g_slc.at(0, t, h) = 0.0;
    }
  }
  const nsa::ref::NsaGrads64 g = grads64(c);
  Tensor64 dk(keys, Dk), dv(keys, Dv);
  const double scale = a.cfg.scale;
  for (int64_t t = keys; t < T; ++t) {
    for (int64_t h = 0; h < G; ++h) {
      // P = softmax(scale q K^T) over keys 0..15; dO = g do; dS = P (dO V^T - dO . o).
      std::vector<double> p(keys), dp(keys);
      double mx = -1e300, sum = 0.0, d_row = 0.0;
      for (int64_t j = 0; j < keys; ++j) {
        p[j] = 0.0;
        for (int64_t i = 0; i < Dk; ++i)
          p[j] += scale * a.q.at(0, t, h, i) * a.k_slc.at(0, j, 0, i);
        mx = std::max(mx, p[j]);
      }
      for (double& x : p) sum += (x = std::exp(x - mx));
      for (double& x : p) x /= sum;
      const double gate = a.g_slc.at(0, t, h);
      for (int64_t j = 0; j < keys; ++j) {
        dp[j] = 0.0;
        for (int64_t i = 0; i < Dv; ++i) {
          dp[j] += gate * c.d_o.at(0, t, h, i) * a.v_slc.at(0, j, 0, i);
          dv.at(j, i) += p[j] * gate * c.d_o.at(0, t, h, i);
        }
        d_row += p[j] * dp[j];
      }
      for (int64_t j = 0; j < keys; ++j) {
        for (int64_t i = 0; i < Dk; ++i) {
          dk.at(j, i) += scale * p[j] * (dp[j] - d_row) * a.q.at(0, t, h, i);
        }
      }
    }
  }
  for (int64_t j = 0; j < keys; ++j) {
    // Two float64 sums of ~300 O(1) terms in different orders: ~1e-13 apart.
    for (int64_t i = 0; i < Dk; ++i) EXPECT_NEAR(g.dk_slc.at(0, j, 0, i), dk.at(j, i), 1e-10);
    for (int64_t i = 0; i < Dv; ++i) EXPECT_NEAR(g.dv_slc.at(0, j, 0, i), dv.at(j, i), 1e-10);
  }
  for (int64_t j = keys; j < T; ++j) {
    for (int64_t i = 0; i < Dk; ++i) EXPECT_EQ(g.dk_slc.at(0, j, 0, i), 0.0) << j;
  }
  // And a sample of the shared keys against finite differences.
  auto loss = [&] { return loss64(c); };
  expect_matches_fd("dk_slc", &a.k_slc, g.dk_slc, loss, 11);
  expect_matches_fd("dv_slc", &a.v_slc, g.dv_slc, loss, 7);
}

// ---- Compression (SPEC 5) ----

CompressArgs64 make_compress_case(nsa_cmp_kind kind, int64_t B, int64_t T, int64_t H, int64_t D,
                                  int64_t Dh, nsa_config cfg, std::vector<int32_t> cu,
                                  uint64_t seed) {
  CompressArgs64 a;
  a.cfg = cfg;
  a.kind = kind;
  a.seqs = sequences_of(cfg, B, T, cu);
  std::mt19937_64 rng(seed);
  a.x = Tensor64(B, T, H, D);
  fill_f32_exact(a.x, rng, -1.0, 1.0);
  if (kind == NSA_CMP_MLP) {
    const int64_t l = cfg.cmp_block;
    a.pos = Tensor64(H, l, D);
    a.w1 = Tensor64(H, Dh, l * D);
    a.b1 = Tensor64(H, Dh);
    a.w2 = Tensor64(H, D, Dh);
    a.b2 = Tensor64(H, D);
    for (Tensor64* t : {&a.pos, &a.w1, &a.b1, &a.w2, &a.b2}) fill_f32_exact(*t, rng, -0.5, 0.5);
  }
  return a;
}

void expect_compress_grads_match_fd(CompressArgs64 a, uint64_t seed) {
  Tensor64 out;
  ASSERT_TRUE(nsa::ref::compress64(a, 1, &out).is_ok());
  Tensor64 dout = out;
  std::mt19937_64 rng(seed);
  fill_f32_exact(dout, rng, -1.0, 1.0);
  CompressGrads64 g;
  ASSERT_TRUE(nsa::ref::compress_backward64(a, dout, 2, &g).is_ok());
  auto loss = [&] {
    Tensor64 o;
    EXPECT_TRUE(nsa::ref::compress64(a, 1, &o).is_ok());
    double l = 0.0;
    for (size_t i = 0; i < o.data.size(); ++i) l += dout.data[i] * o.data[i];
    return l;
  };
  expect_matches_fd("dx", &a.x, g.dx, loss);
  if (a.kind == NSA_CMP_MLP) {
    expect_matches_fd("dpos", &a.pos, g.dpos, loss);
    expect_matches_fd("dw1", &a.w1, g.dw1, loss);
    expect_matches_fd("db1", &a.b1, g.db1, loss);
    expect_matches_fd("dw2", &a.w2, g.dw2, loss);
    expect_matches_fd("db2", &a.b2, g.db2, loss);
  }
}

TEST(CompressBackwardFd, MeanOverlappingBlocksRaggedTail) {
  // l = 4, d = 2: interior tokens sit in two blocks; T = 11 leaves token 10 in none (dx = 0).
  const CompressArgs64 a =
      make_compress_case(NSA_CMP_MEAN, 2, 11, 2, 3, 0, config(4, 2, 8, 3, 1, 1, 6), {}, 10);
  expect_compress_grads_match_fd(a, 11);
  Tensor64 dout(2, nsa_cmp_len(&a.cfg, 11), 2, 3);
  for (double& x : dout.data) x = 1.0;
  CompressGrads64 g;
  ASSERT_TRUE(nsa::ref::compress_backward64(a, dout, 1, &g).is_ok());
  // Token 0: one block (1/4), token 2: two blocks (2/4), token 10: none.
  EXPECT_DOUBLE_EQ(g.dx.at(0, 0, 0, 0), 0.25);
  EXPECT_DOUBLE_EQ(g.dx.at(0, 2, 0, 0), 0.5);
  EXPECT_EQ(g.dx.at(1, 10, 1, 2), 0.0);
}

TEST(CompressBackwardFd, MlpOverlappingVarlen) {
  // Packed sequences of 9, 2 (no block) and 7 tokens; d < l.
  expect_compress_grads_match_fd(
      make_compress_case(NSA_CMP_MLP, 1, 18, 2, 3, 5, config(4, 3, 8, 3, 1, 1, 6), {0, 9, 11, 18},
                         12),
      13);
}

TEST(CompressBackwardFd, MlpStrideEqualsBlock) {
  expect_compress_grads_match_fd(
      make_compress_case(NSA_CMP_MLP, 2, 10, 1, 2, 4, config(3, 3, 8, 3, 1, 1, 6), {}, 14), 15);
}

TEST(BackwardChain, CompressThenAttendMatchesFd) {
  // The documented use: dk = dk (slc + win) + nsa_compress_bwd(dk_cmp). Checked on the composite
  // L(k) = sum(do * o(k, k_cmp = mean(k), v, v_cmp = mean(v))).
  Case64 c = make_case64(shape(1, 24, 2, 1, 3, 2), small_cfg(), 16);
  CompressArgs64 ck = make_compress_case(NSA_CMP_MEAN, 1, 24, 1, 3, 0, small_cfg(), {}, 0);
  CompressArgs64 cv = make_compress_case(NSA_CMP_MEAN, 1, 24, 1, 2, 0, small_cfg(), {}, 0);
  ck.x = c.args.k_slc;
  cv.x = c.args.v_slc;
  auto sync = [&] {  // k, v feed every branch
    c.args.k_win = c.args.k_slc = ck.x;
    c.args.v_win = c.args.v_slc = cv.x;
    EXPECT_TRUE(nsa::ref::compress64(ck, 1, &c.args.k_cmp).is_ok());
    EXPECT_TRUE(nsa::ref::compress64(cv, 1, &c.args.v_cmp).is_ok());
  };
  sync();
  const nsa::ref::NsaGrads64 g = grads64(c);
  CompressGrads64 gk, gv;
  ASSERT_TRUE(nsa::ref::compress_backward64(ck, g.dk_cmp, 1, &gk).is_ok());
  ASSERT_TRUE(nsa::ref::compress_backward64(cv, g.dv_cmp, 1, &gv).is_ok());
  Tensor64 dk = gk.dx, dv = gv.dx;
  for (size_t i = 0; i < dk.data.size(); ++i) dk.data[i] += g.dk_slc.data[i] + g.dk_win.data[i];
  for (size_t i = 0; i < dv.data.size(); ++i) dv.data[i] += g.dv_slc.data[i] + g.dv_win.data[i];
  auto loss = [&] {
    sync();
    return loss64(c);
  };
  expect_matches_fd("dk (all branches)", &ck.x, dk, loss);
  expect_matches_fd("dv (all branches)", &cv.x, dv, loss);
}

}  // namespace
}  // namespace nsa_test
