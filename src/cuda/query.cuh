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
  int P = 1;  // positions per forward block (fwd_positions)
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

// Eq. 10 for one loaded chunk of nk compressed keys, at each of the group's positions p:
// ps[p kChunk + r] = sum over its heads of exp(score - lse), in head order, from each head's
// final cmp m and l (s.m, s.l), for its first lim(p) keys (the ones it sees; 0 past them). A head
// with no finite score (l = 0) adds nothing, as the reference's p = 0. Ends with a barrier.
template <typename In, typename Lim>
__device__ void group_probs(const Smem& s, const Group& g, int nk, float* ps, Lim lim) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  chunk_scores<In>(s, g, nk, Rows{0, g.rows()});
  for (int h = warp; h < g.rows(); h += kWarps) {
    const int seen = lim(h / g.G);
    const float lse = s.m[h] + logf(s.l[h]);
    const float sc = score_of<In>(s, g, h, lane, seen);
    s.p[h * kChunk + lane] = lane < seen && s.l[h] != 0.0f ? expf(sc - lse) : 0.0f;
  }
  __syncthreads();
  for (int i = threadIdx.x; i < g.P * kChunk; i += kThreads) {
    const int p = i / kChunk, r = i % kChunk;
    if (r >= nk) continue;
    float sum = 0.0f;
    for (int h = 0; h < g.G; ++h) sum += s.p[(p * g.G + h) * kChunk + r];
    ps[i] = sum;
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

// SPEC 4 step 2 at each of the group's positions p: its group-summed cmp probabilities spread
// onto its selection blocks 0..J(p) of score + p nblk, from the branch's final m and l (s.m,
// s.l), chunk by chunk in key order (stream_keys), each chunk loaded once for every position.
// nc(p) counts the compressed tokens p sees (nondecreasing in p).
template <typename In, typename Nc, typename Jp>
__device__ void block_scores(const Smem& s, const Group& g, RowView kc, int64_t cmp0, Nc nc,
                             float* score, float* ps, const FwdArgs& a, Jp J) {
  for (int p = 0; p < g.P; ++p) {
    for (int64_t j = threadIdx.x; j <= J(p); j += kThreads) score[p * a.nblk + j] = 0.0f;
  }
  stream_keys<In>(
      s, g, kc, kc, false, 1, Span{cmp0, nc(g.P - 1)}, [&](const Smem& b, const auto& c) {
        const int nk = c.nk();
        const int64_t c0 = c.c0;
        group_probs<In>(b, g, nk, ps,
                        [&](int p) { return int(min(int64_t(nk), max(int64_t(0), nc(p) - c0))); });
        for (int p = 0; p < g.P; ++p) {
          spread_probs(ps + p * kChunk, c0, nk, score + p * a.nblk, a, J(p));
        }
      });
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

// Where a block's queries and their keys are: q, the gates and every output of the first at
// [qb, qt, head]; its keys at rows start .. start + t of batch row kb (its position is t, its
// sequence len tokens long), its compressed keys from row cmp_start of kb; hk its KV head. The
// forward's blocks take n consecutive positions t .. t + n - 1 of that sequence (tokens qt ..
// qt + n - 1); decode one.
struct Loc {
  int64_t qb = 0, qt = 0, kb = 0, start = 0, t = 0, len = 0, cmp_start = 0, hk = 0;
  int n = 1;
};

// SPEC 4 step 1: the complete compressed blocks of L's query p (position t + p), clamped to the
// rows the tensor has.
__device__ inline int64_t cmp_count(const FwdArgs& a, const Loc& L, int p = 0) {
  const int64_t t = L.t + p;
  int64_t nc = t + 1 >= a.l ? (t + 1 - a.l) / a.d + 1 : 0;
  nc = min(nc, cmp_len(L.len, a.l, a.d));
  return max(int64_t(0), min(nc, a.Tc_rows - L.cmp_start));
}

// Where the branches of the G heads from h0 at [b, tok] (and the positions after it) go: ungated
// outputs and LSEs when asked for, and their gates.
__device__ inline void branch_outs(const FwdArgs& a, int64_t b, int64_t tok, int64_t h0,
                                   BranchOut* out) {
  for (int c = 0; c < 3; ++c) {
    BranchOut& o = out[c];
    const T4 &ob = a.o_br[c], &lse = a.lse[c], &gate = a.gate[c];
    if (ob.p) o.o = any_ptr(ob, b, tok, h0), o.o_el = ob.el, o.o_hs = ob.s2, o.o_ps = ob.s1;
    if (lse.p) o.lse = ptr<float>(lse, b, tok, h0), o.lse_hs = lse.s2, o.lse_ps = lse.s1;
    o.gate = any_ptr(gate, b, tok, h0);
    o.gate_el = gate.el;
    o.gate_hs = gate.s2;
    o.gate_ps = gate.s1;
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

// Dynamic shared memory of nsa_query for P positions, in bytes: the tiles of P G rows, then
// each position's block scores and group probabilities, the selection and top-n scratch.
inline int64_t nsa_smem_bytes(int G, int Dk, int Dv, int nblk, int n, int P = 1) {
  return 4 * (smem_floats(P * G, Dk, Dv) + int64_t(P) * (nblk + kChunk) + 2 * int64_t(n));
}

// Rows (heads times positions) a forward block aims at: two of the tensor cores' 16-row tiles.
// A small group fills them instead of padding, and every group shares its cmp and win keys
// across positions: at G = 16 each compressed key is read for two positions at once, at G = 4
// for eight, so G = 4 reads as many cmp and win keys per head as G = 16.
constexpr int kTileRows = 32;

// Positions per forward block: kTileRows / G (at least 1), fewer when their block scores would
// not fit in smem_limit bytes.
inline int fwd_positions(int G, int Dk, int Dv, int nblk, int n, int64_t smem_limit) {
  int P = G < kTileRows ? kTileRows / G : 1;
  while (P > 1 && nsa_smem_bytes(G, Dk, Dv, nblk, n, P) > smem_limit) --P;
  return P;
}

// Step 1 at L's positions: cmp over the compressed tokens every position sees, loaded once for
// all of them, then the few that only the later positions see (the count grows by one every d
// positions), for their rows alone.
template <typename In>
__device__ void cmp_branch(const FwdArgs& a, const Loc& L, const Group& g, const Smem& s,
                           RowView kc, RowView vc, const BranchOut& out) {
  const int64_t nc0 = cmp_count(a, L);
  begin_branch(s, g);
  attend_spans<In>(s, g, kc, vc, 1, Span{L.cmp_start, nc0});
  for (int p = 1; p < L.n; ++p) {
    const int64_t nc = cmp_count(a, L, p);
    if (nc > nc0) {
      attend_spans<In>(s, g, kc, vc, 1, Span{L.cmp_start + nc0, nc - nc0}, rows_of_position(g, p));
    }
  }
  end_branch(s, g, out);
}

// Step 5 at L's positions t .. t + n - 1: each sees [max(0, t + p - w + 1), t + p]. The keys
// they all see, [max(0, t + n - w), t], are loaded once for every row; each position's own
// first and last keys only for its rows. Each row still takes its keys in ascending order.
template <typename In>
__device__ void win_branch(const FwdArgs& a, const Loc& L, const Group& g, const Smem& s,
                           RowView kw, RowView vw, const BranchOut& out) {
  const int64_t t0 = L.t, common = max(int64_t(0), t0 + L.n - a.w);
  begin_branch(s, g);
  __syncthreads();
  for (int p = 0; p < L.n; ++p) {
    const int64_t lo = max(int64_t(0), t0 + p - a.w + 1);
    const int64_t hi = common <= t0 ? min(common, t0 + p + 1) : t0 + p + 1;  // own keys below
    if (hi > lo) {
      attend_spans<In>(s, g, kw, vw, 1, Span{L.start + lo, hi - lo}, rows_of_position(g, p));
    }
  }
  if (common <= t0) {
    attend_spans<In>(s, g, kw, vw, 1, Span{L.start + common, t0 - common + 1});
    for (int p = 1; p < L.n; ++p) {
      attend_spans<In>(s, g, kw, vw, 1, Span{L.start + t0 + 1, p}, rows_of_position(g, p));
    }
  }
  end_branch(s, g, out);
}

// SPEC 4 for the G query heads of KV head L.hk at L's positions (one in decode, up to a.P in the
// forward), the block's work in the forward and in a decode step alike. cmp and win load the
// keys the positions share once for all of them (fwd_positions); the selection and slc are each
// position's own.
template <typename In>
__device__ void nsa_query(const FwdArgs& a, const Loc& L, float* smem) {
  const int64_t b = L.qb, tok = L.qt, kb = L.kb, hk = L.hk, h0 = hk * a.G;
  const Group g{a.G, a.Dk, a.Dv, a.scale, L.n};
  const Smem s = carve(smem, g.rows(), a.Dk, a.Dv);
  float* score = s.extra;            // [n][nblk]
  float* ps = score + L.n * a.nblk;  // [n][kChunk]
  int* sel = reinterpret_cast<int*>(ps + L.n * kChunk);
  int* tmp = sel + a.n;
  load_group<In>(s, g, any_ptr(a.q, b, tok, h0), a.q.el, a.q.s2, a.q.s1);
  BranchOut out[3];
  branch_outs(a, b, tok, h0, out);
  const RowView kc = rows<In>(a.k_cmp, kb, hk), vc = rows<In>(a.v_cmp, kb, hk);
  cmp_branch<In>(a, L, g, s, kc, vc, out[0]);

  // Step 2: the block scores of every position that needs them, in one pass.
  const auto J = [&](int p) { return (L.t + p) / a.lp; };
  if (a.idx_in.p == nullptr && J(L.n - 1) + 1 > a.n) {
    block_scores<In>(
        s, g, kc, L.cmp_start, [&](int p) { return cmp_count(a, L, p); }, score, ps, a, J);
  }

  // Steps 3-4: each position's selection, then slc over its blocks' keys up to its t.
  __syncthreads();  // cmp's end_branch has read every row's m and l
  begin_branch(s, g);
  __syncthreads();
  for (int p = 0; p < L.n; ++p) {
    const int count = choose_blocks(a, b, tok + p, hk, J(p), score + p * a.nblk, sel, tmp, [] {});
    attend_spans<In>(s, g, rows<In>(a.k_slc, kb, hk), rows<In>(a.v_slc, kb, hk), count,
                     SlcSpans{sel, L.start, L.t + p, a.lp}, rows_of_position(g, p));
  }
  end_branch(s, g, out[1]);
  __syncthreads();

  win_branch<In>(a, L, g, s, rows<In>(a.k_win, kb, hk), rows<In>(a.v_win, kb, hk), out[2]);
  __syncthreads();

  // Step 6: the gated sum.
  store_out(s, g, any_ptr(a.o, b, tok, h0), a.o.el, a.o.s2, a.o.s1);
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
                   Span{L.start + w0, t - w0 + 1});
  BranchOut bo;
  if (a.lse.p) bo.lse = ptr<float>(a.lse, b, tok, h0), bo.lse_hs = a.lse.s2;
  end_branch(s, g, bo);
  __syncthreads();
  store_out(s, g, any_ptr(a.o, b, tok, h0), a.o.el, a.o.s2);
}

// The forward's arguments from a validated problem (host code; forward.cu, test_cuda_emu.cc), for
// blocks of at most smem_limit bytes of dynamic shared memory (an H100's by default).
inline FwdArgs fwd_args(const FwdProblem& pr, int64_t smem_limit = 227 * 1024) {
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
  a.P = fwd_positions(a.G, a.Dk, a.Dv, a.nblk, a.n, smem_limit);
  return a;
}

// Forward blocks per batch row: its tokens in tiles of a.P.
__host__ __device__ inline int64_t fwd_tiles(const FwdArgs& a) { return (a.T + a.P - 1) / a.P; }

// One block of the forward: tile blockIdx.x of the [B, T] batch (a.P tokens), KV head
// blockIdx.y. A tile that crosses a sequence's end (packed batches) runs one part per sequence.
template <typename In>
__device__ void fwd_block(const FwdArgs& a, float* smem) {
  const int64_t tiles = fwd_tiles(a), b = blockIdx.x / tiles, tok0 = blockIdx.x % tiles * a.P;
  const int64_t end = min(tok0 + a.P, a.T);
  for (int64_t tok = tok0; tok < end;) {
    const Place pl = place_token(a.cu, a.S, b, tok, a.T, a.l, a.d);
    if (!pl.ok) {  // invalid cu_seqlens: this token is left as it was
      ++tok;
      continue;
    }
    const int n = int(min(end - tok, pl.len - pl.t));
    nsa_query<In>(a, {b, tok, b, pl.start, pl.t, pl.len, pl.cmp_start, blockIdx.y, n}, smem);
    __syncthreads();  // the next part carves the same shared memory
    tok += n;
  }
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
