// The CPU backend's internal interface: plain inner loops (compress.cc), element access, stage
// timing, and the steps of SPEC.md section 4 shared by the kernels: the selection (topk.cc)
// and the forward itself (forward_lanes.cc, SIMD with runtime dispatch).
//
// Accumulation is float32 for f32 and bf16 inputs alike (bf16 -> f32 is exact).
#pragma once

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <limits>

#include "common/dtype.h"
#include "common/problem.h"

namespace nsa::cpu {

// ---- Inner loops. ----

// y += a * x
inline void axpy(float a, const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

// y *= a
inline void scale_by(float a, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] *= a;
}

inline void fill(float v, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = v;
}

// ---- Scratch sizes. ----

// *out = a * b for element counts of scratch buffers; false when either is negative or the
// product overflows int64, which the caller reports as out of memory instead of allocating a
// wrapped size. Scratch is allocated before any parallel region (an exception cannot leave an
// OpenMP region: it would terminate the process) and before any output is written (a failed
// call writes nothing); per-thread scratch is one buffer of threads * per_thread elements.
// Products past 2^56 elements (more than any machine holds) count as overflow too: they stay
// below every std::vector's max_size, which would otherwise throw std::length_error.
inline bool mul_size(int64_t a, int64_t b, int64_t* out) {
  return a >= 0 && b >= 0 && !__builtin_mul_overflow(a, b, out) && *out <= (int64_t{1} << 56);
}

// Compressed tokens per chunk of the mlp compression (forward and backward, SPEC 5): up to 256,
// and no more than the longest sequence has, so that scratch is what the call needs (with
// cmp_stride 4096 the backward's token window for 256 rows would hold a million tokens, for a
// call of a few). Every sequence is cut into the same chunks as with 256, so the bits agree.
inline int64_t mlp_chunk_rows(const std::vector<Sequence>& seqs) {
  int64_t rows = 1;
  for (const Sequence& s : seqs) rows = std::max(rows, s.cmp_len);
  return std::min<int64_t>(rows, 256);
}

// ---- Element access (offsets from offset_of, so strided views work). ----

// The n elements at `off` of a float tensor as f32: a pointer into the tensor when it holds f32
// (no copy), else the row widened (exactly) into `buf`.
inline const float* row_f32(const nsa_tensor& t, int64_t off, int64_t n, float* buf) {
  if (t.dtype == NSA_DTYPE_F32) return static_cast<const float*>(t.data) + off;
  const uint16_t* src = static_cast<const uint16_t*>(t.data) + off;
  if (t.dtype == NSA_DTYPE_F16) {
    for (int64_t i = 0; i < n; ++i) buf[i] = f16_to_f32(src[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) buf[i] = bf16_to_f32(src[i]);
  }
  return buf;
}

// Like row_f32, but always copies into dst.
inline void load_row(const nsa_tensor& t, int64_t off, int64_t n, float* dst) {
  const float* src = row_f32(t, off, n, dst);
  if (src != dst) {
    for (int64_t i = 0; i < n; ++i) dst[i] = src[i];
  }
}

inline float load_f32(const nsa_tensor& t, int64_t off) {
  if (t.dtype == NSA_DTYPE_F32) return static_cast<const float*>(t.data)[off];
  const uint16_t h = static_cast<const uint16_t*>(t.data)[off];
  return t.dtype == NSA_DTYPE_F16 ? f16_to_f32(h) : bf16_to_f32(h);
}

// Writes n floats at `off`, rounding to the tensor's dtype (f32, bf16 or f16).
inline void store_row(const nsa_tensor& t, int64_t off, const float* src, int64_t n) {
  if (t.dtype == NSA_DTYPE_F32) {
    float* dst = static_cast<float*>(t.data) + off;
    for (int64_t i = 0; i < n; ++i) dst[i] = src[i];
  } else if (t.dtype == NSA_DTYPE_F16) {
    uint16_t* dst = static_cast<uint16_t*>(t.data) + off;
    for (int64_t i = 0; i < n; ++i) dst[i] = f32_to_f16(src[i]);
  } else {
    uint16_t* dst = static_cast<uint16_t*>(t.data) + off;
    for (int64_t i = 0; i < n; ++i) dst[i] = f32_to_bf16(src[i]);
  }
}

// ---- Stage timing (nsa_fwd_profile). ----

enum Stage {
  kStagePack,
  kStageCmp,
  kStageScores,
  kStageTopn,
  kStageSlc,
  kStageWin,
  kStageCombine,
  kStageCount
};

// One thread's stage clock: lap(stage) adds the time since the previous lap to that stage. With
// no sink (profiling off) it reads no clock.
class StageClock {
 public:
  explicit StageClock(double* sink) : sink_(sink) {
    if (sink_) last_ = std::chrono::steady_clock::now();
  }
  void lap(int stage) {  // a Stage, or another op's stage index into its sink
    if (!sink_) return;
    const auto now = std::chrono::steady_clock::now();
    sink_[stage] += std::chrono::duration<double>(now - last_).count();
    last_ = now;
  }

 private:
  double* sink_;
  std::chrono::steady_clock::time_point last_{};
};

// Adds per-thread stage sums ([threads][kStageCount]) into the caller's profile.
inline void add_stage_times(const double* per_thread, int threads, nsa_fwd_profile* out) {
  double* fields[kStageCount] = {&out->pack_s, &out->cmp_s, &out->scores_s, &out->topn_s,
                                 &out->slc_s,  &out->win_s, &out->combine_s};
  for (int t = 0; t < threads; ++t) {
    for (int k = 0; k < kStageCount; ++k) *fields[k] += per_thread[t * kStageCount + k];
  }
}

// ---- One work item and its scratch. ----

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// The G query heads hk*G .. hk*G + G-1 at position t of sequence `seq` (SPEC 4).
struct Group {
  const FwdProblem* pr = nullptr;
  const Sequence* seq = nullptr;
  int64_t t = 0;    // position inside the sequence
  int64_t tok = 0;  // row along T: seq->start + t
  int64_t hk = 0;   // KV head
};

// One position's selection state (topk.cc): block scores in, the selected set out. Buffers are
// carved by forward_lanes.cc from one allocation made before the parallel region.
struct Scratch {
  float* score = nullptr;     // [J_max + 1] block scores (SPEC 4.2)
  int32_t* cand = nullptr;    // [J_max + 1] top-n candidates
  int32_t* blocks = nullptr;  // [min(n, J_max + 1)] the selected set, sorted (SPEC 4.3)
  int64_t num_blocks = 0;     // its size; indices_out pads it with -1 to n
};

// ---- The steps of SPEC 4. ----

// |C_t|: compressed token i is visible once complete, i*d + l - 1 <= t (SPEC 4.1).
inline int64_t visible_cmp_count(const nsa_config& cfg, int64_t t) {
  const int64_t l = cfg.cmp_block, d = cfg.cmp_stride;
  return t + 1 >= l ? (t + 1 - l) / d + 1 : 0;
}

// topk.cc, step 3 from block scores: I_t = F_t plus the n - |F_t| best-scoring other blocks,
// ties to the lower index, into blocks (sorted); returns its size, min(n, t / l' + 1). cand has
// room for t / l' + 1 entries.
int64_t top_blocks(const nsa_config& cfg, int64_t t, const float* score, int32_t* cand,
                   int32_t* blocks);

// topk.cc, step 3: blocks[0 .. num_blocks) from the scores or from slc_indices_in; writes
// slc_indices_out.
void slc_select(const Group& g, Scratch& s);

// forward_lanes.cc: every step, with the G heads of a group in SIMD lanes. Returns false when
// its buffers cannot be allocated.
bool forward_lanes(const FwdProblem& pr);

}  // namespace nsa::cpu
