// Split-key decode (FlashDecoding): when a step's (row, KV head) blocks are too few to fill the
// device (batch 1 at 64k is 4 blocks for 132 SMs), each branch's keys are split across blocks
// and the parts merged by their LSEs. NSA's selection needs the whole cmp softmax before any slc
// key is read (SPEC 4 steps 2-3), so a step is five launches, each over (row, KV head, part):
//   1. cmp_part:  the cmp branch over part z of the compressed tokens: o and LSE of the part;
//   2. probs:     the merged cmp LSE (every part's block merges it the same way), then Eq. 10's
//                 group probabilities of its compressed tokens, written to scratch;
//   3. select:    Eq. 9's block scores from them, in the forward's token order, and the top-n;
//   4. sw_part:   the slc branch over a share of the selected blocks, or win over a share of the
//                 window: o and LSE of each part;
//   5. combine:   each branch merged from its parts, gated and summed (SPEC 4 step 6).
// The dense baseline is two: its keys in parts, then the merge. Every merge runs in part order,
// so a step gives the same bits on every run; they are not the single-block path's bits (the
// LSE of a merge rounds differently from one online softmax), which is why the plan depends only
// on the step's shape and the device, never on timing.
#pragma once

#include <algorithm>

#include "cuda/decode.cuh"

