// The CPU forward with the G query heads of a KV group in SIMD lanes (SPEC.md section 4; the
// paper's group-centric kernel, Section 3.4, laid out for a CPU vector unit).
//
// All three branches share one shape of work: the G heads of one query position against a set
// of keys that is the same for every head of the group. With the heads in the lanes of a vector
// (16 f32 lanes on AVX-512 hold the paper's group of 16), every step is vertical:
//   S[j] = Q^T k_j      Dk FMAs of (a vector of G queries' i-th elements) x (k_j[i] broadcast),
//   online softmax      running max and sum per lane, no horizontal reduction at all,
//   O^T += P V          Dv FMAs per key of (P[j], the G heads' weights) x (v_j[c] broadcast).
// Each key is loaded once for the whole group, as a broadcast operand of the FMA, and each FMA
// does useful work in every lane. Four consecutive positions of one KV head go together, as
// two pairs: the two positions of a pair attend nearly the same window and compressed keys (and
// some of the same selected blocks), so where both attend a key, one broadcast of it feeds both
// (the kernels in lanes-inl.h); the compressed keys are walked once for all four. K is packed once
// per call into tiles of 16 keys with the keys innermost ([Dk][16]), so the broadcasts of one step
// sit in one cache line; V is converted to f32 rows. Heads past G in the last vector are padded
// with zero queries; their lanes compute finite values that are never stored.
//
// The compressed branch needs the probabilities themselves (they are summed over the group into
// block scores, Eqs. 8-10), so it is a two-pass softmax: the scores of every visible compressed
// token, Tc x G floats (256 KiB at 64k tokens), stay in L2 between the passes, and the one QK
// pass serves both o_cmp and the block scores.
//
// Groups of up to 8 heads would fill a quarter or half of a vector this way, so for them steps
// 1-2, 4 and 5 put the keys in the lanes instead (forward_keys-inl.h), and a work item is a tile
// of 256 positions whose selected branch is walked block-major. The tile runs in three passes
// either way (run_tile): steps 1-3 per quad, step 4 over the tile, step 5 and the combine per
// quad; with the heads in lanes a tile is one quad. The heads-in-lanes steps themselves are in
// forward_heads-inl.h; this file drives both layouts, packs, and carves the threads' buffers.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <initializer_list>
#include <limits>
#include <new>
#include <vector>

#include "common/dtype.h"
#include "cpu/kernels.h"
#include "cpu/simd/tiles.h"
#include "hwy/aligned_allocator.h"

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "cpu/forward_lanes.cc"
#include <hwy/foreach_target.h>  // IWYU pragma: keep
#include <hwy/highway.h>

#include "cpu/forward_heads-inl.h"
#include "cpu/forward_keys-inl.h"
#include "cpu/simd/softmax-inl.h"

