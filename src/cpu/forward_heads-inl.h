// The forward's steps with the G heads of a group in the lanes (per Highway target; included by
// forward_lanes.cc after foreach_target.h): attention of a pair of positions over key spans
// (steps 4 and 5), the compressed branch of a quad with its block scores (steps 1-2), and step 4
// for a pair. Their products are lanes-inl.h's in f32, or bf16/lanes-inl.h's with bf16
// arithmetic (Dims::bf). forward_lanes.cc says why the heads sit in the lanes.
#if defined(NSA_CPU_FORWARD_HEADS_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef NSA_CPU_FORWARD_HEADS_INL_H_
#undef NSA_CPU_FORWARD_HEADS_INL_H_
#else
#define NSA_CPU_FORWARD_HEADS_INL_H_
#endif

#include <algorithm>
#include <cstdint>
#include <initializer_list>

#include <hwy/highway.h>

#include "cpu/forward_keys-inl.h"
#include "cpu/forward_state.h"
#include "cpu/lanes-inl.h"
#include "cpu/simd/block_scores-inl.h"
#include "cpu/simd/softmax-inl.h"
#include "cpu/simd/tile_size.h"

HWY_BEFORE_NAMESPACE();
namespace nsa::cpu {
namespace HWY_NAMESPACE {
namespace heads {
namespace hn = hwy::HWY_NAMESPACE;

using fwd::Branch;
using fwd::Dims;
using fwd::KV;
using fwd::kv_of;
using fwd::Packs;
using fwd::Pos;
using keys::widen_block;

// Keys per online-softmax step: the max/sum/rescale work is paid once per this many keys.
constexpr int64_t kChunk = 64;

// S = Q^T K of head vector hv of A (and B) for `tiles` tiles from key c0 into sa (sb): f32
// (lanes-inl.h) or bf16 pairs (bf16/lanes-inl.h).
template <class DF>
HWY_NOINLINE void scores(const Dims& dm, const KV& kv, int64_t c0, int64_t tiles, const Pos& A,
                         const Pos* B, int64_t hv, float* sa, float* sb) {
  if (dm.bf) {
    dm.bf->lane_scores(A.qp + hv, B ? B->qp + hv : nullptr, dm.GP, dm.Dk2,
                       kv.kp + (c0 - kv.key0) * dm.Dk2, tiles, dm.scale, sa, sb);
  } else {
    lanes::score_tiles<DF>(A.qt + hv, B ? B->qt + hv : nullptr, dm.GP, dm.Dk,
                           kv.kt + (c0 - kv.key0) * dm.Dk, tiles, sa, sb);
  }
}

// oa += pa V (and ob += pb V) over keys [j0, j1) counted from key c0 (a multiple of kTileKeys);
// with bf16 arithmetic the paired rows of pa and pb are overwritten (bf16/lanes-inl.h).
template <class DF>
HWY_NOINLINE void accumulate(const Dims& dm, const KV& kv, int64_t c0, float* pa, float* pb,
                             int64_t j0, int64_t j1, float* oa, float* ob) {
  if (dm.bf) {
    dm.bf->lane_accumulate(pa, pb, dm.GP, kv.vp + (c0 - kv.key0) / 2 * dm.ldv, dm.ldv, dm.Dv, j0,
                           j1, oa, ob);
  } else {
    lanes::accumulate<DF>(pa, pb, dm.GP, kv.v + (c0 - kv.key0) * dm.Dv, dm.Dv, j0, j1, oa, ob);
  }
}

// One head vector (lanes from hv) of one chunk of keys from c0 for positions pos[0], pos[1]:
// scores, the online-softmax step over each position's keys [lo[p], hi[p]) (in[p]: it has some),
// and O^T += P V, jointly over the keys both attend. Only a position's own keys reach its output
// (a key that only one position attends never meets the other's weight: 0 * NaN would be NaN).
template <class DF>
void attend_vector(Pos* const pos[2], Branch Pos::*br, const Dims& dm, const KV& kv, int64_t c0,
                   int64_t tiles, const int64_t lo[2], const int64_t hi[2], const bool in[2],
                   int64_t hv) {
  const int64_t GP = dm.GP;
  Pos& A = *pos[in[0] ? 0 : 1];  // the position that is in (the first, when both are)
  Pos* B = in[0] && in[1] ? pos[1] : nullptr;
  scores<DF>(dm, kv, c0, tiles, A, B, hv, A.s + hv, B ? B->s + hv : nullptr);
  for (int p = 0; p < 2; ++p) {
    if (!in[p]) continue;
    Branch& b = (*pos[p]).*br;
    softmax::step_lanes(DF(), pos[p]->s + hv, GP, lo[p], hi[p], dm.Dv, b.m + hv, b.l + hv,
                        b.o + hv);
  }
  // Keys both attend: [jl, jh) (empty with one position); each position's others on its own.
  const int64_t jl = B ? std::max(lo[0], lo[1]) : 0, jh = B ? std::min(hi[0], hi[1]) : 0;
  if (jl < jh) {
    accumulate<DF>(dm, kv, c0, A.s + hv, B->s + hv, jl, jh, (A.*br).o + hv, (B->*br).o + hv);
  }
  for (int p = 0; p < 2; ++p) {
    if (!in[p]) continue;
    float* o = ((*pos[p]).*br).o + hv;
    if (jl < jh) {
      accumulate<DF>(dm, kv, c0, pos[p]->s + hv, nullptr, lo[p], jl, o, nullptr);
      accumulate<DF>(dm, kv, c0, pos[p]->s + hv, nullptr, jh, hi[p], o, nullptr);
    } else {
      accumulate<DF>(dm, kv, c0, pos[p]->s + hv, nullptr, lo[p], hi[p], o, nullptr);
    }
  }
}

// Online-softmax attention of up to two positions over keys [f[p], e[p]) of one (sequence, KV
// head), added to branch `br` of each; a null position, or f >= e, takes no part. kv holds that
// pair's packed K and V. Where both positions attend a key, the kernels serve both at once.
template <class DF>
void attend_spans(Pos* const pos[2], Branch Pos::*br, const Dims& dm, const KV& kv,
                  const int64_t f[2], const int64_t e[2]) {
  const int64_t N = hn::Lanes(DF());
  bool act[2];
  int64_t u0 = INT64_MAX, u1 = INT64_MIN;
  for (int p = 0; p < 2; ++p) {
    act[p] = pos[p] != nullptr && f[p] < e[p];
    if (act[p]) u0 = std::min(u0, f[p]), u1 = std::max(u1, e[p]);
  }
  if (!act[0] && !act[1]) return;
  for (int64_t c0 = u0 / kTileKeys * kTileKeys; c0 < u1; c0 += kChunk) {
    const int64_t c1 = std::min(c0 + kChunk, u1), n = c1 - c0;
    int64_t lo[2], hi[2];
    bool in[2];
    for (int p = 0; p < 2; ++p) {
      lo[p] = act[p] ? std::clamp<int64_t>(f[p] - c0, 0, n) : 0;
      hi[p] = act[p] ? std::clamp<int64_t>(e[p] - c0, 0, n) : 0;
      in[p] = lo[p] < hi[p];
    }
    if (!in[0] && !in[1]) continue;
    const int64_t tiles = (n + kTileKeys - 1) / kTileKeys;
    for (int64_t hv = 0; hv < dm.GP; hv += N) {
      attend_vector<DF>(pos, br, dm, kv, c0, tiles, lo, hi, in, hv);
    }
  }
}

template <class DF>
void block_scores_lanes(Pos& ps, const Dims& dm, int64_t nc, float* acc);

// The compressed branch of up to four positions, two pairs (steps 1-2). Its probabilities are
// needed themselves, so it is a two-pass softmax: all nc scores of a position stay in its s
// ([round_up(nc, kTileKeys)][GP]) between the passes, and feed the block scores
// (block_scores_lanes) before P V (which may overwrite them: bf16/lanes-inl.h). The compressed
// keys are walked in chunks that stay in L2 while both pairs pass over them: from L3 once per
// four positions (Tc grows as T, about 5 MiB of K and V at 64k tokens).
template <class DF>
void cmp_branch(Pos* const quad[4], const Dims& dm, const KV& kv, const int64_t nc[4], float* acc,
                StageClock& clock) {
  const int64_t N = hn::Lanes(DF()), GP = dm.GP;
  constexpr int64_t kCmpChunk = 256;  // keys: 192 KiB of K and 128 KiB of V at the paper's dims
  // Per pair: A, the position with keys (the earlier when both have: nc grows with t), B the
  // other when it has keys too; [0, lo) both see, [lo, hi) only the later one.
  struct Pair {
    Pos* A = nullptr;
    Pos* B = nullptr;
    int64_t nA = 0, nB = 0, lo = 0, hi = 0;
  } pairs[2];
  int64_t n_all = 0;
  for (int k = 0; k < 2; ++k) {
    Pos* p0 = quad[2 * k];
    Pos* p1 = quad[2 * k + 1];
    const int64_t n0 = p0 ? nc[2 * k] : 0, n1 = p1 ? nc[2 * k + 1] : 0;
    Pair& pr = pairs[k];
    if (n0 > 0) pr.A = p0, pr.nA = n0;
    if (n1 > 0) (pr.A ? pr.B : pr.A) = p1, (pr.B ? pr.nB : pr.nA) = n1;
    pr.lo = pr.B ? std::min(pr.nA, pr.nB) : pr.nA;
    pr.hi = pr.B ? std::max(pr.nA, pr.nB) : pr.nA;
    n_all = std::max(n_all, pr.hi);
  }
  for (int64_t hv = 0; hv < GP; hv += N) {
    // Pass 1: the scores.
    for (int64_t c0 = 0; c0 < n_all; c0 += kCmpChunk) {
      for (const Pair& pr : pairs) {
        if (!pr.A || c0 >= pr.hi) continue;
        const int64_t tiles = (std::min(c0 + kCmpChunk, pr.hi) - c0 + kTileKeys - 1) / kTileKeys;
        scores<DF>(dm, kv, c0, tiles, *pr.A, pr.B, hv, pr.A->s + c0 * GP + hv,
                   pr.B ? pr.B->s + c0 * GP + hv : nullptr);
      }
    }
    // The softmax of each position over all its scores.
    for (const Pair& pr : pairs) {
      for (Pos* p : {pr.A, pr.B}) {
        if (!p) continue;
        const int64_t n = p == pr.A ? pr.nA : pr.nB;
        softmax::step_lanes(DF(), p->s + hv, GP, 0, n, dm.Dv, p->cmp.m + hv, p->cmp.l + hv,
                            p->cmp.o + hv);
      }
    }
  }
  clock.lap(kStageCmp);
  if (!present(quad[0]->g.pr->p.slc_indices_in)) {  // the caller's selection: no scores
    for (const Pair& pr : pairs) {
      if (pr.A) block_scores_lanes<DF>(*pr.A, dm, pr.nA, acc);
      if (pr.B) block_scores_lanes<DF>(*pr.B, dm, pr.nB, acc);
    }
  }
  clock.lap(kStageScores);
  // Pass 2: O^T += P V.
  for (int64_t hv = 0; hv < GP; hv += N) {
    for (int64_t c0 = 0; c0 < n_all; c0 += kCmpChunk) {
      const int64_t c1 = c0 + kCmpChunk;
      for (const Pair& pr : pairs) {
        if (!pr.A || c0 >= pr.hi) continue;
        accumulate<DF>(dm, kv, 0, pr.A->s + hv, pr.B ? pr.B->s + hv : nullptr, c0,
                       std::min(c1, pr.lo), pr.A->cmp.o + hv, pr.B ? pr.B->cmp.o + hv : nullptr);
        if (pr.B) {  // the one key the later position sees and the earlier does not
          Pos& late = pr.nA > pr.nB ? *pr.A : *pr.B;
          accumulate<DF>(dm, kv, 0, late.s + hv, nullptr, std::max(c0, pr.lo), std::min(c1, pr.hi),
                         late.cmp.o + hv, nullptr);
        }
      }
    }
  }
  clock.lap(kStageCmp);
}

// The block scores of one position (step 2, Eqs. 8-10 with the overlap weights of SPEC 4.2;
// simd/block_scores-inl.h): score[j] = sum_i ov(i, j) / d * sum_h p[h][i] / l[h], over the group's
// real heads. The probabilities stay in their lanes: each compressed token adds its weighted
// vector into the vector of each selection block it overlaps, and only those vectors, one per
// block, are summed across lanes.
template <class DF>
void block_scores_lanes(Pos& ps, const Dims& dm, int64_t nc, float* acc) {
  using VF = hn::Vec<DF>;
  const DF d;
  const int64_t N = hn::Lanes(d), GP = dm.GP;
  const nsa_config& cfg = ps.g.pr->p.in.cfg;
  const int64_t l = cfg.cmp_block, stride = cfg.cmp_stride, lp = cfg.slc_block;
  const int64_t last = ps.g.t / lp;  // J
  // 1/l per lane: 0 for the padding lanes and for empty heads (no probability mass).
  float* inv_l = acc;
  acc += GP;
  const auto lane = hn::Iota(d, 0.0f);
  for (int64_t hv = 0; hv < GP; hv += N) {
    const VF lv = hn::Load(d, ps.cmp.l + hv);
    const auto real = hn::Lt(hn::Add(lane, hn::Set(d, float(hv))), hn::Set(d, float(dm.G)));
    const VF inv =
        hn::IfThenElse(hn::Eq(lv, hn::Zero(d)), hn::Zero(d), hn::Div(hn::Set(d, 1.0f), lv));
    hn::Store(hn::IfThenElse(real, inv, hn::Zero(d)), d, inv_l + hv);
  }
  for (int64_t j = 0; j <= last; ++j) hn::Store(hn::Zero(d), d, acc + j * N);
  auto weighted = [&](int64_t i) {  // sum_h p[h][i] / l[h], still in lanes
    VF pv = hn::Zero(d);
    for (int64_t hv = 0; hv < GP; hv += N) {
      pv = hn::MulAdd(hn::Load(d, ps.s + i * GP + hv), hn::Load(d, inv_l + hv), pv);
    }
    return pv;
  };
  // Each block's sum stays a vector of per-lane partial sums, reduced across lanes once.
  overlap_block_scores(
      l, stride, lp, nc, last, hn::Zero(d), weighted,
      [&](VF m, float w, VF a) { return hn::MulAdd(m, hn::Set(d, w), a); },
      [&](int64_t j) { return hn::Load(d, acc + j * N); },
      [&](int64_t j, VF a) { hn::Store(a, d, acc + j * N); });
  for (int64_t j = 0; j <= last; ++j) {
    ps.sel.score[j] = hn::GetLane(hn::SumOfLanes(d, hn::Load(d, acc + j * N)));
  }
}

// Step 4 for one pair of positions (pos[1] may be null): selected attention over the union of
// their sets, block by block; the causal mask only cuts a query's own block.
template <class DF>
void slc_pair(Pos* const pos[2], const Packs& pk, int64_t si, int64_t hk, const Dims& dm,
              float* blk_k, float* blk_v) {
  const nsa_config& cfg = pos[0]->g.pr->p.in.cfg;
  const int np = pos[1] ? 2 : 1;
  const Scratch& s0 = pos[0]->sel;
  const Scratch* s1 = pos[1] ? &pos[1]->sel : nullptr;
  int64_t i0 = 0, i1 = 0;
  const int64_t n1 = s1 ? s1->num_blocks : 0;
  while (i0 < s0.num_blocks || i1 < n1) {
    const int32_t j = i1 >= n1              ? s0.blocks[i0]
                      : i0 >= s0.num_blocks ? s1->blocks[i1]
                                            : std::min(s0.blocks[i0], s1->blocks[i1]);
    int64_t f[2] = {0, 0}, e[2] = {0, 0};
    for (int p = 0; p < np; ++p) {
      const Scratch& sel = pos[p]->sel;
      int64_t& at = p == 0 ? i0 : i1;
      if (at < sel.num_blocks && sel.blocks[at] == j) {
        f[p] = int64_t(j) * cfg.slc_block;
        e[p] = std::min<int64_t>(f[p] + cfg.slc_block, pos[p]->g.t + 1);
        ++at;
      }
    }
    if (!pk.slc.half) {  // f32 or pairs: read in place
      attend_spans<DF>(pos, &Pos::slc, dm, kv_of(pk.slc, si, hk), f, e);
      continue;
    }
    KV kv;
    kv.kt = blk_k, kv.v = blk_v;
    kv.key0 =
        widen_block(pk.slc, si, hk, int64_t{j} * cfg.slc_block, std::max(e[0], e[1]), blk_k, blk_v);
    attend_spans<DF>(pos, &Pos::slc, dm, kv, f, e);
  }
}

}  // namespace heads
}  // namespace HWY_NAMESPACE
}  // namespace nsa::cpu
HWY_AFTER_NAMESPACE();

#endif  // NSA_CPU_FORWARD_HEADS_INL_H_
