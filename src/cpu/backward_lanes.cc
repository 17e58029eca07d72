// The CPU backward of NSA attention (SPEC.md section 6): the kernels, Highway SIMD with runtime
// dispatch.
//
// Each branch is softmax attention over a key set fixed per query (I_t is a constant of the
// backward), so its backward is FlashAttention-2's (Dao 2023, Alg. 2), gated (SPEC 4.6, paper
// Eq. 5). From the forward's saved LSE and ungated output O_c of each (row, branch):
//   dg_c = do . O_c,  D_c = g_c dg_c,
// and per (query position t, key j) of the branch, with the G heads of t's KV group:
//   S = scale q.k_j,  P = exp(S - lse),  dP = do . v_j,  dS = P (g_c dP - D_c),
//   dq += scale dS k_j,  dk_j += scale dS q,  dv_j += g_c P do.
// Five products per pair, as FlashAttention counts them: one pass over the pairs, nothing
// recomputed twice.
//
// Layout: a tile of 16 keys sits in the SIMD lanes (one AVX-512 vector), the G heads of the query
// position are the rows of the register block. K and V are packed once per call into tiles
// [D][16] (keys innermost) and K also into padded rows; per position, the scaled queries and dO
// are transposed to [D][G]. Then every product is a vertical FMA of a tile row by a broadcast:
//   S, dP   [G][16]  += q^T[i][h] (broadcast) x K tile[i] / do^T[c][h] x V tile[c]
//   dK^T    [Dk][16] += q^T[i][h] (broadcast) x dS[h]      (the tile's accumulator)
//   dV^T    [Dv][16] += do^T[c][h] (broadcast) x g P[h]
//   dq      [G][Dk]  += dS[h][j] (broadcast) x K row j      (rows in lanes)
// with no horizontal reduction anywhere. A key set is a union of key ranges (the compressed
// tokens 0..vis-1; each selected block, cut at t; the window); each range is walked in whole
// tiles, with the lanes outside the range masked to P = 0.
//
// Determinism without atomics: dq has one owner (its query position). dk/dv are summed over
// queries, so the query tiles are cut into kChunks contiguous chunks of about equal cost, a fixed
// function of the problem (not of the thread count); each chunk adds into its own f32 dk/dv
// buffers in query order, and a last pass sums the chunks' buffers in chunk order. The bits are
// then the same for any thread count and any schedule. Memory: kChunks copies of the key
// gradients, O(T (Dk + Dv)) each; nothing grows with T^2.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/backward.h"
#include "cpu/kernels.h"
#include "hwy/aligned_allocator.h"

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "cpu/backward_lanes.cc"
#include <hwy/foreach_target.h>  // IWYU pragma: keep
#include <hwy/highway.h>
#include <hwy/contrib/math/math-inl.h>

