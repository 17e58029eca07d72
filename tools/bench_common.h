// Shared by the `nsa bench` commands: the keys a query attends, and robust timing.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <vector>

#include "nsa/nsa.h"

// Keys attended by the query at position t, summed over the three branches (SPEC 4).
inline double attended_keys(const nsa_config& c, int64_t t) {
  const double cmp = t + 1 >= c.cmp_block ? double((t + 1 - c.cmp_block) / c.cmp_stride + 1) : 0;
  const int64_t blocks = t / c.slc_block + 1;
  // All blocks when they fit in n; otherwise n blocks, the query's own (forced, partial) among
  // them when n_local >= 1.
  const double slc = blocks <= c.slc_count ? double(t + 1)
                     : c.slc_local >= 1    ? double(c.slc_count - 1) * c.slc_block + double(t % c.slc_block + 1)
                                           : double(c.slc_count) * c.slc_block;
  const double win = double(std::min<int64_t>(c.window, t + 1));
  return cmp + slc + win;
}

// The median over `repeats` measurements of the mean time of `steps` calls of run, in ms, after
// one warm-up call (first-touch page faults and caches).
template <typename F>
double median_of_means_ms(int repeats, int steps, F&& run) {
  run();
  std::vector<double> ms;
  for (int r = 0; r < repeats; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int s = 0; s < steps; ++s) run();
    const auto t1 = std::chrono::steady_clock::now();
    ms.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count() / steps);
  }
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}
