// The CUDA backend's attention building block, shared by the forward, the dense baseline and
// decode: one thread block holds the G query heads of one KV group at one query position (or at
// a few consecutive ones, Group) and streams key chunks through shared memory once for all of
// them (paper, Section 3.4: group-centric data loading and shared KV fetching). Arithmetic is f32
// (bf16 and f16 inputs widened exactly, or multiplied exactly by the tensor cores), with an
// online softmax per row and one branch finished before the next.
//
// Layout of the work: a block of kThreads threads, one warp per row (a head at a position; rows
// w, w + kWarps, ...) for the softmax, lane i holding key i of the chunk. f32 inputs stay on the
// CUDA cores: for scores each lane sums its key's products, for P V lane x holds value dims
// x, x + 32, ... bf16 and f16 inputs take the tensor cores (mma.cuh): warp w computes the scores
// of keys 8w .. 8w + 7 for 16 rows at a time, then P V for value columns 8w, 8w + 32, ...; the
// queries are staged as 16-bit hi + lo pairs when their dtype is wider than the keys' (decode),
// and P as hi + lo always, so that their rounding to 16 bits costs about 2^-16 relative rather
// than a single rounding's 2^-8 (bf16). The tensor cores' f32 sums are not IEEE-rounded per
// addition, so 16-bit inputs agree with f32 inputs of the same values within the f32 bound, not
// bit for bit.
// The 16-bit path streams key chunks through two buffers: the next chunk's copies (cp.async) are
// in flight while the block computes on the current one (stream_keys).
// Every reduction runs in a fixed order, so two runs give the same bits.
#pragma once

#include <math_constants.h>

#include <cstdint>

#include "cuda/async_copy.cuh"
#include "cuda/elem.cuh"
#include "cuda/mma.cuh"

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

// Shared memory of one block, carved from the dynamic allocation (sizes in floats: smem_floats)
// for R rows (a head at a position, Group). The 16-bit tiles of the tensor-core path share the
// f32 query and chunk areas, which it does not use; its chunk areas hold two chunks, the one
// being computed on and the one being fetched (swap_chunks exchanges them).
struct Smem {
  float* q;            // [R][Dk] the rows' queries (f32 inputs)
  float* k;            // [kChunk][kstride(Dk)] a key chunk (f32 inputs)
  float* v;            // [kChunk][Dv] the chunk's values (f32 inputs)
  uint16_t* k16;       // [kChunk][k16_ld(Dk)] a key chunk (16-bit inputs), in k's area
  uint16_t* v16;       // [kChunk][v16_ld(Dv)] its values, in v's area
  uint16_t* k16_next;  // the same for the next chunk, after them
  uint16_t* v16_next;
  uint16_t* q16;  // [2][mma_rows(R)][k16_ld(Dk)] the queries' hi and lo parts (16-bit), over q
  int* q_lo;      // whether the lo parts are not all zero
  float* p;       // [R][kChunk] the chunk's scores, then its softmax weights
  float* o;       // [R][Dv] the branch being computed, unnormalised
  float* out;     // [R][Dv] the gated sum of finished branches (SPEC 4 step 6)
  float* m;       // [R] running max of the scaled scores
  float* l;       // [R] running sum of exp(score - m)
  float* corr;    // [mma_rows(R)] the chunk's rescaling of o per row (16-bit inputs)
  float* extra;   // what a kernel adds after these (block scores, ...)
};

// The row stride of an f32 key chunk in shared memory: odd, so that lane i reading row i meets no
// other lane's bank.
__host__ __device__ inline int kstride(int Dk) { return Dk | 1; }

