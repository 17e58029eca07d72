// The forward's steps with the keys in the lanes, for groups smaller than a vector (per Highway
// target; included by forward_lanes.cc after foreach_target.h).
//
// Why: the heads-in-lanes kernels (lanes-inl.h) fill a vector with the G heads of a position, so
// a group of 4 runs 4-lane vectors: each key element is broadcast for 4 FMAs, and each
// selected block is fetched per position. Here a tile of 16 keys sits in the lanes and the heads
// of several positions are the rows of the register block (the backward's layout and products,
// backward_tiles-inl.h):
//   S [R][keys]  += q^T[i][r] (broadcast) x K tile row i   (R stacked rows: GH heads x slots)
//   online softmax per row (softmax-inl.h's step_row: the same non-finite rule)
//   O [R][Dv]    += P[r][j] (broadcast) x V row j          (columns in lanes)
// Every FMA is full width whatever G is, and each key tile loaded serves every stacked row:
// steps 1-2 stack the four positions of a quad (they see nearly the same compressed keys),
// step 5 the quad's windows, step 4 the positions of a 256-position tile that selected the same
// block (walked block-major, as the backward does). GH = padded_heads(G) (1, 2, 4 or 8).
#if defined(NSA_CPU_FORWARD_KEYS_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef NSA_CPU_FORWARD_KEYS_INL_H_
#undef NSA_CPU_FORWARD_KEYS_INL_H_
#else
#define NSA_CPU_FORWARD_KEYS_INL_H_
#endif

#include <algorithm>
#include <cstdint>
#include <limits>

#include <hwy/highway.h>

#include "cpu/backward_tiles-inl.h"
#include "cpu/forward_state.h"
#include "cpu/simd/block_scores-inl.h"
#include "cpu/simd/softmax-inl.h"
#include "cpu/simd/tile_size.h"

