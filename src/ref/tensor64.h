// Tensor64: a contiguous row-major float64 array, the working form of the reference backward's
// arguments. The C API converts f32/bf16 tensors to it once; the finite-difference tests build it
// directly, so that their central differences are not swamped by float32 rounding.
#pragma once

#include <cstdint>
#include <vector>

namespace nsa::ref {

struct Tensor64 {
  int64_t shape[4] = {0, 1, 1, 1};  // unused trailing sizes are 1
  std::vector<double> data;

  Tensor64() = default;
  // Zeros of shape [d0, d1, d2, d3].
  explicit Tensor64(int64_t d0, int64_t d1 = 1, int64_t d2 = 1, int64_t d3 = 1)
      : shape{d0, d1, d2, d3}, data(static_cast<size_t>(d0 * d1 * d2 * d3), 0.0) {}

  int64_t index(int64_t i0, int64_t i1 = 0, int64_t i2 = 0, int64_t i3 = 0) const {
    return ((i0 * shape[1] + i1) * shape[2] + i2) * shape[3] + i3;
  }
  double& at(int64_t i0, int64_t i1 = 0, int64_t i2 = 0, int64_t i3 = 0) {
    return data[index(i0, i1, i2, i3)];
  }
  double at(int64_t i0, int64_t i1 = 0, int64_t i2 = 0, int64_t i3 = 0) const {
    return data[index(i0, i1, i2, i3)];
  }
  // The innermost row [i0, i1, i2, :].
  double* row(int64_t i0, int64_t i1, int64_t i2 = 0) { return &data[index(i0, i1, i2)]; }
  const double* row(int64_t i0, int64_t i1, int64_t i2 = 0) const {
    return &data[index(i0, i1, i2)];
  }
};

}  // namespace nsa::ref
