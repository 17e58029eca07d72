// Property tests of the float64 reference (SPEC.md section 4) on awkward shapes: T in {1, 31, 32,
// 33, 64, 65, 1000}, G in {1, 3, 16}, Dk != Dv, the default, fla (l=d=l'=64) and half-sized
// (l=16, d=8, l'=32) configs, strided (padded) views, f32 and bf16 inputs, bf16 outputs, B > 1 and
// variable-length packing. Every expected value is recomputed here in float64 from the same input
// elements the op read, without calling src/ref.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <utility>
#include <vector>

#include "contract_util.h"

using namespace nsa_test;

namespace {

enum class Layout { kDefault, kFla, kHalf };

nsa_config layout_config(Layout l) {
  switch (l) {
    case Layout::kFla: return config(64, 64, 64, 16, 1, 2, 512);
    case Layout::kHalf: return config(16, 8, 32, 16, 1, 2, 512);
    default: return config(32, 16, 64, 16, 1, 2, 512);
  }
}

struct Spec {
  std::string name;
  int64_t B, T, Hq, Hkv, Dk, Dv;
  Layout layout;
  nsa_dtype dtype;
  bool padded;
  std::vector<int32_t> cu;  // empty: B fixed-length sequences
  nsa_dtype out = NSA_DTYPE_F32;
};

// Head dims stay small and T = 1000 keeps few heads: the reference costs
// ~ T * Hq * (keys per query) * (Dk + Dv), and so does the recomputation here.
const std::vector<Spec>& specs() {
  static const std::vector<Spec> s = {
      {"T1_G1_B2", 2, 1, 1, 1, 16, 8, Layout::kDefault, NSA_DTYPE_F32, false, {}},
      {"T31_G3_half_bf16", 1, 31, 3, 1, 24, 8, Layout::kHalf, NSA_DTYPE_BF16, true, {}},
      {"T32_G16", 1, 32, 16, 1, 16, 24, Layout::kDefault, NSA_DTYPE_F32, true, {}},
      {"T33_G3_fla_bf16_out",
       1,
       33,
       6,
       2,
       24,
       16,
       Layout::kFla,
       NSA_DTYPE_BF16,
       false,
       {},
       NSA_DTYPE_BF16},
      {"T64_G1_half_B2", 2, 64, 2, 2, 16, 8, Layout::kHalf, NSA_DTYPE_F32, true, {}},
      {"T65_G16_bf16", 1, 65, 16, 1, 16, 8, Layout::kDefault, NSA_DTYPE_BF16, true, {}},
      {"T1000_G1", 1, 1000, 1, 1, 16, 8, Layout::kDefault, NSA_DTYPE_F32, true, {}},
      {"T1000_G3_fla_bf16", 1, 1000, 3, 1, 24, 8, Layout::kFla, NSA_DTYPE_BF16, false, {}},
      {"T1000_G1_half", 1, 1000, 1, 1, 16, 8, Layout::kHalf, NSA_DTYPE_F32, false, {}},
      {"varlen_half",
       1,
       162,
       3,
       1,
       16,
       8,
       Layout::kHalf,
       NSA_DTYPE_F32,
       true,
       {0, 1, 32, 97, 97, 162}},
      {"varlen_default_bf16",
       1,
       433,
       2,
       2,
       24,
       16,
       Layout::kDefault,
       NSA_DTYPE_BF16,
       true,
       {0, 33, 433}},
  };
  return s;
}

int64_t longest(const Spec& s) {
  if (s.cu.empty()) return s.T;
  int64_t m = 0;
  for (size_t i = 0; i + 1 < s.cu.size(); ++i) m = std::max<int64_t>(m, s.cu[i + 1] - s.cu[i]);
  return m;
}

FwdCase build(const Spec& sp, const nsa_config& cfg, uint64_t seed) {
  Shape s;
  s.B = sp.B;
  s.T = sp.T;
  s.Hq = sp.Hq;
  s.Hkv = sp.Hkv;
  s.Dk = sp.Dk;
  s.Dv = sp.Dv;
  return make_case(s, cfg, sp.dtype, seed, sp.padded, sp.cu, sp.out);
}

// Sparse settings, so that selection and window really cut: n small, w small.
nsa_config sparse_config(const Spec& sp) {
  nsa_config c = layout_config(sp.layout);
  switch (sp.layout) {
    case Layout::kFla:
      c.slc_count = 3;
      c.window = 64;
      break;
    case Layout::kHalf:
      c.slc_count = 5;
      c.slc_init = 2;
      c.slc_local = 1;
      c.window = 20;
      break;
    default:
      c.slc_count = 4;
      c.window = 40;
      break;
  }
  return c;
}

struct Inputs {
  Dense q, k, v, kc, vc, gc, gs, gw;
  explicit Inputs(const FwdCase& c)
      : q(c.q), k(c.k), v(c.v), kc(c.k_cmp), vc(c.v_cmp), gc(c.g_cmp), gs(c.g_slc), gw(c.g_win) {}
};

// Dense causal attention, o = sum_{p <= t} softmax_p(scale q_t . k_p) v_p over the query's own
// sequence, written out in full: what the window branch with w >= T and the selected branch with
// every block selected must reduce to.
Att dense_causal(const Inputs& in, const Seq& s, int64_t t, int64_t h, int64_t hk, int64_t Dk,
                 int64_t Dv, double scale) {
  const double* q = in.q.row(s.b, s.start + t, h);
  std::vector<double> score(t + 1);
  double m = kNegInf;
  for (int64_t p = 0; p <= t; ++p) {
    const double* k = in.k.row(s.b, s.start + p, hk);
    double dot = 0.0;
    for (int64_t c = 0; c < Dk; ++c) dot += q[c] * k[c];
    score[p] = scale * dot;
    m = std::max(m, score[p]);
  }
  Att a;
  a.o.assign(Dv, 0.0);
  double z = 0.0;
  for (int64_t p = 0; p <= t; ++p) {
    const double w = std::exp(score[p] - m);
    const double* v = in.v.row(s.b, s.start + p, hk);
    z += w;
    for (int64_t c = 0; c < Dv; ++c) a.o[c] += w * v[c];
  }
  for (double& x : a.o) x /= z;
  a.lse = m + std::log(z);
  return a;
}

// Runs one spec with only one gate open and checks o, that branch's o and lse against dense
// causal attention.
void expect_branch_is_dense(const Spec& sp, const nsa_config& cfg, bool window_branch) {
  SCOPED_TRACE(sp.name);
  FwdCase c = build(sp, cfg, 1000 + sp.T);
  c.g_cmp.fill(0.0);
  c.g_slc.fill(window_branch ? 0.0 : 1.0);
  c.g_win.fill(window_branch ? 1.0 : 0.0);
  ASSERT_EQ(run_ref(c), NSA_OK);
  const Inputs in(c);
  const Dense o(c.o), ob(window_branch ? c.o_win : c.o_slc);
  const Dense lse(window_branch ? c.lse_win : c.lse_slc);
  const int64_t G = sp.Hq / sp.Hkv;
  const double scale = effective_scale(cfg, sp.Dk);
  Checker chk(sp.name);
  for (const Seq& s : sequences(c)) {
    for (int64_t t = 0; t < s.len; ++t) {
      const int64_t tok = s.start + t;
      for (int64_t h = 0; h < sp.Hq; ++h) {
        const Att want = dense_causal(in, s, t, h, h / G, sp.Dk, sp.Dv, scale);
        chk.near(lse(s.b, tok, h), want.lse, lse_tol(want.lse), "lse", s.b, tok, h);
        for (int64_t e = 0; e < sp.Dv; ++e) {
          chk.near(o(s.b, tok, h, e), want.o[e], out_tol(sp.out, want.o[e]), "o", s.b, tok, h, e);
          chk.near(ob(s.b, tok, h, e), want.o[e], out_tol(sp.out, want.o[e]), "o_branch", s.b, tok,
                   h, e);
        }
      }
    }
  }
}

// SPEC 4.5: a window of w >= T keys is all of 0 .. t, so with g_win = 1 and the other gates 0 the
// op is dense causal attention. w = T exactly on some specs (the edge), larger on others.
TEST(Properties, WindowOnlyWithWideWindowIsDenseCausal) {
  for (size_t i = 0; i < specs().size(); ++i) {
    const Spec& sp = specs()[i];
    nsa_config cfg = layout_config(sp.layout);
    cfg.window = static_cast<int32_t>(i % 2 ? longest(sp) : 4096);
    expect_branch_is_dense(sp, cfg, /*window_branch=*/true);
  }
}

// SPEC 4.3-4.4: with n >= ceil(T / l') every block 0 .. t/l' is selected, so the selected branch
// sees all keys 0 .. t; with g_slc = 1 alone the op is dense causal attention. The window is
// narrow to show it plays no part.
TEST(Properties, SelectEverythingIsDenseCausal) {
  for (const Spec& sp : specs()) {
    nsa_config cfg = layout_config(sp.layout);
    const int64_t blocks = (longest(sp) + cfg.slc_block - 1) / cfg.slc_block;
    cfg.slc_count = static_cast<int32_t>(std::max<int64_t>(blocks, cfg.slc_init + cfg.slc_local));
    cfg.window = 7;
    expect_branch_is_dense(sp, cfg, /*window_branch=*/false);
  }
}

// The three branches of SPEC 4 for one query, recomputed from their key sets: the visible
// compressed tokens (4.1), the positions p <= t of the blocks the op reported (4.4), and the
// window (4.5).
struct Branches {
  Att cmp, slc, win;
};
Branches recompute(const FwdCase& c, const Inputs& in, const Dense& idx, const Seq& s, int64_t t,
                   int64_t h) {
  const nsa_config& cfg = c.cfg;
  const int64_t G = c.shape.Hq / c.shape.Hkv, hk = h / G, tok = s.start + t;
  const int64_t Dk = c.shape.Dk, Dv = c.shape.Dv, lp = cfg.slc_block;
  const double scale = effective_scale(cfg, Dk);
  const double* q = in.q.row(s.b, tok, h);
  Branches br;
  std::vector<const double*> K, V;
  for (int64_t i = 0; i * cfg.cmp_stride + cfg.cmp_block - 1 <= t; ++i) {
    K.push_back(in.kc.row(s.b, s.cmp_start + i, hk));
    V.push_back(in.vc.row(s.b, s.cmp_start + i, hk));
  }
  br.cmp = attention(q, Dk, K, V, Dv, scale);
  K.clear();
  V.clear();
  std::vector<char> chosen(t / lp + 1, 0);
  for (int64_t k = 0; k < cfg.slc_count; ++k) {
    const double j = idx(s.b, tok, hk, k);
    if (j >= 0 && j <= t / lp) chosen[static_cast<size_t>(j)] = 1;
  }
  for (int64_t p = 0; p <= t; ++p) {
    if (!chosen[p / lp]) continue;
    K.push_back(in.k.row(s.b, s.start + p, hk));
    V.push_back(in.v.row(s.b, s.start + p, hk));
  }
  br.slc = attention(q, Dk, K, V, Dv, scale);
  K.clear();
  V.clear();
  for (int64_t p = std::max<int64_t>(0, t - cfg.window + 1); p <= t; ++p) {
    K.push_back(in.k.row(s.b, s.start + p, hk));
    V.push_back(in.v.row(s.b, s.start + p, hk));
  }
  br.win = attention(q, Dk, K, V, Dv, scale);
  return br;
}

// Each branch's lse is log sum_p exp(scale q.k_p) over its key set and its output the matching
// softmax average; o = g_cmp o_cmp + g_slc o_slc + g_win o_win (SPEC 4.6, Eq. 5).
TEST(Properties, BranchOutputsLseAndGatedSumAreConsistent) {
  for (const Spec& sp : specs()) {
    SCOPED_TRACE(sp.name);
    FwdCase c = build(sp, sparse_config(sp), 2000 + sp.T);
    ASSERT_EQ(run_ref(c), NSA_OK);
    const Inputs in(c);
    const Dense idx(c.idx_out), o(c.o), oc(c.o_cmp), os(c.o_slc), ow(c.o_win);
    const Dense lc(c.lse_cmp), ls(c.lse_slc), lw(c.lse_win);
    Checker chk(sp.name);
    for (const Seq& s : sequences(c)) {
      for (int64_t t = 0; t < s.len; ++t) {
        const int64_t tok = s.start + t;
        for (int64_t h = 0; h < sp.Hq; ++h) {
          const Branches br = recompute(c, in, idx, s, t, h);
          chk.near(lc(s.b, tok, h), br.cmp.lse, lse_tol(br.cmp.lse), "lse_cmp", s.b, tok, h);
          chk.near(ls(s.b, tok, h), br.slc.lse, lse_tol(br.slc.lse), "lse_slc", s.b, tok, h);
          chk.near(lw(s.b, tok, h), br.win.lse, lse_tol(br.win.lse), "lse_win", s.b, tok, h);
          const double gc = in.gc(s.b, tok, h), gs = in.gs(s.b, tok, h), gw = in.gw(s.b, tok, h);
          for (int64_t e = 0; e < sp.Dv; ++e) {
            const double want = gc * br.cmp.o[e] + gs * br.slc.o[e] + gw * br.win.o[e];
            chk.near(o(s.b, tok, h, e), want, out_tol(sp.out, want), "o", s.b, tok, h, e);
            chk.near(oc(s.b, tok, h, e), br.cmp.o[e], out_tol(sp.out, br.cmp.o[e]), "o_cmp", s.b,
                     tok, h, e);
            chk.near(os(s.b, tok, h, e), br.slc.o[e], out_tol(sp.out, br.slc.o[e]), "o_slc", s.b,
                     tok, h, e);
            chk.near(ow(s.b, tok, h, e), br.win.o[e], out_tol(sp.out, br.win.o[e]), "o_win", s.b,
                     tok, h, e);
          }
        }
      }
    }
  }
}

// SPEC 4.2 weights by counting: the raw positions compressed token i shares with selection block
// j, divided by d. weights[i] lists (j, ov(i, j)) for the blocks i touches.
std::vector<std::vector<std::pair<int64_t, double>>> counted_overlaps(const nsa_config& cfg,
                                                                      int64_t max_tc) {
  std::vector<std::vector<std::pair<int64_t, double>>> w(max_tc);
  for (int64_t i = 0; i < max_tc; ++i) {
    for (int64_t x = i * cfg.cmp_stride; x < i * cfg.cmp_stride + cfg.cmp_block; ++x) {
      const int64_t j = x / cfg.slc_block;
      if (w[i].empty() || w[i].back().first != j) w[i].push_back({j, 0.0});
      w[i].back().second += 1.0 / cfg.cmp_stride;
    }
  }
  return w;
}

// SPEC 4.3: reported indices are sorted ascending, unique, -1 padded to n, hold min(n, J+1)
// blocks, contain the forced blocks and never exceed J = t / l'; and the free blocks chosen are a
// top-(n - |F_t|) by the block scores of SPEC 4.2, recomputed here from the group's p_cmp.
TEST(Properties, SelectedIndicesAreWellFormedTopN) {
  for (const Spec& sp : specs()) {
    SCOPED_TRACE(sp.name);
    const nsa_config cfg = sparse_config(sp);
    FwdCase c = build(sp, cfg, 3000 + sp.T);
    ASSERT_EQ(run_ref(c), NSA_OK);
    const Inputs in(c);
    const Dense idx(c.idx_out);
    const int64_t n = cfg.slc_count, lp = cfg.slc_block, G = sp.Hq / sp.Hkv;
    const auto ov = counted_overlaps(cfg, nsa_cmp_len(&cfg, longest(sp)));
    const double scale = effective_scale(cfg, sp.Dk);
    Checker chk(sp.name);
    for (const Seq& s : sequences(c)) {
      for (int64_t t = 0; t < s.len; ++t) {
        const int64_t tok = s.start + t, J = t / lp;
        for (int64_t hk = 0; hk < sp.Hkv; ++hk) {
          std::vector<int64_t> got;
          bool padding = false;
          std::string at = "t=" + std::to_string(t) + " hk=" + std::to_string(hk) + " seq@" +
                           std::to_string(s.start) + " b=" + std::to_string(s.b);
          for (int64_t k = 0; k < n; ++k) {
            const int64_t j = static_cast<int64_t>(idx(s.b, tok, hk, k));
            if (j == -1) {
              padding = true;
              continue;
            }
            chk.expect(!padding, "index after -1 padding, " + at);
            chk.expect(j >= 0 && j <= J, "index " + std::to_string(j) + " outside [0, J], " + at);
            chk.expect(got.empty() || j > got.back(), "not strictly ascending, " + at);
            got.push_back(j);
          }
          chk.expect(static_cast<int64_t>(got.size()) == std::min(n, J + 1), "count, " + at);
          std::vector<char> in_set(J + 1, 0), forced(J + 1, 0);
          for (int64_t j : got)
            if (j >= 0 && j <= J) in_set[j] = 1;
          for (int64_t j = 0; j <= J; ++j) {
            forced[j] = j < cfg.slc_init || j > J - cfg.slc_local;
            if (forced[j])
              chk.expect(in_set[j], "forced block " + std::to_string(j) + " missing, " + at);
          }
          // Independent block scores: sum over the group's heads of p_cmp[i] * ov(i, j).
          std::vector<double> score(J + 1, 0.0);
          std::vector<const double*> K, V;
          for (int64_t i = 0; i * cfg.cmp_stride + cfg.cmp_block - 1 <= t; ++i) {
            K.push_back(in.kc.row(s.b, s.cmp_start + i, hk));
            V.push_back(in.vc.row(s.b, s.cmp_start + i, hk));
          }
          for (int64_t g = 0; g < G; ++g) {
            const Att a = attention(in.q.row(s.b, tok, hk * G + g), sp.Dk, K, V, sp.Dv, scale);
            for (size_t i = 0; i < a.p.size(); ++i)
              for (auto [j, w] : ov[i])
                if (j <= J) score[j] += a.p[i] * w;
          }
          double worst_in = 1e300, best_out = -1e300;
          for (int64_t j = 0; j <= J; ++j) {
            if (forced[j]) continue;
            if (in_set[j]) worst_in = std::min(worst_in, score[j]);
            else best_out = std::max(best_out, score[j]);
          }
          // Scores are sums of at most G * l / d probability-weighted terms, computed here and in
          // the reference in different orders: they agree to ~1e-15; 1e-9 leaves ample room.
          chk.expect(best_out <= worst_in + 1e-9, "a free block outscores a chosen one, " + at);
        }
      }
    }
  }
}

}  // namespace