// The tensor-core path's sizes: rows padded to whole 16-row tiles, key dims to whole k-steps of
// 16 (zeros), value dims to whole 8-column tiles; rows 8 elements longer than that, so that the
// fragment loads of the 8 row groups fall in different banks.
__host__ __device__ inline int round_up(int x, int m) { return (x + m - 1) / m * m; }
__host__ __device__ inline int mma_rows(int R) { return round_up(R, 16); }
__host__ __device__ inline int k16_ld(int Dk) { return round_up(Dk, 16) + 8; }
__host__ __device__ inline int64_t whole16B(int64_t floats) { return (floats + 3) / 4 * 4; }
__host__ __device__ inline int v16_ld(int Dv) { return round_up(Dv, 8) + 8; }

// The query and chunk areas hold either path's tiles (the 16-bit chunks twice), in whole
// multiples of 16 bytes, so that every 16-bit tile starts 16-byte aligned for cp.async.
__host__ __device__ inline int64_t q_floats(int R, int Dk) {
  const int64_t f32 = int64_t(R) * Dk, b16 = int64_t(mma_rows(R)) * k16_ld(Dk);
  return whole16B(f32 > b16 ? f32 : b16);
}
__host__ __device__ inline int64_t chunk_k_floats(int Dk) {
  const int64_t f32 = int64_t(kChunk) * kstride(Dk), b16 = int64_t(kChunk) * k16_ld(Dk);
  return whole16B(f32 > b16 ? f32 : b16);
}
__host__ __device__ inline int64_t chunk_v_floats(int Dv) {
  const int64_t f32 = int64_t(kChunk) * Dv, b16 = int64_t(kChunk) * v16_ld(Dv);
  return whole16B(f32 > b16 ? f32 : b16);
}

__host__ __device__ inline int64_t smem_floats(int R, int Dk, int Dv) {
  return q_floats(R, Dk) + chunk_k_floats(Dk) + chunk_v_floats(Dv) + int64_t(R) * kChunk +
         2 * int64_t(R) * Dv + 2 * int64_t(R) + mma_rows(R) + 1;
}

__device__ inline Smem carve(float* base, int R, int Dk, int Dv) {
  Smem s;
  s.q = base;
  s.q16 = reinterpret_cast<uint16_t*>(base);
  s.k = s.q + q_floats(R, Dk);
  s.v = s.k + chunk_k_floats(Dk);
  s.k16 = reinterpret_cast<uint16_t*>(s.k);
  s.v16 = reinterpret_cast<uint16_t*>(s.v);
  s.k16_next = s.k16 + kChunk * k16_ld(Dk);
  s.v16_next = s.v16 + kChunk * v16_ld(Dv);
  s.p = s.v + chunk_v_floats(Dv);
  s.o = s.p + R * kChunk;
  s.out = s.o + R * Dv;
  s.m = s.out + R * Dv;
  s.l = s.m + R;
  s.corr = s.l + R;
  s.q_lo = reinterpret_cast<int*>(s.corr + mma_rows(R));
  s.extra = reinterpret_cast<float*>(s.q_lo + 1);
  return s;
}

// The problem sizes a block works with: the G heads of one KV group at P consecutive positions
// of one sequence (P > 1 only in the forward), row r of its tiles head r % G at position r / G.
struct Group {
  int G, Dk, Dv;
  float scale;
  int P = 1;
  __host__ __device__ int rows() const { return P * G; }
};

// The rows a span of keys updates, [r0, r1) (r1 < 0: every row): a position's own keys update
// only its rows, whose state the others' keys never touch, not even by 0 * NaN.
struct Rows {
  int r0 = 0, r1 = -1;
};
__device__ __forceinline__ Rows all_of(const Group& g, Rows rr) {
  return rr.r1 < 0 ? Rows{0, g.rows()} : rr;
}
__device__ __forceinline__ Rows rows_of_position(const Group& g, int p) {
  return {p * g.G, (p + 1) * g.G};
}

// Where row r of a [T, H, ...] slice is: head stride hs, position stride ps.
__device__ __forceinline__ int64_t row_at(const Group& g, int r, int64_t hs, int64_t ps) {
  return (r / g.G) * ps + (r % g.G) * hs;
}

