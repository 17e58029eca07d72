// The CPU backward of NSA attention (SPEC.md section 6): setup, the inverted selection, and
// pass 1 (dq, dg_c, D_c), owned by query tiles. Pass 2 (dk/dv) is in backward_keys.cc; the
// ownership scheme is described in backward.h.
//
// Each branch is plain softmax attention over its key set with I_t fixed, so its backward is
// FlashAttention-2's (Dao 2023, Alg. 2), gated (SPEC 4.6, paper Eq. 5):
//   P_j = exp(s_j - lse), dP_j = g_c do . v_j, D_c = sum_j P_j dP_j (= rowsum(dO_c o O_c)),
//   dS_j = P_j (dP_j - D_c), dq += scale sum_j dS_j k_j, dg_c = do . O_c, O_c = sum_j P_j v_j.
// Accumulation is f32 (bf16 inputs widened exactly).
//
// Where the time goes: pass 1 reads each (row, key) pair once (a Dk dot, a Dv dot, a Dv axpy and
// a Dk axpy); pass 2 reads each pair again (the same two dots, then a Dk and a Dv axpy into the
// key's accumulators), so the whole backward is about 2x the forward's multiply-adds, plus the
// recomputed exp. Profile at T = 4096, Hq = 16, Hkv = 1, Dk = 192, Dv = 128, one thread: pass 1
// (query_tile) 42%, pass 2 (raw_block 36%, cmp_tile 4%), expf 6%. The loops are f32 vectors
// (GCC vector extensions, compiled per ISA by target_clones; no Highway yet), blocked in fours
// (dot4/axpy4); they are bound by loads and stores of rows, and each (row, key) pair still pays
// two horizontal reductions. Next: heads x keys tiles (GEMM-like, heads in lanes as the forward's
// lanes-inl.h), which would load each row once per tile and need no reduction.
#include "cpu/backward.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <new>

#include "common/backends.h"
#include "cpu/kernels.h"

