// The harness of test_nonfinite.cc (README, "Non-finite inputs"): a scenario runs a case clean,
// then with non-finite values written into its inputs, on the reference and the CPU backend; a
// rule names what every element of every output must be (NaN, zero, -inf, finite, a given value,
// or bit-identical to the clean run), and the two backends' poisoned runs must agree to rounding
// wherever both are finite. Also the key sets of SPEC 4.4-4.5 and the selection that NaN block
// scores produce, so that a rule can be stated per query.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "backend_harness.h"
#include "contract_util.h"

namespace nsa_test {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kInf = std::numeric_limits<double>::infinity();

// Indices into snapshot(): o, o_cmp, o_slc, o_win, lse_cmp, lse_slc, lse_win, slc_indices_out.
enum Out { kO, kOCmp, kOSlc, kOWin, kLseCmp, kLseSlc, kLseWin, kIdx, kNumOut };
inline const char* const kOutName[] = {"o",       "o_cmp",   "o_slc",   "o_win",
                                       "lse_cmp", "lse_slc", "lse_win", "slc_indices_out"};

enum class Want { Same, NaN, Finite, Zero, NegInf, Value };
struct Expect {
  Want want = Want::Same;
  double value = 0.0;  // Want::Value only
  // Implicit, so that a rule can return a bare Want.
  Expect(Want w = Want::Same, double v = 0.0) : want(w), value(v) {}  // NOLINT
};

// The expectation for one element: out, batch row, token, head (the KV head for kIdx), channel
// (the slot for kIdx; 0 for the LSEs). `clean` is the same backend's clean run.
using Rule = std::function<Expect(const std::vector<Dense>& clean, int out, int64_t b, int64_t tok,
                                  int64_t h, int64_t e)>;
using Hook = std::function<void(FwdCase&, nsa_fwd_params&)>;

struct Scenario {
  std::function<FwdCase()> make;
  Hook base = [](FwdCase&, nsa_fwd_params&) {};  // applied to the clean and the poisoned run
  Hook poison;                                   // applied to the poisoned run only
  Rule rule;
};

// Two KV groups of G = 2 heads (most of a SIMD vector's lanes are padding), or of 16 when built
// as test_nonfinite_lanes (a full AVX-512 vector); several blocks per query and a window wider
// than one 64-key chunk of the CPU's online softmax, so a chunk can be all -inf while the next
// one is not.
#ifndef NSA_NONFINITE_G
#define NSA_NONFINITE_G 2
#endif
constexpr int64_t kG = NSA_NONFINITE_G;
inline const Shape kShape{2, 160, 2 * kG, 2, 16, 8};
inline const nsa_config kCfg = config(/*l=*/16, /*d=*/8, /*l'=*/16, /*n=*/4, /*n_init=*/1,
                                      /*n_local=*/1, /*w=*/80);

// Seeds chosen so that NaN block scores change the selection of NanQuery's row (it checks).
inline FwdCase random_case(nsa_dtype dt = NSA_DTYPE_F32) {
  return make_case(kShape, kCfg, dt, kG == 2 ? 7 : 12);
}

// Channel 0 of every query, key and compressed key set to 1, so that the sign of a score is
// known: an infinity in channel 0 of a key (query) makes that score an infinity of its sign.
inline FwdCase signed_case() {
  FwdCase c = random_case();
  for (Tensor* t : {&c.q, &c.k, &c.k_cmp}) {
    t->for_each([&](int64_t a, int64_t b, int64_t h, int64_t) { t->set({a, b, h, 0}, 1.0); });
  }
  return c;
}

// Runs p (whose tensors are c's) on backend be, in its memory (backend_harness.h).
inline std::vector<Dense> run(const BackendUnderTest& be, FwdCase& c, const nsa_fwd_params& p) {
  std::string msg;
  EXPECT_EQ(run_on(be, p, 0, &msg), NSA_OK) << msg;
  return snapshot(c);
}

inline bool meets(const Expect& x, double got, double clean) {
  switch (x.want) {
    case Want::Same: return std::bit_cast<uint64_t>(got) == std::bit_cast<uint64_t>(clean);
    case Want::NaN: return std::isnan(got);
    case Want::Finite: return std::isfinite(got);
    case Want::Zero: return got == 0.0;
    case Want::NegInf: return got == -kInf;
    case Want::Value: return got == x.value;
  }
  return false;
}

inline void check(const std::string& what, const std::vector<Dense>& clean,
                  const std::vector<Dense>& got, const Rule& rule) {
  int64_t bad = 0;
  for (int n = 0; n < kNumOut; ++n) {
    const Dense& g = got[n];
    for (int64_t b = 0; b < g.s[0]; ++b)
      for (int64_t t = 0; t < g.s[1]; ++t)
        for (int64_t h = 0; h < g.s[2]; ++h)
          for (int64_t e = 0; e < g.s[3]; ++e) {
            const Expect x = rule(clean, n, b, t, h, e);
            if (!meets(x, g(b, t, h, e), clean[n](b, t, h, e)) && bad++ < 8) {
              ADD_FAILURE() << what << ": " << kOutName[n] << "[" << b << ", " << t << ", " << h
                            << ", " << e << "] = " << g(b, t, h, e) << " (clean "
                            << clean[n](b, t, h, e) << "), expected kind "
                            << static_cast<int>(x.want) << " value " << x.value;
            }
          }
  }
  EXPECT_EQ(bad, 0) << what;
}

// The two backends' poisoned runs: both finite -> equal to rounding (f32 vs float64), plus
// `extra` (bf16 arithmetic's rounding of P). The outputs that depend on the selection are
// compared only where the selections agree.
inline void cross_check(const std::string& what, const std::vector<Dense>& ref,
                        const std::vector<Dense>& cpu, double extra, const char* name) {
  int64_t bad = 0;
  for (int n = 0; n < kIdx; ++n) {
    const Dense& r = ref[n];
    for (int64_t b = 0; b < r.s[0]; ++b)
      for (int64_t t = 0; t < r.s[1]; ++t)
        for (int64_t h = 0; h < r.s[2]; ++h) {
          bool same_sel = true;
          for (int64_t k = 0; k < kCfg.slc_count; ++k) {
            same_sel = same_sel && ref[kIdx](b, t, h / kG, k) == cpu[kIdx](b, t, h / kG, k);
          }
          if (!same_sel && (n == kO || n == kOSlc || n == kLseSlc)) continue;
          for (int64_t e = 0; e < r.s[3]; ++e) {
            const double x = r(b, t, h, e), y = cpu[n](b, t, h, e);
            const bool ok = (std::isnan(x) && std::isnan(y)) || x == y ||
                            std::fabs(x - y) <= 1e-4 * (1.0 + std::fabs(x)) + extra;
            if (!ok && bad++ < 5) {
              ADD_FAILURE() << what << ": ref vs " << name << " " << kOutName[n] << "[" << b << ", "
                            << t << ", " << h << ", " << e << "] = " << x << " vs " << y;
            }
          }
        }
  }
  EXPECT_EQ(bad, 0) << what;
}

// Returns the reference's clean run.
inline std::vector<Dense> run_scenario(const std::string& what, const Scenario& sc) {
  // The oracle first, then every backend with a forward (CUDA where a device is).
  std::vector<BackendUnderTest> backends = {oracle()};
  for (const BackendUnderTest& b : backends_under_test(kOpFwd)) backends.push_back(b);
  std::vector<std::vector<Dense>> poisoned(backends.size());
  std::vector<Dense> clean_ref;
  double extra = 0.0;
  for (size_t i = 0; i < backends.size(); ++i) {
    FwdCase c = sc.make();
    // bf16 inputs take bf16 arithmetic where the CPU has it: P rounded to bf16 moves a branch's
    // output by at most 2^-8 max|v|, o by the gates' sum (<= 3) times that (test_cpu_vs_ref.cc).
    if (c.q.desc().dtype == NSA_DTYPE_BF16 && nsa_bf16_math_auto() != NSA_BF16_MATH_F32) {
      extra = 3 * max_abs(c.v) / 256;
    }
    nsa_fwd_params p = c.params();
    sc.base(c, p);
    const std::vector<Dense> clean = run(backends[i], c, p);
    // The clean run must be finite, or "unchanged" would prove nothing about the poison.
    for (double x : clean[kO].v) EXPECT_TRUE(std::isfinite(x)) << what;
    if (i == 0) clean_ref = clean;
    sc.poison(c, p);
    poisoned[i] = run(backends[i], c, p);
    check(what + " [" + backends[i].name + "]", clean, poisoned[i], sc.rule);
  }
  for (size_t i = 1; i < backends.size(); ++i) {
    cross_check(what, poisoned[0], poisoned[i], extra, backends[i].name);
  }
  return clean_ref;
}

// ---- The key sets of SPEC 4.4-4.5 and the selection rule for NaN block scores. ----

inline bool in_win(int64_t t, int64_t p) { return p <= t && p > t - kCfg.window; }
inline bool in_slc(const Dense& idx, int64_t b, int64_t tok, int64_t hk, int64_t t, int64_t p) {
  if (p > t) return false;
  for (int64_t k = 0; k < kCfg.slc_count; ++k) {
    if (idx(b, tok, hk, k) == p / kCfg.slc_block) return true;
  }
  return false;
}

inline int64_t visible(int64_t t) {
  return t + 1 >= kCfg.cmp_block ? (t + 1 - kCfg.cmp_block) / kCfg.cmp_stride + 1 : 0;
}

// I_t when every block touched by a visible compressed block scores NaN (`nan` true) or when
// every block scores the same (`nan` false): forced blocks, then untouched blocks (score 0, a
// number, ranks above NaN), then the rest, each by ascending index (ties to the lower index).
inline std::vector<int32_t> predicted_selection(int64_t t, bool nan) {
  const int64_t J = t / kCfg.slc_block, n = kCfg.slc_count, nc = visible(t);
  const int64_t touched =
      nc > 0 ? ((nc - 1) * kCfg.cmp_stride + kCfg.cmp_block - 1) / kCfg.slc_block : -1;
  std::vector<int32_t> chosen, first, second;
  for (int32_t j = 0; j <= J; ++j) {
    const bool forced = J + 1 <= n || j < kCfg.slc_init || j > J - kCfg.slc_local;
    (forced ? chosen : (nan && j <= touched ? second : first)).push_back(j);
  }
  first.insert(first.end(), second.begin(), second.end());
  for (size_t r = 0; chosen.size() < static_cast<size_t>(n) && r < first.size(); ++r) {
    chosen.push_back(first[r]);
  }
  std::sort(chosen.begin(), chosen.end());
  chosen.resize(n, -1);
  return chosen;
}

// A poisoned raw key or value: sequence [start, start + len) of batch row b, position p inside
// it, KV head hk; channel -1 for a key (the branch turns NaN), else the value channel.
struct Hit {
  int64_t b, start, len, p, hk, channel;
  bool slc = true, win = true;  // which branches read the poisoned tensor
};
inline std::optional<Expect> key_hit(const Hit& x, const Dense& idx, int out, int64_t b,
                                     int64_t tok, int64_t h, int64_t e) {
  if (out == kIdx || b != x.b || tok < x.start || tok >= x.start + x.len || h / kG != x.hk) {
    return std::nullopt;
  }
  const int64_t t = tok - x.start;
  const bool s = x.slc && in_slc(idx, b, tok, x.hk, t, x.p), w = x.win && in_win(t, x.p);
  const bool ch = x.channel < 0 || e == x.channel, key = x.channel < 0;
  if ((out == kO && (s || w) && ch) || (out == kOSlc && s && ch) || (out == kOWin && w && ch) ||
      (out == kLseSlc && s && key) || (out == kLseWin && w && key)) {
    return Want::NaN;
  }
  return std::nullopt;
}

// The group (b, tok, hk) whose block scores are NaN: predicted selection; o_slc, lse_slc and o
// of the group's finite heads unchanged where that selection equals the clean one.
inline Expect nan_scores(const std::vector<Dense>& clean, int out, int64_t b, int64_t tok,
                         int64_t h, int64_t e, int64_t t) {
  const std::vector<int32_t> sel = predicted_selection(t, true);
  if (out == kIdx) return Expect(Want::Value, sel[e]);
  bool same = true;
  for (int64_t k = 0; k < kCfg.slc_count; ++k)
    same = same && clean[kIdx](b, tok, h / kG, k) == sel[k];
  return (out == kO || out == kOSlc || out == kLseSlc) && !same ? Want::Finite : Want::Same;
}

inline void set_row(Tensor& t, int64_t b, int64_t tok, int64_t h, double v, int64_t dim) {
  for (int64_t e = 0; e < dim; ++e) t.set({b, tok, h, e}, v);
}

}  // namespace nsa_test