// The hi + lo parts of x in In: hi rounded to nearest, lo the rest rounded, so hi + lo is x to
// 2^-16 relative (bf16; exact for f16 queries on bf16 keys). A non-finite hi leaves lo 0, so that
// an infinite x stays infinite rather than inf - inf.
template <typename In>
__device__ __forceinline__ void split16(float x, uint16_t* hi, uint16_t* lo) {
  *hi = to16<In>(x);
  const float h = from16<In>(*hi);
  *lo = isfinite(h) ? to16<In>(x - h) : uint16_t(0);
}

// A tensor-core sum of hi parts plus the sum of the lo parts. A value exact in 16 bits (a weight
// of 1, a query of 1.0) has lo = 0, and 0 times an infinite key or value is NaN in the lo sum
// where the reference's single product is that infinity: an infinite hi sum stands alone (a NaN
// one stays NaN).
__device__ __forceinline__ float add_lo(float hi, float lo) { return isinf(hi) ? hi : hi + lo; }

// Loads the group's queries (row r at q + row_at(r, hs, ps), any float dtype) and clears out;
// for the tensor cores also their 16-bit hi and lo tiles, zero past the rows and Dk (padding
// meets zero key dims). q's dtype is a run-time fact: decode takes any float queries whatever the
// cache holds.
template <typename In>
__device__ inline void load_group(const Smem& s, const Group& g, const void* q, Elem el, int64_t hs,
                                  int64_t ps = 0) {
  const int R = g.rows();
  for (int i = threadIdx.x; i < R * g.Dv; i += kThreads) s.out[i] = 0.0f;
  if constexpr (!kMma<In>) {
    for (int i = threadIdx.x; i < R * g.Dk; i += kThreads) {
      const int r = i / g.Dk, x = i % g.Dk;
      s.q[i] = ld_any(q, el, row_at(g, r, hs, ps) + x);
    }
  } else {
    const int M = mma_rows(R), ld = k16_ld(g.Dk);
    for (int i = threadIdx.x; i < M * ld; i += kThreads) {
      const int r = i / ld, x = i % ld;
      split16<In>(r < R && x < g.Dk ? ld_any(q, el, row_at(g, r, hs, ps) + x) : 0.0f, &s.q16[i],
                  &s.q16[M * ld + i]);
    }
    if (threadIdx.x == 0) *s.q_lo = el != elem_v<In>;
  }
}

// Starts a branch: empty accumulators for every row. Callers sync before and after.
__device__ inline void begin_branch(const Smem& s, const Group& g) {
  for (int i = threadIdx.x; i < g.rows() * g.Dv; i += kThreads) s.o[i] = 0.0f;
  for (int h = threadIdx.x; h < g.rows(); h += kThreads) {
    s.m[h] = -CUDART_INF_F;
    s.l[h] = 0.0f;
  }
}

// Rows 0 .. rows - 1 of a 16-bit tile at dst (row stride ld): element (r, x < width) is row
// pos(r) of src (stride row), column x, when r < n and x < D, else 0. Where every row and both
// ends are 16-byte aligned (head dims a multiple of 8, the usual case) the rows go 16 bytes a
// thread by cp.async, which the caller commits and waits for (stream_keys); element by element
// otherwise. The zeros are plain stores.
template <typename In, typename Pos>
__device__ void copy_rows16(uint16_t* dst, int ld, const In* src, int64_t row, Pos pos, int n,
                            int D, int width, int rows) {
  const bool vec = D % 8 == 0 && width % 8 == 0 && row % 8 == 0 &&
                   reinterpret_cast<uintptr_t>(src) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(dst) % 16 == 0;  // ld: a multiple of 8 already
  if (vec) {
    const int per = width / 8;
    for (int i = threadIdx.x; i < rows * per; i += kThreads) {
      const int r = i / per, x = 8 * (i % per);
      if (r < n && x < D) {
        cp_async16(dst + r * ld + x, src + pos(r) * row + x);
      } else {
        store16B(dst + r * ld + x, make_uint4(0u, 0u, 0u, 0u));
      }
    }
    return;
  }
  for (int i = threadIdx.x; i < rows * width; i += kThreads) {
    const int r = i / width, x = i % width;
    dst[r * ld + x] = r < n && x < D ? bits16(src[pos(r) * row + x]) : uint16_t(0);
  }
}