namespace nsa::cpu {
namespace bwd {

void make_view(const nsa_tensor& t, View* v) {
  if (t.dtype == NSA_DTYPE_F32) {
    v->base = static_cast<const float*>(t.data);
    v->s0 = t.stride[0], v->s1 = t.stride[1], v->s2 = t.stride[2];
    return;
  }
  // bf16: a contiguous f32 copy, converted once.
  const int64_t n0 = t.shape[0], n1 = t.shape[1], n2 = t.shape[2];
  const int64_t n3 = t.ndim == 4 ? t.shape[3] : 1;
  v->owned.resize(static_cast<size_t>(n0 * n1 * n2 * n3));
  v->s2 = n3, v->s1 = n2 * n3, v->s0 = n1 * n2 * n3;
  for (int64_t a = 0; a < n0; ++a)
    for (int64_t b = 0; b < n1; ++b)
      for (int64_t c = 0; c < n2; ++c)
        load_row(t, offset_of(t, a, b, c), n3, v->owned.data() + a * v->s0 + b * v->s1 + c * v->s2);
  v->base = v->owned.data();
}

int64_t selected_set(const BwdProblem& pr, int64_t b, int64_t tok, int64_t hk, int32_t* out) {
  const nsa_tensor& ix = pr.p.slc_indices;
  const int64_t n = pr.p.cfg.slc_count;
  int64_t m = 0;
  for (int64_t k = 0; k < n; ++k) {
    const int32_t j = static_cast<const int32_t*>(ix.data)[offset_of(ix, b, tok, hk, k)];
    if (j >= 0) out[m++] = j;
  }
  std::sort(out, out + m);
  return std::unique(out, out + m) - out;
}

namespace {

// Counting sort of the selection by block (SPEC 6: I_t fixed): count, prefix-sum, fill with t
// ascending, so every block's list is ascending in t and pass 2 sums in that order.
void invert_selection(const BwdProblem& pr, SlcInverse* inv) {
  const int64_t Hkv = pr.Hkv, lp = pr.p.cfg.slc_block, S = static_cast<int64_t>(pr.seqs.size());
  inv->pair_base.assign(static_cast<size_t>(S * Hkv), 0);
  int64_t slots = 0;
  for (int64_t s = 0; s < S; ++s) {
    const int64_t blocks = (pr.seqs[s].len + lp - 1) / lp;
    for (int64_t hk = 0; hk < Hkv; ++hk) {
      inv->pair_base[s * Hkv + hk] = slots;
      slots += blocks;
    }
  }
  inv->offset.assign(static_cast<size_t>(slots + 1), 0);
  std::vector<int32_t> set(static_cast<size_t>(pr.p.cfg.slc_count));
  for (int pass = 0; pass < 2; ++pass) {
    std::vector<int64_t> fill;
    if (pass == 1) {
      for (int64_t i = 0; i < slots; ++i) inv->offset[i + 1] += inv->offset[i];
      inv->queries.resize(static_cast<size_t>(inv->offset[slots]));
      fill.assign(inv->offset.begin(), inv->offset.end() - 1);
    }
    for (int64_t s = 0; s < S; ++s) {
      const Sequence& sq = pr.seqs[s];
      for (int64_t hk = 0; hk < Hkv; ++hk) {
        const int64_t base = inv->pair_base[s * Hkv + hk];
        for (int64_t t = 0; t < sq.len; ++t) {
          const int64_t m = selected_set(pr, sq.batch, sq.start + t, hk, set.data());
          for (int64_t i = 0; i < m; ++i) {
            if (pass == 0) {
              ++inv->offset[base + set[i] + 1];
            } else {
              inv->queries[fill[base + set[i]]++] = static_cast<int32_t>(t);
            }
          }
        }
      }
    }
  }
}

// A tile of query positions [t0, t1) of one sequence and KV head: pass 1's unit of ownership.
struct QueryTile {
  int64_t seq = 0, hk = 0, t0 = 0, t1 = 0;
};
constexpr int64_t kQueryTile = 16;

// Per-thread scratch of pass 1.
struct QueryScratch {
  std::vector<int64_t> rows;  // [max_len]: the branch's key rows
  std::vector<float> p, dp;   // [G * max_len]: scores then probabilities; ungated do . v_j
  std::vector<float> o, dq;   // [G * Dv], [G * Dk]
  std::vector<float> lse, psum;  // [G]
  std::vector<float> zero;       // [max(Dk, Dv)] zeros: the padding row of a last four
  std::vector<int32_t> set;   // [n]
};

// The key rows (dimension 1 of the branch's K/V) that position t reads in branch c (SPEC 4).
int64_t branch_rows(const BwdProblem& pr, const Sequence& s, int64_t t, int64_t hk, int c,
                    int32_t* set, int64_t* rows) {
  const nsa_config& cfg = pr.p.cfg;
  int64_t m = 0;
  if (c == kCmp) {  // step 1: complete compressed blocks, i*d + l - 1 <= t
    const int64_t vis = visible_cmp_count(cfg, t);
    for (int64_t i = 0; i < vis; ++i) rows[m++] = s.cmp_start + i;
  } else if (c == kSlc) {  // step 4: positions p <= t of the selected blocks
    const int64_t nb = selected_set(pr, s.batch, s.start + t, hk, set);
    for (int64_t i = 0; i < nb; ++i) {
      const int64_t begin = int64_t{set[i]} * cfg.slc_block;
      const int64_t end = std::min<int64_t>(begin + cfg.slc_block, t + 1);
      for (int64_t p = begin; p < end; ++p) rows[m++] = s.start + p;
    }
  } else {  // step 5: the window max(0, t - w + 1) .. t
    for (int64_t p = std::max<int64_t>(0, t - cfg.window + 1); p <= t; ++p) rows[m++] = s.start + p;
  }
  return m;
}

// Keys outer, the G heads of the group inner: a key row is loaded once for all heads (it stays in
// L1 while they use it) and the heads' q, do, O and dq rows (G (2 Dk + 2 Dv) floats) stay in L1
// too. target_clones: the plain f32 loops are compiled for AVX-512, AVX2+FMA and the baseline,
// chosen at load time (runtime dispatch; the build itself targets the baseline ISA).
__attribute__((target_clones("avx512f", "arch=haswell", "default")))
void query_tile(State& st, const QueryTile& qt, QueryScratch& sc) {
  const BwdProblem& pr = *st.pr;
  const nsa_bwd_params& p = pr.p;
  const Inputs& in = st.in;
  const Sequence& s = pr.seqs[qt.seq];
  const int64_t b = s.batch, hk = qt.hk, Dk = pr.Dk, Dv = pr.Dv, G = pr.G, h0 = hk * G;
  const float scale = p.cfg.scale;
  const View* keys[3] = {&in.k_cmp, &in.k_slc, &in.k_win};
  const View* vals[3] = {&in.v_cmp, &in.v_slc, &in.v_win};
  const nsa_tensor* saved_lse[3] = {&p.lse_cmp, &p.lse_slc, &p.lse_win};
  const nsa_tensor* dgate[3] = {&p.dg_cmp, &p.dg_slc, &p.dg_win};
  for (int64_t t = qt.t0; t < qt.t1; ++t) {
    const int64_t tok = s.start + t;
    fill(0.0f, sc.dq.data(), G * Dk);
    for (int c = 0; c < 3; ++c) {
      int64_t* rows = sc.rows.data();
      const int64_t m = branch_rows(pr, s, t, hk, c, sc.set.data(), rows);
      const int64_t ld = m;  // row stride of p / dp: [G][m]
      for (int64_t g = 0; g < G; ++g) sc.psum[g] = 0.0f;
      if (m > 0) {  // an empty branch (t < l - 1 for cmp): o_c = 0, no gradient, no NaN
        // Keys in fours (dot4, axpy4: each head's rows are loaded once per four keys); the last
        // four is padded with a zero row, which adds exactly 0.
        const float* zero = sc.zero.data();
        auto four = [&](const View* x, int64_t j, const float** r) {
          for (int64_t i = 0; i < 4; ++i) r[i] = j + i < m ? x->row(b, rows[j + i], hk) : zero;
        };
        const float* kr[4];
        const float* vr[4];
        float x4[4];
        // Scores.
        for (int64_t j = 0; j < m; j += 4) {
          four(keys[c], j, kr);
          for (int64_t g = 0; g < G; ++g) {
            dot4(in.q.row(b, tok, h0 + g), kr, Dk, x4);
            for (int64_t i = 0; i < std::min<int64_t>(4, m - j); ++i) sc.p[g * ld + j + i] = scale * x4[i];
          }
        }
        // The LSE: the forward's when given (nsa.h), else recomputed.
        for (int64_t g = 0; g < G; ++g) {
          if (present(*saved_lse[c])) {
            sc.lse[g] = load_f32(*saved_lse[c], offset_of(*saved_lse[c], b, tok, h0 + g));
            continue;
          }
          const float* sg = sc.p.data() + g * ld;
          float mx = kNegInf, sum = 0.0f;
          for (int64_t j = 0; j < m; ++j) mx = std::max(mx, sg[j]);
          for (int64_t j = 0; j < m; ++j) sum += std::exp(sg[j] - mx);
          sc.lse[g] = mx + std::log(sum);
        }
        // P, dP (with the ungated do), O_c and sum_j P_j dP_j in one pass over the values.
        fill(0.0f, sc.o.data(), G * Dv);
        for (int64_t j = 0; j < m; j += 4) {
          four(vals[c], j, vr);
          for (int64_t g = 0; g < G; ++g) {
            float dp4[4], p4[4] = {0, 0, 0, 0};
            dot4(in.d_o.row(b, tok, h0 + g), vr, Dv, dp4);
            for (int64_t i = 0; i < std::min<int64_t>(4, m - j); ++i) {
              float& pj = sc.p[g * ld + j + i];
              pj = std::exp(pj - sc.lse[g]);
              p4[i] = pj;
              sc.dp[g * ld + j + i] = dp4[i];
              sc.psum[g] += pj * dp4[i];
            }
            axpy4(p4, vr, sc.o.data() + g * Dv, Dv);
          }
        }
        // dS_j = P_j (g_c dP_j - D_c), dq += scale dS_j k_j.
        for (int64_t j = 0; j < m; j += 4) {
          four(keys[c], j, kr);
          for (int64_t g = 0; g < G; ++g) {
            const float gate = in.gate[c].row(b, tok, h0 + g)[0];
            for (int64_t i = 0; i < 4; ++i) {
              const int64_t x = g * ld + j + i;
              x4[i] = j + i < m ? scale * (sc.p[x] * (gate * sc.dp[x] - gate * sc.psum[g])) : 0.0f;
            }
            axpy4(x4, kr, sc.dq.data() + g * Dk, Dk);
          }
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        const int64_t h = h0 + g;
        const float gate = in.gate[c].row(b, tok, h)[0];
        const float dg = m > 0 ? dot(in.d_o.row(b, tok, h), sc.o.data() + g * Dv, Dv) : 0.0f;
        st.lse[st.slot(b, tok, h, c)] = m > 0 ? sc.lse[g] : kNegInf;
        st.dsum[st.slot(b, tok, h, c)] = gate * sc.psum[g];
        store_row(*dgate[c], offset_of(*dgate[c], b, tok, h), &dg, 1);
      }
    }
    for (int64_t g = 0; g < G; ++g) {
      store_row(p.dq, offset_of(p.dq, b, tok, h0 + g), sc.dq.data() + g * Dk, Dk);
    }
  }
}

void query_pass(State& st) {
  const BwdProblem& pr = *st.pr;
  std::vector<QueryTile> tiles;
  for (int64_t s = 0; s < static_cast<int64_t>(pr.seqs.size()); ++s) {
    for (int64_t hk = 0; hk < pr.Hkv; ++hk) {
      for (int64_t t0 = 0; t0 < pr.seqs[s].len; t0 += kQueryTile) {
        tiles.push_back({s, hk, t0, std::min(pr.seqs[s].len, t0 + kQueryTile)});
      }
    }
  }
  std::vector<QueryScratch> scratch(static_cast<size_t>(st.threads));
  for (QueryScratch& sc : scratch) {
    sc.rows.resize(static_cast<size_t>(st.max_len));
    sc.p.resize(static_cast<size_t>(pr.G * st.max_len));
    sc.dp.resize(static_cast<size_t>(pr.G * st.max_len));
    sc.o.resize(static_cast<size_t>(pr.G * pr.Dv));
    sc.dq.resize(static_cast<size_t>(pr.G * pr.Dk));
    sc.lse.resize(static_cast<size_t>(pr.G));
    sc.psum.resize(static_cast<size_t>(pr.G));
    sc.zero.assign(static_cast<size_t>(std::max(pr.Dk, pr.Dv)), 0.0f);
    sc.set.resize(static_cast<size_t>(pr.p.cfg.slc_count));
  }
  const int64_t n = static_cast<int64_t>(tiles.size());
  // Later positions read more keys: dynamic scheduling balances the threads.
#pragma omp parallel for schedule(dynamic, 1) num_threads(st.threads)
  for (int64_t i = 0; i < n; ++i) query_tile(st, tiles[i], scratch[omp_get_thread_num()]);
}

}  // namespace
}  // namespace bwd

Status backward(const BwdProblem& pr) {
  using namespace bwd;
  State st;
  st.pr = &pr;
  st.threads = pr.num_threads > 0 ? pr.num_threads : omp_get_max_threads();
  for (const Sequence& s : pr.seqs) st.max_len = std::max(st.max_len, s.len);
  if (st.max_len == 0) return Status::ok();
  try {
    const nsa_bwd_params& p = pr.p;
    Inputs& in = st.in;
    make_view(p.q, &in.q);
    make_view(p.d_o, &in.d_o);
    make_view(p.k_cmp, &in.k_cmp);
    make_view(p.v_cmp, &in.v_cmp);
    make_view(p.k_slc, &in.k_slc);
    make_view(p.v_slc, &in.v_slc);
    make_view(p.k_win, &in.k_win);
    make_view(p.v_win, &in.v_win);
    make_view(p.g_cmp, &in.gate[kCmp]);
    make_view(p.g_slc, &in.gate[kSlc]);
    make_view(p.g_win, &in.gate[kWin]);
    const size_t slots = static_cast<size_t>(pr.B * pr.T * pr.Hq * 3);
    st.lse.assign(slots, kNegInf);
    st.dsum.assign(slots, 0.0f);
    invert_selection(pr, &st.inv);
    query_pass(st);
    key_pass(st);
  } catch (const std::bad_alloc&) {
    return error(NSA_ERR_OUT_OF_MEMORY, "backward: cannot allocate the CPU backward's buffers");
  }
  return Status::ok();
}

}  // namespace nsa::cpu
