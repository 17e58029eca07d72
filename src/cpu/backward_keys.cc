// Pass 2 of the CPU backward (SPEC.md section 6): dk/dv, owned by the KEY side so that no two
// threads ever add into one element (no atomics) and every element is summed in one fixed order
// (bitwise the same for any thread count). Per (query row, key) pair it recomputes
//   P = exp(scale q.k - lse), dS = P (g_c do . v - D_c),
//   dk += scale dS q, dv += P g_c do,
// from the row's LSE and D_c that pass 1 stored (FlashAttention-2's backward, Dao 2023, with the
// loops swapped: keys outer, the queries that read them inner).
//
// Who reads a key (SPEC 4):
//   - selected branch: the positions t whose I_t holds its block (the inverted selection of
//     backward.cc), each reading the keys p <= t of the block;
//   - window branch: key p is read by t in [p, p + w - 1];
//   - compressed branch: compressed token i is read by t >= i*d + l - 1.
// Units of ownership: one selection block of raw keys (its slc and win gradients together, since
// with shared K/V both add into dk/dv) and a tile of compressed tokens. Scratch is the block's
// accumulators, O(l' (Dk + Dv)) per thread; nothing grows with T^2.
#include <omp.h>

#include <algorithm>
#include <cmath>

#include "cpu/backward.h"
#include "cpu/kernels.h"

