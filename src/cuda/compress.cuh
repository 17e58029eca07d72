// The mean compression's block code (SPEC 5), shared by compress.cu and the CPU emulation of the
// kernels (tests/test_cuda_emu.cc): where a compressed row's raw tokens are, and their average.
#pragma once

#include "cuda/compress.h"
#include "cuda/elem.cuh"
#include "cuda/seqs.cuh"

namespace nsa::cuda {

constexpr int kCmpThreads = 128;

// Compressed row r of out: its batch row and the raw token row of its block's first token, or
// !ok when cu_seqlens does not place it (invalid contents: the row is left as it was).
struct CmpRow {
  int64_t b = 0, row = 0, first = 0;  // batch row, row of out, first raw token's row of x
  bool ok = false;
};

__device__ inline CmpRow place_row(const CmpArgs& a, int64_t r) {
  CmpRow c;
  if (a.cu == nullptr) {
    c.b = r / a.Tc;
    c.row = a.row0 + r % a.Tc;
    c.first = c.row * a.d;
    c.ok = true;
    return c;
  }
  int64_t cmp_start = 0;
  for (int64_t s = 0; s < a.S; ++s) {
    const int64_t begin = a.cu[s], end = a.cu[s + 1];
    const int64_t n = end > begin ? cmp_len(end - begin, a.l, a.d) : 0;
    if (r < cmp_start + n) {
      c.row = r;
      c.first = begin + (r - cmp_start) * a.d;
      c.ok = begin >= 0 && end <= a.T;
      return c;
    }
    cmp_start += n;
  }
  return c;
}

// SPEC 5 mean: compressed row c of head h, the average of its block's l rows.
__device__ inline void mean_row(const CmpArgs& a, const CmpRow& c, int64_t h) {
  const float inv_l = 1.0f / float(a.l);
  for (int64_t x = threadIdx.x; x < a.D; x += kCmpThreads) {
    float acc = 0.0f;
    for (int64_t u = 0; u < a.l; ++u) {
      acc += ld_any(a.x, a.x_el, c.b * a.xs0 + (c.first + u) * a.xs1 + h * a.xs2 + x);
    }
    st_any(a.out, a.out_el, c.b * a.os0 + c.row * a.os1 + h * a.os2 + x, acc * inv_l);
  }
}

// Compressed row blockIdx.x of head blockIdx.y, where the problem places it.
__device__ inline void mean_block(const CmpArgs& a) {
  const CmpRow c = place_row(a, blockIdx.x);
  if (c.ok) mean_row(a, c, blockIdx.y);
}

}  // namespace nsa::cuda
