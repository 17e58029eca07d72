// The CPU backend's internal interface: the inner loops, element access, per-thread scratch and
// the per-step kernels of SPEC.md section 4, each for the G query heads of one KV group at one
// query position (one "group", the unit of work of forward.cc).
//
// Accumulation is float32 for f32 and bf16 inputs alike (bf16 -> f32 is exact). The inner loops
// (dot, axpy, scale_by) are plain C++ the compiler can vectorise; a later SIMD backend with
// runtime dispatch replaces them here, in one place.
#pragma once

#include <chrono>
#include <cmath>
#include <cstdint>
#include <limits>

#include "common/dtype.h"
#include "common/problem.h"

namespace nsa::cpu {

// Runtime dispatch for the plain-loop kernels: GCC compiles each marked function once per target
// and picks the best one at load time (function multiversioning), so the inlined loops below
// run on AVX-512 or AVX2 where the CPU has them and the binary still runs everywhere.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define NSA_CPU_DISPATCH __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define NSA_CPU_DISPATCH
#endif

// ---- Inner loops. ----

// Independent partial sums: the compiler may not reorder a float reduction on its own, so the
// reordering is written out, with a fixed summation tree (the result depends on n only, never on
// the thread that runs it). 16 lanes fill one AVX-512 register or four SSE ones.
constexpr int kLanes = 16;

inline float dot(const float* a, const float* b, int64_t n) {
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int u = 0; u < kLanes; ++u) acc[u] += a[i + u] * b[i + u];
  }
  for (int u = 0; i < n; ++i, ++u) acc[u] += a[i] * b[i];
  for (int w = kLanes / 2; w > 0; w /= 2) {
    for (int u = 0; u < w; ++u) acc[u] += acc[u + w];
  }
  return acc[0];
}

// y += a * x
inline void axpy(float a, const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

// y += a[0] x[0] + a[1] x[1] + a[2] x[2] + a[3] x[3]: y is loaded and stored once for four rows
// (the P V product is bound by those stores otherwise).
inline void axpy4(const float* a, const float* const* x, float* y, int64_t n) {
  const float a0 = a[0], a1 = a[1], a2 = a[2], a3 = a[3];
  const float *x0 = x[0], *x1 = x[1], *x2 = x[2], *x3 = x[3];
  for (int64_t i = 0; i < n; ++i) y[i] += (a0 * x0[i] + a1 * x1[i]) + (a2 * x2[i] + a3 * x3[i]);
}

// y *= a
inline void scale_by(float a, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] *= a;
}

inline void fill(float v, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = v;
}

// max(a, b), NaN if either is NaN. std::max(a, b) drops a NaN b, so a row of NaN scores would
// look like a row of -inf ones (empty) and its NaN would vanish; a NaN score must instead make
// its branch NaN, as in the reference (README "Non-finite inputs").
inline float max_nan(float a, float b) { return (a > b || a != a) ? a : b; }

// ---- Element access (offsets from offset_of, so strided views work). ----

// The n elements at `off` of a float tensor as f32: a pointer into the tensor when it holds f32
// (no copy), else the row converted into `buf`.
inline const float* row_f32(const nsa_tensor& t, int64_t off, int64_t n, float* buf) {
  if (t.dtype == NSA_DTYPE_F32) return static_cast<const float*>(t.data) + off;
  const uint16_t* src = static_cast<const uint16_t*>(t.data) + off;
  for (int64_t i = 0; i < n; ++i) buf[i] = bf16_to_f32(src[i]);
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
  return bf16_to_f32(static_cast<const uint16_t*>(t.data)[off]);
}

// Writes n floats at `off`, rounding to the tensor's dtype (f32 or bf16).
inline void store_row(const nsa_tensor& t, int64_t off, const float* src, int64_t n) {
  if (t.dtype == NSA_DTYPE_F32) {
    float* dst = static_cast<float*>(t.data) + off;
    for (int64_t i = 0; i < n; ++i) dst[i] = src[i];
  } else {
    uint16_t* dst = static_cast<uint16_t*>(t.data) + off;
    for (int64_t i = 0; i < n; ++i) dst[i] = f32_to_bf16(src[i]);
  }
}

// ---- Stage timing (nsa_fwd_profile). ----

enum Stage { kStagePack, kStageCmp, kStageScores, kStageTopn, kStageSlc, kStageWin,
             kStageCombine, kStageCount };

