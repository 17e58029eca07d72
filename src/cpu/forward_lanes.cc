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
// does useful work in every lane. K is packed once per call into tiles of 16 keys with the keys
// innermost ([Dk][16]), so the broadcasts of one step sit in one cache line; V is converted to
// f32 rows. Heads past G in the last vector are padded with zero queries; their lanes compute
// finite values that are never stored.
//
// The compressed branch needs the probabilities themselves (they are summed over the group into
// block scores, Eqs. 8-10), so it is a two-pass softmax: the scores of every visible compressed
// token, Tc x G floats (256 KiB at 64k tokens), stay in L2 between the passes, and the one QK
// pass serves both o_cmp and the block scores.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common/dtype.h"
#include "cpu/kernels.h"
#include "hwy/aligned_allocator.h"

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "cpu/forward_lanes.cc"
#include <hwy/foreach_target.h>  // IWYU pragma: keep
#include <hwy/highway.h>
#include <hwy/contrib/math/math-inl.h>

HWY_BEFORE_NAMESPACE();
namespace nsa::cpu {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// Internal linkage: dense_fwd.cc defines helpers of the same names in the same namespaces.
namespace {

using DF = hn::ScalableTag<float>;
using VF = hn::Vec<DF>;

// Keys per packed K tile. Selection blocks (64 keys by default) are whole tiles.
constexpr int64_t kKeys = 16;
// Keys per score register block: 16 accumulators + the query vector fit 32 registers (AVX-512);
// with 16 registers (AVX2, SSE4) half of that.
constexpr int kScoreBlock = HWY_MAX_BYTES >= 64 ? 16 : 8;
// Output columns per O^T register block, for the same reason.
constexpr int kOutBlock = HWY_MAX_BYTES >= 64 ? 16 : 8;
// Keys per online-softmax step: the max/sum/rescale work is paid once per this many keys.
constexpr int64_t kChunk = 64;

int64_t round_up(int64_t n, int64_t to) { return (n + to - 1) / to * to; }

// K and V of one tensor pair, for every (sequence, KV head), as f32: K in tiles of kKeys keys
// ([Dk][kKeys], keys innermost), V in rows [pos][Dv]. The rows of one (sequence, head) are
// contiguous; positions past the sequence end (up to the tile) are zero.
struct PackedKV {
  std::vector<int64_t> first_tile;  // per sequence, cumulative (tiles of one head)
  hwy::AlignedFreeUniquePtr<float[]> mem;
  float* k = nullptr;
  float* v = nullptr;
  int64_t tiles = 0, Dk = 0, Dv = 0;
  const float* k_at(int64_t seq, int64_t hk) const {
    return k + (hk * tiles + first_tile[seq]) * kKeys * Dk;
  }
  const float* v_at(int64_t seq, int64_t hk) const {
    return v + (hk * tiles + first_tile[seq]) * kKeys * Dv;
  }
};

// Row `row` of a [B, rows, H, D] tensor as f32 (bf16 widens exactly).
void widen_row(const nsa_tensor& t, int64_t b, int64_t row, int64_t h, int64_t n, float* dst) {
  const int64_t off = offset_of(t, b, row, h);
  if (t.dtype == NSA_DTYPE_F32) {
    const float* src = static_cast<const float*>(t.data) + off;
    std::copy(src, src + n, dst);
  } else {
    const uint16_t* src = static_cast<const uint16_t*>(t.data) + off;
    for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_f32(src[i]);
  }
}

// Packs (k, v) for every sequence: rows [start, start + len) of each, as `span` gives them
// (the raw tokens, or the compressed ones). Returns false when out of memory.
template <typename Span>
bool pack(const FwdProblem& pr, const nsa_tensor& k, const nsa_tensor& v, Span span,
          int threads, PackedKV& pk) {
  const int64_t Dk = pr.Dk, Dv = pr.Dv, Hkv = pr.Hkv;
  pk.Dk = Dk;
  pk.Dv = Dv;
  pk.first_tile.assign(1, 0);
  for (const Sequence& seq : pr.seqs) {
    pk.first_tile.push_back(pk.first_tile.back() + (span(seq).second + kKeys - 1) / kKeys);
  }
  pk.tiles = pk.first_tile.back();
  const int64_t floats = std::max<int64_t>(1, Hkv * pk.tiles * kKeys * (Dk + Dv));
  pk.mem = hwy::AllocateAligned<float>(static_cast<size_t>(floats));
  if (!pk.mem) return false;
  pk.k = pk.mem.get();
  pk.v = pk.k + Hkv * pk.tiles * kKeys * Dk;
  const int64_t work = Hkv * pk.tiles;
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> row(static_cast<size_t>(Dk));
#pragma omp for schedule(static)
    for (int64_t i = 0; i < work; ++i) {
      const int64_t hk = i / pk.tiles, tile = i % pk.tiles;
      const int64_t si = std::upper_bound(pk.first_tile.begin(), pk.first_tile.end(), tile) -
                         pk.first_tile.begin() - 1;
      const Sequence& seq = pr.seqs[si];
      const auto [start, len] = span(seq);
      const int64_t k0 = (tile - pk.first_tile[si]) * kKeys;
      const int64_t nk = std::min(kKeys, len - k0);
      float* kt = pk.k + i * kKeys * Dk;
      float* vr = pk.v + i * kKeys * Dv;
      std::fill(kt, kt + kKeys * Dk, 0.0f);
      std::fill(vr, vr + kKeys * Dv, 0.0f);
      for (int64_t j = 0; j < nk; ++j) {
        widen_row(k, seq.batch, start + k0 + j, hk, Dk, row.data());
        for (int64_t c = 0; c < Dk; ++c) kt[c * kKeys + j] = row[c];
        widen_row(v, seq.batch, start + k0 + j, hk, Dv, vr + j * Dv);
      }
    }
  }
  return true;
}

// The G heads of one query position, and the running state of one branch.
struct Heads {
  const float* qt;  // [Dk][GP] queries, scaled, heads in lanes (zero past G)
  int64_t GP;       // G rounded up to whole vectors
  int64_t Dk, Dv;
};
struct Branch {
  float* o;  // [Dv][GP] output, transposed
  float* m;  // [GP] running max
  float* l;  // [GP] running sum (NaN once a NaN or +inf score was seen)
};

// S[0 .. KB) for one head vector: s[j * GP] = q . k_j, for the KB keys of a packed tile at kt.
template <int KB>
HWY_INLINE void score_block(const float* HWY_RESTRICT qt, int64_t GP, const float* HWY_RESTRICT kt,
                            int64_t Dk, float* HWY_RESTRICT s) {
  const DF d;
  VF acc[KB];
  for (int j = 0; j < KB; ++j) acc[j] = hn::Zero(d);
  for (int64_t i = 0; i < Dk; ++i) {
    const VF q = hn::Load(d, qt + i * GP);
    const float* k = kt + i * kKeys;
    for (int j = 0; j < KB; ++j) acc[j] = hn::MulAdd(q, hn::Set(d, k[j]), acc[j]);
  }
  for (int j = 0; j < KB; ++j) hn::Store(acc[j], d, s + j * GP);
}

// Scores of every head vector for `tiles` packed tiles at kt into s ([tiles * kKeys][GP]).
void score_tiles(const Heads& h, const float* kt, int64_t tiles, float* s) {
  const int64_t N = hn::Lanes(DF());
  for (int64_t hv = 0; hv < h.GP; hv += N) {
    for (int64_t ti = 0; ti < tiles; ++ti) {
      for (int64_t j = 0; j < kKeys; j += kScoreBlock) {
        score_block<kScoreBlock>(h.qt + hv, h.GP, kt + ti * kKeys * h.Dk + j, h.Dk,
                                 s + (ti * kKeys + j) * h.GP + hv);
      }
    }
  }
}

// O^T columns [c0, c0 + CB) of one head vector: o = alpha * o + sum_j p_j v_j[c], keys [j0, j1).
template <int CB>
HWY_INLINE void out_block(const float* HWY_RESTRICT p, int64_t GP, const float* HWY_RESTRICT v,
                          int64_t Dv, int64_t j0, int64_t j1, VF alpha, float* HWY_RESTRICT o) {
  const DF d;
  VF acc[CB];
  for (int c = 0; c < CB; ++c) acc[c] = hn::Mul(alpha, hn::Load(d, o + c * GP));
  for (int64_t j = j0; j < j1; ++j) {
    const VF pj = hn::Load(d, p + j * GP);
    const float* vj = v + j * Dv;
    for (int c = 0; c < CB; ++c) acc[c] = hn::MulAdd(pj, hn::Set(d, vj[c]), acc[c]);
  }
  for (int c = 0; c < CB; ++c) hn::Store(acc[c], d, o + c * GP);
}

// O^T = alpha * O^T + P V for one head vector over keys [j0, j1) (p and v indexed from 0).
void accumulate(const Heads& h, const float* p, const float* v, int64_t j0, int64_t j1, VF alpha,
                float* o) {
  int64_t c = 0;
  for (; c + kOutBlock <= h.Dv; c += kOutBlock) {
    out_block<kOutBlock>(p, h.GP, v + c, h.Dv, j0, j1, alpha, o + c * h.GP);
  }
  for (; c < h.Dv; ++c) out_block<1>(p, h.GP, v + c, h.Dv, j0, j1, alpha, o + c * h.GP);
}

// exp(s - m) for the probabilities; m = -inf (no finite score yet) is replaced by 0 so that -inf
// scores give exp(-inf) = 0 and not exp(NaN).
HWY_INLINE VF safe_max(VF m) {
  const DF d;
  return hn::IfThenElse(hn::Eq(m, hn::Set(d, kNegInf)), hn::Zero(d), m);
}

// A NaN or +inf score makes its lane's branch NaN (README "Non-finite inputs"): vector Max and
// Exp would silently drop a NaN, so it is caught here and carried in l, which poisons o and lse.
HWY_INLINE hn::Mask<DF> poisoned(VF s) {
  const DF d;
  return hn::Or(hn::IsNaN(s), hn::Eq(s, hn::Set(d, -kNegInf)));
}

// Online-softmax attention of the heads over keys [first, end) of one (sequence, KV head),
// added to the branch's running state; kt/v are that pair's packed K tiles and V rows.
void attend_span(const Heads& h, const float* kt, const float* v, int64_t first, int64_t end,
                 float* s, Branch& br) {
  const DF d;
  const int64_t N = hn::Lanes(d), GP = h.GP;
  for (int64_t c0 = first / kKeys * kKeys; c0 < end; c0 += kChunk) {
    const int64_t c1 = std::min(c0 + kChunk, end);
    score_tiles(h, kt + (c0 / kKeys) * kKeys * h.Dk, (c1 - c0 + kKeys - 1) / kKeys, s);
    // Only keys [lo, hi) of the chunk are in the span: the others are neither weighed nor read.
    const int64_t lo = std::max(first, c0) - c0, hi = c1 - c0;
    for (int64_t hv = 0; hv < GP; hv += N) {
      const VF m_old = hn::Load(d, br.m + hv);
      VF mx = m_old;
      VF bad = hn::Zero(d);  // all-ones bits in lanes that saw a poisoned score
      for (int64_t j = lo; j < hi; ++j) {
        const VF sj = hn::Load(d, s + j * GP + hv);
        mx = hn::Max(mx, sj);
        bad = hn::Or(bad, hn::VecFromMask(d, poisoned(sj)));
      }
      const VF m_use = safe_max(mx);
      const VF alpha = hn::Exp(d, hn::Sub(m_old, m_use));  // 0 while nothing was seen
      VF sum = hn::Zero(d);
      for (int64_t j = lo; j < hi; ++j) {
        const VF pj = hn::Exp(d, hn::Sub(hn::Load(d, s + j * GP + hv), m_use));
        hn::Store(pj, d, s + j * GP + hv);
        sum = hn::Add(sum, pj);
      }
      VF l = hn::MulAdd(hn::Load(d, br.l + hv), alpha, sum);
      l = hn::IfThenElse(hn::MaskFromVec(bad), hn::Set(d, std::numeric_limits<float>::quiet_NaN()), l);
      hn::Store(l, d, br.l + hv);
      hn::Store(mx, d, br.m + hv);
      accumulate(h, s + hv, v + c0 * h.Dv, lo, hi, alpha, br.o + hv);
    }
  }
}

void branch_begin(const Heads& h, Branch& br) {
  std::fill(br.o, br.o + h.Dv * h.GP, 0.0f);
  std::fill(br.m, br.m + h.GP, kNegInf);
  std::fill(br.l, br.l + h.GP, 0.0f);
}

// o /= l and lse = m + log l per lane; an empty branch (l = 0) keeps o (0) and gets lse = -inf;
// a poisoned one (l NaN) gets NaN in both (SPEC 4.1, README "Non-finite inputs").
void branch_finish(const Heads& h, Branch& br, float* lse) {
  const DF d;
  const int64_t N = hn::Lanes(d);
  for (int64_t hv = 0; hv < h.GP; hv += N) {
    const VF l = hn::Load(d, br.l + hv), m = hn::Load(d, br.m + hv);
    const auto empty = hn::Eq(l, hn::Zero(d));
    const VF inv = hn::IfThenElse(empty, hn::Set(d, 1.0f), hn::Div(hn::Set(d, 1.0f), l));
    for (int64_t c = 0; c < h.Dv; ++c) {
      float* o = br.o + c * h.GP + hv;
      hn::Store(hn::Mul(hn::Load(d, o), inv), d, o);
    }
    VF out = hn::Add(m, hn::Log(d, hn::IfThenElse(empty, hn::Set(d, 1.0f), l)));
    out = hn::IfThenElse(empty, hn::Set(d, kNegInf), out);
    out = hn::IfThenElse(hn::IsNaN(l), l, out);
    hn::Store(out, d, lse + hv);
  }
}

// The compressed branch over the nc visible compressed tokens (two-pass softmax, scores kept in
// s: [round_up(nc, kKeys)][GP]), then p_sum[i] = sum over the group's real heads of p[h][i], the
// input of the block scores (Eq. 10).
void cmp_branch(const Heads& h, int64_t G, const float* kt, const float* v, int64_t nc, float* s,
                Branch& br, float* inv_l, float* p_sum, StageClock& clock) {
  const DF d;
  const int64_t N = hn::Lanes(d), GP = h.GP;
  score_tiles(h, kt, (nc + kKeys - 1) / kKeys, s);
  for (int64_t hv = 0; hv < GP; hv += N) {
    VF mx = hn::Set(d, kNegInf);
    VF bad = hn::Zero(d);  // all-ones bits in lanes that saw a poisoned score
    for (int64_t j = 0; j < nc; ++j) {
      const VF sj = hn::Load(d, s + j * GP + hv);
      mx = hn::Max(mx, sj);
      bad = hn::Or(bad, hn::VecFromMask(d, poisoned(sj)));
    }
    const VF m_use = safe_max(mx);
    VF sum = hn::Zero(d);
    for (int64_t j = 0; j < nc; ++j) {
      const VF pj = hn::Exp(d, hn::Sub(hn::Load(d, s + j * GP + hv), m_use));
      hn::Store(pj, d, s + j * GP + hv);
      sum = hn::Add(sum, pj);
    }
    sum = hn::IfThenElse(hn::MaskFromVec(bad), hn::Set(d, std::numeric_limits<float>::quiet_NaN()), sum);
    hn::Store(sum, d, br.l + hv);
    hn::Store(mx, d, br.m + hv);
    accumulate(h, s + hv, v, 0, nc, hn::Zero(d), br.o + hv);
  }
  clock.lap(kStageCmp);
  // p[h][i] / l[h] summed over the real heads: 1 / l per lane, 0 for the padding lanes and for
  // empty heads (all scores -inf: no probability mass).
  const auto lane = hn::Iota(d, 0.0f);
  for (int64_t hv = 0; hv < GP; hv += N) {
    const VF l = hn::Load(d, br.l + hv);
    const auto real = hn::Lt(hn::Add(lane, hn::Set(d, float(hv))), hn::Set(d, float(G)));
    const VF inv = hn::IfThenElse(hn::Eq(l, hn::Zero(d)), hn::Zero(d), hn::Div(hn::Set(d, 1.0f), l));
    hn::Store(hn::IfThenElse(real, inv, hn::Zero(d)), d, inv_l + hv);
  }
  for (int64_t j = 0; j < nc; ++j) {
    VF acc = hn::Zero(d);
    for (int64_t hv = 0; hv < GP; hv += N) {
      acc = hn::MulAdd(hn::Load(d, s + j * GP + hv), hn::Load(d, inv_l + hv), acc);
    }
    p_sum[j] = hn::GetLane(hn::SumOfLanes(d, acc));
  }
}

// One thread's buffers.
struct Work {
  float* qt;      // [Dk][GP]
  float* s;       // [max(kChunk, Tc_max rounded to kKeys)][GP]
  Branch cmp, slc, win;
  float* lse;     // [3][GP]
  float* inv_l;   // [GP]
  float* p_sum;   // [Tc_max]
  float* row;     // [max(Dk, Dv)]: one query or output row
  Scratch sel;    // score, cand, blocks for slc_select (topk.cc)
};

// o = g_cmp o_cmp + g_slc o_slc + g_win o_win per head, and the optional outputs (SPEC 4.6).
void combine_heads(const Group& g, const Heads& h, Work& w) {
  const FwdProblem& pr = *g.pr;
  const nsa_fwd_params& p = pr.p;
  const int64_t Dv = pr.Dv, GP = h.GP, b = g.seq->batch, tok = g.tok;
  const float* lse_cmp = w.lse;
  const float* lse_slc = w.lse + GP;
  const float* lse_win = w.lse + 2 * GP;
  auto store_lse = [&](const nsa_tensor& t, int64_t head, float value) {
    if (present(t)) static_cast<float*>(t.data)[offset_of(t, b, tok, head)] = value;
  };
  auto store_branch = [&](const nsa_tensor& t, int64_t head, int64_t hg, const float* ot) {
    if (!present(t)) return;
    for (int64_t c = 0; c < Dv; ++c) w.row[c] = ot[c * GP + hg];
    store_row(t, offset_of(t, b, tok, head), w.row, Dv);
  };
  for (int64_t hg = 0; hg < pr.G; ++hg) {
    const int64_t head = g.hk * pr.G + hg;
    // Gate values as given: the op applies no sigmoid (SPEC 3).
    const float gc = load_f32(p.g_cmp, offset_of(p.g_cmp, b, tok, head));
    const float gs = load_f32(p.g_slc, offset_of(p.g_slc, b, tok, head));
    const float gw = load_f32(p.g_win, offset_of(p.g_win, b, tok, head));
    for (int64_t c = 0; c < Dv; ++c) {
      w.row[c] = gc * w.cmp.o[c * GP + hg] + gs * w.slc.o[c * GP + hg] + gw * w.win.o[c * GP + hg];
    }
    store_row(p.o, offset_of(p.o, b, tok, head), w.row, Dv);
    store_branch(p.o_cmp, head, hg, w.cmp.o);
    store_branch(p.o_slc, head, hg, w.slc.o);
    store_branch(p.o_win, head, hg, w.win.o);
    store_lse(p.lse_cmp, head, lse_cmp[hg]);
    store_lse(p.lse_slc, head, lse_slc[hg]);
    store_lse(p.lse_win, head, lse_win[hg]);
  }
}

struct Packs {
  PackedKV slc, win, cmp;
  const PackedKV* win_kv = nullptr;  // &win, or &slc when the branches share K/V
};

// All steps of SPEC 4 for the G heads of KV head g.hk at position g.t.
void run_position(const Group& g, const Packs& pk, int64_t si, Work& w, StageClock& clock) {
  const FwdProblem& pr = *g.pr;
  const nsa_fwd_params& p = pr.p;
  const nsa_config& cfg = p.cfg;
  const int64_t G = pr.G, Dk = pr.Dk, GP = round_up(G, hn::Lanes(DF()));
  const Heads h{w.qt, GP, Dk, pr.Dv};
  for (int64_t hg = 0; hg < G; ++hg) {
    widen_row(p.q, g.seq->batch, g.tok, g.hk * G + hg, Dk, w.row);
    for (int64_t i = 0; i < Dk; ++i) w.qt[i * GP + hg] = w.row[i] * cfg.scale;
  }

  // Steps 1-2: compressed attention and the block scores.
  branch_begin(h, w.cmp);
  const int64_t nc = visible_cmp_count(cfg, g.t);
  if (nc == 0) {
    // Empty C_t: o_cmp = 0, lse_cmp = -inf, never NaN; every block score is 0 (SPEC 4.1).
    std::fill(w.sel.score, w.sel.score + g.t / cfg.slc_block + 1, 0.0f);
    clock.lap(kStageCmp);
  } else {
    cmp_branch(h, G, pk.cmp.k_at(si, g.hk), pk.cmp.v_at(si, g.hk), nc, w.s, w.cmp, w.inv_l,
               w.p_sum, clock);
    block_scores(cfg, g.t, nc, w.p_sum, w.sel.score);
    clock.lap(kStageScores);
  }
  branch_finish(h, w.cmp, w.lse);
  clock.lap(kStageCmp);

  // Step 3: the selected set (topk.cc), sorted, so adjacent blocks merge into one span.
  slc_select(g, w.sel);
  clock.lap(kStageTopn);

  // Step 4: selected attention; the causal mask only cuts the query's own block.
  branch_begin(h, w.slc);
  const float* kt = pk.slc.k_at(si, g.hk);
  const float* v = pk.slc.v_at(si, g.hk);
  for (int64_t k = 0; k < w.sel.num_blocks;) {
    int64_t k_end = k + 1;
    while (k_end < w.sel.num_blocks && w.sel.blocks[k_end] == w.sel.blocks[k_end - 1] + 1) ++k_end;
    const int64_t first = int64_t(w.sel.blocks[k]) * cfg.slc_block;
    const int64_t end = std::min<int64_t>(int64_t(w.sel.blocks[k_end - 1] + 1) * cfg.slc_block, g.t + 1);
    attend_span(h, kt, v, first, end, w.s, w.slc);
    k = k_end;
  }
  branch_finish(h, w.slc, w.lse + GP);
  clock.lap(kStageSlc);

  // Step 5: the window, keys max(0, t - w + 1) .. t.
  branch_begin(h, w.win);
  attend_span(h, pk.win_kv->k_at(si, g.hk), pk.win_kv->v_at(si, g.hk),
              std::max<int64_t>(0, g.t - cfg.window + 1), g.t + 1, w.s, w.win);
  branch_finish(h, w.win, w.lse + 2 * GP);
  clock.lap(kStageWin);

  combine_heads(g, h, w);
  clock.lap(kStageCombine);
}

bool same_view(const nsa_tensor& a, const nsa_tensor& b) {
  return a.data == b.data && a.dtype == b.dtype &&
         std::equal(a.stride, a.stride + 4, b.stride) && std::equal(a.shape, a.shape + 4, b.shape);
}

int64_t FloatLanes() { return static_cast<int64_t>(hn::Lanes(DF())); }

bool ForwardLanes(const FwdProblem& pr) {
  const DF d;
  const int64_t N = hn::Lanes(d), GP = round_up(pr.G, N), Dk = pr.Dk, Dv = pr.Dv;
  const nsa_fwd_params& p = pr.p;
  const int threads = pr.num_threads > 0 ? pr.num_threads : omp_get_max_threads();
  std::vector<double> stage_s(pr.profile ? static_cast<size_t>(threads * kStageCount) : 0);
  StageClock pack_clock(pr.profile ? stage_s.data() : nullptr);

  Packs pk;
  auto raw = [](const Sequence& s) { return std::pair<int64_t, int64_t>(s.start, s.len); };
  auto cmp = [](const Sequence& s) { return std::pair<int64_t, int64_t>(s.cmp_start, s.cmp_len); };
  if (!pack(pr, p.k_slc, p.v_slc, raw, threads, pk.slc)) return false;
  pk.win_kv = &pk.slc;
  if (!same_view(p.k_win, p.k_slc) || !same_view(p.v_win, p.v_slc)) {
    if (!pack(pr, p.k_win, p.v_win, raw, threads, pk.win)) return false;
    pk.win_kv = &pk.win;
  }
  if (!pack(pr, p.k_cmp, p.v_cmp, cmp, threads, pk.cmp)) return false;
  pack_clock.lap(kStagePack);

  int64_t max_len = 0, max_cmp = 0;
  std::vector<int64_t> first_item(pr.seqs.size() + 1, 0);
  for (size_t i = 0; i < pr.seqs.size(); ++i) {
    max_len = std::max(max_len, pr.seqs[i].len);
    max_cmp = std::max(max_cmp, pr.seqs[i].cmp_len);
    first_item[i + 1] = first_item[i] + pr.seqs[i].len * pr.Hkv;
  }
  const int64_t max_blocks = max_len > 0 ? (max_len - 1) / p.cfg.slc_block + 1 : 1;
  const int64_t s_rows = std::max(kChunk, round_up(max_cmp, kKeys));
  // Per thread, in the order carved below.
  const int64_t sizes[] = {Dk * GP, s_rows * GP, Dv * GP, GP, GP, Dv * GP, GP, GP, Dv * GP, GP,
                           GP, 3 * GP, GP, std::max<int64_t>(max_cmp, 1), std::max(Dk, Dv), max_blocks};
  int64_t floats = 0;
  for (int64_t size : sizes) floats += round_up(size, 16);
  const int64_t ints = 2 * round_up(max_blocks, 16);
  hwy::AlignedFreeUniquePtr<float[]> fbuf = hwy::AllocateAligned<float>(size_t(threads * floats));
  std::vector<int32_t> ibuf;
  try {
    ibuf.resize(static_cast<size_t>(threads * ints));
  } catch (const std::bad_alloc&) {
    return false;
  }
  if (!fbuf) return false;

  const int64_t total = first_item.back();
#pragma omp parallel num_threads(threads)
  {
    const int tid = omp_get_thread_num();
    float* f = fbuf.get() + tid * floats;
    auto take = [&f](int64_t count) {
      float* at = f;
      f += round_up(count, 16);
      return at;
    };
    Work w;
    w.qt = take(Dk * GP);
    w.s = take(s_rows * GP);
    for (Branch* br : {&w.cmp, &w.slc, &w.win}) {
      br->o = take(Dv * GP);
      br->m = take(GP);
      br->l = take(GP);
    }
    w.lse = take(3 * GP);
    w.inv_l = take(GP);
    w.p_sum = take(std::max<int64_t>(max_cmp, 1));
    w.row = take(std::max(Dk, Dv));
    w.sel.score = take(max_blocks);
    w.sel.cand = ibuf.data() + tid * ints;
    w.sel.blocks = w.sel.cand + round_up(max_blocks, 16);
    // Padding lanes of the queries stay zero for the whole call.
    std::fill(w.qt, w.qt + Dk * GP, 0.0f);
    StageClock clock(pr.profile ? stage_s.data() + tid * kStageCount : nullptr);
    // Later positions cost more (more compressed tokens): dynamic chunks balance the threads.
    // Every item is computed by the same code whatever thread runs it, so the results do not
    // depend on the thread count.
#pragma omp for schedule(dynamic, 16)
    for (int64_t it = 0; it < total; ++it) {
      const int64_t si =
          std::upper_bound(first_item.begin(), first_item.end(), it) - first_item.begin() - 1;
      const Sequence& seq = pr.seqs[si];
      const int64_t rem = it - first_item[si];
      Group g;
      g.pr = &pr;
      g.seq = &seq;
      g.t = rem / pr.Hkv;
      g.tok = seq.start + g.t;
      g.hk = rem % pr.Hkv;
      run_position(g, pk, si, w, clock);
    }
  }
  if (pr.profile) {
    add_stage_times(stage_s.data(), threads, pr.profile);
    pr.profile->kernel = 1;
  }
  return true;
}

}  // namespace
}  // namespace HWY_NAMESPACE
}  // namespace nsa::cpu
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace nsa::cpu {

HWY_EXPORT(ForwardLanes);
HWY_EXPORT(FloatLanes);

bool forward_lanes(const FwdProblem& pr) { return HWY_DYNAMIC_DISPATCH(ForwardLanes)(pr); }

// Heads in lanes pay for the padding lanes: worth it once the group fills half a vector (the
// paper's G = 16 fills an AVX-512 vector exactly); smaller groups use the per-head kernels.
bool lanes_suit(const FwdProblem& pr) { return pr.G * 2 >= HWY_DYNAMIC_DISPATCH(FloatLanes)(); }

}  // namespace nsa::cpu
#endif