// Copies nk <= kChunk rows (key r at position pos(r)) of K (and V when want_v) into shared
// memory: widened to f32 for the CUDA cores; as 16-bit tiles for the tensor cores, with zeros in
// the padding the tiles read (key dims past Dk, value rows past nk up to the k-step: P is 0 there,
// and 0 times a stale NaN would not be). stream_keys calls it: the buffers it fills are not
// being read, and the 16-bit path's copies are committed and waited for there.
template <typename In, typename Pos>
__device__ void load_chunk(const Smem& s, const Group& g, RowView k, RowView v, int nk, Pos pos,
                           bool want_v) {
  const In* kp = static_cast<const In*>(k.p);
  const In* vp = static_cast<const In*>(v.p);
  if constexpr (kMma<In>) {
    copy_rows16(s.k16, k16_ld(g.Dk), kp, k.row, pos, nk, g.Dk, round_up(g.Dk, 16), nk);
    if (want_v) copy_rows16(s.v16, v16_ld(g.Dv), vp, v.row, pos, nk, g.Dv, g.Dv, round_up(nk, 16));
  } else {
    for (int i = threadIdx.x; i < nk * g.Dk; i += kThreads) {
      const int r = i / g.Dk, x = i % g.Dk;
      s.k[r * kstride(g.Dk) + x] = ld(kp, pos(r) * k.row + x);
    }
    if (!want_v) return;
    for (int i = threadIdx.x; i < nk * g.Dv; i += kThreads) {
      const int r = i / g.Dv, x = i % g.Dv;
      s.v[r * g.Dv + x] = ld(vp, pos(r) * v.row + x);
    }
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

// The tensor cores' scores of the loaded chunk, scaled, into s.p for rows rr (keys past nk hold
// leftovers: score_of never reads them). Warp w takes keys 8w .. 8w + 7, 16 rows a tile; each
// k-step adds the queries' hi part and, when there is one, their lo part.
template <typename In>
__device__ void mma_scores(const Smem& s, const Group& g, int nk, Rows rr) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, n0 = 8 * warp;
  if (n0 >= nk) return;  // the whole warp: mma.sync needs all its lanes
  const int ld = k16_ld(g.Dk), dk = round_up(g.Dk, 16), M = mma_rows(g.rows());
  const bool lo = *s.q_lo != 0;
  for (int m0 = rr.r0 / 16 * 16; m0 < rr.r1; m0 += 16) {
    float c[4] = {0.0f, 0.0f, 0.0f, 0.0f}, c_lo[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int k0 = 0; k0 < dk; k0 += 16) {
      uint32_t a[4], b[2];
      load_b_rows(b, s.k16 + n0 * ld + k0, ld, lane);
      load_a(a, s.q16 + m0 * ld + k0, ld, lane);
      mma16816<In>(c, a, b);
      if (lo) {
        load_a(a, s.q16 + (M + m0) * ld + k0, ld, lane);
        mma16816<In>(c_lo, a, b);
      }
    }
    for (int i = 0; i < 4; ++i) {
      const int h = m0 + acc_row(lane) + 8 * (i / 2);
      const float sc = add_lo(c[i], c_lo[i]) * g.scale;
      if (h >= rr.r0 && h < rr.r1) s.p[h * kChunk + n0 + acc_col(lane) + i % 2] = sc;
    }
  }
}

// Scaled score of head h with chunk key `lane` (-inf past nk): summed here on the CUDA cores,
// read from s.p after mma_scores on the tensor cores.
template <typename In>
__device__ __forceinline__ float score_of(const Smem& s, const Group& g, int h, int lane, int nk) {
  if (lane >= nk) return -CUDART_INF_F;
  if constexpr (kMma<In>) {
    return s.p[h * kChunk + lane];
  } else {
    const float* qh = s.q + h * g.Dk;
    const float* kr = s.k + lane * kstride(g.Dk);
    float acc = 0.0f;
    for (int x = 0; x < g.Dk; ++x) acc = fmaf(qh[x], kr[x], acc);
    return acc * g.scale;
  }
}

// Every score of the loaded chunk ready for score_of: the tensor cores' pass and a barrier on
// that path, nothing on the CUDA cores'.
template <typename In>
__device__ __forceinline__ void chunk_scores(const Smem& s, const Group& g, int nk, Rows rr) {
  if constexpr (kMma<In>) {
    mma_scores<In>(s, g, nk, rr);
    __syncthreads();
  }
}

// The A fragments of P's 16x16 tile at rows m0, keys k0 (zero outside rr and past nk), as hi +
// lo parts.
template <typename In>
__device__ inline void p_frags(const Smem& s, Rows rr, int m0, int k0, int nk, int lane,
                               uint32_t (&hi)[4], uint32_t (&lo)[4]) {
  for (int i = 0; i < 4; ++i) {  // load_a's order: rows +8 in registers 1 and 3, keys +8 in 2, 3
    const int h = m0 + lane / 4 + 8 * (i % 2), key = k0 + 2 * (lane % 4) + 8 * (i / 2);
    uint16_t ph[2], pl[2];
    for (int j = 0; j < 2; ++j) {
      const bool in = h >= rr.r0 && h < rr.r1 && key + j < nk;
      split16<In>(in ? s.p[h * kChunk + key + j] : 0.0f, &ph[j], &pl[j]);
    }
    hi[i] = pack(ph[0], ph[1]);
    lo[i] = pack(pl[0], pl[1]);
  }
}

// o = o corr + P V on the tensor cores for rows rr, from the chunk's weights in s.p: warp w takes
// the value columns of tiles w, w + kWarps, ..., 16 rows a tile.
template <typename In>
__device__ void mma_pv(const Smem& s, const Group& g, int nk, Rows rr) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int ld = v16_ld(g.Dv), tiles = (g.Dv + 7) / 8;
  for (int m0 = rr.r0 / 16 * 16; m0 < rr.r1; m0 += 16) {
    for (int t = warp; t < tiles; t += kWarps) {
      float c[4], c_lo[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      for (int i = 0; i < 4; ++i) {
        const int h = m0 + acc_row(lane) + 8 * (i / 2), x = 8 * t + acc_col(lane) + i % 2;
        c[i] = h >= rr.r0 && h < rr.r1 && x < g.Dv ? s.o[h * g.Dv + x] * s.corr[h] : 0.0f;
      }
      for (int k0 = 0; k0 < nk; k0 += 16) {
        uint32_t b[2], hi[4], lo[4];
        load_b_cols(b, s.v16 + k0 * ld + 8 * t, ld, lane);
        p_frags<In>(s, rr, m0, k0, nk, lane, hi, lo);
        mma16816<In>(c, hi, b);
        mma16816<In>(c_lo, lo, b);
      }
      for (int i = 0; i < 4; ++i) {
        const int h = m0 + acc_row(lane) + 8 * (i / 2), x = 8 * t + acc_col(lane) + i % 2;
        if (h >= rr.r0 && h < rr.r1 && x < g.Dv) s.o[h * g.Dv + x] = add_lo(c[i], c_lo[i]);
      }
    }
  }
}

// One chunk of the online softmax for rows rr (the chunk is loaded): their m, l and o updated.
template <typename In>
__device__ inline void attend_chunk(const Smem& s, const Group& g, int nk, Rows rr) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  chunk_scores<In>(s, g, nk, rr);
  for (int h = rr.r0 + warp; h < rr.r1; h += kWarps) {
    const float sc = score_of<In>(s, g, h, lane, nk);
    const float m_old = s.m[h];
    const float m_new = nan_max(m_old, warp_max(sc));
    // m_new is finite once a key was seen (nk >= 1); -inf only for -inf scores from the input.
    const float corr = m_old == -CUDART_INF_F ? 0.0f : expf(m_old - m_new);
    const float p = lane < nk && m_new != -CUDART_INF_F ? expf(sc - m_new) : 0.0f;
    const float psum = warp_sum(p);
    s.p[h * kChunk + lane] = p;
    __syncwarp();
    if constexpr (!kMma<In>) {
      for (int x = lane; x < g.Dv; x += 32) {
        float acc = s.o[h * g.Dv + x] * corr;
        for (int r = 0; r < nk; ++r) acc = fmaf(s.p[h * kChunk + r], s.v[r * g.Dv + x], acc);
        s.o[h * g.Dv + x] = acc;
      }
      __syncwarp();
    }
    if (lane == 0) {
      s.l[h] = s.l[h] * corr + psum;
      s.m[h] = m_new;
      s.corr[h] = corr;
    }
    __syncwarp();
  }
  if constexpr (kMma<In>) {
    __syncthreads();
    mma_pv<In>(s, g, nk, rr);
  }
}

