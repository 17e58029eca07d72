// What the API fuzzer checks after a valid call: every present output element written (and
// nothing else), and the CPU backend against the float64 reference within f32 rounding bounds.
// A selected-index difference is accepted only where an independent float64 recomputation of the
// block scores (SPEC.md 4.2) shows a near-tie that f32 and f64 may rank either way.
#pragma once

#include <functional>
#include <map>
#include <set>
#include <tuple>

#include "contract_util.h"
#include "fuzz_compress.h"
#include "fuzz_fwd.h"

namespace nsa_fuzz {

constexpr double kEps = 1.0 / (1 << 24);  // f32 unit roundoff, 2^-24
// Both results are rounded to bf16 on store and may land on the two sides of one rounding
// boundary: one bf16 ulp, at most 2^-7 of the value.
constexpr double kBf16Rel = 1.0 / (1 << 7);
// Likewise for f16: one f16 ulp, at most 2^-10 of the value.
constexpr double kF16Rel = 1.0 / (1 << 10);
// The relative share of a tolerance that an output's own dtype adds.
inline double out_rel(nsa_dtype dt) {
  return dt == NSA_DTYPE_BF16 ? kBf16Rel : dt == NSA_DTYPE_F16 ? kF16Rel : 0.0;
}

// Every logical element of the present outputs holds a value a kernel wrote: o and the branch
// outputs finite, LSEs not NaN or +inf (-inf is an empty branch), indices -1 or a visible block.
inline void expect_written(const FwdCase& c) {
  const Buf* outs[8] = {&c.o,       &c.o_cmp,   &c.o_slc,   &c.o_win,
                        &c.lse_cmp, &c.lse_slc, &c.lse_win, &c.idx_out};
  for (int i = 0; i < 8; ++i) {
    if (!c.present[i]) continue;
    int64_t bad = 0;
    outs[i]->for_each([&](int64_t, int64_t tok, int64_t, int64_t, int64_t off) {
      const double x = outs[i]->get(off);
      if (i < 4) bad += !std::isfinite(x);
      else if (i < 7) bad += std::isnan(x) || x == std::numeric_limits<double>::infinity();
      else bad += x < -1 || x > static_cast<double>(c.pos_in_seq(tok) / c.cfg.slc_block);
    });
    EXPECT_EQ(bad, 0) << "output #" << i << ": elements unwritten or impossible";
  }
}

// Block scores of query token `tok` of batch row b for KV head hk, in float64 from the inputs,
// written from SPEC.md 4.1-4.2 independently of src/ref.
inline std::vector<double> block_scores(const FwdCase& c, int64_t b, int64_t tok, int64_t hk) {
  int64_t start = 0, cmp_start = 0;
  for (size_t s = 0; s + 1 < c.cu.size(); ++s) {
    if (tok >= c.cu[s] && tok < c.cu[s + 1]) start = c.cu[s];
    if (tok >= c.cu[s + 1]) cmp_start += nsa_cmp_len(&c.cfg, c.cu[s + 1] - c.cu[s]);
  }
  const int64_t t = tok - start, l = c.cfg.cmp_block, d = c.cfg.cmp_stride, lp = c.cfg.slc_block;
  const int64_t visible = t >= l - 1 ? (t - (l - 1)) / d + 1 : 0, J = t / lp, G = c.Hq / c.Hkv;
  const double scale = nsa_test::effective_scale(c.cfg, c.Dk);
  std::vector<double> score(static_cast<size_t>(J + 1), 0.0);
  for (int64_t h = hk * G; h < (hk + 1) * G; ++h) {
    std::vector<double> s(static_cast<size_t>(visible));
    double m = -std::numeric_limits<double>::infinity(), z = 0.0;
    for (int64_t i = 0; i < visible; ++i) {
      double dot = 0.0;
      for (int64_t e = 0; e < c.Dk; ++e) {
        dot += c.q.get(c.q.off(b, tok, h, e)) * c.k_cmp.get(c.k_cmp.off(b, cmp_start + i, hk, e));
      }
      m = std::max(m, s[i] = scale * dot);
    }
    for (double& x : s) z += (x = std::exp(x - m));
    for (int64_t i = 0; i < visible; ++i) {
      for (int64_t j = i * d / lp; j <= std::min(J, (i * d + l - 1) / lp); ++j) {
        const int64_t ov = std::min(i * d + l, (j + 1) * lp) - std::max(i * d, j * lp);
        score[j] += s[i] / z * static_cast<double>(ov) / static_cast<double>(d);
      }
    }
  }
  return score;
}

// Whether two selections of one query row differ only by swapping near-tied blocks. 1e-4 of the
// largest score: f32 probabilities carry ~Dk 2^-24 |s| relative error (~4e-5 with Dk <= 40 and
// |s| <= ~16), and a wrong selection leaves a far larger gap.
inline bool near_tie(const FwdCase& c, int64_t b, int64_t tok, int64_t hk, std::set<int> A,
                     std::set<int> C, std::string* why) {
  A.erase(-1), C.erase(-1);
  std::vector<int> a_only, c_only;
  std::set_difference(A.begin(), A.end(), C.begin(), C.end(), std::back_inserter(a_only));
  std::set_difference(C.begin(), C.end(), A.begin(), A.end(), std::back_inserter(c_only));
  const std::vector<double> s = block_scores(c, b, tok, hk);
  const double top = *std::max_element(s.begin(), s.end());
  std::ostringstream os;
  os << "row [" << b << ", " << tok << ", " << hk << "]: ref-only blocks";
  for (int j : a_only) os << " " << j << " (" << s[j] << ")";
  os << ", cpu-only blocks";
  for (int j : c_only) os << " " << j << " (" << s[j] << ")";
  *why = os.str();
  if (a_only.size() != c_only.size()) return false;
  for (int x : a_only) {
    for (int y : c_only) {
      if (x >= static_cast<int>(s.size()) || y >= static_cast<int>(s.size()) ||
          std::fabs(s[x] - s[y]) > 1e-4 * top) {
        return false;
      }
    }
  }
  return true;
}

using IdxRows =
    std::map<std::tuple<int64_t, int64_t, int64_t>, std::pair<std::set<int>, std::set<int>>>;

// Rows (b, t, hk) where two index tensors of shape [B, T, Hkv, n] differ: {ref set, cpu set}.
inline IdxRows differing_rows(const Buf& shape_of, const std::vector<unsigned char>& ref,
                              const std::vector<unsigned char>& cpu) {
  IdxRows rows;
  shape_of.for_each([&](int64_t b, int64_t t, int64_t h, int64_t, int64_t off) {
    auto& [a, c] = rows[{b, t, h}];
    a.insert(static_cast<int>(shape_of.get_in(ref, off)));
    c.insert(static_cast<int>(shape_of.get_in(cpu, off)));
  });
  for (auto it = rows.begin(); it != rows.end();) {
    it = it->second.first == it->second.second ? rows.erase(it) : std::next(it);
  }
  return rows;
}

// The CPU outputs now in c's buffers against the reference's `ref` (bytes of c.outs(), in order).
// `selections` runs both backends with an index output and returns {ref, cpu} index bytes in a
// contiguous [B, T, Hkv, n] tensor it also returns; it is called only when values disagree.
using SelectionRunner =
    std::function<bool(Buf*, std::vector<unsigned char>*, std::vector<unsigned char>*)>;
inline void compare_fwd(FwdCase& c, const std::vector<std::vector<unsigned char>>& ref,
                        const SelectionRunner& selections) {
  ++compare_count();
  // K: the most terms an f32 sum of this case adds, a Dk-term score dot plus up to
  // min(T, max(n l', w, Tc)) softmax-weighted O(1) values, each rounding <= 2^-24 relative.
  // x16: |s| stays below ~16 (q, k in U(-2, 2), scale <= 1.5 / sqrt(Dk)), and exp turns a
  // relative score error into a relative weight error |s| times larger.
  const double keys = std::min<double>(
      double(c.T),
      std::max({double(c.cfg.slc_count) * c.cfg.slc_block, double(c.cfg.window), double(c.Tc)}));
  const double tol = 16.0 * (double(c.Dk) + keys) * kEps;
  // bf16 inputs on a CPU whose AUTO bf16 arithmetic is not F32 round each softmax weight to bf16
  // for P V: a branch's output moves by up to 2^-8 max|v| more (|v| <= 1 here), o by the gates'
  // sum (<= 3) times that (test_cpu_vs_ref.cc, CpuFwdBf16Math).
  const bool bf16_math = c.dt == NSA_DTYPE_BF16 && nsa_bf16_math_auto() != NSA_BF16_MATH_F32;
  const double tol_o = tol + (bf16_math ? 3.0 / 256 : 0.0);
  struct Bad {
    int out;
    int64_t b, t, h, e;
    double got, want;
  };
  std::vector<Bad> bad;
  std::vector<Buf*> outs = c.outs();
  for (int i = 0; i < 7; ++i) {
    if (!c.present[i]) continue;
    const Buf& o = *outs[i];
    const double rel = i < 4 ? out_rel(o.dtype()) : tol;  // lse: |lse| tol
    o.for_each([&](int64_t b, int64_t t, int64_t h, int64_t e, int64_t off) {
      const double x = o.get(off), y = o.get_in(ref[i], off);
      const double abs_tol = i < 4 ? tol_o : tol;
      const bool ok = std::isinf(y) ? x == y : std::fabs(x - y) <= abs_tol + rel * std::fabs(y);
      if (!ok) bad.push_back({i, b, t, h, e, x, y});
    });
  }
  IdxRows rows;
  if (c.present[7]) rows = differing_rows(c.idx_out, ref[7], c.idx_out.storage());
  if (!bad.empty() && !c.present[7] && !c.has_idx_in && c.n() <= 64) {
    Buf idx;
    std::vector<unsigned char> r_idx, c_idx;
    if (selections(&idx, &r_idx, &c_idx)) rows = differing_rows(idx, r_idx, c_idx);
  }
  if (c.has_idx_in) {
    EXPECT_TRUE(rows.empty()) << "with caller indices the reported selections must agree";
    rows.clear();
  }
  int reported = 0;
  for (const auto& [key, sets] : rows) {
    std::string why;
    const auto [b, t, hk] = key;
    if (!near_tie(c, b, t, hk, sets.first, sets.second, &why)) {
      if (reported++ < 5)
        ADD_FAILURE() << "cpu and ref select different blocks without a near-tie: " << why;
    } else {
      ++tie_count();
    }
  }
  const int64_t G = c.Hq / c.Hkv;
  static const char* names[] = {"o", "o_cmp", "o_slc", "o_win", "lse_cmp", "lse_slc", "lse_win"};
  int64_t unexcused = 0;
  for (const Bad& x : bad) {
    // A near-tied selection changes o, o_slc and lse_slc of the group's heads on that row.
    const bool slc_dependent = x.out == 0 || x.out == 2 || x.out == 5;
    if (slc_dependent && rows.count({x.b, x.t, x.h / G})) continue;
    if (unexcused++ < 5) {
      ADD_FAILURE() << names[x.out] << "[" << x.b << ", " << x.t << ", " << x.h << ", " << x.e
                    << "] cpu " << x.got << " ref " << x.want << " (tol "
                    << (x.out < 4 ? tol_o : tol) << ")";
    }
  }
  EXPECT_EQ(unexcused, 0) << "cpu vs ref mismatches";
}

// The CPU compression output now in c.out against the reference's bytes `ref`. mean: an f32 sum
// of l values of size <= 1, error <= l 2^-24. mlp: two f32 dot products of l*D and Dh terms whose
// sums of |terms| are O(sqrt(fan-in)) <= O(fan-in); x4 for the O(1) biases and position terms.
inline void compare_cmp(const CmpCase& c, const std::vector<unsigned char>& ref) {
  ++compare_count();
  const double terms =
      c.kind == NSA_CMP_MEAN ? double(c.cfg.cmp_block) : double(c.cfg.cmp_block) * c.D + c.Dh;
  const double tol = 4.0 * terms * kEps, rel = out_rel(c.out.dtype());
  int64_t bad = 0;
  c.out.for_each([&](int64_t b, int64_t t, int64_t h, int64_t e, int64_t off) {
    const double x = c.out.get(off), y = c.out.get_in(ref, off);
    if (!(std::fabs(x - y) <= tol + rel * std::fabs(y)) && bad++ < 5) {
      ADD_FAILURE() << "out[" << b << ", " << t << ", " << h << ", " << e << "] cpu " << x
                    << " ref " << y << " (tol " << tol << ")";
    }
  });
  EXPECT_EQ(bad, 0) << "cpu vs ref compression mismatches";
}

}  // namespace nsa_fuzz
