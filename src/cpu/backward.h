// The CPU backward of NSA attention (SPEC.md section 6): shared state of its two passes.
//
// Pass 1 (backward.cc), owned by query tiles: per (query row, branch) the softmax is recomputed
// (from the saved LSE when given), giving dq, dg_c = do . o_c and D_c = sum_j P_j dP_j, which is
// stored per (row, branch) for pass 2. Pass 2 (backward_keys.cc), owned by key blocks: each key
// accumulates its dk/dv from exactly the queries that read it, recomputing P and dS from the
// query's LSE and D_c (FlashAttention-2's recompute-instead-of-store, Dao 2023). Every output
// element has one owner that sums in a fixed order, so results are bitwise the same for any
// thread count, with no atomics.
#pragma once

#include <cstdint>
#include <vector>

#include "common/problem.h"

namespace nsa::cpu::bwd {

constexpr int kCmp = 0, kSlc = 1, kWin = 2;  // the branches of SPEC 4 (steps 1, 4, 5)

// A float input as f32 rows: the caller's memory when it is f32 (the innermost dimension is
// contiguous, so a row is a plain pointer), else a contiguous f32 copy made once (bf16 -> f32 is
// exact), so that no hot loop converts.
struct View {
  const float* base = nullptr;
  int64_t s0 = 0, s1 = 0, s2 = 0;
  std::vector<float> owned;
  const float* row(int64_t i0, int64_t i1, int64_t i2) const {
    return base + i0 * s0 + i1 * s1 + i2 * s2;
  }
};
void make_view(const nsa_tensor& t, View* v);

struct Inputs {
  View q, d_o, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win;
  View gate[3];  // g_cmp, g_slc, g_win
};

// The selection inverted (SPEC 6: I_t fixed): for every (sequence, KV head, selection block),
// the positions t whose I_t holds the block, ascending. Counting sort over t; size sum |I_t|.
struct SlcInverse {
  std::vector<int64_t> pair_base;  // [S * Hkv]: first block slot of (sequence, KV head)
  std::vector<int64_t> offset;     // [slots + 1]: start of each block's list in `queries`
  std::vector<int32_t> queries;    // positions inside the sequence
};

struct State {
  const BwdProblem* pr = nullptr;
  Inputs in;
  SlcInverse inv;
  // Per (row = (b, tok, h), branch): the LSE used (saved or recomputed) and D_c = g_c * sum_j
  // P_j dP_j (dP with the ungated do). O(B T Hq) floats each.
  std::vector<float> lse, dsum;
  int threads = 1;
  int64_t max_len = 0;  // the longest sequence: every branch of a row reads at most this many keys
  int64_t slot(int64_t b, int64_t tok, int64_t h, int c) const {
    return ((b * pr->T + tok) * pr->Hq + h) * 3 + c;
  }
};

// The selected set of row (b, tok, KV head hk) from slc_indices: -1 dropped, duplicates once,
// ascending (SPEC 4.3). Writes up to n blocks into `out`; returns the count.
int64_t selected_set(const BwdProblem& pr, int64_t b, int64_t tok, int64_t hk, int32_t* out);

// Eight floats as one GCC vector: one AVX register in the AVX2/AVX-512 clones of the hot loops
// (target_clones), two SSE registers in the baseline one. Measured: the same dot written with a
// float[8] array was left mostly scalar by GCC (lane shuffles per step), 60% of the run time.
typedef float F8 __attribute__((vector_size(32)));

// acc += x[0..8) * y[0..8) (unaligned loads; no F8 crosses a call, which would change the ABI).
inline void mul_add8(const float* x, const float* y, F8* acc) {
  F8 a, b;
  __builtin_memcpy(&a, x, sizeof a);
  __builtin_memcpy(&b, y, sizeof b);
  *acc += a * b;
}

// dot(x, y) over n floats with 16 partial sums in a fixed order (results do not depend on the
// thread), reduced in a fixed tree.
inline float dot(const float* x, const float* y, int64_t n) {
  F8 a = {0, 0, 0, 0, 0, 0, 0, 0}, b = a;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    mul_add8(x + i, y + i, &a);
    mul_add8(x + i + 8, y + i + 8, &b);
  }
  if (i + 8 <= n) {
    mul_add8(x + i, y + i, &a);
    i += 8;
  }
  a += b;
  float tail = 0.0f;
  for (; i < n; ++i) tail += x[i] * y[i];
  return (((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]))) + tail;
}

// out[r] = dot(x, y[r]) for four rows y[0..3]: x is loaded once for the four (register blocking:
// the loads, not the multiply-adds, bound these loops). Each out[r] sums in dot's order.
inline void dot4(const float* x, const float* const* y, int64_t n, float* out) {
  F8 a[4] = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    F8 xv;
    __builtin_memcpy(&xv, x + i, sizeof xv);
    for (int r = 0; r < 4; ++r) {
      F8 yv;
      __builtin_memcpy(&yv, y[r] + i, sizeof yv);
      a[r] += xv * yv;
    }
  }
  for (int r = 0; r < 4; ++r) {
    float tail = 0.0f;
    for (int64_t k = i; k < n; ++k) tail += x[k] * y[r][k];
    const F8& v = a[r];
    out[r] = (((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]))) + tail;
  }
}

// y += c[0] x[0] + c[1] x[1] + c[2] x[2] + c[3] x[3]: one load and store of y per four rows.
inline void axpy4(const float* c, const float* const* x, float* y, int64_t n) {
  const float c0 = c[0], c1 = c[1], c2 = c[2], c3 = c[3];
  const float *x0 = x[0], *x1 = x[1], *x2 = x[2], *x3 = x[3];
  for (int64_t i = 0; i < n; ++i) y[i] += (c0 * x0[i] + c1 * x1[i]) + (c2 * x2[i] + c3 * x3[i]);
}

// Pass 2: dk/dv of the raw branches (slc, win) and of the compressed tokens. Its scratch is
// allocated before the parallel region (std::bad_alloc reaches backward(), never a thread).
void key_pass(const State& st);

}  // namespace nsa::cpu::bwd