// A cursor over the chunks of a list of key spans, in order: spans(i, &first, &count) gives span
// i of nspans, each split into chunks of kChunk keys (empty spans have none). next() moves to the
// next chunk and says whether there is one; a new cursor stands before the first. The spans are
// passed to next() rather than held, so that a cursor is a few plain registers.
struct KeyChunks {
  int i = -1;
  int64_t first = 0, count = 0, c0 = 0;  // span i is [first, first + count); the chunk from c0
  template <typename Spans>
  __device__ bool next(const Spans& spans, int nspans) {
    if (i >= 0) c0 += kChunk;
    while (i < 0 || c0 >= count) {
      if (++i >= nspans) return false;
      spans(i, &first, &count);
      c0 = 0;
    }
    return true;
  }
  __device__ int nk() const { return static_cast<int>(count - c0 < kChunk ? count - c0 : kChunk); }
  __device__ int64_t base() const { return first + c0; }  // the chunk's first key
};

// A single span of keys [first, first + count), for KeyChunks.
struct Span {
  int64_t first, count;
  __device__ void operator()(int, int64_t* f, int64_t* n) const { *f = first, *n = count; }
};

// Exchanges the current and next 16-bit chunk buffers of s.
__device__ __forceinline__ void swap_chunks(Smem* s) {
  uint16_t* k = s->k16;
  uint16_t* v = s->v16;
  s->k16 = s->k16_next, s->v16 = s->v16_next;
  s->k16_next = k, s->v16_next = v;
}