namespace nsa::cuda {
namespace {

// Parts per branch (dense: win only). All zero: no split, the single-block path.
struct SplitPlan {
  int cmp = 0, slc = 0, win = 0;
  __host__ __device__ int parts() const { return cmp + slc + win; }
};

// Below this many keys a block's work is short: the extra launches would cost more than the
// parallelism gains.
constexpr int64_t kMinSplitKeys = 1024;

inline int64_t clamp_parts(int64_t want, int64_t most) {
  return std::max<int64_t>(1, std::min(want, most));
}

// Parts per (row, KV head) that would give a launch of `blocks` such blocks about two blocks per
// SM.
inline int64_t split_want(int64_t blocks, int sms) {
  return (2 * int64_t(sms) + blocks - 1) / blocks;
}

// NSA: cmp parts of at least two chunks of compressed tokens, slc parts of whole selected
// blocks, win parts of at least two chunks of keys. No split where every branch would be one
// part.
inline SplitPlan nsa_split_plan(int64_t blocks, int sms, int64_t t_max, const nsa_config& cfg) {
  const int64_t want = split_want(blocks, sms);
  if (want <= 1 || t_max + 1 < kMinSplitKeys) return {};
  const int64_t nc = cmp_len(t_max + 1, cfg.cmp_block, cfg.cmp_stride);
  const int64_t win = std::min<int64_t>(cfg.window, t_max + 1);
  SplitPlan p;
  p.cmp = int(clamp_parts(want, (nc + 2 * kChunk - 1) / (2 * kChunk)));
  p.slc = int(clamp_parts(want, cfg.slc_count));
  p.win = int(clamp_parts(want, (win + 2 * kChunk - 1) / (2 * kChunk)));
  return p.parts() > 3 ? p : SplitPlan{};
}

// Dense: parts of at least four chunks of keys, from kMinSplitKeys keys (the window's) on.
inline SplitPlan dense_split_plan(int64_t blocks, int sms, int64_t t_max, int32_t window) {
  const int64_t want = split_want(blocks, sms);
  const int64_t keys = window > 0 ? std::min<int64_t>(window, t_max + 1) : t_max + 1;
  if (want <= 1 || keys < kMinSplitKeys) return {};
  SplitPlan p;
  p.win = int(clamp_parts(want, (keys + 4 * kChunk - 1) / (4 * kChunk)));
  return p;
}

// The most parts a plan of this step shape can have (blocks per launch, the device, the
// config): the scratch is laid out for that many, so its size does not change as the sequences
// grow and a step never reallocates it (a workspace grown once, or reserved, serves every later
// step of the same batch size).
inline int max_split_parts(int64_t blocks, int sms, const nsa_config* cfg) {
  const int64_t want = split_want(blocks, sms);
  return int(cfg ? 2 * want + std::min<int64_t>(want, cfg->slc_count) : want);
}

// A split step's scratch (the context's workspace), one slot per (launch row, KV head): the
// parts' outputs [P][G][Dv] and LSEs [P][G] (P >= plan.parts()), the group probabilities
// [ncmax] (the cache's compressed rows) and the selection [n] (-1 past its count).
struct SplitScratch {
  float* base = nullptr;
  SplitPlan plan;
  int P = 0;
  int64_t Hkv = 0, ncmax = 0;
  int G = 0, Dv = 0, n = 0;
};

__host__ __device__ inline int64_t slot_floats(const SplitScratch& w) {
  return int64_t(w.P) * w.G * (w.Dv + 1) + w.ncmax + w.n;
}
inline int64_t split_scratch_bytes(const SplitScratch& w, int64_t rows) {
  return 4 * rows * w.Hkv * slot_floats(w);
}

struct Slot {
  float* o;    // [P][G][Dv]
  float* lse;  // [P][G]
  float* ps;   // [ncmax]
  int* sel;    // [n]
};
__device__ inline Slot slot(const SplitScratch& w, int64_t i, int64_t hk) {
  Slot s;
  s.o = w.base + (i * w.Hkv + hk) * slot_floats(w);
  s.lse = s.o + int64_t(w.P) * w.G * w.Dv;
  s.ps = s.lse + int64_t(w.P) * w.G;
  s.sel = reinterpret_cast<int*>(s.ps + w.ncmax);
  return s;
}

// Part p's outputs, written by end_branch: normalised o and the LSE, no gate.
__device__ inline BranchOut part_out(const SplitScratch& w, const Slot& sl, int p) {
  BranchOut b;
  b.o = sl.o + int64_t(p) * w.G * w.Dv;
  b.o_hs = w.Dv;
  b.lse = sl.lse + int64_t(p) * w.G;
  b.lse_hs = 1;
  return b;
}

// Part z of `parts` of count items: whole chunks, the last parts possibly empty.
__device__ inline void part_range(int64_t count, int parts, int z, int64_t* first, int64_t* n) {
  int64_t per = (count + parts - 1) / parts;
  per = (per + kChunk - 1) / kChunk * kChunk;
  *first = int64_t(z) * per;
  *n = max(int64_t(0), min(per, count - *first));
}

// Parts p0 .. p0 + np - 1 merged into the branch accumulators as end_branch reads them: m the
// largest part LSE, l = sum of exp(lse_p - m), o = sum of exp(lse_p - m) o_p (with_o). Empty
// parts (LSE -inf) weigh nothing; a NaN LSE makes the branch NaN, as one online softmax would.
// Callers sync before and after.
__device__ inline void merge_parts(const Smem& s, const Group& g, const SplitScratch& w,
                                   const Slot& sl, int p0, int np, bool with_o) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int h = warp; h < g.G; h += kWarps) {
    float m = -CUDART_INF_F;
    for (int p = p0; p < p0 + np; ++p) m = nan_max(m, sl.lse[p * w.G + h]);
    float l = 0.0f;
    for (int p = p0; p < p0 + np && m != -CUDART_INF_F; ++p) l += expf(sl.lse[p * w.G + h] - m);
    for (int x = lane; with_o && x < g.Dv; x += 32) {
      float acc = 0.0f;
      for (int p = p0; p < p0 + np && m != -CUDART_INF_F; ++p) {
        acc = fmaf(expf(sl.lse[p * w.G + h] - m), sl.o[(int64_t(p) * w.G + h) * w.Dv + x], acc);
      }
      s.o[h * g.Dv + x] = acc;
    }
    if (lane == 0) s.m[h] = m, s.l[h] = l;
  }
}

// The step's query at launch row blockIdx.x, KV head blockIdx.y (decode_block's Loc).
__device__ inline Loc step_loc(const StepRows& r) {
  const int64_t i = blockIdx.x, t = r.t[i];
  return {0, r.row0 + i, r.seq[i], 0, t, t + 1, 0, blockIdx.y};
}

// One part of one branch: attention over the keys [first, first + n) of k / v, into part p.
template <typename In>
__device__ void attend_part(const Smem& s, const Group& g, RowView k, RowView v, int64_t first,
                            int64_t n, const SplitScratch& w, const Slot& sl, int p) {
  begin_branch(s, g);
  attend_spans<In>(s, g, k, v, 1, Span{first, n});
  end_branch(s, g, part_out(w, sl, p));
}

