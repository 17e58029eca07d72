// The steps of SPEC.md section 4, each on its own, in float64.
#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "ref/ref.h"

namespace nsa::ref {

int64_t visible_cmp_count(const nsa_config& cfg, int64_t t) {
  // Compressed token i covers raw tokens i*d .. i*d + l - 1 and is visible once complete
  // (SPEC 4.1; the paper's Eq. 7 with 0-indexed positions).
  const int64_t l = cfg.cmp_block, d = cfg.cmp_stride;
  return t + 1 >= l ? (t + 1 - l) / d + 1 : 0;
}

double overlap_weight(const nsa_config& cfg, int64_t i, int64_t j) {
  // |[i*d, i*d + l) ∩ [j*l', (j+1)*l')| / d: the overlap-consistent reading of Eq. 9 (SPEC 4.2).
  const int64_t l = cfg.cmp_block, d = cfg.cmp_stride, lp = cfg.slc_block;
  const int64_t lo = std::max(i * d, j * lp);
  const int64_t hi = std::min(i * d + l, (j + 1) * lp);
  return hi > lo ? static_cast<double>(hi - lo) / static_cast<double>(d) : 0.0;
}

std::vector<double> block_scores(const nsa_config& cfg, int64_t t,
                                 const std::vector<std::vector<double>>& p_cmp) {
  const int64_t lp = cfg.slc_block, l = cfg.cmp_block, d = cfg.cmp_stride;
  const int64_t num_blocks = t / lp + 1;
  std::vector<double> score(num_blocks, 0.0);
  // Eq. 10: the group's heads add up, so one selection serves them all.
  for (const std::vector<double>& p : p_cmp) {
    for (int64_t i = 0; i < static_cast<int64_t>(p.size()); ++i) {
      // Only the selection blocks that compressed block i touches get a share of p[i].
      for (int64_t j = (i * d) / lp; j <= (i * d + l - 1) / lp && j < num_blocks; ++j) {
        score[j] += p[i] * overlap_weight(cfg, i, j);
      }
    }
  }
  return score;
}

std::vector<int32_t> selected_set(const nsa_config& cfg, int64_t t,
                                  const std::vector<double>& scores) {
  const int64_t n = cfg.slc_count;
  const int64_t last = t / cfg.slc_block;  // J: the query's own block
  std::vector<int32_t> chosen;
  if (last + 1 <= n) {
    // Fewer eligible blocks than n: all of them (SPEC 4.3).
    chosen.resize(last + 1);
    std::iota(chosen.begin(), chosen.end(), 0);
  } else {
    std::vector<char> forced(last + 1, 0);
    for (int64_t j = 0; j < cfg.slc_init && j <= last; ++j) forced[j] = 1;
    for (int64_t j = std::max<int64_t>(0, last - cfg.slc_local + 1); j <= last; ++j) forced[j] = 1;
    std::vector<int32_t> candidates;
    for (int64_t j = 0; j <= last; ++j) {
      if (forced[j]) {
        chosen.push_back(static_cast<int32_t>(j));
      } else {
        candidates.push_back(static_cast<int32_t>(j));
      }
    }
    // A NaN score ranks below every number, so it never displaces a real one.
    auto key = [&](int32_t j) {
      return std::isnan(scores[j]) ? -std::numeric_limits<double>::infinity() : scores[j];
    };
    // Largest score first; equal scores in ascending index order (ties to the lower index). A
    // strict total order, so std::sort needs no temporary buffer (std::stable_sort's may fail to
    // allocate and silently fall back).
    std::sort(candidates.begin(), candidates.end(),
              [&](int32_t a, int32_t b) { return key(a) > key(b) || (key(a) == key(b) && a < b); });
    const int64_t room = n - static_cast<int64_t>(chosen.size());
    for (int64_t r = 0; r < room && r < static_cast<int64_t>(candidates.size()); ++r) {
      chosen.push_back(candidates[r]);
    }
  }
  std::sort(chosen.begin(), chosen.end());
  return chosen;
}

std::vector<int32_t> select_blocks(const nsa_config& cfg, int64_t t,
                                   const std::vector<double>& scores) {
  std::vector<int32_t> chosen = selected_set(cfg, t, scores);
  chosen.resize(cfg.slc_count, -1);
  return chosen;
}

std::vector<int32_t> as_block_set(std::vector<int32_t> entries) {
  std::erase_if(entries, [](int32_t j) { return j < 0; });
  std::sort(entries.begin(), entries.end());
  entries.erase(std::unique(entries.begin(), entries.end()), entries.end());
  return entries;
}

Attention attend(const std::vector<double>& q, const std::vector<std::vector<double>>& keys,
                 const std::vector<std::vector<double>>& values, double scale) {
  Attention a;
  const size_t dv = values.empty() ? 0 : values[0].size();
  if (keys.empty()) {
    a.lse = -std::numeric_limits<double>::infinity();
    return a;  // o stays empty; the caller treats it as zeros
  }
  std::vector<double> s(keys.size());
  double max_s = -std::numeric_limits<double>::infinity();
  for (size_t p = 0; p < keys.size(); ++p) {
    double dot = 0.0;
    for (size_t i = 0; i < q.size(); ++i) dot += q[i] * keys[p][i];
    s[p] = scale * dot;
    // A maximum that keeps NaN: std::max drops it, so an all-NaN row would pass for an all -inf
    // (empty) one. A NaN max makes every weight, the lse and o NaN, as a +inf max does through
    // exp(inf - inf) (README "Non-finite inputs").
    if (std::isnan(s[p]) || s[p] > max_s) max_s = s[p];
  }
  a.p.assign(keys.size(), 0.0);
  a.o.assign(dv, 0.0);
  if (max_s == -std::numeric_limits<double>::infinity()) {
    // Every score -inf: no key has weight, the branch is empty (lse = -inf, never NaN). o still
    // sums 0 * v below, so a NaN value in the key set shows, as on the CPU.
    a.lse = max_s;
  } else {
    // Shift by the maximum so exp never overflows; a -inf score gets weight exp(-inf) = 0.
    double sum = 0.0;
    for (size_t p = 0; p < keys.size(); ++p) {
      a.p[p] = std::exp(s[p] - max_s);
      sum += a.p[p];
    }
    a.lse = max_s + std::log(sum);
    for (double& w : a.p) w /= sum;
  }
  for (size_t p = 0; p < keys.size(); ++p) {
    for (size_t i = 0; i < dv; ++i) a.o[i] += a.p[p] * values[p][i];
  }
  return a;
}

}  // namespace nsa::ref
