// The per-position work of the CUDA forward, its dense baseline and decode (SPEC 4): one thread
// block per (query position, KV group), all G query heads together. The compressed branch runs
// first; its probabilities are recomputed once more, summed over the group and spread onto the
// selection blocks (Eq. 9) straight into shared memory, so neither a [T, Tc] nor a [T, blocks]
// matrix reaches global memory; the top-n is chosen there; then the slc and win branches stream
// their keys through the same chunk loop (attend.cuh). Everything a block sums, it sums in a
// fixed order: the same bits on every run. The kernels (forward.cu, decode.cu) only say where
// the query and its keys are (Loc).
#pragma once

#include <climits>

#include "cuda/attend.cuh"
#include "cuda/seqs.cuh"
#include "common/problem.h"
#include "nsa/nsa.h"

namespace nsa::cuda {
namespace {

// An [B, T, H(, D)] tensor: data and the strides of its first three dims; absent when p is null.
struct T4 {
  void* p = nullptr;
  int64_t s0 = 0, s1 = 0, s2 = 0;
  Elem el = Elem::kF32;
};

T4 t4(const nsa_tensor& t) {
  T4 v;
  v.p = t.data;
  v.s0 = t.stride[0];
  v.s1 = t.ndim > 1 ? t.stride[1] : 0;
  v.s2 = t.ndim > 2 ? t.stride[2] : 0;
  v.el = elem_of(t.dtype);
  return v;
}

// Element offset of [b, t, h] and its byte address.
__device__ __forceinline__ int64_t at(const T4& x, int64_t b, int64_t t, int64_t h) {
  return b * x.s0 + t * x.s1 + h * x.s2;
}
template <typename E>
__device__ __forceinline__ E* ptr(const T4& x, int64_t b, int64_t t, int64_t h) {
  return static_cast<E*>(x.p) + at(x, b, t, h);
}
__device__ __forceinline__ void* any_ptr(const T4& x, int64_t b, int64_t t, int64_t h) {
  const int64_t off = at(x, b, t, h);
  return x.el == Elem::kF32 ? static_cast<void*>(static_cast<float*>(x.p) + off)
                            : static_cast<void*>(static_cast<uint16_t*>(x.p) + off);
}

// The rows of head h of batch row b, for chunk loads.
template <typename In>
__device__ RowView rows(const T4& x, int64_t b, int64_t h) {
  return {static_cast<const In*>(x.p) + b * x.s0 + h * x.s2, x.s1};
}

struct FwdArgs {
  T4 q, k_slc, v_slc, k_win, v_win, k_cmp, v_cmp;
  T4 gate[3], o_br[3], lse[3];  // per branch: cmp, slc, win
  T4 o, idx_in, idx_out;
  const int32_t* cu = nullptr;
  int64_t S = 0, T = 0, Tc_rows = 0;
  int G = 0, Dk = 0, Dv = 0;
  int l = 0, d = 0, lp = 0, n = 0, n_init = 0, n_local = 0, w = 0;
  float scale = 0.0f;
  // Block-score slots: (T - 1) / l' + 1, T the batch's row length (for a packed batch the host
  // does not know the longest sequence, so it sizes for the whole row).
  int nblk = 0;
};

// Block-scope reduction slots of the top-n.
struct Best {
  float key;
  int j;
};
__device__ __forceinline__ bool better(float k, int j, const Best& b) {
  return b.j < 0 || k > b.key || (k == b.key && j < b.j);
}

// SPEC 4 step 3: the n - |F_t| highest non-forced scores (ties to the lower index, NaN lowest)
// joined to the forced blocks, written ascending to sel; returns the count (J + 1 >= n here).
// score[0..J] is consumed: forced blocks get +inf keys, chosen ones NaN.
__device__ int top_n(float* score, int* sel, int* tmp, const FwdArgs& a, int64_t J) {
  __shared__ Best red[kWarps];
  for (int64_t j = threadIdx.x; j <= J; j += kThreads) {
    const bool forced = j < a.n_init || j > J - a.n_local;
    const float s = score[j];
    score[j] = forced ? CUDART_INF_F : (isnan(s) ? -CUDART_INF_F : s);
  }
  __syncthreads();
  for (int r = 0; r < a.n; ++r) {
    Best b{0.0f, -1};
    for (int64_t j = threadIdx.x; j <= J; j += kThreads) {
      const float k = score[j];
      if (!isnan(k) && better(k, int(j), b)) b = {k, int(j)};
    }
    for (int o = 16; o > 0; o >>= 1) {
      const float k = __shfl_xor_sync(0xffffffffu, b.key, o);
      const int j = __shfl_xor_sync(0xffffffffu, b.j, o);
      if (j >= 0 && better(k, j, b)) b = {k, j};
    }
    if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = b;
    __syncthreads();
    if (threadIdx.x == 0) {
      Best w = red[0];
      for (int i = 1; i < kWarps; ++i) {
        if (red[i].j >= 0 && better(red[i].key, red[i].j, w)) w = red[i];
      }
      tmp[r] = w.j;
      if (w.j >= 0) score[w.j] = CUDART_NAN_F;  // taken (J + 1 > n: there is always one)
    }
    __syncthreads();
  }
  // Ascending: each chosen block's rank among the chosen (they are distinct).
  for (int i = threadIdx.x; i < a.n; i += kThreads) {
    int rank = 0;
    for (int k = 0; k < a.n; ++k) rank += tmp[k] < tmp[i];
    sel[rank] = tmp[i];
  }
  __syncthreads();
  return a.n;
}

// The caller's selection (nsa.h, slc_indices_in): -1 and out-of-range entries ignored (a device
// call cannot report them, "Where memory lives"), duplicates once, ascending.
__device__ int given_set(const int32_t* in, int* sel, int* tmp, const FwdArgs& a, int64_t J) {
  __shared__ int count;
  for (int i = threadIdx.x; i < a.n; i += kThreads) {
    const int32_t j = in[i];
    tmp[i] = j >= 0 && j <= J ? j : INT_MAX;
  }
  if (threadIdx.x == 0) count = 0;
  __syncthreads();
  for (int i = threadIdx.x; i < a.n; i += kThreads) {
    bool first = tmp[i] != INT_MAX;
    for (int k = 0; k < i && first; ++k) first = tmp[k] != tmp[i];
    if (!first) continue;
    int rank = 0;  // distinct values below tmp[i]: first occurrences only
    for (int k = 0; k < a.n; ++k) {
      bool first_k = tmp[k] < tmp[i];
      for (int m = 0; m < k && first_k; ++m) first_k = tmp[m] != tmp[k];
      rank += first_k;
    }
    sel[rank] = tmp[i];
    atomicAdd(&count, 1);  // an integer count: order-free
  }
  __syncthreads();
  return count;
}

// Eq. 10 for one chunk of nk compressed keys from row first of kc: ps[r] = sum over the group's
// heads of exp(score - lse), in head order, from each head's final cmp m and l (s.m, s.l). A head
// with no finite score (l = 0) adds nothing, as the reference's p = 0.
template <typename In>
__device__ void group_probs(const Smem& s, const Group& g, RowView kc, int64_t first, int nk,
                            float* ps) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();
  load_chunk<In>(
      s, g, kc, kc, nk, [&](int r) { return first + r; }, false);
  __syncthreads();
  chunk_scores<In>(s, g, nk);
  for (int h = warp; h < g.G; h += kWarps) {
    const float lse = s.m[h] + logf(s.l[h]);
    const float sc = score_of<In>(s, g, h, lane, nk);
    s.p[h * kChunk + lane] = lane < nk && s.l[h] != 0.0f ? expf(sc - lse) : 0.0f;
  }
  __syncthreads();
  if (int(threadIdx.x) < nk) {
    float sum = 0.0f;
    for (int h = 0; h < g.G; ++h) sum += s.p[h * kChunk + threadIdx.x];
    ps[threadIdx.x] = sum;
  }
  __syncthreads();
}

// Eq. 9: compressed tokens c0 .. c0 + nk - 1 (group probabilities ps) spread onto the selection
// blocks 0..J of score. Compressed token i covers [i d, i d + l); it weighs on block j by the
// overlap in strides. Each block's sum runs in token order. Callers sync after.
__device__ inline void spread_probs(const float* ps, int64_t c0, int nk, float* score,
                                    const FwdArgs& a, int64_t J) {
  const int64_t j_lo = (c0 * a.d) / a.lp;
  int64_t j_hi = ((c0 + nk - 1) * a.d + a.l - 1) / a.lp;
  if (j_hi > J) j_hi = J;
  for (int64_t j = j_lo + threadIdx.x; j <= j_hi; j += kThreads) {
    float acc = score[j];
    for (int r = 0; r < nk; ++r) {
      const int64_t i = c0 + r;
      const int64_t lo = max(i * a.d, j * a.lp), hi = min(i * a.d + a.l, (j + 1) * a.lp);
      if (hi > lo) acc = fmaf(ps[r], float(hi - lo) / float(a.d), acc);
    }
    score[j] = acc;
  }
}

// SPEC 4 step 2: the group-summed cmp probabilities spread onto the selection blocks 0..J of
// score, from the branch's final m and l (s.m, s.l), chunk by chunk in key order.
template <typename In>
__device__ void block_scores(const Smem& s, const Group& g, RowView kc, int64_t cmp0, int64_t nc,
                             float* score, float* ps, const FwdArgs& a, int64_t J) {
  for (int64_t j = threadIdx.x; j <= J; j += kThreads) score[j] = 0.0f;
  for (int64_t c0 = 0; c0 < nc; c0 += kChunk) {
    const int nk = int(nc - c0 < kChunk ? nc - c0 : kChunk);
    group_probs<In>(s, g, kc, cmp0 + c0, nk, ps);
    spread_probs(ps, c0, nk, score, a, J);
  }
  __syncthreads();
}

// SPEC 4 steps 2-3: the group's selection into sel (ascending; returns the count) and, when
// asked, idx_out. scores() fills score[0..J] when the block scores are needed (neither caller
// indices nor J + 1 <= n).
template <typename Scores>
__device__ int choose_blocks(const FwdArgs& a, int64_t b, int64_t tok, int64_t hk, int64_t J,
                             float* score, int* sel, int* tmp, Scores scores) {
  int count;
  if (a.idx_in.p) {
    count = given_set(ptr<const int32_t>(a.idx_in, b, tok, hk), sel, tmp, a, J);
  } else if (J + 1 <= a.n) {
    for (int i = threadIdx.x; i <= J; i += kThreads) sel[i] = i;
    count = int(J + 1);
  } else {
    scores();
    count = top_n(score, sel, tmp, a, J);
  }
  __syncthreads();
  if (a.idx_out.p) {
    int32_t* io = ptr<int32_t>(a.idx_out, b, tok, hk);
    for (int i = threadIdx.x; i < a.n; i += kThreads) io[i] = i < count ? sel[i] : -1;
  }
  return count;
}

// Where one query and its keys are: q, the gates and every output at [qb, qt, head]; its keys
// at rows start .. start + t of batch row kb (its position is t, its sequence len tokens long),
// its compressed keys from row cmp_start of kb; hk its KV head.
struct Loc {
  int64_t qb = 0, qt = 0, kb = 0, start = 0, t = 0, len = 0, cmp_start = 0, hk = 0;
};

// SPEC 4 step 1: the complete compressed blocks of L's query, clamped to the rows the tensor has.
__device__ inline int64_t cmp_count(const FwdArgs& a, const Loc& L) {
  int64_t nc = L.t + 1 >= a.l ? (L.t + 1 - a.l) / a.d + 1 : 0;
  nc = min(nc, cmp_len(L.len, a.l, a.d));
  return max(int64_t(0), min(nc, a.Tc_rows - L.cmp_start));
}

// Where the branches of the G heads from h0 at [b, tok] go: ungated outputs and LSEs when asked
// for, and their gates.
__device__ inline void branch_outs(const FwdArgs& a, int64_t b, int64_t tok, int64_t h0,
                                   BranchOut* out) {
  for (int c = 0; c < 3; ++c) {
    BranchOut& o = out[c];
    if (a.o_br[c].p) o = {any_ptr(a.o_br[c], b, tok, h0), a.o_br[c].el, a.o_br[c].s2};
    if (a.lse[c].p) o.lse = ptr<float>(a.lse[c], b, tok, h0), o.lse_hs = a.lse[c].s2;
    o.gate = any_ptr(a.gate[c], b, tok, h0);
    o.gate_el = a.gate[c].el;
    o.gate_hs = a.gate[c].s2;
  }
}

// The slc branch's keys of L's query: span i of the selection sel (block sel[i], up to t).
struct SlcSpans {
  const int* sel;
  int64_t start, t, lp;
  __device__ void operator()(int i, int64_t* f, int64_t* n) const {
    const int64_t first = int64_t(sel[i]) * lp;
    *f = start + first;
    *n = min(lp, t + 1 - first);
  }
};

// Dynamic shared memory of nsa_query, in bytes.
inline int64_t nsa_smem_bytes(int G, int Dk, int Dv, int nblk, int n) {
  return 4 * (smem_floats(G, Dk, Dv) + nblk + kChunk + 2 * int64_t(n));
}

// SPEC 4 for the G query heads of KV head L.hk at one query position (L), the block's work in
// the forward and in a decode step alike.
template <typename In>
__device__ void nsa_query(const FwdArgs& a, const Loc& L, float* smem) {
  const int64_t b = L.qb, tok = L.qt, kb = L.kb, hk = L.hk;
  const Group g{a.G, a.Dk, a.Dv, a.scale};
  const Smem s = carve(smem, a.G, a.Dk, a.Dv);
  float* score = s.extra;
  float* ps = score + a.nblk;
  int* sel = reinterpret_cast<int*>(ps + kChunk);
  int* tmp = sel + a.n;
  const int64_t t = L.t, J = t / a.lp, h0 = hk * a.G;
  load_group<In>(s, g, any_ptr(a.q, b, tok, h0), a.q.el, a.q.s2);

  BranchOut out[3];
  branch_outs(a, b, tok, h0, out);

  // Step 1: cmp over the complete compressed blocks.
  const int64_t nc = cmp_count(a, L);
  const RowView kc = rows<In>(a.k_cmp, kb, hk), vc = rows<In>(a.v_cmp, kb, hk);
  begin_branch(s, g);
  attend_spans<In>(s, g, kc, vc, 1, [&](int, int64_t* f, int64_t* n) {
    *f = L.cmp_start;
    *n = nc;
  });
  end_branch(s, g, out[0]);

  // Steps 2-3: the group's selection.
  const int count = choose_blocks(a, b, tok, hk, J, score, sel, tmp, [&] {
    block_scores<In>(s, g, kc, L.cmp_start, nc, score, ps, a, J);
  });

  // Step 4: slc over the selected blocks' keys up to t.
  begin_branch(s, g);
  __syncthreads();
  attend_spans<In>(s, g, rows<In>(a.k_slc, kb, hk), rows<In>(a.v_slc, kb, hk), count,
                   SlcSpans{sel, L.start, t, a.lp});
  end_branch(s, g, out[1]);
  __syncthreads();

  // Step 5: win over max(0, t - w + 1) .. t.
  begin_branch(s, g);
  __syncthreads();
  const int64_t w0 = max(int64_t(0), t - a.w + 1);
  attend_spans<In>(s, g, rows<In>(a.k_win, kb, hk), rows<In>(a.v_win, kb, hk), 1,
                   [&](int, int64_t* f, int64_t* n) {
                     *f = L.start + w0;
                     *n = t - w0 + 1;
                   });
  end_branch(s, g, out[2]);
  __syncthreads();

  // Step 6: the gated sum.
  store_out(s, g, any_ptr(a.o, b, tok, h0), a.o.el, a.o.s2);
}

// The dense baseline (nsa_dense_fwd): one branch over keys max(0, t - w + 1) .. t (w = 0: all).
struct DenseArgs {
  T4 q, k, v, o, lse;
  const int32_t* cu = nullptr;
  int64_t S = 0, T = 0;
  int G = 0, Dk = 0, Dv = 0, w = 0;
  float scale = 0.0f;
};

template <typename In>
__device__ void dense_query(const DenseArgs& a, const Loc& L, float* smem) {
  const int64_t b = L.qb, tok = L.qt, kb = L.kb, hk = L.hk;
  const Group g{a.G, a.Dk, a.Dv, a.scale};
  const Smem s = carve(smem, a.G, a.Dk, a.Dv);
  const int64_t t = L.t, h0 = hk * a.G;
  load_group<In>(s, g, any_ptr(a.q, b, tok, h0), a.q.el, a.q.s2);
  begin_branch(s, g);
  __syncthreads();
  const int64_t w0 = a.w > 0 ? max(int64_t(0), t - a.w + 1) : 0;
  attend_spans<In>(s, g, rows<In>(a.k, kb, hk), rows<In>(a.v, kb, hk), 1,
                   [&](int, int64_t* f, int64_t* n) {
                     *f = L.start + w0;
                     *n = t - w0 + 1;
                   });
  BranchOut bo;
  if (a.lse.p) bo.lse = ptr<float>(a.lse, b, tok, h0), bo.lse_hs = a.lse.s2;
  end_branch(s, g, bo);
  __syncthreads();
  store_out(s, g, any_ptr(a.o, b, tok, h0), a.o.el, a.o.s2);
}

// The forward's arguments from a validated problem (host code; forward.cu, test_cuda_emu.cc).
inline FwdArgs fwd_args(const FwdProblem& pr) {
  const nsa_fwd_params& p = pr.p;
  const nsa_config& cfg = p.in.cfg;
  FwdArgs a;
  a.q = t4(p.in.q);
  a.k_slc = t4(p.in.k_slc), a.v_slc = t4(p.in.v_slc);
  a.k_win = t4(p.in.k_win), a.v_win = t4(p.in.v_win);
  a.k_cmp = t4(p.in.k_cmp), a.v_cmp = t4(p.in.v_cmp);
  const nsa_tensor* gates[3] = {&p.in.g_cmp, &p.in.g_slc, &p.in.g_win};
  const nsa_tensor* obr[3] = {&p.o_cmp, &p.o_slc, &p.o_win};
  const nsa_tensor* lses[3] = {&p.lse_cmp, &p.lse_slc, &p.lse_win};
  for (int c = 0; c < 3; ++c)
    a.gate[c] = t4(*gates[c]), a.o_br[c] = t4(*obr[c]), a.lse[c] = t4(*lses[c]);
  a.o = t4(p.o), a.idx_in = t4(p.slc_indices_in), a.idx_out = t4(p.slc_indices_out);
  a.cu = p.in.cu_seqlens;
  a.S = p.in.num_seqs;
  a.T = pr.T;
  a.Tc_rows = p.in.k_cmp.shape[1];
  a.G = int(pr.G), a.Dk = int(pr.Dk), a.Dv = int(pr.Dv);
  a.l = cfg.cmp_block, a.d = cfg.cmp_stride, a.lp = cfg.slc_block, a.n = cfg.slc_count;
  a.n_init = cfg.slc_init, a.n_local = cfg.slc_local, a.w = cfg.window;
  a.scale = cfg.scale;
  a.nblk = int((pr.T - 1) / cfg.slc_block + 1);
  return a;
}

// One block of the forward: token blockIdx.x of the [B, T] batch, KV head blockIdx.y.
template <typename In>
__device__ void fwd_block(const FwdArgs& a, float* smem) {
  const int64_t b = blockIdx.x / a.T, tok = blockIdx.x % a.T;
  const Place pl = place_token(a.cu, a.S, b, tok, a.T, a.l, a.d);
  if (!pl.ok) return;  // invalid cu_seqlens: this row is left as it was
  nsa_query<In>(a, {b, tok, b, pl.start, pl.t, pl.len, pl.cmp_start, blockIdx.y}, smem);
}

inline DenseArgs dense_args(const DenseProblem& pr) {
  const nsa_dense_fwd_params& p = pr.p;
  DenseArgs a;
  a.q = t4(p.q), a.k = t4(p.k), a.v = t4(p.v), a.o = t4(p.o), a.lse = t4(p.lse);
  a.cu = p.cu_seqlens;
  a.S = p.num_seqs;
  a.T = pr.T;
  a.G = int(pr.G), a.Dk = int(pr.Dk), a.Dv = int(pr.Dv), a.w = p.window;
  a.scale = p.scale;
  return a;
}

template <typename In>
__device__ void dense_block(const DenseArgs& a, float* smem) {
  const int64_t b = blockIdx.x / a.T, tok = blockIdx.x % a.T;
  const Place pl = place_token(a.cu, a.S, b, tok, a.T, 1, 1);
  if (!pl.ok) return;
  dense_query<In>(a, {b, tok, b, pl.start, pl.t, pl.len, 0, blockIdx.y}, smem);
}

}  // namespace
}  // namespace nsa::cuda