HWY_BEFORE_NAMESPACE();
namespace nsa::cpu {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// File-local: other kernel files define helpers of the same names in this namespace.
namespace {

using bwd::kCmp;
using bwd::kSlc;
using bwd::kWin;
using bwd::State;

constexpr int64_t kTile = 16;  // keys per tile: the lanes of one AVX-512 f32 vector
using DT = hn::CappedTag<float, kTile>;
using VT = hn::Vec<DT>;
constexpr int kN = static_cast<int>(hn::MaxLanes(DT()));
constexpr int kNV = static_cast<int>(kTile) / kN;  // vectors per tile row (1 on AVX-512)
// Head rows per register block: 16 accumulators with AVX-512's 32 registers, 8 elsewhere.
constexpr int kHB = std::max(1, (HWY_MAX_BYTES >= 64 ? 16 : 8) / kNV);
// The dq block: kQH heads x kCB vectors of columns.
constexpr int kQH = 4, kCB = 4;
// Query positions per work unit (the unit of the chunk split).
constexpr int64_t kQueryTile = 16;
// Fixed number of dk/dv accumulator copies (see the file comment): enough to keep a few threads
// busy, few enough that the copies stay small next to the inputs.
constexpr int64_t kChunks = 4;

constexpr float kInf = std::numeric_limits<float>::infinity();

int64_t round_up(int64_t n, int64_t to) { return (n + to - 1) / to * to; }

// ---- Per-tile products (see the file comment for the layouts). ----

// out[h][16] = sum_i xT[i][h] tile[i][16], h < GP: the scores (xT = scaled Q^T, tile = K) or
// dP (xT = dO^T, tile = V).
void tile_products(const float* HWY_RESTRICT xT, int64_t GP, const float* HWY_RESTRICT tile,
                   int64_t D, float* HWY_RESTRICT out) {
  const DT d;
  for (int64_t h0 = 0; h0 < GP; h0 += kHB) {
    VT acc[kHB][kNV];
    for (int h = 0; h < kHB; ++h)
      for (int v = 0; v < kNV; ++v) acc[h][v] = hn::Zero(d);
    for (int64_t i = 0; i < D; ++i) {
      VT kv[kNV];
      for (int v = 0; v < kNV; ++v) kv[v] = hn::Load(d, tile + i * kTile + v * kN);
      const float* x = xT + i * GP + h0;
      for (int h = 0; h < kHB; ++h) {
        const VT b = hn::Set(d, x[h]);
        for (int v = 0; v < kNV; ++v) acc[h][v] = hn::MulAdd(b, kv[v], acc[h][v]);
      }
    }
    for (int h = 0; h < kHB; ++h)
      for (int v = 0; v < kNV; ++v) hn::Store(acc[h][v], d, out + (h0 + h) * kTile + v * kN);
  }
}

// acc[i][16] += sum_h xT[i][h] w[h][16]: dK^T (xT = scaled Q^T, w = dS) or dV^T (xT = dO^T,
// w = g P). The weights of a head block stay in registers while the D rows stream.
void tile_gradient(const float* HWY_RESTRICT xT, int64_t GP, const float* HWY_RESTRICT w,
                   int64_t D, float* HWY_RESTRICT acc) {
  const DT d;
  for (int64_t h0 = 0; h0 < GP; h0 += kHB) {
    VT wv[kHB][kNV];
    for (int h = 0; h < kHB; ++h)
      for (int v = 0; v < kNV; ++v) wv[h][v] = hn::Load(d, w + (h0 + h) * kTile + v * kN);
    for (int64_t i = 0; i < D; ++i) {
      VT a[kNV];
      for (int v = 0; v < kNV; ++v) a[v] = hn::Load(d, acc + i * kTile + v * kN);
      const float* x = xT + i * GP + h0;
      for (int h = 0; h < kHB; ++h) {
        const VT b = hn::Set(d, x[h]);
        for (int v = 0; v < kNV; ++v) a[v] = hn::MulAdd(b, wv[h][v], a[v]);
      }
      for (int v = 0; v < kNV; ++v) hn::Store(a[v], d, acc + i * kTile + v * kN);
    }
  }
}

// dq[h][Dkp] += sum_{j = j0..j1} ds[h][j] kr[j][Dkp]: the tile's K rows (padded to Dkp) weighted
// by dS, kQH heads x kCB column vectors per register block.
void tile_dq(const float* HWY_RESTRICT ds, int64_t GP, const float* HWY_RESTRICT kr, int64_t Dkp,
             int64_t j0, int64_t j1, float* HWY_RESTRICT dq) {
  const DT d;
  for (int64_t h0 = 0; h0 < GP; h0 += kQH) {
    for (int64_t c0 = 0; c0 < Dkp; c0 += kCB * kN) {
      VT a[kQH][kCB];
      for (int h = 0; h < kQH; ++h)
        for (int c = 0; c < kCB; ++c) a[h][c] = hn::Load(d, dq + (h0 + h) * Dkp + c0 + c * kN);
      for (int64_t j = j0; j <= j1; ++j) {
        VT kv[kCB];
        for (int c = 0; c < kCB; ++c) kv[c] = hn::Load(d, kr + j * Dkp + c0 + c * kN);
        for (int h = 0; h < kQH; ++h) {
          const VT b = hn::Set(d, ds[(h0 + h) * kTile + j]);
          for (int c = 0; c < kCB; ++c) a[h][c] = hn::MulAdd(b, kv[c], a[h][c]);
        }
      }
      for (int h = 0; h < kQH; ++h)
        for (int c = 0; c < kCB; ++c) hn::Store(a[h][c], d, dq + (h0 + h) * Dkp + c0 + c * kN);
    }
  }
}

// The softmax pieces of one tile, lanes [lo, hi] live: s (scores) becomes dS = P (g dP - D) and
// dp becomes g P, with P = exp(s - lse) and both 0 in the dead lanes. Padding heads have
// lse = +inf, g = D = 0, so they give exact zeros.
void tile_softmax(float* HWY_RESTRICT s, float* HWY_RESTRICT dp, int64_t GP,
                  const float* HWY_RESTRICT lse, const float* HWY_RESTRICT g,
                  const float* HWY_RESTRICT dsum, int64_t lo, int64_t hi) {
  const DT d;
  hn::Mask<DT> live[kNV];
  for (int v = 0; v < kNV; ++v) {
    const VT idx = hn::Iota(d, static_cast<float>(v * kN));
    live[v] = hn::And(hn::Ge(idx, hn::Set(d, static_cast<float>(lo))),
                      hn::Le(idx, hn::Set(d, static_cast<float>(hi))));
  }
  for (int64_t h = 0; h < GP; ++h) {
    const VT l = hn::Set(d, lse[h]), gv = hn::Set(d, g[h]), dv = hn::Set(d, dsum[h]);
    for (int v = 0; v < kNV; ++v) {
      float* sp = s + h * kTile + v * kN;
      float* dpp = dp + h * kTile + v * kN;
      const VT p = hn::IfThenElseZero(live[v], hn::Exp(d, hn::Sub(hn::Load(d, sp), l)));
      const VT ds = hn::Mul(p, hn::MulSub(gv, hn::Load(d, dpp), dv));
      hn::Store(hn::IfThenElseZero(live[v], ds), d, sp);
      hn::Store(hn::Mul(p, gv), d, dpp);
    }
  }
}

// ---- Packed K/V. ----

// One K/V tensor pair packed for every (sequence, KV head): K as tiles [Dk][16] and as rows
// [key][Dkp] (zero-padded), V as tiles [Dv][16]; keys past a sequence's end are zero. Tile
// `ti` of sequence `seq`, head hk, is number (hk * tiles + first_tile[seq] + ti).
struct Packed {
  std::vector<int64_t> first_tile;
  int64_t tiles = 0;
  hwy::AlignedFreeUniquePtr<float[]> kt, vt, kr;
};

// The rows a sequence contributes: raw tokens or compressed tokens.
struct Span {
  bool cmp = false;
  int64_t start(const Sequence& s) const { return cmp ? s.cmp_start : s.start; }
  int64_t len(const Sequence& s) const { return cmp ? s.cmp_len : s.len; }
};

std::vector<int64_t> tile_starts(const BwdProblem& pr, Span span, int64_t* total) {
  std::vector<int64_t> first;
  int64_t n = 0;
  for (const Sequence& s : pr.seqs) {
    first.push_back(n);
    n += (span.len(s) + kTile - 1) / kTile;
  }
  *total = n;
  return first;
}

bool pack(const BwdProblem& pr, const nsa_tensor& k, const nsa_tensor& v, Span span, int64_t Dkp,
          int threads, Packed* pk) {
  const int64_t Dk = pr.Dk, Dv = pr.Dv;
  pk->first_tile = tile_starts(pr, span, &pk->tiles);
  const size_t units = static_cast<size_t>(std::max<int64_t>(1, pr.Hkv * pk->tiles));
  pk->kt = hwy::AllocateAligned<float>(units * kTile * Dk);
  pk->vt = hwy::AllocateAligned<float>(units * kTile * Dv);
  pk->kr = hwy::AllocateAligned<float>(units * kTile * Dkp);
  if (!pk->kt || !pk->vt || !pk->kr) return false;
  const int64_t work = pr.Hkv * pk->tiles;
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> row(static_cast<size_t>(std::max(Dk, Dv)));
#pragma omp for schedule(static)
    for (int64_t u = 0; u < work; ++u) {
      const int64_t hk = u / pk->tiles, tile = u % pk->tiles;
      const int64_t si = std::upper_bound(pk->first_tile.begin(), pk->first_tile.end(), tile) -
                         pk->first_tile.begin() - 1;
      const Sequence& s = pr.seqs[si];
      const int64_t k0 = (tile - pk->first_tile[si]) * kTile;
      const int64_t nk = std::min(kTile, span.len(s) - k0);
      float* kt = pk->kt.get() + u * kTile * Dk;
      float* vt = pk->vt.get() + u * kTile * Dv;
      float* kr = pk->kr.get() + u * kTile * Dkp;
      std::fill(kt, kt + kTile * Dk, 0.0f);
      std::fill(vt, vt + kTile * Dv, 0.0f);
      std::fill(kr, kr + kTile * Dkp, 0.0f);
      for (int64_t j = 0; j < nk; ++j) {
        const int64_t r = span.start(s) + k0 + j;
        load_row(k, offset_of(k, s.batch, r, hk), Dk, kr + j * Dkp);
        for (int64_t i = 0; i < Dk; ++i) kt[i * kTile + j] = kr[j * Dkp + i];
        load_row(v, offset_of(v, s.batch, r, hk), Dv, row.data());
        for (int64_t c = 0; c < Dv; ++c) vt[c * kTile + j] = row[c];
      }
    }
  }
  return true;
}

// dk/dv accumulators of one branch group, kChunks copies, in the tile layout of its Packed.
struct Accum {
  hwy::AlignedFreeUniquePtr<float[]> dk, dv;
  int64_t per_chunk_k = 0, per_chunk_v = 0;
};

bool make_accum(const BwdProblem& pr, const Packed& pk, Accum* a) {
  const int64_t units = std::max<int64_t>(1, pr.Hkv * pk.tiles);
  a->per_chunk_k = units * kTile * pr.Dk;
  a->per_chunk_v = units * kTile * pr.Dv;
  a->dk = hwy::AllocateAligned<float>(static_cast<size_t>(kChunks * a->per_chunk_k));
  a->dv = hwy::AllocateAligned<float>(static_cast<size_t>(kChunks * a->per_chunk_v));
  if (!a->dk || !a->dv) return false;
  std::fill(a->dk.get(), a->dk.get() + kChunks * a->per_chunk_k, 0.0f);
  std::fill(a->dv.get(), a->dv.get() + kChunks * a->per_chunk_v, 0.0f);
  return true;
}

// ---- One query position. ----

struct Branch {
  const Packed* pk = nullptr;
  Accum* acc = nullptr;
};

// Per-chunk scratch.
struct Scratch {
  float* qT;    // [Dk][GP] scale * q
  float* doT;   // [Dv][GP]
  float* s;     // [GP][16] scores, then dS
  float* dp;    // [GP][16] dP, then g P
  float* dq;    // [GP][Dkp]
  float* head;  // [3][3][GP]: per branch lse, g, D
  int32_t* set; // [n]
};

struct Ctx {
  const State* st;
  const BwdProblem* pr;
  Branch br[3];
  int64_t GP, Dkp;
};

// The gradients of one query position t (all G heads of KV head hk) through branch c's keys
// [lo, hi] (local indices of the branch's rows), added to chunk `chunk`'s accumulators.
void add_range(const Ctx& cx, Scratch& sc, int c, int64_t si, int64_t hk, int64_t lo, int64_t hi,
               int64_t chunk) {
  const BwdProblem& pr = *cx.pr;
  const Packed& pk = *cx.br[c].pk;
  const Accum& acc = *cx.br[c].acc;
  const int64_t Dk = pr.Dk, Dv = pr.Dv, GP = cx.GP;
  const float* lse = sc.head + (c * 3 + 0) * GP;
  const float* g = sc.head + (c * 3 + 1) * GP;
  const float* dsum = sc.head + (c * 3 + 2) * GP;
  for (int64_t ti = lo / kTile; ti <= hi / kTile; ++ti) {
    const int64_t u = hk * pk.tiles + pk.first_tile[si] + ti;
    const int64_t k0 = ti * kTile;
    const int64_t a = std::max(lo, k0) - k0, b = std::min(hi, k0 + kTile - 1) - k0;
    tile_products(sc.qT, GP, pk.kt.get() + u * kTile * Dk, Dk, sc.s);
    tile_products(sc.doT, GP, pk.vt.get() + u * kTile * Dv, Dv, sc.dp);
    tile_softmax(sc.s, sc.dp, GP, lse, g, dsum, a, b);
    tile_dq(sc.s, GP, pk.kr.get() + u * kTile * cx.Dkp, cx.Dkp, a, b, sc.dq);
    tile_gradient(sc.qT, GP, sc.s, Dk, acc.dk.get() + chunk * acc.per_chunk_k + u * kTile * Dk);
    tile_gradient(sc.doT, GP, sc.dp, Dv, acc.dv.get() + chunk * acc.per_chunk_v + u * kTile * Dv);
  }
}

void position(const Ctx& cx, Scratch& sc, int64_t si, int64_t hk, int64_t t, int64_t chunk) {
  const BwdProblem& pr = *cx.pr;
  const State& st = *cx.st;
  const nsa_bwd_params& p = pr.p;
  const nsa_config& cfg = p.cfg;
  const Sequence& s = pr.seqs[si];
  const int64_t b = s.batch, tok = s.start + t, G = pr.G, GP = cx.GP, Dk = pr.Dk, Dv = pr.Dv;
  const int64_t h0 = hk * G;
  const nsa_tensor* dgate[3] = {&p.dg_cmp, &p.dg_slc, &p.dg_win};
  for (int64_t h = 0; h < G; ++h) {
    const float* q = st.q.row(b, tok, h0 + h);
    const float* dout = st.d_o.row(b, tok, h0 + h);
    for (int64_t i = 0; i < Dk; ++i) sc.qT[i * GP + h] = cfg.scale * q[i];
    for (int64_t i = 0; i < Dv; ++i) sc.doT[i * GP + h] = dout[i];
    for (int c = 0; c < 3; ++c) {
      const float* o = st.o_branch[c].row(b, tok, h0 + h);
      float dg = 0.0f;
      for (int64_t i = 0; i < Dv; ++i) dg += dout[i] * o[i];
      const float gate = st.gate[c].row(b, tok, h0 + h)[0];
      sc.head[(c * 3 + 0) * GP + h] = st.lse[c].row(b, tok, h0 + h)[0];
      sc.head[(c * 3 + 1) * GP + h] = gate;
      sc.head[(c * 3 + 2) * GP + h] = gate * dg;
      store_row(*dgate[c], offset_of(*dgate[c], b, tok, h0 + h), &dg, 1);
    }
  }
  std::fill(sc.dq, sc.dq + GP * cx.Dkp, 0.0f);
  // Step 1: the complete compressed blocks, i*d + l - 1 <= t (SPEC 4.1).
  const int64_t vis = visible_cmp_count(cfg, t);
  if (vis > 0) add_range(cx, sc, kCmp, si, hk, 0, vis - 1, chunk);
  // Step 4: the keys p <= t of each selected block.
  const int64_t nb = bwd::selected_set(pr, b, tok, hk, sc.set);
  for (int64_t i = 0; i < nb; ++i) {
    const int64_t lo = int64_t{sc.set[i]} * cfg.slc_block;
    add_range(cx, sc, kSlc, si, hk, lo, std::min<int64_t>(lo + cfg.slc_block - 1, t), chunk);
  }
  // Step 5: the window max(0, t - w + 1) .. t.
  add_range(cx, sc, kWin, si, hk, std::max<int64_t>(0, t - cfg.window + 1), t, chunk);
  for (int64_t h = 0; h < G; ++h) {
    float* dq = sc.dq + h * cx.Dkp;
    for (int64_t i = 0; i < Dk; ++i) dq[i] *= cfg.scale;
    store_row(p.dq, offset_of(p.dq, b, tok, h0 + h), dq, Dk);
  }
}

// ---- Output: the chunks' sums, transposed back to rows. ----

// Writes dk/dv rows of every (sequence, KV head) from `acc` (summed over chunks in order), or
// zeros when acc is null, into the [B, rows, Hkv, D] outputs dk_out / dv_out.
void write_keys(const BwdProblem& pr, const Packed& pk, const Accum* acc, Span span,
                const nsa_tensor& dk_out, const nsa_tensor& dv_out, int threads) {
  const int64_t work = pr.Hkv * pk.tiles;
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> rows(static_cast<size_t>(kTile * std::max(pr.Dk, pr.Dv)));
#pragma omp for schedule(static)
    for (int64_t u = 0; u < work; ++u) {
      const int64_t hk = u / pk.tiles, tile = u % pk.tiles;
      const int64_t si = std::upper_bound(pk.first_tile.begin(), pk.first_tile.end(), tile) -
                         pk.first_tile.begin() - 1;
      const Sequence& s = pr.seqs[si];
      const int64_t k0 = (tile - pk.first_tile[si]) * kTile;
      const int64_t nk = std::min(kTile, span.len(s) - k0);
      for (int which = 0; which < 2; ++which) {
        const nsa_tensor& out = which == 0 ? dk_out : dv_out;
        const int64_t D = which == 0 ? pr.Dk : pr.Dv;
        std::fill(rows.begin(), rows.end(), 0.0f);
        if (acc) {
          const float* base = which == 0 ? acc->dk.get() : acc->dv.get();
          const int64_t per = which == 0 ? acc->per_chunk_k : acc->per_chunk_v;
          for (int64_t ch = 0; ch < kChunks; ++ch) {
            const float* a = base + ch * per + u * kTile * D;
            for (int64_t i = 0; i < D; ++i)
              for (int64_t j = 0; j < nk; ++j) rows[j * D + i] += a[i * kTile + j];
          }
        }
        for (int64_t j = 0; j < nk; ++j) {
          store_row(out, offset_of(out, s.batch, span.start(s) + k0 + j, hk), rows.data() + j * D, D);
        }
      }
    }
  }
}

