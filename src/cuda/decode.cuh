// The KV cache's block code (decode.cu) and the host helpers that address it, shared with the CPU
// emulation of the kernels (tests/test_cuda_emu.cc). The cache keeps the forward's own layout:
// raw tokens [num_seqs, capacity, Hkv, D], compressed ones [num_seqs, Tc(capacity), Hkv, D]; a
// decode step runs query.cuh's work at one position per (row, KV head).
#pragma once

#include <algorithm>
#include <vector>

#include "common/kv_cache.h"
#include "cuda/compress.cuh"
#include "cuda/query.cuh"

namespace nsa::cuda {
namespace {

// A cache's device buffers, as the kernels address them.
struct CacheBufs {
  void* k = nullptr;  // raw [num_seqs, rows, Hkv, Dk]
  void* v = nullptr;
  void* kc = nullptr;  // compressed [num_seqs, cmp_rows, Hkv, Dk]
  void* vc = nullptr;
  int64_t rows = 0, cmp_rows = 0;
};

// The cache's [num_seqs, rows, Hkv, D] buffer as a T4 (query.cuh).
inline T4 cache_view(void* p, int64_t rows, int64_t Hkv, int64_t D, nsa_dtype dt) {
  T4 v;
  v.p = p;
  v.s0 = rows * Hkv * D;
  v.s1 = Hkv * D;
  v.s2 = D;
  v.el = elem_of(dt);
  return v;
}

// An [S, H(, D)] decode tensor as a T4 with one batch row (rows are query "tokens").
inline T4 rows_view(const nsa_tensor& t) {
  T4 v;
  v.p = t.data;
  v.s1 = t.stride[0];
  v.s2 = t.ndim > 1 ? t.stride[1] : 0;
  v.el = elem_of(t.dtype);
  return v;
}

// D elements of x from element `from` (any float dtype) to dst from element `to` (the cache's).
__device__ inline void copy_row(const void* x, Elem x_el, int64_t from, void* dst, Elem dst_el,
                                int64_t to, int64_t D) {
  for (int64_t i = threadIdx.x; i < D; i += kThreads) {
    st_any(dst, dst_el, to + i, ld_any(x, x_el, from + i));
  }
}

// Row blockIdx.x of x [n, Hkv, D] (any float dtype), head blockIdx.y, into position pos0 + row of
// the sequence slice dst ([rows, Hkv, D], the cache's dtype).
__device__ inline void append_block(const void* x, Elem x_el, int64_t xs0, int64_t xs1, void* dst,
                                    Elem dst_el, int64_t pos0, int64_t Hkv, int64_t D) {
  const int64_t r = blockIdx.x, h = blockIdx.y;
  copy_row(x, x_el, r * xs0 + h * xs1, dst, dst_el, ((pos0 + r) * Hkv + h) * D, D);
}

// The rows of one decode launch: kernel parameters, so a step reads nothing the host must copy.
constexpr int kRowsPerLaunch = 256;
struct StepRows {
  int64_t row0 = 0;  // the first row of q / o this launch covers
  int32_t seq[kRowsPerLaunch];
  int32_t t[kRowsPerLaunch];  // the query's position: the sequence's length - 1
};

// A step's appends (decode.cu, kv_cache_append_rows): row r.row0 + i of x [S, Hkv, D] (i =
// blockIdx.x), head blockIdx.y, into position r.t[i] (the length before it) of sequence r.seq[i]
// of the cache buffer dst [num_seqs, rows, Hkv, D].
__device__ inline void append_step_block(const void* x, Elem x_el, int64_t xs0, int64_t xs1,
                                         void* dst, Elem dst_el, int64_t rows, int64_t Hkv,
                                         int64_t D, const StepRows& r) {
  const int64_t i = blockIdx.x, h = blockIdx.y;
  const int64_t to = ((int64_t(r.seq[i]) * rows + r.t[i]) * Hkv + h) * D;
  copy_row(x, x_el, (r.row0 + i) * xs0 + h * xs1, dst, dst_el, to, D);
}

// The compressed tokens a step's appends complete (at most one a sequence, SPEC 7): token r.t[i]
// of sequence r.seq[i] (i = blockIdx.x), head blockIdx.y, the mean of its raw rows; a spans every
// sequence of the cache (cache_cmp_all).
__device__ inline void mean_step_block(const CmpArgs& a, const StepRows& r) {
  CmpRow c;
  c.b = r.seq[blockIdx.x];
  c.row = r.t[blockIdx.x];
  c.first = c.row * a.d;
  mean_row(a, c, blockIdx.y);
}

template <typename In>
__device__ void decode_block(const FwdArgs& a, const StepRows& r, float* smem) {
  const int64_t i = blockIdx.x, t = r.t[i];
  nsa_query<In>(a, {0, r.row0 + i, r.seq[i], 0, t, t + 1, 0, blockIdx.y}, smem);
}

template <typename In>
__device__ void dense_decode_block(const DenseArgs& a, const StepRows& r, float* smem) {
  const int64_t i = blockIdx.x, t = r.t[i];
  dense_query<In>(a, {0, r.row0 + i, r.seq[i], 0, t, t + 1, 0, blockIdx.y}, smem);
}

// The positions of a step's rows (each sequence's length - 1, after any append) and the largest.
inline int64_t step_positions(const DecodeProblem& pr, std::vector<int32_t>* t) {
  t->resize(size_t(pr.S));
  int64_t top = 0;
  for (int64_t r = 0; r < pr.S; ++r) {
    (*t)[size_t(r)] = int32_t(pr.cache->len[size_t(pr.seqs[size_t(r)])] - 1);
    top = std::max<int64_t>(top, (*t)[size_t(r)]);
  }
  return top;
}

// Rows [r0, r0 + kRowsPerLaunch) of a step, clipped to S.
inline StepRows step_rows(const DecodeProblem& pr, const std::vector<int32_t>& t, int64_t r0) {
  StepRows rows;
  rows.row0 = r0;
  for (int64_t i = 0; i < kRowsPerLaunch && r0 + i < pr.S; ++i) {
    rows.seq[i] = int32_t(pr.seqs[size_t(r0 + i)]);
    rows.t[i] = t[size_t(r0 + i)];
  }
  return rows;
}

// The NSA step's arguments; its block scores are sized by the longest row of the step (t_max).
inline FwdArgs nsa_step_args(const DecodeProblem& pr, const CacheBufs& cb, int64_t t_max) {
  const nsa_kv_cache& c = *pr.cache;
  const nsa_decode_params& p = *pr.nsa;
  FwdArgs a;
  a.q = rows_view(pr.q);
  a.k_slc = a.k_win = cache_view(cb.k, cb.rows, c.Hkv, c.Dk, c.dtype);
  a.v_slc = a.v_win = cache_view(cb.v, cb.rows, c.Hkv, c.Dv, c.dtype);
  a.k_cmp = cache_view(cb.kc, cb.cmp_rows, c.Hkv, c.Dk, c.dtype);
  a.v_cmp = cache_view(cb.vc, cb.cmp_rows, c.Hkv, c.Dv, c.dtype);
  const nsa_tensor* gates[3] = {&p.g_cmp, &p.g_slc, &p.g_win};
  const nsa_tensor* lses[3] = {&p.lse_cmp, &p.lse_slc, &p.lse_win};
  for (int b = 0; b < 3; ++b) a.gate[b] = rows_view(*gates[b]), a.lse[b] = rows_view(*lses[b]);
  a.o = rows_view(pr.o);
  a.idx_out = rows_view(p.slc_indices_out);
  a.T = cb.rows;
  a.Tc_rows = cb.cmp_rows;
  a.G = int(pr.G), a.Dk = int(c.Dk), a.Dv = int(c.Dv);
  const nsa_config& cfg = c.cfg;
  a.l = cfg.cmp_block, a.d = cfg.cmp_stride, a.lp = cfg.slc_block, a.n = cfg.slc_count;
  a.n_init = cfg.slc_init, a.n_local = cfg.slc_local, a.w = cfg.window;
  a.scale = pr.scale;
  a.nblk = int(t_max / cfg.slc_block + 1);
  return a;
}

inline DenseArgs dense_step_args(const DecodeProblem& pr, const CacheBufs& cb) {
  const nsa_kv_cache& c = *pr.cache;
  DenseArgs a;
  a.q = rows_view(pr.q);
  a.k = cache_view(cb.k, cb.rows, c.Hkv, c.Dk, c.dtype);
  a.v = cache_view(cb.v, cb.rows, c.Hkv, c.Dv, c.dtype);
  a.o = rows_view(pr.o);
  a.lse = rows_view(pr.lse);
  a.T = cb.rows;
  a.G = int(pr.G), a.Dk = int(c.Dk), a.Dv = int(c.Dv), a.w = int(pr.window);
  a.scale = pr.scale;
  return a;
}

// The compressed rows [before, after) of sequence seq, as the mean or mlp kernels take them: x
// the sequence's raw slice, out its compressed slice (kind 0: keys, 1: values).
inline CmpArgs cache_cmp_args(const nsa_kv_cache& c, const CacheBufs& cb, int64_t seq, int kind,
                              int64_t before, int64_t after) {
  const size_t esize = nsa_dtype_size(c.dtype);
  const int64_t D = kind == 0 ? c.Dk : c.Dv;
  CmpArgs a;
  a.x =
      static_cast<const char*>(kind == 0 ? cb.k : cb.v) + size_t(seq * cb.rows * c.Hkv * D) * esize;
  a.out =
      static_cast<char*>(kind == 0 ? cb.kc : cb.vc) + size_t(seq * cb.cmp_rows * c.Hkv * D) * esize;
  a.x_el = a.out_el = elem_of(c.dtype);
  a.xs1 = a.os1 = c.Hkv * D;
  a.xs2 = a.os2 = D;
  a.T = cb.rows;
  a.D = D;
  a.l = c.cfg.cmp_block;
  a.d = c.cfg.cmp_stride;
  a.Tc = a.rows = after - before;
  a.row0 = before;
  return a;
}

// The mean's arguments over every sequence of the cache (batch row: a sequence), for
// mean_step_block.
inline CmpArgs cache_cmp_all(const nsa_kv_cache& c, const CacheBufs& cb, int kind) {
  CmpArgs a = cache_cmp_args(c, cb, 0, kind, 0, 0);
  a.xs0 = a.xs1 * cb.rows;
  a.os0 = a.os1 * cb.cmp_rows;
  return a;
}

}  // namespace
}  // namespace nsa::cuda
