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

// dot(x, y) over n floats with 8 independent partial sums: the order is fixed (so results do not
// depend on the thread), and the compiler can keep the partial sums in one vector.
inline float dot(const float* x, const float* y, int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int j = 0; j < 8; ++j) acc[j] += x[i + j] * y[i + j];
  }
  for (; i < n; ++i) acc[i & 7] += x[i] * y[i];
  return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

// Pass 2: dk/dv of the raw branches (slc, win) and of the compressed tokens. Its scratch is
// allocated before the parallel region (std::bad_alloc reaches backward(), never a thread).
void key_pass(const State& st);

}  // namespace nsa::cpu::bwd