HWY_BEFORE_NAMESPACE();
namespace nsa::cpu {
namespace HWY_NAMESPACE {
namespace keys {
namespace hn = hwy::HWY_NAMESPACE;

using bwd_tiles::DT;
using bwd_tiles::kGroupKeys;
using bwd_tiles::kN;
using bwd_tiles::VT;
using fwd::BlockPos;
using fwd::Branch;
using fwd::Dims;
using fwd::KV;
using fwd::kv_of;
using fwd::kMaxRows;
using fwd::PackedKV;
using fwd::Packs;
using fwd::Pos;
using fwd::Stack;

// n bf16 values as f32 (exact: bf16 is the upper half of an f32).
inline void widen_bf16(const uint16_t* HWY_RESTRICT src, int64_t n, float* HWY_RESTRICT dst) {
  using DF = hn::ScalableTag<float>;
  const DF df;
  const hn::RebindToUnsigned<DF> du;
  const hn::Rebind<uint16_t, DF> d16;
  const int64_t N = hn::Lanes(df);
  int64_t i = 0;
  for (; i + N <= n; i += N) {
    const auto w = hn::PromoteTo(du, hn::LoadU(d16, src + i));
    hn::StoreU(hn::BitCast(df, hn::ShiftLeft<16>(w)), df, dst + i);
  }
  for (; i < n; ++i) dst[i] = bf16_to_f32(src[i]);
}

// bf16 K/V: keys [f, e) of (seq, hk) widened to f32, as whole tiles from the one holding key f
// (K tiles into blk_k, V rows into blk_v). Returns that tile's first key.
inline int64_t widen_block(const PackedKV& pk, int64_t seq, int64_t hk, int64_t f, int64_t e,
                           float* blk_k, float* blk_v) {
  const int64_t key0 = f / kTileKeys * kTileKeys;
  const int64_t tiles = (e - key0 + kTileKeys - 1) / kTileKeys;
  widen_bf16(pk.k16_at(seq, hk) + key0 * pk.Dk, tiles * kTileKeys * pk.Dk, blk_k);
  widen_bf16(pk.v16_at(seq, hk) + key0 * pk.Dv, (e - key0) * pk.Dv, blk_v);
  return key0;
}

// ---- O += P V with the columns in lanes. ----

// o[h][c0, c0 + CB kN) += sum_{j in [j0, j1)} p[h][j] v[j][c0 ...] for QH rows from h0: QH x CB
// accumulators in registers (compile-time shapes, or the compiler spills them).
template <int QH, int CB>
HWY_INLINE void pv_block(const float* HWY_RESTRICT p, int64_t ldp, int64_t h0,
                         const float* HWY_RESTRICT v, int64_t Dv, int64_t c0, int64_t j0,
                         int64_t j1, float* HWY_RESTRICT o, int64_t ldo) {
  const DT d;
  VT a[QH][CB];
  for (int h = 0; h < QH; ++h)
    for (int c = 0; c < CB; ++c) a[h][c] = hn::Load(d, o + (h0 + h) * ldo + c0 + c * kN);
  for (int64_t j = j0; j < j1; ++j) {
    VT vv[CB];
    for (int c = 0; c < CB; ++c) vv[c] = hn::LoadU(d, v + j * Dv + c0 + c * kN);
    for (int h = 0; h < QH; ++h) {
      const VT b = hn::Set(d, p[(h0 + h) * ldp + j]);
      for (int c = 0; c < CB; ++c) a[h][c] = hn::MulAdd(b, vv[c], a[h][c]);
    }
  }
  for (int h = 0; h < QH; ++h)
    for (int c = 0; c < CB; ++c) hn::Store(a[h][c], d, o + (h0 + h) * ldo + c0 + c * kN);
}

// o[h][0, Dv) += sum_{j in [j0, j1)} p[h][j] v[j][0, Dv) for h < rows: p rows of stride ldp, v
// rows of stride Dv, o rows of stride ldo (>= Dv rounded up to kN, 64-byte aligned). Only the
// live keys are read: a key outside a row's set may hold a non-finite value (0 * inf is NaN).
inline void pv_rows(const float* p, int64_t ldp, int64_t rows, const float* v, int64_t Dv,
                    int64_t j0, int64_t j1, float* o, int64_t ldo) {
  if (j0 >= j1) return;
  bwd_tiles::with_heads(rows, [&](auto heads) {
    constexpr int QH = std::min(bwd_tiles::kQH, decltype(heads)::value);
    constexpr int kCB = bwd_tiles::kCB;
    const int64_t full = Dv / kN * kN;  // whole vectors of columns; the rest one at a time
    for (int64_t h0 = 0; h0 < rows; h0 += QH) {
      int64_t c0 = 0;
      for (; c0 + kCB * kN <= full; c0 += kCB * kN)
        pv_block<QH, kCB>(p, ldp, h0, v, Dv, c0, j0, j1, o, ldo);
      for (; c0 < full; c0 += kN) pv_block<QH, 1>(p, ldp, h0, v, Dv, c0, j0, j1, o, ldo);
      for (int64_t c = full; c < Dv; ++c) {
        for (int h = 0; h < QH; ++h) {
          float acc = o[(h0 + h) * ldo + c];
          for (int64_t j = j0; j < j1; ++j) acc += p[(h0 + h) * ldp + j] * v[j * Dv + c];
          o[(h0 + h) * ldo + c] = acc;
        }
      }
    }
  });
}

// ---- Stacked rows. ----

// The positions ("slots") attending together: slot k's GH heads are rows k GH .. of the stack,
// its keys [f[k], e[k]) counted from the K/V run's first key, its softmax state m[k][h], l[k][h]
// (the heads-in-lanes Branch's own arrays, same meaning) and its output rows in Stack::o.
struct Slots {
  int K = 0;
  int64_t f[kMaxRows], e[kMaxRows];
  float* m[kMaxRows];
  float* l[kMaxRows];
};

// Rows of the products for K slots: a power of two up to 16, then a multiple of 16 (what the
// register blocks divide); rows past K GH are zero queries whose results are never read.
inline int64_t stack_rows(const Stack& st, int64_t K) { return bwd_tiles::padded_heads(K * st.GH); }

// Points the stack's rows at the queries of positions ps[0 .. K) (Pos::qt, [Dk][GH] each):
// nothing is copied; rows past K GH repeat row 0 (computed, never read).
inline void stack_queries(const Stack& st, Pos* const* ps, int K, int64_t R) {
  for (int k = 0; k < K; ++k) {
    const int32_t at = static_cast<int32_t>(ps[k]->qt - st.qbase);
    for (int64_t h = 0; h < st.GH; ++h) st.roff[k * st.GH + h] = at + static_cast<int32_t>(h);
  }
  std::fill(st.roff + K * st.GH, st.roff + R, st.roff[0]);
}

// S = Q K^T for R stacked rows over nt tiles from key g0 of kv: f32, or bf16 pairs (with the
// scale, which the f32 queries carry, applied to the scores).
inline void row_scores(const Stack& st, int64_t R, const Dims& dm, const KV& kv, int64_t g0, int nt,
                       float* s, int64_t ld) {
  if (dm.bf) {
    dm.bf->row_scores(reinterpret_cast<const uint32_t*>(st.qbase), st.GH, R, st.roff,
                      kv.kp + (g0 - kv.key0) * dm.Dk2, dm.Dk2, nt, dm.scale, s, ld);
  } else {
    bwd_tiles::gathered_products(st.qbase, st.GH, R, st.roff, kv.kt + (g0 - kv.key0) * dm.Dk,
                                 dm.Dk, nt, s, ld);
  }
}

// O += P V for `rows` rows over keys [j0, j1) counted from key g0 (a multiple of kTileKeys) of kv.
inline void row_pv(const Stack& st, const Dims& dm, const KV& kv, int64_t g0, const float* p,
                   int64_t ldp, int64_t rows, int64_t j0, int64_t j1, float* o) {
  if (dm.bf) {
    dm.bf->row_accumulate(p, ldp, rows, kv.vp + (g0 - kv.key0) / 2 * dm.ldv, dm.ldv, j0, j1, o,
                          st.ldo, st.pp);
  } else {
    pv_rows(p, ldp, rows, kv.v + (g0 - kv.key0) * dm.Dv, dm.Dv, j0, j1, o, st.ldo);
  }
}

// Online softmax attention of the slots over their key ranges of one K/V run (kv, from a tile
// start; the slots' ranges count from kv's key0), in groups of up to 64 keys: the products for
// every row at once, the softmax per row with the keys outside its slot's range masked to -inf,
// then O += P V jointly over the keys every slot sees and per slot over the rest.
inline void attend_slots(const Stack& st, const Slots& sl, int64_t R, const Dims& dm,
                         const KV& kv) {
  const DT d;
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  int64_t u0 = INT64_MAX, u1 = 0, both0 = 0, both1 = INT64_MAX;
  for (int k = 0; k < sl.K; ++k) {
    u0 = std::min(u0, sl.f[k]), u1 = std::max(u1, sl.e[k]);
    both0 = std::max(both0, sl.f[k]), both1 = std::min(both1, sl.e[k]);
  }
  for (int64_t g0 = u0 / kTileKeys * kTileKeys; g0 < u1; g0 += kGroupKeys) {
    const int64_t n = round_up(std::min(kGroupKeys, u1 - g0), kTileKeys);
    row_scores(st, R, dm, kv, kv.key0 + g0, static_cast<int>(n / kTileKeys), st.s, st.s_ld);
    auto local = [&](int64_t x) { return std::clamp<int64_t>(x - g0, 0, n); };
    const int64_t j0 = local(both0), j1 = local(both1);
    for (int k = 0; k < sl.K; ++k) {
      const int64_t a = local(sl.f[k]), b = local(sl.e[k]);
      if (a >= b) continue;
      for (int64_t h = 0; h < st.G; ++h) {
        const int64_t r = k * st.GH + h;
        float* row = st.s + r * st.s_ld;
        std::fill(row, row + a, kNegInf);
        std::fill(row + b, row + n, kNegInf);
        softmax::step_row(d, row, n, sl.m[k] + h, sl.l[k] + h, st.o + r * st.ldo, st.ldo);
      }
      if (j0 >= j1) {
        row_pv(st, dm, kv, kv.key0 + g0, st.s + k * st.GH * st.s_ld, st.s_ld, st.GH, a, b,
               st.o + k * st.GH * st.ldo);
        continue;
      }
      for (auto [x, y] : {std::pair{a, j0}, std::pair{j1, b}}) {
        row_pv(st, dm, kv, kv.key0 + g0, st.s + k * st.GH * st.s_ld, st.s_ld, st.GH, x, y,
               st.o + k * st.GH * st.ldo);
      }
    }
    // Every slot sees [j0, j1): all rows at once (rows past K GH compute unread values).
    row_pv(st, dm, kv, kv.key0 + g0, st.s, st.s_ld, R, j0, j1, st.o);
  }
}

// A branch's output computed with the keys in lanes (rows o[h][ldo]) into its heads-in-lanes
// Branch (o^T [Dv][GP]), whose m and l the rows already updated.
inline void rows_to_lanes(const float* o, int64_t ldo, const Dims& dm, Branch& br) {
  for (int64_t h = 0; h < dm.G; ++h)
    for (int64_t c = 0; c < dm.Dv; ++c) br.o[c * dm.GP + h] = o[h * ldo + c];
}

// ---- The steps. ----

// Step 4 for the np positions of a tile: the (block, position) pairs sorted, so each selected
// block is fetched once (widened once, for bf16) for all the positions that picked it, which
// attend it as slots of one stack (kMaxRows / GH at a time). Their running outputs live in
// Pos::orows between blocks; at the end they are transposed into the Branch.
inline void slc_tile(Pos* tile, int64_t np, const Packs& pk, int64_t si, int64_t hk, const Dims& dm,
                     float* blk_k, float* blk_v, const Stack& st) {
  const nsa_config& cfg = tile[0].g.pr->p.in.cfg;
  const int64_t rows = st.GH * st.ldo;  // floats of one position's outputs
  int64_t n_pairs = 0;
  for (int64_t i = 0; i < np; ++i) {
    std::fill(tile[i].orows, tile[i].orows + rows, 0.0f);
    for (int64_t k = 0; k < tile[i].sel.num_blocks; ++k)
      st.pairs[n_pairs++] = {tile[i].sel.blocks[k], static_cast<int32_t>(i)};
  }
  std::sort(st.pairs, st.pairs + n_pairs);
  const int max_slots = static_cast<int>(kMaxRows / st.GH);
  for (int64_t x = 0; x < n_pairs;) {
    int64_t y = x;
    while (y < n_pairs && st.pairs[y].first == st.pairs[x].first) ++y;
    const int64_t f = int64_t{st.pairs[x].first} * cfg.slc_block;
    auto end_of = [&](const Pos& ps) { return std::min<int64_t>(f + cfg.slc_block, ps.g.t + 1); };
    KV kv = kv_of(pk.slc, si, hk);  // f32 or pairs: read in place
    int64_t key0 = 0;                // the first key of kv's run
    if (pk.slc.half) {               // the positions come in order: the last one reads the most
      kv.kt = blk_k, kv.v = blk_v;
      key0 = widen_block(pk.slc, si, hk, f, end_of(tile[st.pairs[y - 1].second]), blk_k, blk_v);
      kv.key0 = key0;
    }
    for (int64_t z0 = x; z0 < y; z0 += max_slots) {
      Slots sl;
      Pos* ps[kMaxRows];
      sl.K = static_cast<int>(std::min<int64_t>(max_slots, y - z0));
      for (int k = 0; k < sl.K; ++k) {
        ps[k] = &tile[st.pairs[z0 + k].second];
        sl.f[k] = f - key0, sl.e[k] = end_of(*ps[k]) - key0;
        sl.m[k] = ps[k]->slc.m, sl.l[k] = ps[k]->slc.l;
        std::copy(ps[k]->orows, ps[k]->orows + rows, st.o + k * rows);
      }
      const int64_t R = stack_rows(st, sl.K);
      stack_queries(st, ps, sl.K, R);
      attend_slots(st, sl, R, dm, kv);
      for (int k = 0; k < sl.K; ++k)
        std::copy(st.o + k * rows, st.o + (k + 1) * rows, ps[k]->orows);
    }
    x = y;
  }
  for (int64_t i = 0; i < np; ++i) rows_to_lanes(tile[i].orows, st.ldo, dm, tile[i].slc);
}

// Step 5 for a quad (its present positions are quad[0 .. K)): the windows, keys
// max(0, t - w + 1) .. t, as the slots of one stack.
inline void window_quad(Pos* const quad[4], const Packs& pk, int64_t si, const Dims& dm,
                        const Stack& st) {
  const int64_t w = quad[0]->g.pr->p.in.cfg.window, hk = quad[0]->g.hk;
  Slots sl;
  while (sl.K < 4 && quad[sl.K]) {
    const Pos& ps = *quad[sl.K];
    sl.f[sl.K] = std::max<int64_t>(0, ps.g.t - w + 1), sl.e[sl.K] = ps.g.t + 1;
    sl.m[sl.K] = ps.win.m, sl.l[sl.K] = ps.win.l;
    ++sl.K;
  }
  const int64_t R = stack_rows(st, sl.K);
  std::fill(st.o, st.o + R * st.ldo, 0.0f);
  stack_queries(st, quad, sl.K, R);
  attend_slots(st, sl, R, dm, kv_of(*pk.win_kv, si, hk));
  for (int k = 0; k < sl.K; ++k) rows_to_lanes(st.o + k * st.GH * st.ldo, st.ldo, dm, quad[k]->win);
}

// Step 2 for slot p of a quad (Eqs. 8-10, SPEC 4.2): mass(i) = sum_h p[h][i] / l[h] over the real
// heads (p the exp(s - m) left in the score rows; an empty head, l = 0, has no mass; a poisoned
// one, l NaN, makes the masses NaN), summed into blocks by overlap_block_scores.
inline void block_scores(Pos& ps, const Dims& dm, int64_t nc, const Stack& st, int p) {
  const hn::ScalableTag<float> d;
  const int64_t N = hn::Lanes(d);
  const nsa_config& cfg = ps.g.pr->p.in.cfg;
  const int64_t last = ps.g.t / cfg.slc_block;
  const float* P = st.s + p * st.GH * st.s_ld;
  for (int64_t h = 0; h < dm.G; ++h) {
    const float l = ps.cmp.l[h];
    st.inv[h] = l == 0.0f ? 0.0f : 1.0f / l;
  }
  for (int64_t i = 0; i < nc; i += N) {  // rows are s_ld >= round_up(nc, 16) long
    auto acc = hn::Zero(d);
    for (int64_t h = 0; h < dm.G; ++h)
      acc = hn::MulAdd(hn::LoadU(d, P + h * st.s_ld + i), hn::Set(d, st.inv[h]), acc);
    hn::StoreU(acc, d, st.w + i);
  }
  float* score = ps.sel.score;
  std::fill(score, score + last + 1, 0.0f);
  overlap_block_scores(
      int64_t{cfg.cmp_block}, int64_t{cfg.cmp_stride}, int64_t{cfg.slc_block}, nc, last, 0.0f,
      [&](int64_t i) { return st.w[i]; }, [](float m, float wt, float a) { return a + m * wt; },
      [&](int64_t j) { return score[j]; }, [&](int64_t j, float a) { score[j] = a; });
}

// Steps 1-2 for a quad: the four positions stacked (they see the same compressed keys but the
// last one or two), a two-pass softmax per row over the position's nc[p] keys (the probabilities
// feed the block scores), O += P V jointly over the keys all see and per position over the rest.
inline void cmp_quad(Pos* const quad[4], const int64_t nc[4], const Packs& pk, int64_t si,
                     const Dims& dm, const Stack& st) {
  const hn::ScalableTag<float> d;
  const int64_t GH = st.GH, R = 4 * GH, ld = st.s_ld, hk = quad[0]->g.hk;
  int K = 0;
  int64_t n_all = 0, n_lo = INT64_MAX;
  while (K < 4 && quad[K]) {
    if (nc[K] > 0) n_all = std::max(n_all, nc[K]), n_lo = std::min(n_lo, nc[K]);
    ++K;
  }
  stack_queries(st, quad, K, R);
  const KV kv = kv_of(pk.cmp, si, hk);
  for (int64_t g0 = 0; g0 < n_all; g0 += kGroupKeys) {
    const int nt = static_cast<int>((std::min(kGroupKeys, n_all - g0) + kTileKeys - 1) / kTileKeys);
    row_scores(st, R, dm, kv, g0, nt, st.s + g0, ld);
  }
  std::fill(st.o, st.o + R * st.ldo, 0.0f);
  for (int p = 0; p < K; ++p) {
    if (nc[p] == 0) continue;
    const int64_t n = round_up(nc[p], kTileKeys);
    for (int64_t h = 0; h < dm.G; ++h) {
      float* row = st.s + (p * GH + h) * ld;
      std::fill(row + nc[p], row + n, -std::numeric_limits<float>::infinity());
      softmax::step_row(d, row, n, quad[p]->cmp.m + h, quad[p]->cmp.l + h, nullptr, 0);
    }
  }
  // A position with no compressed key (nc = 0) stays empty (o = 0, lse = -inf): then n_lo is
  // the least of the others and its rows' values are never read.
  row_pv(st, dm, kv, 0, st.s, ld, R, 0, n_lo, st.o);
  for (int p = 0; p < K; ++p) {
    if (nc[p] == 0) continue;
    row_pv(st, dm, kv, 0, st.s + p * GH * ld, ld, GH, n_lo, nc[p], st.o + p * GH * st.ldo);
    rows_to_lanes(st.o + p * GH * st.ldo, st.ldo, dm, quad[p]->cmp);
    if (!present(quad[p]->g.pr->p.slc_indices_in)) block_scores(*quad[p], dm, nc[p], st, p);
  }
}

}  // namespace keys
}  // namespace HWY_NAMESPACE
}  // namespace nsa::cpu
HWY_AFTER_NAMESPACE();

#endif  // NSA_CPU_FORWARD_KEYS_INL_H_