// ---- The call. ----

struct Unit {
  int64_t seq, hk, t0, t1;
};

// Splits the query tiles into kChunks contiguous runs of about equal cost (keys read per head),
// a function of the problem only.
std::vector<int64_t> chunk_bounds(const BwdProblem& pr, const std::vector<Unit>& units) {
  const nsa_config& cfg = pr.p.cfg;
  std::vector<double> cost(units.size() + 1, 0.0);
  for (size_t i = 0; i < units.size(); ++i) {
    double c = 0;
    for (int64_t t = units[i].t0; t < units[i].t1; ++t) {
      c += static_cast<double>(visible_cmp_count(cfg, t)) +
           static_cast<double>(std::min<int64_t>(t + 1, int64_t{cfg.slc_count} * cfg.slc_block)) +
           static_cast<double>(std::min<int64_t>(t + 1, cfg.window));
    }
    cost[i + 1] = cost[i] + c;
  }
  std::vector<int64_t> bounds(kChunks + 1, 0);
  for (int64_t ch = 1; ch < kChunks; ++ch) {
    const double target = cost.back() * static_cast<double>(ch) / kChunks;
    bounds[ch] = std::lower_bound(cost.begin(), cost.end(), target) - cost.begin();
    bounds[ch] = std::max(bounds[ch], bounds[ch - 1]);
  }
  bounds[kChunks] = static_cast<int64_t>(units.size());
  return bounds;
}

