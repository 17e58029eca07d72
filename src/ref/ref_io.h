// Row access for the reference: tensors of any float dtype read as double.
#pragma once

#include <vector>

#include "common/dtype.h"
#include "common/problem.h"

namespace nsa::ref {

// Elements [i0, i1, i2, 0 .. n) of a 4-D float tensor, as double.
inline std::vector<double> load_row(const nsa_tensor& t, int64_t i0, int64_t i1, int64_t i2,
                                    int64_t n) {
  std::vector<double> row(n);
  const int64_t base = offset_of(t, i0, i1, i2);
  for (int64_t i = 0; i < n; ++i) row[i] = load_as_double(t.data, t.dtype, base + i);
  return row;
}

// Writes row[0 .. n) (zeros past row.size(): an empty branch's output) to [i0, i1, i2, :].
inline void store_row(const nsa_tensor& t, int64_t i0, int64_t i1, int64_t i2,
                      const std::vector<double>& row, int64_t n) {
  const int64_t base = offset_of(t, i0, i1, i2);
  for (int64_t i = 0; i < n; ++i) {
    store_from_double(t.data, t.dtype, base + i,
                      i < static_cast<int64_t>(row.size()) ? row[i] : 0.0);
  }
}

}  // namespace nsa::ref