// Streams the chunks of a list of key spans (KeyChunks) through shared memory: their keys (and
// values when want_v) loaded by load_chunk, then use(s, c) on them, c the chunk's cursor. On the
// tensor-core path the next chunk's copies are issued before the current chunk is used, into the
// other buffers, so they are in flight meanwhile (paper, Section 3.4); the f32 path widens its
// keys as it copies them, into one buffer, so it loads and then uses. A barrier before every use
// (the chunk is in place) and after it (its buffers may be refilled); the first load waits for
// the block's earlier reads.
template <typename In, typename Spans, typename Use>
__device__ void stream_keys(const Smem& s, const Group& g, RowView k, RowView v, bool want_v,
                            int nspans, const Spans& spans, Use use) {
  const auto load = [&](const Smem& b, const KeyChunks& c) {
    const int64_t base = c.base();
    load_chunk<In>(
        b, g, k, v, c.nk(), [&](int r) { return base + r; }, want_v);
  };
  KeyChunks c;
  __syncthreads();
  bool have = c.next(spans, nspans);
  const bool none = !have;
  if constexpr (!kMma<In>) {
    while (have) {
      load(s, c);
      __syncthreads();
      use(s, c);
      have = c.next(spans, nspans);  // before the barrier, as every read of the spans
      __syncthreads();
    }
  } else {
    Smem b = s;
    if (have) {
      load(b, c);
      cp_async_commit();
    }
    while (have) {
      KeyChunks n = c;
      const bool more = n.next(spans, nspans);
      swap_chunks(&b);
      if (more) load(b, n);  // into the other buffers
      swap_chunks(&b);
      cp_async_commit();  // one group per chunk, possibly empty: the waits below count chunks
      if (more) {
        cp_async_wait<1>();  // all but the chunk just issued
      } else {
        cp_async_wait<0>();
      }
      __syncthreads();
      use(b, c);
      __syncthreads();
      swap_chunks(&b);
      c = n;
      have = more;
    }
  }
  // No chunk: the spans were still read (spans() may read shared memory, as SlcSpans' sel) and
  // the caller may rewrite them next; the barrier after the last use stands in otherwise.
  if (none) __syncthreads();
}