// Launch 1: cmp over part blockIdx.z of the compressed tokens.
template <typename In>
__device__ void cmp_part_block(const FwdArgs& a, const StepRows& r, const SplitScratch& w,
                               float* smem) {
  const Loc L = step_loc(r);
  const Group g{a.G, a.Dk, a.Dv, a.scale};
  const Smem s = carve(smem, a.G, a.Dk, a.Dv);
  load_group<In>(s, g, any_ptr(a.q, 0, L.qt, L.hk * a.G), a.q.el, a.q.s2);
  int64_t first = 0, n = 0;
  part_range(cmp_count(a, L), w.plan.cmp, blockIdx.z, &first, &n);
  attend_part<In>(s, g, rows<In>(a.k_cmp, L.kb, L.hk), rows<In>(a.v_cmp, L.kb, L.hk),
                  L.cmp_start + first, n, w, slot(w, blockIdx.x, L.hk), blockIdx.z);
}

// Whether the selection needs block scores (choose_blocks' third case).
__device__ inline bool needs_scores(const FwdArgs& a, const Loc& L) {
  return a.idx_in.p == nullptr && L.t / a.lp + 1 > a.n;
}

// Launch 2: the group probabilities of part blockIdx.z's compressed tokens, under the merged
// cmp LSE of each head.
template <typename In>
__device__ void probs_block(const FwdArgs& a, const StepRows& r, const SplitScratch& w,
                            float* smem) {
  const Loc L = step_loc(r);
  if (!needs_scores(a, L)) return;  // the whole block returns: no barrier is skipped
  const Group g{a.G, a.Dk, a.Dv, a.scale};
  const Smem s = carve(smem, a.G, a.Dk, a.Dv);
  const Slot sl = slot(w, blockIdx.x, L.hk);
  load_group<In>(s, g, any_ptr(a.q, 0, L.qt, L.hk * a.G), a.q.el, a.q.s2);
  merge_parts(s, g, w, sl, 0, w.plan.cmp, false);
  int64_t first = 0, n = 0;
  part_range(cmp_count(a, L), w.plan.cmp, blockIdx.z, &first, &n);
  const RowView kc = rows<In>(a.k_cmp, L.kb, L.hk);
  float* ps = s.extra;
  stream_keys<In>(s, g, kc, kc, false, 1, Span{L.cmp_start + first, n},
                  [&](const Smem& b, const auto& c) {
                    const int nk = c.nk();
                    group_probs<In>(b, g, nk, ps, [&](int) { return nk; });
                    if (int(threadIdx.x) < nk) sl.ps[first + c.c0 + threadIdx.x] = ps[threadIdx.x];
                  });
}

// Launch 3: the selection, from the probabilities in token order (as block_scores sums them).
__device__ inline void select_block(const FwdArgs& a, const StepRows& r, const SplitScratch& w,
                                    float* smem) {
  const Loc L = step_loc(r);
  const Smem s = carve(smem, a.G, a.Dk, a.Dv);
  const Slot sl = slot(w, blockIdx.x, L.hk);
  float* score = s.extra;
  float* ps = score + a.nblk;
  int* sel = reinterpret_cast<int*>(ps + kChunk);
  int* tmp = sel + a.n;
  const int64_t J = L.t / a.lp;
  const int count = choose_blocks(a, 0, L.qt, L.hk, J, score, sel, tmp, [&] {
    for (int64_t j = threadIdx.x; j <= J; j += kThreads) score[j] = 0.0f;
    const int64_t nc = cmp_count(a, L);
    for (int64_t c0 = 0; c0 < nc; c0 += kChunk) {
      const int nk = int(min(int64_t(kChunk), nc - c0));
      __syncthreads();
      if (int(threadIdx.x) < nk) ps[threadIdx.x] = sl.ps[c0 + threadIdx.x];
      __syncthreads();
      spread_probs(ps, c0, nk, score, a, J);
    }
    __syncthreads();
  });
  for (int i = threadIdx.x; i < a.n; i += kThreads) sl.sel[i] = i < count ? sel[i] : -1;
}

