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
// Layout (the products are in backward_tiles-inl.h): a tile of 16 keys sits in the SIMD lanes (one
// AVX-512 vector), the G heads of the query position are the rows of the register block. K and V
// are packed once per call into tiles [D][16] (keys innermost) and K also into padded rows; per
// position, the scaled queries and dO are transposed to [D][G]. Then every product is a vertical
// FMA of a tile row by a broadcast:
//   S, dP   [G][16]  += q^T[i][h] (broadcast) x K tile[i] / do^T[c][h] x V tile[c]
//   dK^T    [Dk][16] += q^T[i][h] (broadcast) x dS[h]      (the tile's accumulator)
//   dV^T    [Dv][16] += do^T[c][h] (broadcast) x g P[h]
//   dq      [G][Dk]  += dS[h][j] (broadcast) x K row j      (rows in lanes)
// with no horizontal reduction anywhere. A key set is a union of key ranges (the compressed
// tokens 0..vis-1; each selected block, cut at t; the window); each range is walked in groups of
// up to 4 whole tiles (register blocks span the group), with the lanes outside the range masked
// to P = 0. Within a work unit of kQueryTile positions the walk is key-group major: each group's
// K/V and dk/dv accumulators are fetched once and serve every position that reads them.
//
// Determinism without atomics: dq has one owner (its query position). dk/dv are summed over
// queries, so the query tiles are cut into kChunks contiguous chunks of about equal cost, a fixed
// function of the problem (not of the thread count); each chunk adds into its own f32 dk/dv
// buffers in query order, and a last pass sums the chunks' buffers in chunk order. The bits are
// then the same for any thread count and any schedule. Memory: kChunks copies of the key
// gradients, O(T (Dk + Dv)) each; nothing grows with T^2.
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/backward.h"
#include "cpu/kernels.h"
#include "cpu/simd/tiles.h"
#include "hwy/aligned_allocator.h"

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "cpu/backward_lanes.cc"
#include <hwy/foreach_target.h>  // IWYU pragma: keep
#include <hwy/highway.h>

#include "cpu/backward_tiles-inl.h"