namespace nsa::cpu::bwd {
namespace {

constexpr int64_t kCmpTile = 16;  // compressed tokens per pass-2 work item

// One work item: a selection block of raw keys (cmp == false; [k0, k1) positions) or a tile of
// compressed tokens (cmp == true; [k0, k1) local compressed indices).
struct KeyItem {
  int64_t seq = 0, hk = 0, k0 = 0, k1 = 0;
  bool cmp = false;
};

// One query head row as pass 2 reads it: q, do, the gate, and pass 1's LSE and D_c.
struct Row {
  const float* q;
  const float* dout;
  float g, lse, d_c;
};
struct KeyScratch {
  std::vector<float> dk_slc, dv_slc, dk_win, dv_win, sum;  // [rows * Dk|Dv], sum: [max(Dk, Dv)]
  std::vector<Row> heads;                                   // [G]: one query position's rows
};


// The contribution of one (query head row, key) pair to the key's dk/dv rows.
inline void add_pair(const Row& r, const float* k, const float* v, float scale, int64_t Dk,
                     int64_t Dv, float* dk, float* dv) {
  const float p = std::exp(scale * dot(r.q, k, Dk) - r.lse);  // as pass 1 computes it
  const float ds = p * (r.g * dot(r.dout, v, Dv) - r.d_c);
  axpy(scale * ds, r.q, dk, Dk);
  axpy(p * r.g, r.dout, dv, Dv);
}

// add_pair for four head rows at once (dot4, axpy4): the key's rows and its dk/dv accumulators
// are loaded once per four heads instead of once per head.
inline void add_four(const Row* r, const float* k, const float* v, float scale, int64_t Dk,
                     int64_t Dv, float* dk, float* dv) {
  const float* qs[4] = {r[0].q, r[1].q, r[2].q, r[3].q};
  const float* ds[4] = {r[0].dout, r[1].dout, r[2].dout, r[3].dout};
  float s[4], dp[4], ck[4], cv[4];
  dot4(k, qs, Dk, s);
  dot4(v, ds, Dv, dp);
  for (int i = 0; i < 4; ++i) {
    const float p = std::exp(scale * s[i] - r[i].lse);
    ck[i] = scale * (p * (r[i].g * dp[i] - r[i].d_c));
    cv[i] = p * r[i].g;
  }
  axpy4(ck, qs, dk, Dk);
  axpy4(cv, ds, dv, Dv);
}

Row row_of(const State& st, int64_t b, int64_t tok, int64_t h, int c) {
  const Inputs& in = st.in;
  return {in.q.row(b, tok, h), in.d_o.row(b, tok, h), in.gate[c].row(b, tok, h)[0],
          st.lse[st.slot(b, tok, h, c)], st.dsum[st.slot(b, tok, h, c)]};
}

// Adds the pairs of query position t (all G heads) with keys [lo, hi] of the block at k0. Keys
// outer, heads inner: the key's rows and accumulators stay in L1 while the G heads add into them.
// Always inlined, so that it is compiled into each ISA clone of its callers.
__attribute__((always_inline)) inline void add_query(const State& st, const Sequence& s, int64_t hk, int c, int64_t t, int64_t k0,
               int64_t lo, int64_t hi, Row* heads, float* dk, float* dv) {
  const BwdProblem& pr = *st.pr;
  const View& kv = c == kSlc ? st.in.k_slc : c == kWin ? st.in.k_win : st.in.k_cmp;
  const View& vv = c == kSlc ? st.in.v_slc : c == kWin ? st.in.v_win : st.in.v_cmp;
  const int64_t G = pr.G, base = c == kCmp ? s.cmp_start : s.start;
  for (int64_t g = 0; g < G; ++g) heads[g] = row_of(st, s.batch, s.start + t, hk * G + g, c);
  for (int64_t p = lo; p <= hi; ++p) {
    const float* k = kv.row(s.batch, base + p, hk);
    const float* v = vv.row(s.batch, base + p, hk);
    float* dk_p = dk + (p - k0) * pr.Dk;
    float* dv_p = dv + (p - k0) * pr.Dv;
    int64_t g = 0;
    for (; g + 4 <= G; g += 4) add_four(heads + g, k, v, pr.p.cfg.scale, pr.Dk, pr.Dv, dk_p, dv_p);
    for (; g < G; ++g) add_pair(heads[g], k, v, pr.p.cfg.scale, pr.Dk, pr.Dv, dk_p, dv_p);
  }
}

// Runtime dispatch of the plain f32 loops (see query_tile in backward.cc).
__attribute__((target_clones("avx512f", "arch=haswell", "default")))
void raw_block(const State& st, const KeyItem& it, KeyScratch& sc) {
  const BwdProblem& pr = *st.pr;
  const nsa_bwd_params& p = pr.p;
  const Sequence& s = pr.seqs[it.seq];
  const int64_t Dk = pr.Dk, Dv = pr.Dv, nk = it.k1 - it.k0, w = p.cfg.window;
  for (auto* a : {&sc.dk_slc, &sc.dk_win}) fill(0.0f, a->data(), nk * Dk);
  for (auto* a : {&sc.dv_slc, &sc.dv_win}) fill(0.0f, a->data(), nk * Dv);
  // Selected branch: the queries whose I_t holds this block, t ascending.
  const int64_t slot = st.inv.pair_base[it.seq * pr.Hkv + it.hk] + it.k0 / p.cfg.slc_block;
  for (int64_t i = st.inv.offset[slot]; i < st.inv.offset[slot + 1]; ++i) {
    const int64_t t = st.inv.queries[i];
    add_query(st, s, it.hk, kSlc, t, it.k0, it.k0, std::min(it.k1 - 1, t), sc.heads.data(),
              sc.dk_slc.data(), sc.dv_slc.data());
  }
  // Window branch: query t reads keys [t - w + 1, t].
  const int64_t t_end = std::min(s.len - 1, it.k1 - 1 + w - 1);
  for (int64_t t = it.k0; t <= t_end; ++t) {
    add_query(st, s, it.hk, kWin, t, it.k0, std::max(it.k0, t - w + 1), std::min(it.k1 - 1, t),
              sc.heads.data(), sc.dk_win.data(), sc.dv_win.data());
  }
  // Routing (nsa.h): a branch with its own K/V reports to its own outputs, the others add up in
  // dk/dv (slc first, then win: a fixed order); with both own, dk/dv (if given) are zero.
  for (int64_t j = 0; j < nk; ++j) {
    const int64_t tok = s.start + it.k0 + j;
    struct Out {
      const float* slc;
      const float* win;
      const nsa_tensor* own_slc;
      const nsa_tensor* own_win;
      const nsa_tensor* shared;
      int64_t D;
    };
    const Out outs[2] = {
        {sc.dk_slc.data() + j * Dk, sc.dk_win.data() + j * Dk, &p.dk_slc, &p.dk_win, &p.dk, Dk},
        {sc.dv_slc.data() + j * Dv, sc.dv_win.data() + j * Dv, &p.dv_slc, &p.dv_win, &p.dv, Dv}};
    for (const Out& o : outs) {
      if (pr.slc_own_kv) store_row(*o.own_slc, offset_of(*o.own_slc, s.batch, tok, it.hk), o.slc, o.D);
      if (pr.win_own_kv) store_row(*o.own_win, offset_of(*o.own_win, s.batch, tok, it.hk), o.win, o.D);
      if (!present(*o.shared)) continue;
      for (int64_t i = 0; i < o.D; ++i) {
        sc.sum[i] = (pr.slc_own_kv ? 0.0f : o.slc[i]) + (pr.win_own_kv ? 0.0f : o.win[i]);
      }
      store_row(*o.shared, offset_of(*o.shared, s.batch, tok, it.hk), sc.sum.data(), o.D);
    }
  }
}

__attribute__((target_clones("avx512f", "arch=haswell", "default")))
void cmp_tile(const State& st, const KeyItem& it, KeyScratch& sc) {
  const BwdProblem& pr = *st.pr;
  const nsa_bwd_params& p = pr.p;
  const Sequence& s = pr.seqs[it.seq];
  const int64_t Dk = pr.Dk, Dv = pr.Dv, nk = it.k1 - it.k0;
  const int64_t l = p.cfg.cmp_block, d = p.cfg.cmp_stride;
  float* dk = sc.dk_slc.data();
  float* dv = sc.dv_slc.data();
  fill(0.0f, dk, nk * Dk);
  fill(0.0f, dv, nk * Dv);
  // Compressed token i is read by every t >= i*d + l - 1 (SPEC 4.1), t ascending.
  for (int64_t t = it.k0 * d + l - 1; t < s.len; ++t) {
    const int64_t hi = std::min(it.k1, visible_cmp_count(p.cfg, t)) - 1;
    add_query(st, s, it.hk, kCmp, t, it.k0, it.k0, hi, sc.heads.data(), dk, dv);
  }
  for (int64_t i = it.k0; i < it.k1; ++i) {
    const int64_t row = s.cmp_start + i;
    store_row(p.dk_cmp, offset_of(p.dk_cmp, s.batch, row, it.hk), dk + (i - it.k0) * Dk, Dk);
    store_row(p.dv_cmp, offset_of(p.dv_cmp, s.batch, row, it.hk), dv + (i - it.k0) * Dv, Dv);
  }
}

}  // namespace

void key_pass(const State& st) {
  const BwdProblem& pr = *st.pr;
  const int64_t lp = pr.p.cfg.slc_block;
  std::vector<KeyItem> items;
  for (int64_t s = 0; s < static_cast<int64_t>(pr.seqs.size()); ++s) {
    const Sequence& sq = pr.seqs[s];
    for (int64_t hk = 0; hk < pr.Hkv; ++hk) {
      for (int64_t k0 = 0; k0 < sq.len; k0 += lp) items.push_back({s, hk, k0, std::min(sq.len, k0 + lp), false});
      for (int64_t k0 = 0; k0 < sq.cmp_len; k0 += kCmpTile) {
        items.push_back({s, hk, k0, std::min(sq.cmp_len, k0 + kCmpTile), true});
      }
    }
  }
  const int64_t rows = std::max(lp, kCmpTile);
  std::vector<KeyScratch> scratch(static_cast<size_t>(st.threads));
  for (KeyScratch& sc : scratch) {
    for (auto* a : {&sc.dk_slc, &sc.dk_win}) a->resize(static_cast<size_t>(rows * pr.Dk));
    for (auto* a : {&sc.dv_slc, &sc.dv_win}) a->resize(static_cast<size_t>(rows * pr.Dv));
    sc.sum.resize(static_cast<size_t>(std::max(pr.Dk, pr.Dv)));
    sc.heads.resize(static_cast<size_t>(pr.G));
  }
  const int64_t n = static_cast<int64_t>(items.size());
  // Item costs differ widely (early compressed tiles are read by most queries, a block's slc
  // list depends on the selection): dynamic scheduling.
#pragma omp parallel for schedule(dynamic, 1) num_threads(st.threads)
  for (int64_t i = 0; i < n; ++i) {
    KeyScratch& sc = scratch[omp_get_thread_num()];
    if (items[i].cmp) {
      cmp_tile(st, items[i], sc);
    } else {
      raw_block(st, items[i], sc);
    }
  }
}

}  // namespace nsa::cpu::bwd