// One thread's stage clock: lap(stage) adds the time since the previous lap to that stage. With
// no sink (profiling off) it reads no clock.
class StageClock {
 public:
  explicit StageClock(double* sink) : sink_(sink) {
    if (sink_) last_ = std::chrono::steady_clock::now();
  }
  void lap(Stage stage) {
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
  double* fields[kStageCount] = {&out->pack_s, &out->cmp_s,  &out->scores_s, &out->topn_s,
                                 &out->slc_s,  &out->win_s,  &out->combine_s};
  for (int t = 0; t < threads; ++t) {
    for (int k = 0; k < kStageCount; ++k) *fields[k] += per_thread[t * kStageCount + k];
  }
}

// ---- One work item and its scratch. ----

// Keys per tile of the online softmax (slc, win): scores of a tile for all G heads stay in L1.
constexpr int64_t kTile = 64;

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// The G query heads hk*G .. hk*G + G-1 at position t of sequence `seq` (SPEC 4).
struct Group {
  const FwdProblem* pr = nullptr;
  const Sequence* seq = nullptr;
  int64_t t = 0;    // position inside the sequence
  int64_t tok = 0;  // row along T: seq->start + t
  int64_t hk = 0;   // KV head
};

// Per-thread scratch, carved by forward.cc from one allocation made before the parallel region
// (nothing allocates inside it). Sizes grow as T, never as T^2.
struct Scratch {
  float* q = nullptr;        // [G, Dk] the group's queries
  float* kbuf = nullptr;     // [kTile, Dk] bf16 key rows converted to f32
  float* vbuf = nullptr;     // [kTile, Dv] bf16 value rows converted, or one output row
  float* s = nullptr;        // [G, max(kTile, Tc_max)] scores, then probabilities
  float* p_sum = nullptr;    // [Tc_max] cmp probabilities summed over the group
  float* m = nullptr;        // [G] online softmax: running maximum
  float* l = nullptr;        // [G] online softmax: running sum
  float* o_cmp = nullptr;    // [G, Dv] the branch outputs
  float* o_slc = nullptr;
  float* o_win = nullptr;
  float* lse_cmp = nullptr;  // [G]
  float* lse_slc = nullptr;
  float* lse_win = nullptr;
  float* score = nullptr;    // [J_max + 1] block scores (SPEC 4.2)
  int32_t* cand = nullptr;   // [J_max + 1] top-n candidates
  int32_t* blocks = nullptr; // [min(n, J_max + 1)] the selected set, sorted (SPEC 4.3)
  int64_t num_blocks = 0;    // its size; indices_out pads it with -1 to n
  int64_t s_stride = 0;      // row stride of `s`
};

// ---- The steps of SPEC 4 (one file each). ----

// cmp.cc: |C_t|, the compressed tokens visible at position t (SPEC 4.1).
int64_t visible_cmp_count(const nsa_config& cfg, int64_t t);

// cmp.cc, step 2: score[0 .. t / l'] from the group-summed probabilities p_sum[0 .. nc) of the
// nc visible compressed tokens (Eq. 9 with the overlap weights of SPEC 4.2).
void block_scores(const nsa_config& cfg, int64_t t, int64_t nc, const float* p_sum,
                  float* score);

// cmp.cc, steps 1-2: o_cmp, lse_cmp and the group-summed block scores score[0 .. t/l'].
void cmp_attend(const Group& g, Scratch& s);

// topk.cc, step 3: blocks[0 .. num_blocks) from the scores or from slc_indices_in; writes
// slc_indices_out.
void slc_select(const Group& g, Scratch& s);

// slc.cc, step 4: o_slc, lse_slc over the selected blocks.
void slc_attend(const Group& g, Scratch& s);

// forward_lanes.cc: the whole forward with the G heads of a group in SIMD lanes (for G large
// enough to fill them). Returns false when its buffers cannot be allocated.
bool forward_lanes(const FwdProblem& pr);
// Whether the lanes kernels serve groups of G heads on this CPU.
bool lanes_suit(int64_t G);

// win.cc, step 5: o_win, lse_win over the sliding window.
void win_attend(const Group& g, Scratch& s);

// win.cc: online-softmax attention of the group over keys [first, end) of its sequence, added to
// the running state (m, l, acc [G, Dv]). The window is one such span; the selection is several.
void attend_span(const Group& g, const nsa_tensor& k, const nsa_tensor& v, int64_t first,
                 int64_t end, Scratch& s, float* acc);

// Starts an empty online softmax for G heads: m = -inf, l = 0, acc = 0.
inline void softmax_begin(int64_t G, int64_t Dv, Scratch& s, float* acc) {
  fill(kNegInf, s.m, G);
  fill(0.0f, s.l, G);
  fill(0.0f, acc, G * Dv);
}

// Normalises acc into the branch output; an empty branch gives o = 0, lse = -inf (SPEC 4.1).
inline void softmax_finish(int64_t G, int64_t Dv, Scratch& s, float* acc, float* lse) {
  for (int64_t h = 0; h < G; ++h) {
    if (s.l[h] == 0.0f) {
      // No key, or every score -inf: empty. acc holds sum 0 * v, which is 0 unless a value in
      // the key set is NaN or infinite (then that channel stays NaN, as in the reference).
      lse[h] = kNegInf;
    } else {
      // l is NaN after a NaN or +inf score: o and lse become NaN, not the empty branch's -inf.
      scale_by(1.0f / s.l[h], acc + h * Dv, Dv);
      lse[h] = s.m[h] + std::log(s.l[h]);
    }
  }
}

// combine.cc, step 6: o = g_cmp o_cmp + g_slc o_slc + g_win o_win, and the optional outputs.
void combine(const Group& g, Scratch& s);

}  // namespace nsa::cpu
