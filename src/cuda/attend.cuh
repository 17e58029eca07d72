// The CUDA backend's attention building block, shared by the forward, the dense baseline and
// decode: one thread block holds the G query heads of one KV group at one query position and
// streams key chunks through shared memory once for all of them (paper, Section 3.4:
// group-centric data loading and shared KV fetching). Arithmetic is f32 (bf16 and f16 inputs
// widened exactly), with an online softmax per head and one branch finished before the next.
//
// Layout of the work: a block of kThreads threads, one warp per head (heads w, w + kWarps, ...);
// for scores, lane i holds key i of the chunk; for P V, lane x holds value dims x, x + 32, ...
// Every reduction runs in a fixed order, so two runs give the same bits.
#pragma once

#include <math_constants.h>

#include <cstdint>

#include "cuda/elem.cuh"

namespace nsa::cuda {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kChunk = 32;  // keys per shared-memory chunk: one per lane

// The rows of one head of one batch row of a [B, T, H, D] tensor (D contiguous): element r, x at
// p + r * row + x.
struct RowView {
  const void* p = nullptr;
  int64_t row = 0;  // element stride of T
};

// Shared memory of one block, carved from the dynamic allocation (sizes in floats: smem_floats).
struct Smem {
  float* q;      // [G][Dk] the group's queries
  float* k;      // [kChunk][kstride(Dk)] a key chunk
  float* v;      // [kChunk][Dv] the chunk's values
  float* p;      // [G][kChunk] the chunk's softmax weights
  float* o;      // [G][Dv] the branch being computed, unnormalised
  float* out;    // [G][Dv] the gated sum of finished branches (SPEC 4 step 6)
  float* m;      // [G] running max of the scaled scores
  float* l;      // [G] running sum of exp(score - m)
  float* extra;  // what a kernel adds after these (block scores, ...)
};

// The row stride of a key chunk in shared memory: odd, so that lane i reading row i meets no other
// lane's bank.
__host__ __device__ inline int kstride(int Dk) { return Dk | 1; }

__host__ __device__ inline int64_t smem_floats(int G, int Dk, int Dv) {
  return int64_t(G) * Dk + int64_t(kChunk) * kstride(Dk) + int64_t(kChunk) * Dv +
         int64_t(G) * kChunk + 2 * int64_t(G) * Dv + 2 * int64_t(G);
}

__device__ inline Smem carve(float* base, int G, int Dk, int Dv) {
  Smem s;
  s.q = base;
  s.k = s.q + G * Dk;
  s.v = s.k + kChunk * kstride(Dk);
  s.p = s.v + kChunk * Dv;
  s.o = s.p + G * kChunk;
  s.out = s.o + G * Dv;
  s.m = s.out + G * Dv;
  s.l = s.m + G;
  s.extra = s.l + G;
  return s;
}

// The problem sizes a block works with.
struct Group {
  int G, Dk, Dv;
  float scale;
};

// Loads the G queries of a group ([G, Dk] at q, any float dtype, head stride hs) and clears out.
// q's dtype is a run-time fact: decode takes any float queries whatever the cache holds.
__device__ inline void load_group(const Smem& s, const Group& g, const void* q, Elem el,
                                  int64_t hs) {
  for (int i = threadIdx.x; i < g.G * g.Dk; i += kThreads) {
    const int h = i / g.Dk, x = i % g.Dk;
    s.q[i] = ld_any(q, el, h * hs + x);
  }
  for (int i = threadIdx.x; i < g.G * g.Dv; i += kThreads) s.out[i] = 0.0f;
}

// Starts a branch: empty accumulators for every head. Callers sync before and after.
__device__ inline void begin_branch(const Smem& s, const Group& g) {
  for (int i = threadIdx.x; i < g.G * g.Dv; i += kThreads) s.o[i] = 0.0f;
  for (int h = threadIdx.x; h < g.G; h += kThreads) {
    s.m[h] = -CUDART_INF_F;
    s.l[h] = 0.0f;
  }
}

// Copies nk <= kChunk rows (key r at position pos(r)) of K (and V when want_v) into shared
// memory. Callers sync before (the previous chunk is consumed) and after.
template <typename In, typename Pos>
__device__ void load_chunk(const Smem& s, const Group& g, RowView k, RowView v, int nk, Pos pos,
                           bool want_v) {
  const In* kp = static_cast<const In*>(k.p);
  for (int i = threadIdx.x; i < nk * g.Dk; i += kThreads) {
    const int r = i / g.Dk, x = i % g.Dk;
    s.k[r * kstride(g.Dk) + x] = ld(kp, pos(r) * k.row + x);
  }
  if (!want_v) return;
  const In* vp = static_cast<const In*>(v.p);
  for (int i = threadIdx.x; i < nk * g.Dv; i += kThreads) {
    const int r = i / g.Dv, x = i % g.Dv;
    s.v[r * g.Dv + x] = ld(vp, pos(r) * v.row + x);
  }
}

// max that keeps NaN (fmaxf drops it): a NaN score must make the branch NaN, as in the reference.
__device__ __forceinline__ float nan_max(float a, float b) {
  return isnan(a) || isnan(b) ? CUDART_NAN_F : fmaxf(a, b);
}
__device__ __forceinline__ float warp_max(float x) {
  for (int o = 16; o > 0; o >>= 1) x = nan_max(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
__device__ __forceinline__ float warp_sum(float x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// Scaled score of head h with chunk key `lane` (-inf past nk).
__device__ __forceinline__ float chunk_score(const Smem& s, const Group& g, int h, int lane,
                                             int nk) {
  if (lane >= nk) return -CUDART_INF_F;
  const float* qh = s.q + h * g.Dk;
  const float* kr = s.k + lane * kstride(g.Dk);
  float acc = 0.0f;
  for (int x = 0; x < g.Dk; ++x) acc = fmaf(qh[x], kr[x], acc);
  return acc * g.scale;
}

// One chunk of the online softmax for every head (the chunk is loaded): m, l and o updated.
__device__ inline void attend_chunk(const Smem& s, const Group& g, int nk) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int h = warp; h < g.G; h += kWarps) {
    const float sc = chunk_score(s, g, h, lane, nk);
    const float m_old = s.m[h];
    const float m_new = nan_max(m_old, warp_max(sc));
    // m_new is finite once a key was seen (nk >= 1); -inf only for -inf scores from the input.
    const float corr = m_old == -CUDART_INF_F ? 0.0f : expf(m_old - m_new);
    const float p = lane < nk && m_new != -CUDART_INF_F ? expf(sc - m_new) : 0.0f;
    const float psum = warp_sum(p);
    s.p[h * kChunk + lane] = p;
    __syncwarp();
    for (int x = lane; x < g.Dv; x += 32) {
      float acc = s.o[h * g.Dv + x] * corr;
      for (int r = 0; r < nk; ++r) acc = fmaf(s.p[h * kChunk + r], s.v[r * g.Dv + x], acc);
      s.o[h * g.Dv + x] = acc;
    }
    __syncwarp();
    if (lane == 0) {
      s.l[h] = s.l[h] * corr + psum;
      s.m[h] = m_new;
    }
    __syncwarp();
  }
}

// Softmax attention of the group over a list of key spans: spans(i, &first, &count) gives span i
// of nspans, each split into chunks of kChunk keys; pos maps a span's key to its row in k/v.
template <typename In, typename Spans>
__device__ void attend_spans(const Smem& s, const Group& g, RowView k, RowView v, int nspans,
                             Spans spans) {
  for (int i = 0; i < nspans; ++i) {
    int64_t first = 0, count = 0;
    spans(i, &first, &count);
    for (int64_t c0 = 0; c0 < count; c0 += kChunk) {
      const int nk = static_cast<int>(count - c0 < kChunk ? count - c0 : kChunk);
      const int64_t base = first + c0;
      __syncthreads();
      load_chunk<In>(
          s, g, k, v, nk, [&](int r) { return base + r; }, true);
      __syncthreads();
      attend_chunk(s, g, nk);
    }
  }
  __syncthreads();
}

// Where a finished branch goes: its ungated output and LSE (each optional) and its gate.
struct BranchOut {
  void* o = nullptr;  // [Hq, Dv] slice of this position (head stride o_hs), any float dtype
  Elem o_el = Elem::kF32;
  int64_t o_hs = 0;
  float* lse = nullptr;  // [Hq] slice (stride lse_hs)
  int64_t lse_hs = 0;
  const void* gate = nullptr;  // [Hq] slice (stride gate_hs), any float dtype; nullptr: weight 1
  Elem gate_el = Elem::kF32;
  int64_t gate_hs = 0;
};

// Normalises the branch (o / l; 0 and lse = -inf when it saw no key, SPEC 4 step 1; NaN stays
// NaN), writes its outputs and adds gate * o to out. Callers sync before (attend_spans does) and
// after.
__device__ inline void end_branch(const Smem& s, const Group& g, const BranchOut& b) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int h = warp; h < g.G; h += kWarps) {
    const float l = s.l[h];
    const float inv = l == 0.0f ? 0.0f : 1.0f / l;
    const float gate = b.gate ? ld_any(b.gate, b.gate_el, h * b.gate_hs) : 1.0f;
    for (int x = lane; x < g.Dv; x += 32) {
      const float o = s.o[h * g.Dv + x] * inv;
      if (b.o) st_any(b.o, b.o_el, h * b.o_hs + x, o);
      s.out[h * g.Dv + x] = fmaf(gate, o, s.out[h * g.Dv + x]);
    }
    if (b.lse && lane == 0) b.lse[h * b.lse_hs] = l == 0.0f ? -CUDART_INF_F : s.m[h] + logf(l);
  }
}

// Stores out ([G, Dv]) to o (head stride hs).
__device__ inline void store_out(const Smem& s, const Group& g, void* o, Elem el, int64_t hs) {
  for (int i = threadIdx.x; i < g.G * g.Dv; i += kThreads) {
    const int h = i / g.Dv, x = i % g.Dv;
    st_any(o, el, h * hs + x, s.out[i]);
  }
}

}  // namespace nsa::cuda