HWY_BEFORE_NAMESPACE();
namespace nsa::cpu {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// Internal linkage: every kernel names its own work types plainly (Packed, Dims, ...); the
// blocks the kernels share are in cpu/simd/.
namespace {

// The full vector; the heads-in-lanes kernels take theirs as a template parameter DF
// (ForwardLanes picks it from G).
using DFull = hn::ScalableTag<float>;

using fwd::BlockPos;
using fwd::Branch;
using fwd::Dims;
using fwd::kv_of;
using fwd::Packs;
using fwd::Pos;
using fwd::Stack;
using heads::attend_spans;
using heads::cmp_branch;
using heads::kChunk;
using heads::slc_pair;

void branch_begin(const Dims& d, Branch& br) {
  std::fill(br.o, br.o + d.Dv * d.GP, 0.0f);
  std::fill(br.m, br.m + d.GP, kNegInf);
  std::fill(br.l, br.l + d.GP, 0.0f);
}

// o = g_cmp o_cmp + g_slc o_slc + g_win o_win per head, and the optional outputs (SPEC 4.6).
void combine_heads(const Pos& ps, const Dims& dm, float* row) {
  const Group& g = ps.g;
  const nsa_fwd_params& p = g.pr->p;
  const int64_t Dv = dm.Dv, GP = dm.GP, b = g.seq->batch, tok = g.tok;
  auto store_branch = [&](const nsa_tensor& t, int64_t head, int64_t hg, const float* ot) {
    if (!present(t)) return;
    for (int64_t c = 0; c < Dv; ++c) row[c] = ot[c * GP + hg];
    store_row(t, offset_of(t, b, tok, head), row, Dv);
  };
  auto store_lse = [&](const nsa_tensor& t, int64_t head, float value) {
    if (present(t)) static_cast<float*>(t.data)[offset_of(t, b, tok, head)] = value;
  };
  for (int64_t hg = 0; hg < dm.G; ++hg) {
    const int64_t head = g.hk * dm.G + hg;
    // Gate values as given: the op applies no sigmoid (SPEC 3).
    const float gc = load_f32(p.in.g_cmp, offset_of(p.in.g_cmp, b, tok, head));
    const float gs = load_f32(p.in.g_slc, offset_of(p.in.g_slc, b, tok, head));
    const float gw = load_f32(p.in.g_win, offset_of(p.in.g_win, b, tok, head));
    for (int64_t c = 0; c < Dv; ++c) {
      row[c] = gc * ps.cmp.o[c * GP + hg] + gs * ps.slc.o[c * GP + hg] + gw * ps.win.o[c * GP + hg];
    }
    store_row(p.o, offset_of(p.o, b, tok, head), row, Dv);
    store_branch(p.o_cmp, head, hg, ps.cmp.o);
    store_branch(p.o_slc, head, hg, ps.slc.o);
    store_branch(p.o_win, head, hg, ps.win.o);
    store_lse(p.lse_cmp, head, ps.lse[hg]);
    store_lse(p.lse_slc, head, ps.lse[GP + hg]);
    store_lse(p.lse_win, head, ps.lse[2 * GP + hg]);
  }
}

// One head's query (bf16, at element offset `at` of q) as pairs of dims into qp[i ldq], unscaled:
// the bits are moved, so the products see the exact query (Dims::scale applies to the scores).
void query_pairs(const nsa_tensor& q, int64_t at, const Dims& dm, uint32_t* qp) {
  const uint16_t* x = static_cast<const uint16_t*>(q.data) + at;
  const int64_t st = q.stride[3];
  for (int64_t i = 0; i < dm.Dk2; ++i) {
    const uint32_t hi = 2 * i + 1 < dm.Dk ? x[(2 * i + 1) * st] : 0;
    qp[i * dm.ldq] = uint32_t{x[2 * i * st]} | hi << 16;
  }
}

// Steps 1-3 for the G heads of one KV head at up to four consecutive positions (quad[0] always
// present; later ones null past the sequence end), as two pairs: queries, compressed attention,
// block scores, the selected sets.
template <class DF>
void prepare_quad(Pos* const quad[4], const Packs& pk, int64_t si, const Dims& dm, float* acc,
                  float* row, const Stack& st, StageClock& clock) {
  const FwdProblem& pr = *quad[0]->g.pr;
  const nsa_config& cfg = pr.p.in.cfg;
  const int64_t hk = quad[0]->g.hk;
  for (Pos* ps : std::initializer_list<Pos*>{quad[0], quad[1], quad[2], quad[3]}) {
    if (!ps) continue;
    for (int64_t hg = 0; hg < dm.G; ++hg) {
      const int64_t at = offset_of(pr.p.in.q, ps->g.seq->batch, ps->g.tok, hk * dm.G + hg);
      if (dm.bf) {
        query_pairs(pr.p.in.q, at, dm, ps->qp + hg);
        continue;
      }
      load_row(pr.p.in.q, at, dm.Dk, row);
      for (int64_t i = 0; i < dm.Dk; ++i) ps->qt[i * dm.ldq + hg] = row[i] * cfg.scale;
    }
    branch_begin(dm, ps->cmp);
    branch_begin(dm, ps->slc);
    branch_begin(dm, ps->win);
  }

  // Steps 1-2: compressed attention and the block scores. Empty C_t: o_cmp = 0,
  // lse_cmp = -inf, never NaN, and every block score is 0 (SPEC 4.1).
  int64_t nc[4] = {0, 0, 0, 0};
  for (int p = 0; p < 4; ++p) nc[p] = quad[p] ? visible_cmp_count(cfg, quad[p]->g.t) : 0;
  if (nc[0] > 0 || nc[1] > 0 || nc[2] > 0 || nc[3] > 0) {
    if (dm.keys) {
      keys::cmp_quad(quad, nc, pk, si, dm, st);
      clock.lap(kStageCmp);
    } else {
      cmp_branch<DF>(quad, dm, kv_of(pk.cmp, si, hk), nc, acc, clock);
    }
  }
  for (int p = 0; p < 4; ++p) {
    if (quad[p] && nc[p] == 0) {
      std::fill(quad[p]->sel.score, quad[p]->sel.score + quad[p]->g.t / cfg.slc_block + 1, 0.0f);
    }
  }
  clock.lap(kStageScores);
  for (Pos* ps : std::initializer_list<Pos*>{quad[0], quad[1], quad[2], quad[3]}) {
    if (ps) {
      softmax::finish_lanes(DF(), dm.GP, dm.Dv, ps->cmp.m, ps->cmp.l, ps->cmp.o, ps->lse);
    }
  }
  clock.lap(kStageCmp);

  // Step 3: the selected sets (topk.cc), sorted.
  for (Pos* ps : std::initializer_list<Pos*>{quad[0], quad[1], quad[2], quad[3]}) {
    if (ps) slc_select(ps->g, ps->sel);
  }
  clock.lap(kStageTopn);
}

// Step 5 and the combine for a quad: the windows, keys max(0, t - w + 1) .. t, as two pairs
// (heads in lanes) or one stack (keys in lanes).
template <class DF>
void window_quad(Pos* const quad[4], const Packs& pk, int64_t si, const Dims& dm, float* row,
                 const Stack& st, StageClock& clock) {
  const nsa_config& cfg = quad[0]->g.pr->p.in.cfg;
  const int64_t hk = quad[0]->g.hk;
  Pos* const pairs[2][2] = {{quad[0], quad[1]}, {quad[2], quad[3]}};
  if (dm.keys) keys::window_quad(quad, pk, si, dm, st);
  for (Pos* const* pos : pairs) {
    if (!pos[0] || dm.keys) continue;
    int64_t f[2] = {0, 0}, e[2] = {0, 0};
    for (int p = 0; p < 2; ++p) {
      if (!pos[p]) continue;
      f[p] = std::max<int64_t>(0, pos[p]->g.t - cfg.window + 1);
      e[p] = pos[p]->g.t + 1;
    }
    attend_spans<DF>(pos, &Pos::win, dm, kv_of(*pk.win_kv, si, hk), f, e);
  }
  for (Pos* ps : std::initializer_list<Pos*>{quad[0], quad[1], quad[2], quad[3]}) {
    if (ps) {
      softmax::finish_lanes(DF(), dm.GP, dm.Dv, ps->win.m, ps->win.l, ps->win.o,
                            ps->lse + 2 * dm.GP);
    }
  }
  clock.lap(kStageWin);
  for (Pos* ps : std::initializer_list<Pos*>{quad[0], quad[1], quad[2], quad[3]}) {
    if (ps) combine_heads(*ps, dm, row);
  }
  clock.lap(kStageCombine);
}

// Per-thread buffers of a work item.
struct Bufs {
  float* acc;
  float* row;
  float* blk_k;
  float* blk_v;
  Stack st;  // the keys-in-lanes steps' buffers
};

// All steps of SPEC 4 for the np consecutive positions of a tile (one sequence, one KV head), in
// three passes: steps 1-3 per quad, step 4 over the tile (per pair with the heads in lanes, or
// block-major with the keys in lanes), step 5 and the combine per quad.
template <class DF>
void run_tile(Pos* tile, int64_t np, const Packs& pk, int64_t si, const Dims& dm, const Bufs& b,
              StageClock& clock) {
  const int64_t hk = tile[0].g.hk;
  auto quad_at = [&](int64_t q0, Pos* quad[4]) {
    for (int p = 0; p < 4; ++p) quad[p] = q0 + p < np ? &tile[q0 + p] : nullptr;
  };
  Pos* quad[4];
  for (int64_t q0 = 0; q0 < np; q0 += 4) {
    quad_at(q0, quad);
    prepare_quad<DF>(quad, pk, si, dm, b.acc, b.row, b.st, clock);
  }
  if (dm.keys) {
    keys::slc_tile(tile, np, pk, si, hk, dm, b.blk_k, b.blk_v, b.st);
  } else {
    for (int64_t q0 = 0; q0 < np; q0 += 2) {
      Pos* pair[2] = {&tile[q0], q0 + 1 < np ? &tile[q0 + 1] : nullptr};
      slc_pair<DF>(pair, pk, si, hk, dm, b.blk_k, b.blk_v);
    }
  }
  for (int64_t i = 0; i < np; ++i) {
    Pos& ps = tile[i];
    softmax::finish_lanes(DF(), dm.GP, dm.Dv, ps.slc.m, ps.slc.l, ps.slc.o, ps.lse + dm.GP);
  }
  clock.lap(kStageSlc);
  for (int64_t q0 = 0; q0 < np; q0 += 4) {
    quad_at(q0, quad);
    window_quad<DF>(quad, pk, si, dm, b.row, b.st, clock);
  }
}

bool same_view(const nsa_tensor& a, const nsa_tensor& b) {
  return a.data == b.data && a.dtype == b.dtype && std::equal(a.stride, a.stride + 4, b.stride) &&
         std::equal(a.shape, a.shape + 4, b.shape);
}

// The sizes of one thread's buffers (floats, ints, pairs), carved by carve() in this order: the
// tile's positions (kept from step 1 to the combine), the scratch of the four positions of a
// quad, the rest. All of it is allocated before the parallel region.
struct Layout {
  int64_t P = 4;  // positions per tile
  int64_t Dk = 0, Dv = 0, GP = 0, ldq = 0, orows = 0, set_room = 0, max_blocks = 0;
  int64_t s_rows = 0, acc = 0, blk_keys = 0, qp = 0;
  bool qp_in_qt = false;  // the keys in lanes keep the query pairs in qt's memory (Pos::qp)
  Stack st;            // the keys-in-lanes stack's shape (its buffers are carved)
  int64_t stack[5]{};  // its s, o, w, inv and pp
  int64_t floats = 0, ints = 0, pairs = 0;
};

Layout layout_of(const FwdProblem& pr, const Dims& dm, const Packs& pk, int64_t lanes) {
  Layout z;
  const nsa_config& cfg = pr.p.in.cfg;
  // Step 4 with the keys in lanes shares each selected block among a tile's positions, so its
  // tiles are long; the heads-in-lanes kernels share within pairs only.
  z.P = dm.keys ? 256 : 4;
  z.Dk = dm.Dk, z.Dv = dm.Dv, z.GP = dm.GP, z.ldq = dm.ldq;
  z.qp = dm.bf && !dm.keys ? dm.Dk2 * dm.GP : 0;
  z.qp_in_qt = dm.keys;
  int64_t max_len = 0, max_cmp = 0;
  for (const Sequence& sq : pr.seqs) max_len = std::max(max_len, sq.len);
  for (const Sequence& sq : pr.seqs) max_cmp = std::max(max_cmp, sq.cmp_len);
  z.max_blocks = max_len > 0 ? (max_len - 1) / cfg.slc_block + 1 : 1;
  z.set_room = std::min<int64_t>(cfg.slc_count, z.max_blocks);  // |I_t| at most
  // Heads-in-lanes scratch: all compressed scores of a position; acc: 1/l, then one vector per
  // selection block (block_scores_lanes).
  z.s_rows = dm.keys ? 0 : std::max(kChunk, round_up(max_cmp, kTileKeys));
  z.acc = dm.keys ? 0 : dm.GP + z.max_blocks * lanes;
  // One selected block widened from bf16 (f32 K/V need none): whole tiles from the one holding
  // its first key, never more than the longest sequence holds however large l' is.
  z.blk_keys = pk.slc.half
                   ? round_up(std::min<int64_t>(cfg.slc_block, max_len), kTileKeys) + kTileKeys
                   : 0;
  // The keys-in-lanes stack: score rows hold whole groups of 64 keys, and all the compressed
  // keys of a position.
  z.st.G = dm.G;
  z.st.GH = bwd_tiles::padded_heads(dm.G);
  z.st.ldo = round_up(dm.Dv, kTileKeys);
  z.st.s_ld = round_up(std::max<int64_t>(1, max_cmp), keys::kGroupKeys);
  const int64_t R = dm.keys ? fwd::kMaxRows : 0;
  z.orows = dm.keys ? z.st.GH * z.st.ldo : 0;
  z.stack[0] = R * z.st.s_ld, z.stack[1] = R * z.st.ldo;
  z.stack[2] = dm.keys ? z.st.s_ld : 0, z.stack[3] = R;
  z.stack[4] = dm.keys && dm.bf ? R * 32 : 0;
  // As carve() takes them, each rounded up to 16 floats: per position qt, qp, three branches'
  // o, m, l, lse, orows; per quad slot s and score; then acc, row, blk_k, blk_v and the stack's
  // five.
  const int64_t branch = round_up(dm.Dv * dm.GP, 16) + 2 * round_up(dm.GP, 16);
  z.floats = z.P * (round_up(dm.Dk * dm.ldq, 16) + round_up(z.qp, 16) + 3 * branch +
                    round_up(3 * dm.GP, 16) + round_up(z.orows, 16)) +
             4 * (round_up(z.s_rows * dm.GP, 16) + round_up(z.max_blocks, 16)) +
             round_up(z.acc, 16) + round_up(std::max(dm.Dk, dm.Dv), 16) +
             round_up(z.blk_keys * dm.Dk, 16) + round_up(z.blk_keys * dm.Dv, 16);
  for (int64_t size : z.stack) z.floats += round_up(size, 16);
  z.ints = 4 * round_up(z.max_blocks, 16) + z.P * round_up(z.set_room, 16) + fwd::kMaxRows;
  z.pairs = dm.keys ? z.P * z.set_room : 0;
  return z;
}

// Carves one thread's buffers (Layout's order) for its tile of positions and its Bufs.
void carve(const Layout& z, float* f, int32_t* ints, fwd::BlockPos* pairs, Pos* tile, Bufs& b) {
  auto take = [&f](int64_t count) {
    float* at = f;
    f += round_up(count, 16);
    return at;
  };
  for (int64_t i = 0; i < z.P; ++i) {
    Pos& ps = tile[i];
    ps.qt = take(z.Dk * z.ldq);
    ps.qp = reinterpret_cast<uint32_t*>(z.qp_in_qt ? ps.qt : take(z.qp));
    for (Branch* br : {&ps.cmp, &ps.slc, &ps.win}) {
      br->o = take(z.Dv * z.GP);
      br->m = take(z.GP);
      br->l = take(z.GP);
    }
    ps.lse = take(3 * z.GP);
    ps.orows = take(z.orows);
    ps.sel.blocks = ints;
    ints += round_up(z.set_room, 16);
    // Padding lanes of the queries stay zero for the whole call.
    std::fill(ps.qt, ps.qt + z.Dk * z.ldq, 0.0f);
    std::fill(ps.qp, ps.qp + z.qp, 0u);
  }
  // The four positions of a quad (from a multiple of 4) use scratch slots i % 4.
  for (int k = 0; k < 4; ++k) {
    float* s = take(z.s_rows * z.GP);
    float* score = take(z.max_blocks);
    int32_t* cand = ints;
    ints += round_up(z.max_blocks, 16);
    for (int64_t i = k; i < z.P; i += 4) {
      tile[i].s = s, tile[i].sel.score = score, tile[i].sel.cand = cand;
    }
  }
  b.acc = take(z.acc);
  b.row = take(std::max(z.Dk, z.Dv));
  b.blk_k = take(z.blk_keys * z.Dk);
  b.blk_v = take(z.blk_keys * z.Dv);
  b.st = z.st;
  b.st.qbase = tile[0].qt;
  b.st.roff = ints;
  b.st.s = take(z.stack[0]);
  b.st.o = take(z.stack[1]);
  b.st.w = take(z.stack[2]);
  b.st.inv = take(z.stack[3]);
  b.st.pp = reinterpret_cast<uint32_t*>(take(z.stack[4]));
  b.st.pairs = pairs;
}

template <class DF>
bool ForwardLanesT(const FwdProblem& pr) {
  const DF d;
  const int64_t N = hn::Lanes(d), GP = round_up(pr.G, N);
  const nsa_fwd_params& p = pr.p;
  const int threads = pr.num_threads > 0 ? pr.num_threads : omp_get_max_threads();
  std::vector<double> stage_s(pr.profile ? static_cast<size_t>(threads * kStageCount) : 0);
  StageClock pack_clock(pr.profile ? stage_s.data() : nullptr);

  // Groups of up to 8 heads run steps 1-2, 4 and 5 with the keys in lanes (forward_keys-inl.h):
  // a 4- or 8-lane vector of heads would do a quarter or half of a 16-lane FMA's work per key.
  const bool keys = pr.G <= 8 && N < kTileKeys;
  Dims dm{pr.G, GP, pr.Dk, pr.Dv, keys, keys ? bwd_tiles::padded_heads(pr.G) : GP};
  // bf16 arithmetic where every operand of the products is bf16 (the dense forward's rule: f32
  // inputs are not rounded).
  bool all_bf16 = true;
  for (const nsa_tensor* t :
       {&p.in.q, &p.in.k_slc, &p.in.v_slc, &p.in.k_win, &p.in.v_win, &p.in.k_cmp, &p.in.v_cmp}) {
    all_bf16 = all_bf16 && t->dtype == NSA_DTYPE_BF16;
  }
  // Heads in lanes: the bf16 kernels' 16 lanes; keys in lanes: any target (tiles of 16 keys).
  if ((keys || N == 16) && all_bf16) dm.bf = bf16::kernels(pr.bf16_math);
  dm.Dk2 = (pr.Dk + 1) / 2;
  dm.ldv = round_up(pr.Dv, 16);
  dm.scale = p.in.cfg.scale;

  Packs pk;
  const fwd::Form form = dm.bf ? fwd::Form::kPairs : fwd::Form::kF32;
  if (!pack(pr, p.in.k_slc, p.in.v_slc, /*cmp=*/false, threads,
            dm.bf ? form : fwd::Form::kBf16, pk.slc)) {
    return false;
  }
  pk.win_kv = &pk.slc;
  // The window's keys stay in cache from one position to the next: f32, converted once (or
  // pairs, which are read as they are).
  if (pk.slc.half || !same_view(p.in.k_win, p.in.k_slc) || !same_view(p.in.v_win, p.in.v_slc)) {
    if (!pack(pr, p.in.k_win, p.in.v_win, false, threads, form, pk.win)) return false;
    pk.win_kv = &pk.win;
  }
  if (!pack(pr, p.in.k_cmp, p.in.v_cmp, true, threads, form, pk.cmp)) return false;
  pack_clock.lap(kStagePack);

  const Layout z = layout_of(pr, dm, pk, N);
  // Work items: a tile of P consecutive positions of one sequence and KV head (fewer at the
  // sequence end), head-major; first_item[s] counts the items before sequence s.
  std::vector<int64_t> first_item(pr.seqs.size() + 1, 0);
  for (size_t i = 0; i < pr.seqs.size(); ++i) {
    first_item[i + 1] = first_item[i] + (pr.seqs[i].len + z.P - 1) / z.P * pr.Hkv;
  }
  int64_t all_floats = 0, all_ints = 0, all_pairs = 0;
  if (!mul_size(threads, z.floats, &all_floats) || !mul_size(threads, z.ints, &all_ints) ||
      !mul_size(threads, z.pairs, &all_pairs)) {
    return false;
  }
  hwy::AlignedFreeUniquePtr<float[]> fbuf = hwy::AllocateAligned<float>(size_t(all_floats));
  if (!fbuf) return false;
  std::vector<int32_t> ibuf;
  std::vector<BlockPos> pbuf;
  std::vector<Pos> tiles;
  try {
    ibuf.resize(static_cast<size_t>(all_ints));
    pbuf.resize(static_cast<size_t>(all_pairs));
    tiles.resize(static_cast<size_t>(threads * z.P));
  } catch (const std::bad_alloc&) {
    return false;
  }

  const int64_t total = first_item.back();
#pragma omp parallel num_threads(threads)
  {
    const int tid = omp_get_thread_num();
    Pos* tile = tiles.data() + tid * z.P;
    Bufs b;
    carve(z, fbuf.get() + tid * z.floats, ibuf.data() + tid * z.ints, pbuf.data() + tid * z.pairs,
          tile, b);
    StageClock clock(pr.profile ? stage_s.data() + tid * kStageCount : nullptr);
    // Later positions cost more (more compressed tokens): dynamic chunks balance the threads.
    // Every item is computed by the same code whatever thread runs it, so the results do not
    // depend on the thread count.
#pragma omp for schedule(dynamic, z.P == 4 ? 8 : 1)
    for (int64_t it = 0; it < total; ++it) {
      const int64_t si =
          std::upper_bound(first_item.begin(), first_item.end(), it) - first_item.begin() - 1;
      const Sequence& seq = pr.seqs[si];
      // Head-major within a sequence: consecutive items are consecutive positions of one KV
      // head, which share most of their window, compressed keys and local blocks, so those stay
      // in L2 (with Hkv > 1 an interleaved order cycles through every head's K/V).
      const int64_t rem = it - first_item[si], n_tiles = (seq.len + z.P - 1) / z.P;
      const int64_t hk = rem / n_tiles, t0 = rem % n_tiles * z.P;
      const int64_t np = std::min(z.P, seq.len - t0);
      for (int64_t i = 0; i < np; ++i) {
        Group& g = tile[i].g;
        g.pr = &pr;
        g.seq = &seq;
        g.t = t0 + i;
        g.tok = seq.start + g.t;
        g.hk = hk;
      }
      run_tile<DF>(tile, np, pk, si, dm, b, clock);
    }
  }
  if (pr.profile) add_stage_times(stage_s.data(), threads, pr.profile);
  return true;
}

// The vector the heads of a group fill: G <= 4 and G <= 8 use vectors of 4 and 8 lanes where the
// target's are wider, so that a small group does not pay for the full width's padding. (One
// 512-bit FMA costs two 256-bit ones on AMD Zen 4, so there 8 lanes do G = 8's work in half the
// time; on a CPU with two full-width FMA units the time is the same.)
bool ForwardLanesAny(const FwdProblem& pr) {
  if (pr.G <= 4) return ForwardLanesT<hn::CappedTag<float, 4>>(pr);
  if (pr.G <= 8) return ForwardLanesT<hn::CappedTag<float, 8>>(pr);
  return ForwardLanesT<DFull>(pr);
}

}  // namespace
}  // namespace HWY_NAMESPACE
}  // namespace nsa::cpu
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace nsa::cpu {

HWY_EXPORT(ForwardLanesAny);

bool forward_lanes(const FwdProblem& pr) { return HWY_DYNAMIC_DISPATCH(ForwardLanesAny)(pr); }

}  // namespace nsa::cpu
#endif
