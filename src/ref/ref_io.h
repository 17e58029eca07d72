// Row access for the reference: tensors of any float dtype read as double.
#pragma once

#include <vector>

#include "common/dtype.h"
#include "common/problem.h"
#include "ref/tensor64.h"

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

// A float64 copy of a float tensor of rank 1 to 4 (the reference backward's working form).
inline Tensor64 load_tensor(const nsa_tensor& t) {
  int64_t n[4] = {1, 1, 1, 1};
  for (int i = 0; i < t.ndim; ++i) n[i] = t.shape[i];
  Tensor64 x(n[0], n[1], n[2], n[3]);
  for (int64_t a = 0; a < n[0]; ++a)
    for (int64_t b = 0; b < n[1]; ++b)
      for (int64_t c = 0; c < n[2]; ++c)
        for (int64_t d = 0; d < n[3]; ++d)
          x.at(a, b, c, d) = load_as_double(t.data, t.dtype, offset_of(t, a, b, c, d));
  return x;
}

// Writes every element of `x` to the float tensor `t` of the same shape, rounding to its dtype.
inline void store_tensor(const Tensor64& x, const nsa_tensor& t) {
  for (int64_t a = 0; a < x.shape[0]; ++a)
    for (int64_t b = 0; b < x.shape[1]; ++b)
      for (int64_t c = 0; c < x.shape[2]; ++c)
        for (int64_t d = 0; d < x.shape[3]; ++d)
          store_from_double(t.data, t.dtype, offset_of(t, a, b, c, d), x.at(a, b, c, d));
}

}  // namespace nsa::ref