// Launch 4: part blockIdx.z of slc (a share of the selected blocks) then of win.
template <typename In>
__device__ void sw_part_block(const FwdArgs& a, const StepRows& r, const SplitScratch& w,
                              float* smem) {
  const Loc L = step_loc(r);
  const Group g{a.G, a.Dk, a.Dv, a.scale};
  const Smem s = carve(smem, a.G, a.Dk, a.Dv);
  const Slot sl = slot(w, blockIdx.x, L.hk);
  load_group<In>(s, g, any_ptr(a.q, 0, L.qt, L.hk * a.G), a.q.el, a.q.s2);
  const int z = blockIdx.z;
  if (z < w.plan.slc) {
    int* sel = reinterpret_cast<int*>(s.extra);
    for (int i = threadIdx.x; i < a.n; i += kThreads) sel[i] = sl.sel[i];
    __syncthreads();
    int count = 0;
    while (count < a.n && sel[count] >= 0) ++count;
    const int per = (a.n + w.plan.slc - 1) / w.plan.slc, first = min(count, z * per);
    begin_branch(s, g);
    attend_spans<In>(s, g, rows<In>(a.k_slc, L.kb, L.hk), rows<In>(a.v_slc, L.kb, L.hk),
                     min(count - first, per), SlcSpans{sel + first, L.start, L.t, a.lp});
    end_branch(s, g, part_out(w, sl, w.plan.cmp + z));
    return;
  }
  const int64_t w0 = max(int64_t(0), L.t - a.w + 1);
  int64_t first = 0, n = 0;
  part_range(L.t - w0 + 1, w.plan.win, z - w.plan.slc, &first, &n);
  attend_part<In>(s, g, rows<In>(a.k_win, L.kb, L.hk), rows<In>(a.v_win, L.kb, L.hk),
                  L.start + w0 + first, n, w, sl, w.plan.cmp + z);
}

// Launch 5: each branch from its parts, its outputs, the gated sum.
__device__ inline void combine_block(const FwdArgs& a, const StepRows& r, const SplitScratch& w,
                                     float* smem) {
  const Loc L = step_loc(r);
  const Group g{a.G, a.Dk, a.Dv, a.scale};
  const Smem s = carve(smem, a.G, a.Dk, a.Dv);
  const Slot sl = slot(w, blockIdx.x, L.hk);
  const int64_t h0 = L.hk * a.G;
  for (int i = threadIdx.x; i < a.G * a.Dv; i += kThreads) s.out[i] = 0.0f;
  BranchOut out[3];
  branch_outs(a, 0, L.qt, h0, out);
  const int np[3] = {w.plan.cmp, w.plan.slc, w.plan.win};
  for (int c = 0, p0 = 0; c < 3; p0 += np[c++]) {
    __syncthreads();
    merge_parts(s, g, w, sl, p0, np[c], true);
    __syncthreads();
    end_branch(s, g, out[c]);
  }
  __syncthreads();
  store_out(s, g, any_ptr(a.o, 0, L.qt, h0), a.o.el, a.o.s2);
}

// The dense baseline, launch 1: part blockIdx.z of its keys.
template <typename In>
__device__ void dense_part_block(const DenseArgs& a, const StepRows& r, const SplitScratch& w,
                                 float* smem) {
  const Loc L = step_loc(r);
  const Group g{a.G, a.Dk, a.Dv, a.scale};
  const Smem s = carve(smem, a.G, a.Dk, a.Dv);
  load_group<In>(s, g, any_ptr(a.q, 0, L.qt, L.hk * a.G), a.q.el, a.q.s2);
  const int64_t w0 = a.w > 0 ? max(int64_t(0), L.t - a.w + 1) : 0;
  int64_t first = 0, n = 0;
  part_range(L.t - w0 + 1, w.plan.win, blockIdx.z, &first, &n);
  attend_part<In>(s, g, rows<In>(a.k, L.kb, L.hk), rows<In>(a.v, L.kb, L.hk), L.start + w0 + first,
                  n, w, slot(w, blockIdx.x, L.hk), blockIdx.z);
}

// Launch 2: the parts merged into o and lse.
__device__ inline void dense_combine_block(const DenseArgs& a, const StepRows& r,
                                           const SplitScratch& w, float* smem) {
  const Loc L = step_loc(r);
  const Group g{a.G, a.Dk, a.Dv, a.scale};
  const Smem s = carve(smem, a.G, a.Dk, a.Dv);
  const int64_t h0 = L.hk * a.G;
  for (int i = threadIdx.x; i < a.G * a.Dv; i += kThreads) s.out[i] = 0.0f;
  __syncthreads();
  merge_parts(s, g, w, slot(w, blockIdx.x, L.hk), 0, w.plan.win, true);
  __syncthreads();
  BranchOut bo;
  if (a.lse.p) bo.lse = ptr<float>(a.lse, 0, L.qt, h0), bo.lse_hs = a.lse.s2;
  end_branch(s, g, bo);
  __syncthreads();
  store_out(s, g, any_ptr(a.o, 0, L.qt, h0), a.o.el, a.o.s2);
}

}  // namespace
}  // namespace nsa::cuda
