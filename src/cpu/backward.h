// The CPU backward of NSA attention (SPEC.md section 6): what its setup (backward.cc) hands to
// its kernels (backward_lanes.cc).
//
// Like FlashAttention-2's backward (Dao 2023, Alg. 2), it starts from the forward's saved state:
// per (row, branch) the LSE and the ungated branch output O_c, from which
// D_c = g_c do . O_c and dg_c = do . O_c are O(Dv) per row. The caller passes them (nsa_fwd's
// lse_* and o_*); when any is missing, backward.cc runs the CPU forward once, with the saved
// selection, to produce them. The kernels then make one pass over the (query, key) pairs.
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

struct State {
  const BwdProblem* pr = nullptr;
  View q, d_o;
  View gate[3];      // g_cmp, g_slc, g_win: [B, T, Hq]
  View lse[3];       // the forward's per-branch LSEs [B, T, Hq] (-inf: empty branch)
  View o_branch[3];  // the forward's ungated branch outputs [B, T, Hq, Dv]
  int threads = 1;
};

// The selected set of row (b, tok, KV head hk) from slc_indices: -1 dropped, duplicates once,
// ascending (SPEC 4.3); returns the count. `room` (the size of `out`) must exceed the number of
// distinct blocks the row can name (t / l' + 1); it need not reach n, which may be huge.
int64_t selected_set(const BwdProblem& pr, int64_t b, int64_t tok, int64_t hk, int32_t* out,
                     int64_t room);

// The kernels (backward_lanes.cc, Highway with runtime dispatch). Returns false when out of
// memory (nothing is allocated inside the parallel region).
bool backward_lanes(const State& st);

}  // namespace nsa::cpu::bwd
