// Non-finite inputs (README, "Non-finite inputs"): a NaN or infinity in an input reaches exactly
// the outputs that the rule names, on the reference and the CPU backend alike, and everything
// else is bit-identical to a clean run of the same backend. Each scenario runs a case clean, then
// poisoned, on both backends, and checks every element of every output against the rule: NaN,
// zero, -inf, finite, a predicted selection index, or unchanged. Finite elements of the two
// backends' poisoned runs must also agree to rounding, so "finite" cannot hide a wrong value.
#include <gtest/gtest.h>

#include "nonfinite_util.h"

namespace nsa_test {

// NaN in q[b,t,h]: that row is NaN in every non-empty branch; the group's block scores turn NaN,
// so the other head keeps finite outputs over the NaN-rule selection.
TEST(NonFinite, NanQuery) {
  Scenario sc;
  sc.make = [] { return random_case(); };
  sc.poison = [](FwdCase& c, nsa_fwd_params&) {
    c.q.set({1, 150, kG, 3}, kNaN);  // group 1's first head, C_t non-empty
    c.q.set({0, 5, 0, 0}, kNaN);     // group 0, t < l - 1: C_t empty
  };
  sc.rule = [](const std::vector<Dense>& clean, int out, int64_t b, int64_t tok, int64_t h,
               int64_t e) -> Expect {
    const int64_t hk = out == kIdx ? h : h / kG;
    if (b == 1 && tok == 150 && hk == 1) {
      if (out == kIdx || h != kG) {  // the selection, and the group's other heads
        if (out == kOCmp || out == kLseCmp || out == kOWin || out == kLseWin) return Want::Same;
        return nan_scores(clean, out, b, tok, h, e, 150);
      }
      return Want::NaN;
    }
    if (b == 0 && tok == 5 && out != kIdx && h == 0) {
      return out == kOCmp ? Want::Zero : out == kLseCmp ? Want::NegInf : Want::NaN;
    }
    return Want::Same;
  };
  const std::vector<Dense> clean = run_scenario("nan q", sc);
  // The case must change the selection, or the rule for the group's other head is untested.
  const std::vector<int32_t> sel = predicted_selection(150, true);
  bool differs = false;
  for (int64_t k = 0; k < kCfg.slc_count; ++k)
    differs = differs || clean[kIdx](1, 150, 1, k) != sel[k];
  EXPECT_TRUE(differs);
}

// NaN in a raw key: exactly the queries whose slc or win set holds it (f32 and bf16 inputs).
TEST(NonFinite, NanKey) {
  for (nsa_dtype dt : {NSA_DTYPE_F32, NSA_DTYPE_BF16}) {
    const Hit hits[] = {{0, 0, 160, 40, 1, -1}, {1, 0, 160, 3, 0, -1}};
    Scenario sc;
    sc.make = [dt] { return random_case(dt); };
    sc.poison = [&](FwdCase& c, nsa_fwd_params&) {
      for (const Hit& x : hits) c.k.set({x.b, x.p, x.hk, x.b == 0 ? 5 : 0}, kNaN);
    };
    sc.rule = [&](const std::vector<Dense>& clean, int out, int64_t b, int64_t tok, int64_t h,
                  int64_t e) -> Expect {
      for (const Hit& x : hits) {
        if (auto r = key_hit(x, clean[kIdx], out, b, tok, h, e)) return *r;
      }
      return Want::Same;
    };
    run_scenario(std::string("nan k ") + nsa_dtype_name(dt), sc);
  }
}

// The branches' own keys (SPEC 3): a NaN in k_win reaches the window branch only, +inf in k_slc
// the selected branch only (a +inf score is NaN for the branch, like a NaN one).
TEST(NonFinite, NanOrInfInOneBranchKeys) {
  Tensor kw, ks;
  const Hit hits[] = {{0, 0, 160, 90, 0, -1, false, true}, {1, 0, 160, 20, 1, -1, true, false}};
  Scenario sc;
  sc.make = [] { return signed_case(); };
  sc.base = [&](FwdCase& c, nsa_fwd_params& p) {
    for (Tensor* t : {&kw, &ks}) {
      *t = Tensor(NSA_DTYPE_F32, {kShape.B, kShape.T, kShape.Hkv, kShape.Dk});
      t->for_each([&](int64_t a, int64_t b, int64_t h, int64_t e) {
        t->set({a, b, h, e}, c.k.at({a, b, h, e}));
      });
    }
    p.in.k_win = kw.desc();
    p.in.v_win = c.v.desc();
    p.in.k_slc = ks.desc();
    p.in.v_slc = c.v.desc();
  };
  sc.poison = [&](FwdCase&, nsa_fwd_params&) {
    kw.set({0, 90, 0, 7}, kNaN);
    ks.set({1, 20, 1, 0}, kInf);  // channel 0 of every query is 1: the score is +inf
  };
  sc.rule = [&](const std::vector<Dense>& clean, int out, int64_t b, int64_t tok, int64_t h,
                int64_t e) -> Expect {
    for (const Hit& x : hits) {
      if (auto r = key_hit(x, clean[kIdx], out, b, tok, h, e)) return *r;
    }
    return Want::Same;
  };
  run_scenario("nan k_win, +inf k_slc", sc);
}

// NaN in v[b,p,hk,c]: channel c of o_slc / o_win / o for the queries whose set holds p (weight 0
// included: NegInfScoresWeighZero); the LSEs and the other channels are unchanged. f32 and bf16
// inputs, an even and an odd key: bf16 arithmetic multiplies keys in pairs, and the pair partner
// of a key that a query sees may be one it must not.
TEST(NonFinite, NanValue) {
  for (nsa_dtype dt : {NSA_DTYPE_F32, NSA_DTYPE_BF16}) {
    const Hit hits[] = {{1, 0, 160, 70, 1, 2}, {0, 0, 160, 45, 0, 5}};
    Scenario sc;
    sc.make = [dt] { return random_case(dt); };
    sc.poison = [&](FwdCase& c, nsa_fwd_params&) {
      for (const Hit& x : hits) c.v.set({x.b, x.p, x.hk, x.channel}, kNaN);
    };
    sc.rule = [&](const std::vector<Dense>& clean, int out, int64_t b, int64_t tok, int64_t h,
                  int64_t e) -> Expect {
      for (const Hit& x : hits) {
        if (auto r = key_hit(x, clean[kIdx], out, b, tok, h, e)) return *r;
      }
      return Want::Same;
    };
    run_scenario(std::string("nan v ") + nsa_dtype_name(dt), sc);
  }
}

// NaN in k_cmp row i: the cmp branch of every query that sees row i is NaN, and so are the
// group's block scores. NaN in v_cmp row i: one channel of o_cmp and o.
TEST(NonFinite, NanCompressed) {
  Scenario sc;
  sc.make = [] { return random_case(); };
  sc.poison = [](FwdCase& c, nsa_fwd_params&) {
    c.k_cmp.set({0, 6, 0, 1}, kNaN);  // visible from t = 6 d + l - 1 = 63
    c.v_cmp.set({1, 3, 1, 4}, kNaN);  // visible from t = 39
  };
  sc.rule = [](const std::vector<Dense>& clean, int out, int64_t b, int64_t tok, int64_t h,
               int64_t e) -> Expect {
    const int64_t hk = out == kIdx ? h : h / kG;
    if (b == 0 && hk == 0 && tok >= 63) {
      if (out == kO || out == kOCmp || out == kLseCmp) return Want::NaN;
      if (out == kOWin || out == kLseWin) return Want::Same;
      return nan_scores(clean, out, b, tok, h, e, tok);
    }
    if (b == 1 && hk == 1 && tok >= 39 && (out == kO || out == kOCmp) && e == 4) return Want::NaN;
    return Want::Same;
  };
  run_scenario("nan k_cmp, v_cmp", sc);
}

// A NaN gate poisons o of its own row only, even where its branch is empty (NaN * 0 = NaN).
TEST(NonFinite, NanGate) {
  Scenario sc;
  sc.make = [] { return random_case(); };
  sc.poison = [](FwdCase& c, nsa_fwd_params&) {
    c.g_cmp.set({0, 3, 1}, kNaN);  // t < l - 1: o_cmp is 0
    c.g_slc.set({1, 100, 2}, kNaN);
    c.g_win.set({1, 159, 3}, kNaN);
  };
  sc.rule = [](const std::vector<Dense>&, int out, int64_t b, int64_t tok, int64_t h,
               int64_t) -> Expect {
    const bool row = (b == 0 && tok == 3 && h == 1) || (b == 1 && tok == 100 && h == 2) ||
                     (b == 1 && tok == 159 && h == 3);
    return out == kO && row ? Want::NaN : Want::Same;
  };
  run_scenario("nan gates", sc);
}

// Packed sequences: a fully NaN token stays in its own (one-token) sequence; a NaN key of the
// third sequence reaches that sequence's queries only.
TEST(NonFinite, VarlenNanStaysInItsSequence) {
  const Hit hit{0, 71, 89, 30, 0, -1};
  Scenario sc;
  sc.make = [] {
    Shape s = kShape;
    s.B = 1;
    return make_case(s, kCfg, NSA_DTYPE_F32, 11, false, {0, 70, 71, 160});
  };
  sc.poison = [](FwdCase& c, nsa_fwd_params&) {
    for (int64_t h = 0; h < kShape.Hq; ++h) set_row(c.q, 0, 70, h, kNaN, kShape.Dk);
    for (int64_t h = 0; h < kShape.Hkv; ++h) {
      set_row(c.k, 0, 70, h, kNaN, kShape.Dk);
      set_row(c.v, 0, 70, h, kNaN, kShape.Dv);
    }
    c.k.set({0, 71 + 30, 0, 9}, kNaN);
  };
  sc.rule = [&](const std::vector<Dense>& clean, int out, int64_t b, int64_t tok, int64_t h,
                int64_t e) -> Expect {
    if (tok == 70 && out != kIdx) {  // a one-token sequence: no compressed token, one key
      return out == kOCmp ? Want::Zero : out == kLseCmp ? Want::NegInf : Want::NaN;
    }
    return key_hit(hit, clean[kIdx], out, b, tok, h, e).value_or(Want::Same);
  };
  run_scenario("varlen", sc);
}

// -inf scores weigh 0: keys 0 .. 69 and the compressed rows inside them score -inf for group 0
// of row 0. Queries t < 70 see only -inf keys: every branch is empty (o_* = 0, lse_* = -inf, so
// o = 0) and the block scores are all 0 (the lowest blocks win the ties). Later queries are finite;
// t in [70, 80) has a whole 64-key window tile of -inf before finite keys (the online softmax's m =
// -inf case). A NaN value at key 5 still reaches its channel, weight 0 or not (0 * NaN = NaN).
TEST(NonFinite, NegInfScoresWeighZero) {
  const Hit hit{0, 0, 160, 5, 0, 3};
  Scenario sc;
  sc.make = [] { return signed_case(); };
  sc.poison = [](FwdCase& c, nsa_fwd_params&) {
    for (int64_t p = 0; p < 70; ++p) c.k.set({0, p, 0, 0}, -kInf);
    for (int64_t i = 0; i * 8 + 15 < 70; ++i) c.k_cmp.set({0, i, 0, 0}, -kInf);  // i <= 6
    c.v.set({0, 5, 0, 3}, kNaN);
  };
  sc.rule = [&](const std::vector<Dense>& clean, int out, int64_t b, int64_t tok, int64_t h,
                int64_t e) -> Expect {
    if (auto r = key_hit(hit, clean[kIdx], out, b, tok, h, e)) return *r;
    if (b != 0 || (out == kIdx ? h : h / kG) != 0) return Want::Same;
    if (tok < 70) {
      if (out == kIdx) return Expect(Want::Value, predicted_selection(tok, false)[e]);
      return out >= kLseCmp ? Want::NegInf : Want::Zero;
    }
    const bool cmp_empty = visible(tok) <= 7;  // every visible compressed row is -inf
    if (out == kOCmp) return cmp_empty ? Want::Zero : Want::Finite;
    if (out == kLseCmp) return cmp_empty ? Want::NegInf : Want::Finite;
    return Want::Finite;
  };
  run_scenario("-inf keys", sc);
}

// A query whose every score is -inf has empty branches, never NaN; one whose every score is +inf
// has NaN branches (and NaN block scores for its group).
TEST(NonFinite, InfQuery) {
  Scenario sc;
  sc.make = [] { return signed_case(); };
  sc.poison = [](FwdCase& c, nsa_fwd_params&) {
    c.q.set({1, 120, 1, 0}, -kInf);  // group 0, head 1: all scores -inf
    c.q.set({0, 10, 3, 0}, -kInf);   // t < l - 1
    c.q.set({0, 130, kG, 0}, kInf);  // group 1's first head: all scores +inf
  };
  sc.rule = [](const std::vector<Dense>& clean, int out, int64_t b, int64_t tok, int64_t h,
               int64_t e) -> Expect {
    const int64_t hk = out == kIdx ? h : h / kG;
    const bool side = out == kOCmp || out == kLseCmp || out == kOWin || out == kLseWin;
    if ((b == 1 && tok == 120 && h == 1) || (b == 0 && tok == 10 && h == 3)) {
      if (out != kIdx) return out >= kLseCmp ? Want::NegInf : Want::Zero;
    }
    if (b == 1 && tok == 120 && hk == 0) {  // head 0, and the group's selection: its own scores
      if (out == kIdx) return Want::Finite;
      return side ? Want::Same : Want::Finite;
    }
    if (b == 0 && tok == 130 && hk == 1) {
      if (out != kIdx && h == kG) return Want::NaN;
      return side ? Want::Same : nan_scores(clean, out, b, tok, h, e, 130);
    }
    return Want::Same;
  };
  run_scenario("inf q", sc);
}

// Empty rows produce zeros: t < l - 1 has o_cmp = 0, lse_cmp = -inf however NaN k_cmp / v_cmp
// are; an empty caller-supplied selection has o_slc = 0, lse_slc = -inf however NaN k_slc is.
TEST(NonFinite, EmptyRowsAreZero) {
  Tensor ix(NSA_DTYPE_I32, {kShape.B, kShape.T, kShape.Hkv, kCfg.slc_count});
  Tensor nan_k(NSA_DTYPE_F32, {kShape.B, kShape.T, kShape.Hkv, kShape.Dk});
  ix.fill(-1);
  nan_k.fill(kNaN);
  // Rows with t % 3 == 0 keep an empty set; the others select their own block J.
  ix.for_each([&](int64_t b, int64_t t, int64_t h, int64_t k) {
    if (k == 0 && t % 3 != 0) ix.set({b, t, h, 0}, t / kCfg.slc_block);
  });
  Scenario sc;
  sc.make = [] { return random_case(); };
  sc.base = [&](FwdCase&, nsa_fwd_params& p) { p.slc_indices_in = ix.desc(); };
  sc.poison = [&](FwdCase& c, nsa_fwd_params& p) {
    c.k_cmp.fill(kNaN);
    c.v_cmp.fill(kNaN);
    p.in.k_slc = nan_k.desc();
    p.in.v_slc = c.v.desc();
  };
  sc.rule = [](const std::vector<Dense>&, int out, int64_t, int64_t tok, int64_t,
               int64_t) -> Expect {
    const bool cmp_empty = tok < kCfg.cmp_block - 1, slc_empty = tok % 3 == 0;
    if (out == kOCmp) return cmp_empty ? Want::Zero : Want::NaN;
    if (out == kLseCmp) return cmp_empty ? Want::NegInf : Want::NaN;
    if (out == kOSlc) return slc_empty ? Want::Zero : Want::NaN;
    if (out == kLseSlc) return slc_empty ? Want::NegInf : Want::NaN;
    if (out == kO) return cmp_empty && slc_empty ? Want::Same : Want::NaN;
    return Want::Same;
  };
  run_scenario("empty rows", sc);
}

}  // namespace nsa_test