bool BackwardLanes(const State& st) {
  const BwdProblem& pr = *st.pr;
  const nsa_bwd_params& p = pr.p;
  const int threads = st.threads;
  const int64_t GP = round_up(pr.G, std::max(kHB, kQH));
  const int64_t Dkp = round_up(pr.Dk, kCB * kN);

  Packed pk_cmp, pk_slc, pk_win_own;
  if (!pack(pr, p.k_cmp, p.v_cmp, Span{true}, Dkp, threads, &pk_cmp)) return false;
  if (!pack(pr, p.k_slc, p.v_slc, Span{false}, Dkp, threads, &pk_slc)) return false;
  // The window reads the slc branch's packing when both read the same K/V.
  const bool win_same_kv = p.k_win.data == p.k_slc.data && p.v_win.data == p.v_slc.data &&
                           p.k_win.dtype == p.k_slc.dtype;
  if (!win_same_kv && !pack(pr, p.k_win, p.v_win, Span{false}, Dkp, threads, &pk_win_own)) {
    return false;
  }
  const Packed& pk_win = win_same_kv ? pk_slc : pk_win_own;
  // Accumulators: cmp, slc, and win unless it adds into the same dk/dv as slc (shared K/V).
  const bool win_shares_acc = !pr.slc_own_kv && !pr.win_own_kv;
  Accum acc_cmp, acc_slc, acc_win_own;
  if (!make_accum(pr, pk_cmp, &acc_cmp) || !make_accum(pr, pk_slc, &acc_slc)) return false;
  if (!win_shares_acc && !make_accum(pr, pk_win, &acc_win_own)) return false;
  Accum& acc_win = win_shares_acc ? acc_slc : acc_win_own;

  Ctx cx;
  cx.st = &st;
  cx.pr = &pr;
  cx.br[kCmp] = {&pk_cmp, &acc_cmp};
  cx.br[kSlc] = {&pk_slc, &acc_slc};
  cx.br[kWin] = {&pk_win, &acc_win};
  cx.GP = GP;
  cx.Dkp = Dkp;

  std::vector<Unit> units;
  for (int64_t s = 0; s < static_cast<int64_t>(pr.seqs.size()); ++s) {
    for (int64_t hk = 0; hk < pr.Hkv; ++hk) {
      for (int64_t t0 = 0; t0 < pr.seqs[s].len; t0 += kQueryTile) {
        units.push_back({s, hk, t0, std::min(pr.seqs[s].len, t0 + kQueryTile)});
      }
    }
  }
  const std::vector<int64_t> bounds = chunk_bounds(pr, units);

  // Scratch per chunk (not per thread: a chunk's work is the same whatever thread runs it).
  const int64_t floats = round_up(pr.Dk * GP, 16) + round_up(pr.Dv * GP, 16) + 2 * GP * kTile +
                         GP * Dkp + round_up(9 * GP, 16);
  hwy::AlignedFreeUniquePtr<float[]> fbuf = hwy::AllocateAligned<float>(size_t(kChunks * floats));
  if (!fbuf) return false;
  std::vector<int32_t> sets(static_cast<size_t>(kChunks * std::max(1, p.cfg.slc_count)));
  std::vector<Scratch> scratch(kChunks);
  for (int64_t ch = 0; ch < kChunks; ++ch) {
    float* f = fbuf.get() + ch * floats;
    Scratch& sc = scratch[ch];
    sc.qT = f, f += round_up(pr.Dk * GP, 16);
    sc.doT = f, f += round_up(pr.Dv * GP, 16);
    sc.s = f, f += GP * kTile;
    sc.dp = f, f += GP * kTile;
    sc.dq = f, f += GP * Dkp;
    sc.head = f;
    sc.set = sets.data() + ch * std::max(1, p.cfg.slc_count);
    // Padding heads (G..GP): zero queries and dO, lse = +inf, g = D = 0, for the whole call.
    std::fill(sc.qT, sc.qT + pr.Dk * GP, 0.0f);
    std::fill(sc.doT, sc.doT + pr.Dv * GP, 0.0f);
    for (int c = 0; c < 3; ++c) {
      std::fill(sc.head + (c * 3 + 0) * GP, sc.head + (c * 3 + 1) * GP, kInf);
      std::fill(sc.head + (c * 3 + 1) * GP, sc.head + (c * 3 + 3) * GP, 0.0f);
    }
  }

#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t ch = 0; ch < kChunks; ++ch) {
    for (int64_t i = bounds[ch]; i < bounds[ch + 1]; ++i) {
      const Unit& un = units[static_cast<size_t>(i)];
      for (int64_t t = un.t0; t < un.t1; ++t) position(cx, scratch[ch], un.seq, un.hk, t, ch);
    }
  }

  // Routing (nsa.h): a branch with its own K/V reports to its own outputs; the branches that
  // read k/v add up in dk/dv (one accumulator when both do); with both own, dk/dv get zeros.
  write_keys(pr, pk_cmp, &acc_cmp, Span{true}, p.dk_cmp, p.dv_cmp, threads);
  if (pr.slc_own_kv) write_keys(pr, pk_slc, &acc_slc, Span{false}, p.dk_slc, p.dv_slc, threads);
  if (pr.win_own_kv) write_keys(pr, pk_win, &acc_win, Span{false}, p.dk_win, p.dv_win, threads);
  if (present(p.dk)) {
    const Accum* shared = !pr.slc_own_kv ? &acc_slc : !pr.win_own_kv ? &acc_win : nullptr;
    write_keys(pr, pk_slc, shared, Span{false}, p.dk, p.dv, threads);
  }
  return true;
}

}  // namespace
}  // namespace HWY_NAMESPACE
}  // namespace nsa::cpu
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace nsa::cpu {

HWY_EXPORT(BackwardLanes);

bool bwd::backward_lanes(const State& st) { return HWY_DYNAMIC_DISPATCH(BackwardLanes)(st); }

}  // namespace nsa::cpu
#endif