// Softmax attention of rows rr (default every row) over a list of key spans (KeyChunks).
template <typename In, typename Spans>
__device__ void attend_spans(const Smem& s, const Group& g, RowView k, RowView v, int nspans,
                             Spans spans, Rows rr = {}) {
  rr = all_of(g, rr);
  stream_keys<In>(s, g, k, v, true, nspans, spans,
                  [&](const Smem& b, const auto& c) { attend_chunk<In>(b, g, c.nk(), rr); });
}

// Where a finished branch goes: its ungated output and LSE (each optional) and its gate, from the
// block's first row (head strides *_hs, position strides *_ps).
struct BranchOut {
  void* o = nullptr;  // [T, Hq, Dv] slice, any float dtype
  Elem o_el = Elem::kF32;
  int64_t o_hs = 0, o_ps = 0;
  float* lse = nullptr;  // [T, Hq] slice
  int64_t lse_hs = 0, lse_ps = 0;
  const void* gate = nullptr;  // [T, Hq] slice, any float dtype; nullptr: weight 1
  Elem gate_el = Elem::kF32;
  int64_t gate_hs = 0, gate_ps = 0;
};

// Normalises the branch (o / l; 0 and lse = -inf when it saw no key, SPEC 4 step 1; NaN stays
// NaN), writes its outputs and adds gate * o to out. Callers sync before (attend_spans does) and
// after.
__device__ inline void end_branch(const Smem& s, const Group& g, const BranchOut& b) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int h = warp; h < g.rows(); h += kWarps) {
    const float l = s.l[h];
    const float inv = l == 0.0f ? 0.0f : 1.0f / l;
    const float gate =
        b.gate ? ld_any(b.gate, b.gate_el, row_at(g, h, b.gate_hs, b.gate_ps)) : 1.0f;
    for (int x = lane; x < g.Dv; x += 32) {
      const float o = s.o[h * g.Dv + x] * inv;
      if (b.o) st_any(b.o, b.o_el, row_at(g, h, b.o_hs, b.o_ps) + x, o);
      s.out[h * g.Dv + x] = fmaf(gate, o, s.out[h * g.Dv + x]);
    }
    if (b.lse && lane == 0) {
      b.lse[row_at(g, h, b.lse_hs, b.lse_ps)] = l == 0.0f ? -CUDART_INF_F : s.m[h] + logf(l);
    }
  }
}

// Stores out (a row per head and position) to o (head stride hs, position stride ps).
__device__ inline void store_out(const Smem& s, const Group& g, void* o, Elem el, int64_t hs,
                                 int64_t ps = 0) {
  for (int i = threadIdx.x; i < g.rows() * g.Dv; i += kThreads) {
    const int h = i / g.Dv, x = i % g.Dv;
    st_any(o, el, row_at(g, h, hs, ps) + x, s.out[i]);
  }
}

}  // namespace nsa::cuda