HWY_BEFORE_NAMESPACE();
namespace nsa::cpu {
namespace HWY_NAMESPACE {

// Internal linkage: every kernel names its own work types plainly (Packed, Dims, ...); the
// blocks the kernels share are in cpu/simd/.
namespace {

using bwd::kCmp;
using bwd::kSlc;
using bwd::kWin;
using bwd::State;
using bwd_tiles::group_dq;
using bwd_tiles::group_gradient;
using bwd_tiles::group_products;
using bwd_tiles::group_softmax;
using bwd_tiles::kCB;
using bwd_tiles::kGroupKeys;
using bwd_tiles::kN;

// Query positions per work unit (the unit of the chunk split). Key groups are walked once per
// unit for all its positions, so a selected block is fetched once for every position of the unit
// that picked it: with random selections at 16k, 16 positions shared a block 1.6 times on
// average, 256 about 16 times (the slc branch went from 2.3x to 1.9x the window's time).
constexpr int64_t kQueryTile = 256;
// Fixed number of dk/dv accumulator copies (see the file comment): enough to keep a few threads
// busy, few enough that the copies stay small next to the inputs.
constexpr int64_t kChunks = 4;

constexpr float kInf = std::numeric_limits<float>::infinity();

// ---- Packed K/V. ----

// One K/V tensor pair packed for every (sequence, KV head): K as tiles [Dk][16] and as rows
// [key][Dkp] (zero-padded), V as tiles [Dv][16]; keys past a sequence's end are zero. Tile
// `ti` of sequence `seq`, head hk, is number (hk * tiles + first_tile[seq] + ti).
struct Packed {
  std::vector<int64_t> first_tile;  // per sequence, cumulative; the total last
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
  std::vector<int64_t> first(1, 0);  // cumulative, and the total last
  for (const Sequence& s : pr.seqs) {
    first.push_back(first.back() + (span.len(s) + kTileKeys - 1) / kTileKeys);
  }
  *total = first.back();
  return first;
}

// Whether two descriptors name the same elements in the same layout.
bool same_view(const nsa_tensor& a, const nsa_tensor& b) {
  if (a.data != b.data || a.dtype != b.dtype || a.ndim != b.ndim) return false;
  for (int i = 0; i < a.ndim; ++i) {
    if (a.shape[i] != b.shape[i] || a.stride[i] != b.stride[i]) return false;
  }
  return true;
}

bool pack(const BwdProblem& pr, const nsa_tensor& k, const nsa_tensor& v, Span span, int64_t Dkp,
          int threads, Packed* pk) {
  const int64_t Dk = pr.Dk, Dv = pr.Dv;
  pk->first_tile = tile_starts(pr, span, &pk->tiles);
  const size_t units = static_cast<size_t>(std::max<int64_t>(1, pr.Hkv * pk->tiles));
  pk->kt = hwy::AllocateAligned<float>(units * kTileKeys * Dk);
  pk->vt = hwy::AllocateAligned<float>(units * kTileKeys * Dv);
  pk->kr = hwy::AllocateAligned<float>(units * kTileKeys * Dkp);
  if (!pk->kt || !pk->vt || !pk->kr) return false;
  int64_t row_floats = 0;
  if (!mul_size(threads, Dv, &row_floats)) return false;
  std::vector<float> buf(static_cast<size_t>(row_floats));  // before the region
  const TileSource src =
      tile_source(k, v, pr, pr.seqs, pk->first_tile, span.cmp, /*head_major=*/true);
  auto dest = [&](int64_t u) {
    KVTile<float> dst;
    dst.kt = pk->kt.get() + u * kTileKeys * Dk;
    dst.vt = pk->vt.get() + u * kTileKeys * Dv;
    dst.kr = pk->kr.get() + u * kTileKeys * Dkp;
    dst.ldk = Dkp;
    return dst;
  };
  pack_kv_tiles(src, dest, buf.data(), Dv, threads);
  return true;
}

// dk/dv accumulators of one branch group, kChunks copies, in the tile layout of its Packed.
struct Accum {
  hwy::AlignedFreeUniquePtr<float[]> dk, dv;
  int64_t per_chunk_k = 0, per_chunk_v = 0;
};

bool make_accum(const BwdProblem& pr, const Packed& pk, Accum* a) {
  const int64_t units = std::max<int64_t>(1, pr.Hkv * pk.tiles);
  a->per_chunk_k = units * kTileKeys * pr.Dk;
  a->per_chunk_v = units * kTileKeys * pr.Dv;
  a->dk = hwy::AllocateAligned<float>(static_cast<size_t>(kChunks * a->per_chunk_k));
  a->dv = hwy::AllocateAligned<float>(static_cast<size_t>(kChunks * a->per_chunk_v));
  if (!a->dk || !a->dv) return false;
  std::fill(a->dk.get(), a->dk.get() + kChunks * a->per_chunk_k, 0.0f);
  std::fill(a->dv.get(), a->dv.get() + kChunks * a->per_chunk_v, 0.0f);
  return true;
}

// ---- One query tile. ----

// The stages of nsa_bwd_profile timed inside the parallel pass.
enum BwdStage { kStageRows, kStageCmpBranch, kStageSlcBranch, kStageWinBranch, kBwdStages };

struct Branch {
  const Packed* pk = nullptr;
  Accum* acc = nullptr;
};

// The state of one query position (all G heads of its KV group).
struct Pos {
  int64_t t = 0;
  float* qT;     // [Dk][GP] scale * q
  float* doT;    // [Dv][GP]
  float* dq;     // [GP][Dkp]
  float* head;   // [3][3][GP]: per branch lse, g, D
  int32_t* set;  // [Ctx::set_room]: the selected blocks
  int64_t nb = 0;
};

// Per-chunk scratch: the positions of one query tile, one tile's S/dP, the slc work list.
struct Scratch {
  Pos pos[kQueryTile];
  float* s;                                        // [GP][kGroupKeys] scores, then dS
  float* dp;                                       // [GP][kGroupKeys] dP, then g P
  std::vector<std::pair<int32_t, int32_t>> pairs;  // (selected block, position in the tile)
  double stage_s[4] = {0, 0, 0, 0};                // thread-seconds per BwdStage (profiling)
};

struct Ctx {
  const State* st;
  const BwdProblem* pr;
  Branch br[3];
  int64_t GP, Dkp;
  int64_t set_room;  // entries of Pos::set
};

// The gradients of position ps through keys [k0 + a, k0 + b] of the nt tiles from tile `ti`
// (k0 = 16 ti) of branch c (rows local to the sequence), added to chunk `chunk`'s accumulators.
void add_group(const Ctx& cx, Scratch& sc, const Pos& ps, int c, int64_t si, int64_t hk, int64_t ti,
               int nt, int64_t a, int64_t b, int64_t chunk) {
  const BwdProblem& pr = *cx.pr;
  const Packed& pk = *cx.br[c].pk;
  const Accum& acc = *cx.br[c].acc;
  const int64_t Dk = pr.Dk, Dv = pr.Dv, GP = cx.GP;
  const int64_t u = hk * pk.tiles + pk.first_tile[si] + ti;
  const float* head = ps.head + c * 3 * GP;
  group_products(ps.qT, GP, GP, pk.kt.get() + u * kTileKeys * Dk, Dk, nt, sc.s);
  group_products(ps.doT, GP, GP, pk.vt.get() + u * kTileKeys * Dv, Dv, nt, sc.dp);
  group_softmax(sc.s, sc.dp, GP, nt, head, head + GP, head + 2 * GP, a, b);
  group_dq(sc.s, GP, pk.kr.get() + u * kTileKeys * cx.Dkp, cx.Dkp, a, b, ps.dq);
  group_gradient(ps.qT, GP, sc.s, Dk, nt,
                 acc.dk.get() + chunk * acc.per_chunk_k + u * kTileKeys * Dk);
  group_gradient(ps.doT, GP, sc.dp, Dv, nt,
                 acc.dv.get() + chunk * acc.per_chunk_v + u * kTileKeys * Dv);
}

// Calls add_group for position ps over keys [lo, hi] of group gi (keys [64 gi, 64 gi + 64)),
// on the tiles that hold live keys only.
void add_range_in_group(const Ctx& cx, Scratch& sc, const Pos& ps, int c, int64_t si, int64_t hk,
                        int64_t gi, int64_t lo, int64_t hi, int64_t chunk) {
  const int64_t g0 = gi * kGroupKeys;
  lo = std::max(lo, g0), hi = std::min(hi, g0 + kGroupKeys - 1);
  if (hi < lo) return;
  const int64_t t_first = lo / kTileKeys, t_last = hi / kTileKeys, k0 = t_first * kTileKeys;
  add_group(cx, sc, ps, c, si, hk, t_first, static_cast<int>(t_last - t_first + 1), lo - k0,
            hi - k0, chunk);
}

// Position t's transposed rows, per-branch lse, g, D (and its dg outputs), selection; dq zeroed.
void prepare(const Ctx& cx, Pos& ps, int64_t si, int64_t hk, int64_t t) {
  const BwdProblem& pr = *cx.pr;
  const State& st = *cx.st;
  const nsa_bwd_params& p = pr.p;
  const Sequence& s = pr.seqs[si];
  const int64_t b = s.batch, tok = s.start + t, G = pr.G, GP = cx.GP;
  const int64_t h0 = hk * G;
  const nsa_tensor* dgate[3] = {&p.dg_cmp, &p.dg_slc, &p.dg_win};
  ps.t = t;
  for (int64_t h = 0; h < G; ++h) {
    const float* q = st.q.row(b, tok, h0 + h);
    const float* dout = st.d_o.row(b, tok, h0 + h);
    for (int64_t i = 0; i < pr.Dk; ++i) ps.qT[i * GP + h] = p.in.cfg.scale * q[i];
    for (int64_t i = 0; i < pr.Dv; ++i) ps.doT[i * GP + h] = dout[i];
    for (int c = 0; c < 3; ++c) {
      const float* o = st.o_branch[c].row(b, tok, h0 + h);
      float dg = 0.0f;
      for (int64_t i = 0; i < pr.Dv; ++i) dg += dout[i] * o[i];
      const float gate = st.gate[c].row(b, tok, h0 + h)[0];
      ps.head[(c * 3 + 0) * GP + h] = st.lse[c].row(b, tok, h0 + h)[0];
      ps.head[(c * 3 + 1) * GP + h] = gate;
      ps.head[(c * 3 + 2) * GP + h] = gate * dg;
      store_row(*dgate[c], offset_of(*dgate[c], b, tok, h0 + h), &dg, 1);
    }
  }
  std::fill(ps.dq, ps.dq + GP * cx.Dkp, 0.0f);
  ps.nb = bwd::selected_set(pr, b, tok, hk, ps.set, cx.set_room);
}

// Positions [t0, t1) of sequence si, KV head hk. Key tiles outer, positions inner: a key tile and
// its dk/dv accumulators are fetched once for every position of the query tile that reads them
// (all of them for the window and the compressed tokens; those that selected the block for slc)
// and stay in L1/L2 while the positions pass.
void query_tile(const Ctx& cx, Scratch& sc, int64_t si, int64_t hk, int64_t t0, int64_t t1,
                int64_t chunk) {
  const nsa_config& cfg = cx.pr->p.in.cfg;
  const int64_t np = t1 - t0;
  StageClock clock(cx.pr->profile ? sc.stage_s : nullptr);
  for (int64_t i = 0; i < np; ++i) prepare(cx, sc.pos[i], si, hk, t0 + i);
  clock.lap(kStageRows);
  // Step 1: the complete compressed blocks, i*d + l - 1 <= t (SPEC 4.1).
  const int64_t vis_max = visible_cmp_count(cfg, t1 - 1);
  for (int64_t gi = 0; gi * kGroupKeys < vis_max; ++gi) {
    for (int64_t i = 0; i < np; ++i) {
      const int64_t hi = visible_cmp_count(cfg, t0 + i) - 1;
      add_range_in_group(cx, sc, sc.pos[i], kCmp, si, hk, gi, 0, hi, chunk);
    }
  }
  clock.lap(kStageCmpBranch);
  // Step 4: the keys p <= t of each selected block, block by block.
  sc.pairs.clear();
  for (int64_t i = 0; i < np; ++i) {
    for (int64_t k = 0; k < sc.pos[i].nb; ++k) sc.pairs.push_back({sc.pos[i].set[k], int32_t(i)});
  }
  std::sort(sc.pairs.begin(), sc.pairs.end());
  for (size_t x = 0; x < sc.pairs.size();) {
    size_t y = x;
    while (y < sc.pairs.size() && sc.pairs[y].first == sc.pairs[x].first) ++y;
    // Cut at the unit's last position: no key past it is read (l' may be far above T).
    const int64_t lo = int64_t{sc.pairs[x].first} * cfg.slc_block;
    const int64_t hi = std::min(lo + cfg.slc_block - 1, t1 - 1);
    for (int64_t gi = lo / kGroupKeys; gi <= hi / kGroupKeys; ++gi) {
      for (size_t z = x; z < y; ++z) {
        const Pos& ps = sc.pos[sc.pairs[z].second];
        add_range_in_group(cx, sc, ps, kSlc, si, hk, gi, lo, std::min(hi, ps.t), chunk);
      }
    }
    x = y;
  }
  clock.lap(kStageSlcBranch);
  // Step 5: the window max(0, t - w + 1) .. t.
  const int64_t w = cfg.window;
  const int64_t g_first = std::max<int64_t>(0, t0 - w + 1) / kGroupKeys;
  for (int64_t gi = g_first; gi <= (t1 - 1) / kGroupKeys; ++gi) {
    for (int64_t i = 0; i < np; ++i) {
      const int64_t t = t0 + i;
      add_range_in_group(cx, sc, sc.pos[i], kWin, si, hk, gi, std::max<int64_t>(0, t - w + 1), t,
                         chunk);
    }
  }
  clock.lap(kStageWinBranch);
  const BwdProblem& pr = *cx.pr;
  const Sequence& s = pr.seqs[si];
  for (int64_t i = 0; i < np; ++i) {
    for (int64_t h = 0; h < pr.G; ++h) {
      float* dq = sc.pos[i].dq + h * cx.Dkp;
      for (int64_t c = 0; c < pr.Dk; ++c) dq[c] *= cfg.scale;
      store_row(pr.p.dq, offset_of(pr.p.dq, s.batch, s.start + t0 + i, hk * pr.G + h), dq, pr.Dk);
    }
  }
  clock.lap(kStageRows);
}

// ---- Output: the chunks' sums, transposed back to rows. ----

// Per-thread rows of write_keys: one tile of dk or dv rows.
int64_t write_keys_floats(const BwdProblem& pr) { return kTileKeys * std::max(pr.Dk, pr.Dv); }

// Writes dk/dv rows of every (sequence, KV head) from `acc` (summed over chunks in order), or
// zeros when acc is null, into the [B, rows, Hkv, D] outputs dk_out / dv_out (each skipped when
// absent). buf: threads * write_keys_floats(pr) floats, allocated before the pass wrote any
// output (a failed allocation here would leave dq and dg written).
void write_keys(const BwdProblem& pr, const Packed& pk, const Accum* acc, Span span,
                const nsa_tensor& dk_out, const nsa_tensor& dv_out, int threads, float* buf) {
  const int64_t work = pr.Hkv * pk.tiles;
  const int64_t per_thread = write_keys_floats(pr);
#pragma omp parallel num_threads(threads)
  {
    float* rows = buf + omp_get_thread_num() * per_thread;
#pragma omp for schedule(static)
    for (int64_t u = 0; u < work; ++u) {
      const int64_t hk = u / pk.tiles, tile = u % pk.tiles;
      const int64_t si = sequence_of_tile(pk.first_tile, tile);
      const Sequence& s = pr.seqs[si];
      const int64_t k0 = (tile - pk.first_tile[si]) * kTileKeys;
      const int64_t nk = std::min(kTileKeys, span.len(s) - k0);
      for (int which = 0; which < 2; ++which) {
        const nsa_tensor& out = which == 0 ? dk_out : dv_out;
        if (!present(out)) continue;
        const int64_t D = which == 0 ? pr.Dk : pr.Dv;
        std::fill(rows, rows + per_thread, 0.0f);
        if (acc) {
          const float* base = which == 0 ? acc->dk.get() : acc->dv.get();
          const int64_t per = which == 0 ? acc->per_chunk_k : acc->per_chunk_v;
          for (int64_t ch = 0; ch < kChunks; ++ch) {
            const float* a = base + ch * per + u * kTileKeys * D;
            for (int64_t i = 0; i < D; ++i)
              for (int64_t j = 0; j < nk; ++j) rows[j * D + i] += a[i * kTileKeys + j];
          }
        }
        for (int64_t j = 0; j < nk; ++j) {
          store_row(out, offset_of(out, s.batch, span.start(s) + k0 + j, hk), rows + j * D, D);
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
  const nsa_config& cfg = pr.p.in.cfg;
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

// Carves each chunk's scratch (kChunks copies of `floats` floats at fbuf, sets of n_set
// entries per position) and fills the padding heads' constants.
void carve_scratch(const BwdProblem& pr, int64_t GP, int64_t Dkp, int64_t n_set, float* fbuf,
                   int64_t floats, int32_t* sets, std::vector<Scratch>& scratch) {
  for (int64_t ch = 0; ch < kChunks; ++ch) {
    float* f = fbuf + ch * floats;
    Scratch& sc = scratch[ch];
    for (int64_t i = 0; i < kQueryTile; ++i) {
      Pos& ps = sc.pos[i];
      ps.qT = f, f += round_up(pr.Dk * GP, 16);
      ps.doT = f, f += round_up(pr.Dv * GP, 16);
      ps.dq = f, f += GP * Dkp;
      ps.head = f, f += round_up(9 * GP, 16);
      ps.set = sets + (ch * kQueryTile + i) * n_set;
      // Padding heads (G..GP): zero queries and dO, lse = +inf, g = D = 0, for the whole call.
      std::fill(ps.qT, ps.qT + pr.Dk * GP, 0.0f);
      std::fill(ps.doT, ps.doT + pr.Dv * GP, 0.0f);
      for (int c = 0; c < 3; ++c) {
        std::fill(ps.head + (c * 3 + 0) * GP, ps.head + (c * 3 + 1) * GP, kInf);
        std::fill(ps.head + (c * 3 + 1) * GP, ps.head + (c * 3 + 3) * GP, 0.0f);
      }
    }
    sc.s = f, f += GP * kGroupKeys;
    sc.dp = f;
    // A tile's pairs never pass this (each set holds at most n_set - 1 blocks), so push_back
    // inside the parallel pass never reallocates, and so never throws.
    sc.pairs.reserve(static_cast<size_t>(kQueryTile * n_set));
  }
}

// The key gradients of every branch into the outputs. Routing (nsa.h): a branch with its own
// K/V reports to its own outputs; the branches that read k/v add up in dk/dv (one accumulator
// when both do); with both own, dk/dv get zeros.
void write_outputs(const BwdProblem& pr, const Ctx& cx, float* out, int threads) {
  const nsa_bwd_params& p = pr.p;
  const Branch& cmp = cx.br[kCmp];
  const Branch& slc = cx.br[kSlc];
  const Branch& win = cx.br[kWin];
  write_keys(pr, *cmp.pk, cmp.acc, Span{true}, p.dk_cmp, p.dv_cmp, threads, out);
  if (pr.slc_own_kv) {
    write_keys(pr, *slc.pk, slc.acc, Span{false}, p.dk_slc, p.dv_slc, threads, out);
  }
  if (pr.win_own_kv) {
    write_keys(pr, *win.pk, win.acc, Span{false}, p.dk_win, p.dv_win, threads, out);
  }
  if (present(p.dk) || present(p.dv)) {  // both required unless both branches own K/V
    const Accum* shared = !pr.slc_own_kv ? slc.acc : !pr.win_own_kv ? win.acc : nullptr;
    write_keys(pr, *slc.pk, shared, Span{false}, p.dk, p.dv, threads, out);
  }
}

bool BackwardLanes(const State& st) {
  const BwdProblem& pr = *st.pr;
  const nsa_bwd_params& p = pr.p;
  const int threads = st.threads;
  const int64_t GP = bwd_tiles::padded_heads(pr.G);
  const int64_t Dkp = round_up(pr.Dk, kCB * kN);
  using Clock = std::chrono::steady_clock;
  auto seconds_since = [](Clock::time_point t) {
    return std::chrono::duration<double>(Clock::now() - t).count();
  };
  const auto t_pack = Clock::now();

  Packed pk_cmp, pk_slc, pk_win_own;
  if (!pack(pr, p.in.k_cmp, p.in.v_cmp, Span{true}, Dkp, threads, &pk_cmp)) return false;
  if (!pack(pr, p.in.k_slc, p.in.v_slc, Span{false}, Dkp, threads, &pk_slc)) return false;
  // The window reads the slc branch's packing when both read the same K/V.
  const bool win_same_kv = same_view(p.in.k_win, p.in.k_slc) && same_view(p.in.v_win, p.in.v_slc);
  if (!win_same_kv && !pack(pr, p.in.k_win, p.in.v_win, Span{false}, Dkp, threads, &pk_win_own)) {
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
  const int64_t per_pos =
      round_up(pr.Dk * GP, 16) + round_up(pr.Dv * GP, 16) + GP * Dkp + round_up(9 * GP, 16);
  const int64_t floats = kQueryTile * per_pos + 2 * GP * kGroupKeys;
  int64_t out_floats = 0;
  if (!mul_size(threads, write_keys_floats(pr), &out_floats)) return false;
  hwy::AlignedFreeUniquePtr<float[]> fbuf = hwy::AllocateAligned<float>(size_t(kChunks * floats));
  hwy::AlignedFreeUniquePtr<float[]> out_buf = hwy::AllocateAligned<float>(size_t(out_floats));
  if (!fbuf || !out_buf) return false;
  // Room for a row's selected set: more than the blocks of the longest sequence (not n, which
  // may exceed them by far).
  int64_t max_len = 0;
  for (const Sequence& sq : pr.seqs) max_len = std::max(max_len, sq.len);
  const int64_t n_set = std::min<int64_t>(p.in.cfg.slc_count,
                                          (max_len + p.in.cfg.slc_block - 1) / p.in.cfg.slc_block) +
                        1;
  cx.set_room = n_set;
  std::vector<int32_t> sets(static_cast<size_t>(kChunks * kQueryTile * n_set));
  std::vector<Scratch> scratch(kChunks);
  carve_scratch(pr, GP, Dkp, n_set, fbuf.get(), floats, sets.data(), scratch);

  const double pack_s = seconds_since(t_pack);
  const auto t_pass = Clock::now();
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t ch = 0; ch < kChunks; ++ch) {
    for (int64_t i = bounds[ch]; i < bounds[ch + 1]; ++i) {
      const Unit& un = units[static_cast<size_t>(i)];
      query_tile(cx, scratch[ch], un.seq, un.hk, un.t0, un.t1, ch);
    }
  }

  const double pass_s = seconds_since(t_pass);
  const auto t_reduce = Clock::now();
  write_outputs(pr, cx, out_buf.get(), threads);
  if (nsa_bwd_profile* prof = pr.profile) {
    // The pass's wall time split in proportion to the thread-seconds of its stages.
    double stage[kBwdStages] = {0, 0, 0, 0}, sum = 0;
    for (const Scratch& sc : scratch)
      for (int k = 0; k < kBwdStages; ++k) stage[k] += sc.stage_s[k], sum += sc.stage_s[k];
    const double f = sum > 0 ? pass_s / sum : 0.0;
    prof->pack_s += pack_s;
    prof->rows_s += f * stage[kStageRows];
    prof->cmp_s += f * stage[kStageCmpBranch];
    prof->slc_s += f * stage[kStageSlcBranch];
    prof->win_s += f * stage[kStageWinBranch];
    prof->reduce_s += seconds_since(t_reduce);
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
