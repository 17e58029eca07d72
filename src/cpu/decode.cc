// One decode step over the KV cache (SPEC.md sections 4 and 7), NSA and the dense baseline.
//
// Decoding one token is a matrix-vector problem per KV head: the G query heads of the group
// against a set of cached keys. The G heads share every key, so a key is read once for the group
// (paper Section 3.4): the score kernel holds HB heads x NV key vectors of accumulators, loads
// each key vector once from the cache's K tiles ([Dk][16], keys in lanes) and multiplies it by
// HB broadcast query elements; the output kernel does the same with V rows and broadcast
// probabilities. bf16 caches (pairs in 32-bit words, kv_cache.h) are widened in registers, or
// with bf16 arithmetic (bf16 q) multiplied as pairs by cpu/bf16/lanes-inl.h's keys-in-lanes
// kernels, the heads as rows; the dense baseline runs the same chunks.
//
// Keys are cut into chunks of fixed size; each chunk yields a partial softmax state (max, sum,
// unnormalised output) and the partials of a branch are merged with their log-sum-exps, in chunk
// order (FlashDecoding). Chunks, not threads, fix the arithmetic, so the result does not depend
// on the thread count, and both cores work even for one sequence. The NSA step runs in phases:
//   A  compressed-key chunks (scores kept for step 2);
//   B  per (sequence, KV head): merge cmp, block scores (Eqs. 8-10), top-n, slc/win chunk list;
//   C  selected-block and window chunks;
//   D  per (sequence, KV head): merge slc and win, gates, stores.
// The dense baseline is phase A over all cached keys, then the merge.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <new>
#include <stdexcept>
#include <vector>

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "cpu/decode.cc"
#include <hwy/foreach_target.h>  // IWYU pragma: keep

#include <hwy/highway.h>
#include <hwy/contrib/math/math-inl.h>

#include "cpu/bf16/dot.h"
#include "cpu/kernels.h"
#include "cpu/kv_cache.h"
#include "cpu/simd/block_scores-inl.h"
#include "cpu/simd/softmax-inl.h"
#include "cpu/simd/tile_size.h"

#ifndef NSA_CPU_DECODE_ONCE
#define NSA_CPU_DECODE_ONCE
namespace nsa::cpu::decode_detail {

// Keys per chunk: NSA branches (small enough that the compressed keys of an 8k cache make two
// chunks, one per core) and the dense baseline (fewer partials to merge over a long cache).
constexpr int64_t kChunkKeys = 256;
constexpr int64_t kDenseChunkKeys = 512;
// Heads per register block, and query heads padded to a multiple of it.
constexpr int64_t kHeadBlock = 4;

enum Branch : int32_t { kCmp = 0, kSlc = 1, kWin = 2 };

// Keys [a, b) of one store, for one (sequence, KV head) item, with its partial-state slot.
struct Chunk {
  int64_t item = 0;
  int32_t branch = kCmp;
  bool compressed = false;
  int64_t a = 0, b = 0;
  int64_t slot = 0;
};

}  // namespace nsa::cpu::decode_detail
#endif

HWY_BEFORE_NAMESPACE();
namespace nsa::cpu {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;
using namespace decode_detail;

// At most 16 lanes: a vector of keys never spans two K tiles.
using DF = hn::CappedTag<float, 16>;
using VF = hn::Vec<DF>;
constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr int NV = HWY_MAX_BYTES >= 64 ? 4 : 2;  // key vectors per score block
constexpr int CB = HWY_MAX_BYTES >= 64 ? 4 : 2;  // value-column vectors per output block
constexpr int HB = static_cast<int>(kHeadBlock);

// N elements of a bf16 cache (kv_cache.h: pairs in 32-bit words) as f32: the lower (even) or
// the upper (odd) element of N consecutive words. Exact.
template <bool kOdd>
HWY_INLINE VF load_half(const uint32_t* HWY_RESTRICT words) {
  const DF d;
  const hn::RebindToUnsigned<DF> du;
  const auto w = hn::LoadU(du, words);
  return hn::BitCast(d, kOdd ? hn::And(w, hn::Set(du, 0xFFFF0000u)) : hn::ShiftLeft<16>(w));
}

template <bool kBf16>
HWY_INLINE VF load_elems(const void* base, int64_t off) {
  if constexpr (kBf16) {
    const uint32_t* w = static_cast<const uint32_t*>(base) + off / 2;
    return off & 1 ? load_half<true>(w) : load_half<false>(w);
  } else {
    return hn::LoadU(DF(), static_cast<const float*>(base) + off);
  }
}

// acc[h][v] += q[h][i] k[i][v] for HB heads and NVB key vectors.
template <int NVB>
HWY_INLINE void fma_dim(const float* HWY_RESTRICT q, int64_t Dk, int64_t i, const VF* kv,
                        VF (*acc)[NVB]) {
  const DF d;
  for (int h = 0; h < HB; ++h) {
    const VF qh = hn::Set(d, q[h * Dk + i]);
    for (int v = 0; v < NVB; ++v) acc[h][v] = hn::MulAdd(qh, kv[v], acc[h][v]);
  }
}

// S[h][col0 + v*N ..] = q[h] . k over keys key0 + v*N .. for NVB key vectors and HB heads.
template <int NVB, bool kBf16>
HWY_INLINE void score_block(const float* HWY_RESTRICT q, int64_t Dk, const void* kbase,
                            int64_t key0, float* HWY_RESTRICT S, int64_t ld, int64_t col0) {
  const DF d;
  const int64_t N = hn::Lanes(d);
  const int64_t Dk2 = (Dk + 1) / 2;
  int64_t koff[NVB];  // f32: elements; bf16: words (pairs of dims)
  for (int v = 0; v < NVB; ++v) {
    const int64_t key = key0 + v * N;
    koff[v] = (key / kTileKeys) * (kBf16 ? Dk2 : Dk) * kTileKeys + key % kTileKeys;
  }
  VF acc[HB][NVB];
  for (int h = 0; h < HB; ++h) {
    for (int v = 0; v < NVB; ++v) acc[h][v] = hn::Zero(d);
  }
  if constexpr (kBf16) {
    // Each word holds dims 2i and 2i + 1: one load serves both (the odd one past an odd Dk is
    // padding, never multiplied).
    const uint32_t* kw = static_cast<const uint32_t*>(kbase);
    for (int64_t i = 0; i < Dk2; ++i) {
      VF kv[NVB];
      for (int v = 0; v < NVB; ++v) kv[v] = load_half<false>(kw + koff[v] + i * kTileKeys);
      fma_dim<NVB>(q, Dk, 2 * i, kv, acc);
      if (2 * i + 1 == Dk) break;
      for (int v = 0; v < NVB; ++v) kv[v] = load_half<true>(kw + koff[v] + i * kTileKeys);
      fma_dim<NVB>(q, Dk, 2 * i + 1, kv, acc);
    }
  } else {
    const float* kf = static_cast<const float*>(kbase);
    for (int64_t i = 0; i < Dk; ++i) {
      VF kv[NVB];
      for (int v = 0; v < NVB; ++v) kv[v] = hn::LoadU(d, kf + koff[v] + i * kTileKeys);
      fma_dim<NVB>(q, Dk, i, kv, acc);
    }
  }
  for (int h = 0; h < HB; ++h) {
    for (int v = 0; v < NVB; ++v) hn::StoreU(acc[h][v], d, S + h * ld + col0 + v * N);
  }
}

// O[h][c0 ..] = sum_j P[h][j] v[pos0 + j][c0 ..] over j in [0, nk), CBB column vectors, HB heads.
template <int CBB, bool kBf16>
HWY_INLINE void out_block(const float* HWY_RESTRICT P, int64_t ld, int64_t nk, const void* vbase,
                          int64_t Dv_pad, int64_t pos0, float* HWY_RESTRICT O, int64_t c0) {
  const DF d;
  const int64_t N = hn::Lanes(d);
  VF acc[HB][CBB];
  for (int h = 0; h < HB; ++h) {
    for (int c = 0; c < CBB; ++c) acc[h][c] = hn::Zero(d);
  }
  for (int64_t j = 0; j < nk; ++j) {
    VF vv[CBB];
    // bf16: element (pos, c) is half pos & 1 of word (pos / 2) Dv_pad + c (kv_cache.h).
    const int64_t pos = pos0 + j;
    const int64_t row = kBf16 ? ((pos / 2) * Dv_pad + c0) * 2 + (pos & 1) : pos * Dv_pad + c0;
    for (int c = 0; c < CBB; ++c) {
      vv[c] = load_elems<kBf16>(vbase, row + (kBf16 ? 2 : 1) * c * N);
    }
    for (int h = 0; h < HB; ++h) {
      const VF ph = hn::Set(d, P[h * ld + j]);
      for (int c = 0; c < CBB; ++c) acc[h][c] = hn::MulAdd(ph, vv[c], acc[h][c]);
    }
  }
  for (int h = 0; h < HB; ++h) {
    for (int c = 0; c < CBB; ++c) hn::StoreU(acc[h][c], d, O + h * Dv_pad + c0 + c * N);
  }
}

// The problem's shapes, and where each item's buffers live.
struct Plan {
  const DecodeProblem* pr = nullptr;
  const nsa_kv_cache* c = nullptr;
  int64_t G = 0, GP = 0, Dk = 0, Dv = 0, Dv_pad = 0, items = 0;
  std::vector<int64_t> t, nc;             // per item: query position, visible compressed tokens
  std::vector<int64_t> s_off, s_ld;       // per item: cmp score rows [GP][s_ld] at s_off
  std::vector<int64_t> a_slot0, a_count;  // per item: phase A's slots
  std::vector<float>* buf = nullptr;
  float* q = nullptr;     // [items][GP][Dk], scaled
  // bf16 arithmetic (null: f32): the queries as pairs [items][GP][Dk2], unscaled, and the row
  // offsets [GP] of one item's heads in them (h Dk2).
  const bf16::Kernels* bf = nullptr;
  int64_t Dk2 = 0;
  uint32_t* qp = nullptr;
  std::vector<int32_t> roff;
  float* part = nullptr;  // [slots][GP * (2 + Dv_pad)]: m, l, o
  float* fin = nullptr;   // [items][3][GP * (1 + Dv_pad)]: lse, o per branch
  int64_t part_stride() const { return GP * (2 + Dv_pad); }
  int64_t fin_stride() const { return GP * (1 + Dv_pad); }
  float* final_of(int64_t item, int32_t branch) const {
    return fin + (item * 3 + branch) * fin_stride();
  }
};

// S [GP][ld] = scale Q K^T over nk keys from key0 (a multiple of 16), bf16 arithmetic.
void bf16_scores(const Plan& pl, int64_t item, const void* kbase, int64_t key0, int64_t nk,
                 float* S, int64_t ld) {
  const uint32_t* kp = static_cast<const uint32_t*>(kbase) + key0 * pl.Dk2;
  const uint32_t* qp = pl.qp + item * pl.GP * pl.Dk2;
  for (int64_t t0 = 0; t0 < nk / kTileKeys; t0 += 4) {
    const int nt = static_cast<int>(std::min<int64_t>(4, nk / kTileKeys - t0));
    pl.bf->row_scores(qp, 1, pl.GP, pl.roff.data(), kp + t0 * kTileKeys * pl.Dk2, pl.Dk2, nt,
                      pl.pr->scale, S + t0 * kTileKeys, ld);
  }
}

// One chunk: scores into S [GP][ld] (columns from key floor(a/16)*16), masked outside [a, b),
// softmax per head, then the partial state into its slot. pp: bf16 arithmetic's scratch
// ([GP][32] words).
template <bool kBf16>
void run_chunk(const Plan& pl, const Chunk& ch, float* S, int64_t ld, uint32_t* pp) {
  const DF d;
  const int64_t N = hn::Lanes(d), GP = pl.GP, Dk = pl.Dk, Dv_pad = pl.Dv_pad;
  const DecodeProblem& pr = *pl.pr;
  const int64_t seq = pr.seqs[ch.item / pl.c->Hkv], hk = ch.item % pl.c->Hkv;
  const TokenStore& st = ch.compressed ? storage(*pl.c).cmp : storage(*pl.c).raw;
  const void* kbase = st.k_base(seq, hk);
  const void* vbase = st.v_base(seq, hk);
  const int64_t key0 = ch.a / kTileKeys * kTileKeys;
  const int64_t key1 = round_up(ch.b, kTileKeys);
  const int64_t nk = key1 - key0, nvec = nk / N;
  if (pl.bf) {
    bf16_scores(pl, ch.item, kbase, key0, nk, S, ld);
  } else {
    const float* q = pl.q + ch.item * GP * Dk;
    for (int64_t h0 = 0; h0 < GP; h0 += HB) {
      int64_t v = 0;
      for (; v + NV <= nvec; v += NV) {
        score_block<NV, kBf16>(q + h0 * Dk, Dk, kbase, key0 + v * N, S + h0 * ld, ld, v * N);
      }
      for (; v < nvec; ++v)
        score_block<1, kBf16>(q + h0 * Dk, Dk, kbase, key0 + v * N, S + h0 * ld, ld, v * N);
    }
  }
  // Softmax of each head row over the chunk's keys (outside [a, b) masked to -inf), from an
  // empty state (simd/softmax-inl.h: a NaN or +inf score poisons the head, its l is NaN).
  float* part = pl.part + ch.slot * pl.part_stride();
  float* m_out = part;
  float* l_out = part + GP;
  float* o_out = part + 2 * GP;
  const int64_t lo = ch.a - key0, hi = ch.b - key0;
  for (int64_t h = 0; h < GP; ++h) {
    float* row = S + h * ld;
    for (int64_t j = 0; j < lo; ++j) row[j] = -kInf;
    for (int64_t j = hi; j < nk; ++j) row[j] = -kInf;
    m_out[h] = -kInf;
    l_out[h] = 0.0f;
    softmax::step_row(d, row, nk, m_out + h, l_out + h, nullptr, 0);
  }
  if (pl.bf) {  // o = P V over [lo, hi), the pairs of V from key0 (a multiple of 16)
    std::fill(o_out, o_out + GP * Dv_pad, 0.0f);
    pl.bf->row_accumulate(S, ld, GP, static_cast<const uint32_t*>(vbase) + key0 / 2 * Dv_pad,
                          Dv_pad, lo, hi, o_out, Dv_pad, pp);
    return;
  }
  for (int64_t h0 = 0; h0 < GP; h0 += HB) {
    int64_t c = 0;
    for (; c + CB * N <= Dv_pad; c += CB * N) {
      out_block<CB, kBf16>(S + h0 * ld + lo, ld, hi - lo, vbase, Dv_pad, ch.a, o_out + h0 * Dv_pad,
                           c);
    }
    for (; c < Dv_pad; c += N) {
      out_block<1, kBf16>(S + h0 * ld + lo, ld, hi - lo, vbase, Dv_pad, ch.a, o_out + h0 * Dv_pad,
                          c);
    }
  }
}

// Merges the partials in slots [first, first + count) into o [GP][Dv_pad] (normalised) and
// lse [GP]: the log-sum-exp merge of FlashDecoding, in slot order. No slot, or no finite
// score, gives o = 0 and lse = -inf (SPEC 4.1); a NaN l poisons its head.
void merge(const Plan& pl, int64_t first, int64_t count, float* lse, float* o) {
  const DF d;
  const int64_t N = hn::Lanes(d), GP = pl.GP, Dv_pad = pl.Dv_pad;
  for (int64_t h = 0; h < GP; ++h) {
    float m = -kInf;
    for (int64_t k = 0; k < count; ++k)
      m = std::max(m, pl.part[(first + k) * pl.part_stride() + h]);
    const float m_use = m == -kInf ? 0.0f : m;
    float l = 0.0f;
    float* oh = o + h * Dv_pad;
    for (int64_t c = 0; c < Dv_pad; c += N) hn::StoreU(hn::Zero(d), d, oh + c);
    for (int64_t k = 0; k < count; ++k) {
      const float* part = pl.part + (first + k) * pl.part_stride();
      const float lk = part[GP + h];
      if (lk == 0.0f) continue;  // an empty chunk adds nothing (and its m is -inf)
      const float alpha = std::exp(part[h] - m_use);
      l += lk * alpha;
      if (std::isnan(lk)) l = lk;
      const float* ok = part + 2 * GP + h * Dv_pad;
      const VF a = hn::Set(d, alpha);
      for (int64_t c = 0; c < Dv_pad; c += N) {
        hn::StoreU(hn::MulAdd(a, hn::LoadU(d, ok + c), hn::LoadU(d, oh + c)), d, oh + c);
      }
    }
    const VF inv = hn::Set(d, l == 0.0f ? 1.0f : 1.0f / l);
    const VF poison = hn::Set(d, l);
    for (int64_t c = 0; c < Dv_pad; c += N) {
      hn::StoreU(std::isnan(l) ? poison : hn::Mul(hn::LoadU(d, oh + c), inv), d, oh + c);
    }
    lse[h] = softmax::row_lse(m_use, l);
  }
}

// Step 2 (Eqs. 8-10, SPEC 4.2): score[j] = sum_i ov(i, j)/d * sum_h p[h][i] over the real heads.
// Phase A left exp(s[h][i] - m_k[h]) in the score rows (chunk k's max m_k), so
// p[h][i] = that * exp(m_k[h] - lse[h]): one exp per head and chunk, not per element.
void block_scores(const Plan& pl, int64_t item, const float* lse, float* score) {
  const DF d;
  const int64_t N = hn::Lanes(d);
  const nsa_config& cfg = pl.c->cfg;
  const int64_t nc = pl.nc[item], t = pl.t[item], ld = pl.s_ld[item];
  const int64_t last = t / cfg.slc_block;
  const float* P = pl.buf->data() + pl.s_off[item];
  // w[i] = the group's probability mass on compressed token i, summed over the heads in
  // registers; f[h] = this chunk's factor per head (0: an empty head has no mass).
  float* w = score + last + 1;
  float* f = w + ld;
  for (int64_t k = 0; k * kChunkKeys < nc; ++k) {
    const float* m = pl.part + (pl.a_slot0[item] + k) * pl.part_stride();
    for (int64_t h = 0; h < pl.G; ++h) {
      // A poisoned head (NaN lse) makes every touched block's score NaN (README "Non-finite
      // inputs"); its chunk max may read -inf (a vector max may drop NaN), so test lse first.
      f[h] = std::isnan(lse[h])                 ? lse[h]
             : lse[h] == -kInf || m[h] == -kInf ? 0.0f
                                                : std::exp(m[h] - lse[h]);
    }
    const int64_t i1 = std::min(ld, (k + 1) * kChunkKeys);
    for (int64_t i = k * kChunkKeys; i < i1; i += N) {
      VF acc = hn::Zero(d);
      for (int64_t h = 0; h < pl.G; ++h) {
        acc = hn::MulAdd(hn::LoadU(d, P + h * ld + i), hn::Set(d, f[h]), acc);
      }
      hn::StoreU(acc, d, w + i);
    }
  }
  std::fill(score, score + last + 1, 0.0f);
  overlap_block_scores(
      int64_t{cfg.cmp_block}, int64_t{cfg.cmp_stride}, int64_t{cfg.slc_block}, nc, last, 0.0f,
      [&](int64_t i) { return w[i]; }, [](float m, float wt, float a) { return a + m * wt; },
      [&](int64_t j) { return score[j]; }, [&](int64_t j, float a) { score[j] = a; });
}

// Cuts keys [a, b) into chunks at multiples of `size` (absolute positions: the cut does not
// depend on threads), appending to out with consecutive slots from *slot.
void cut(int64_t item, int32_t branch, bool compressed, int64_t a, int64_t b, int64_t size,
         int64_t* slot, std::vector<Chunk>& out) {
  while (a < b) {
    const int64_t e = std::min(b, (a / size + 1) * size);
    out.push_back(Chunk{item, branch, compressed, a, e, (*slot)++});
    a = e;
  }
}

// Stores one row's G heads: o [Dv] per head from `o` ([GP][Dv_pad]).
void store_heads(const Plan& pl, const nsa_tensor& t, int64_t row, int64_t hk, const float* o) {
  for (int64_t g = 0; g < pl.G; ++g) {
    store_row(t, offset_of(t, row, hk * pl.G + g), o + g * pl.Dv_pad, pl.Dv);
  }
}

void store_lse(const Plan& pl, const nsa_tensor& t, int64_t row, int64_t hk, const float* lse) {
  if (!present(t)) return;
  float* base = static_cast<float*>(t.data);
  for (int64_t g = 0; g < pl.G; ++g) base[offset_of(t, row, hk * pl.G + g)] = lse[g];
}

// The call's chunk tables and selection state, beside the Plan's shapes and buffers.
struct Tables {
  std::vector<Chunk> first;   // phase A: compressed keys (NSA) or every key (dense)
  std::vector<Chunk> wins;    // the window's chunks, run in phase B
  std::vector<Chunk> second;  // phase C: per item, min(n, J + 1) entries (a == b: unused)
  // Per item: phase C's room (min(n, J + 1) blocks), its offset in `second` and first slot.
  std::vector<int64_t> slc_max, slc_off, slc_slot0;
  std::vector<int32_t> sel;  // per item: cand [J + 1] and blocks [n], at sel_off
  std::vector<int64_t> sel_off, num_slc;
  int threads = 1;
  int64_t ld_max = 0;                   // row stride of a thread's chunk scores
  int64_t tls_off = 0, tls_floats = 0;  // per-thread scratch in the cache's buffer
  int64_t pp_off = 0;                   // bf16 arithmetic's pairs of weights, inside it
};

// Plan: the items' shapes, phase A's chunks and the slots of every phase. Per item, room is
// sized by what exists, never by n or w alone (either may be INT32_MAX): at most min(n, J + 1)
// selected blocks, and the window's chunks over min(w, t + 1) keys. Returns the slots, and the
// floats of the items' compressed score rows (*floats) and of one item's block scores.
int64_t plan_items(const DecodeProblem& pr, Plan& pl, Tables& tb, int64_t* floats,
                   int64_t* score_floats) {
  const nsa_kv_cache& c = *pr.cache;
  const nsa_config& cfg = c.cfg;
  pl.pr = &pr;
  pl.c = pr.cache;
  pl.G = pr.G;
  pl.GP = round_up(pr.G, kHeadBlock);
  pl.Dk = c.Dk;
  pl.Dv = c.Dv;
  pl.Dv_pad = storage(c).raw.Dv_pad;
  pl.items = pr.S * c.Hkv;
  const int64_t items = pl.items;
  for (std::vector<int64_t>* v :
       {&pl.t, &pl.nc, &pl.s_off, &pl.s_ld, &pl.a_slot0, &pl.a_count, &tb.slc_max, &tb.slc_slot0}) {
    v->resize(static_cast<size_t>(items));
  }
  tb.slc_off.assign(static_cast<size_t>(items) + 1, 0);
  int64_t slot = 0;
  *floats = 0;
  *score_floats = 0;
  for (int64_t it = 0; it < items; ++it) {
    const int64_t t = c.len[static_cast<size_t>(pr.seqs[it / c.Hkv])] - 1;
    pl.t[it] = t;
    pl.a_slot0[it] = slot;
    if (pr.dense) {
      const int64_t a = pr.window > 0 ? std::max<int64_t>(0, t - pr.window + 1) : 0;
      cut(it, kCmp, false, a, t + 1, kDenseChunkKeys, &slot, tb.first);
      pl.a_count[it] = slot - pl.a_slot0[it];
      continue;
    }
    pl.nc[it] = visible_cmp_count(cfg, t);
    cut(it, kCmp, true, 0, pl.nc[it], kChunkKeys, &slot, tb.first);
    pl.a_count[it] = slot - pl.a_slot0[it];
    pl.s_ld[it] = round_up(pl.nc[it], kTileKeys);
    pl.s_off[it] = *floats;
    *floats += pl.GP * pl.s_ld[it];
    *score_floats = std::max(*score_floats, t / cfg.slc_block + 1 + pl.s_ld[it] + pl.GP);
  }
  // Phases B and C's slots follow phase A's: per item, slc then win.
  for (int64_t it = 0; it < items && !pr.dense; ++it) {
    const int64_t t = pl.t[it];
    tb.slc_max[it] = std::min<int64_t>(cfg.slc_count, t / cfg.slc_block + 1);
    tb.slc_off[it + 1] = tb.slc_off[it] + tb.slc_max[it];
    tb.slc_slot0[it] = slot;
    const int64_t win_keys = std::min<int64_t>(cfg.window, t + 1);
    slot += tb.slc_max[it] + (win_keys + kChunkKeys - 1) / kChunkKeys + 1;
  }
  return slot;
}

// Carves the cache's reused buffer (score rows, queries, partials, finals, per-thread scratch)
// and sizes the selection tables. Returns false when out of memory.
bool allocate(const DecodeProblem& pr, Plan& pl, Tables& tb, int64_t slots, int64_t floats,
              int64_t score_floats) {
  const int64_t items = pl.items;
  tb.threads = pr.num_threads > 0 ? pr.num_threads : omp_get_max_threads();
  tb.ld_max = std::max(kChunkKeys, kDenseChunkKeys) + 2 * kTileKeys;
  const int64_t q_off = floats;
  floats += items * pl.GP * pl.Dk;
  const int64_t qp_off = floats;
  if (pl.bf) floats += items * pl.GP * pl.Dk2;
  const int64_t part_off = floats;
  floats += slots * pl.part_stride();
  const int64_t fin_off = floats;
  floats += items * 3 * pl.fin_stride();
  tb.tls_off = floats;
  tb.pp_off = pl.GP * tb.ld_max + score_floats + 2 * kTileKeys;
  tb.tls_floats = tb.pp_off + (pl.bf ? pl.GP * 32 : 0);
  floats += tb.threads * tb.tls_floats;
  std::vector<float>& buf = storage(*pr.cache).scratch;
  try {
    if (static_cast<int64_t>(buf.size()) < floats) buf.resize(static_cast<size_t>(floats));
    tb.sel_off.assign(static_cast<size_t>(items) + 1, 0);
    for (int64_t it = 0; it < items; ++it) {
      const int64_t room = pr.dense ? 0 : pl.t[it] / pr.cache->cfg.slc_block + 1 + tb.slc_max[it];
      tb.sel_off[it + 1] = tb.sel_off[it] + room;
    }
    tb.num_slc.assign(static_cast<size_t>(items), 0);
    tb.sel.resize(static_cast<size_t>(tb.sel_off[items]));
  } catch (const std::bad_alloc&) {
    return false;
  }
  pl.buf = &buf;
  pl.q = buf.data() + q_off;
  pl.qp = reinterpret_cast<uint32_t*>(buf.data() + qp_off);
  pl.part = buf.data() + part_off;
  pl.fin = buf.data() + fin_off;
  return true;
}

// Queries, scaled, heads past G zero.
void load_queries(const DecodeProblem& pr, const Plan& pl) {
  const int64_t Hkv = pl.c->Hkv;
  for (int64_t it = 0; it < pl.items; ++it) {
    const int64_t row = it / Hkv, hk = it % Hkv;
    if (pl.bf) {  // bf16 arithmetic: the exact bf16 queries as pairs of dims
      uint32_t* qp = pl.qp + it * pl.GP * pl.Dk2;
      std::fill(qp, qp + pl.GP * pl.Dk2, 0u);
      for (int64_t g = 0; g < pr.G; ++g) {
        const uint16_t* x =
            static_cast<const uint16_t*>(pr.q.data) + offset_of(pr.q, row, hk * pr.G + g);
        for (int64_t i = 0; i < pl.Dk; ++i) {  // rows are contiguous, as load_row reads them
          qp[g * pl.Dk2 + i / 2] |= uint32_t{x[i]} << (16 * (i & 1));
        }
      }
      continue;
    }
    float* q = pl.q + it * pl.GP * pl.Dk;
    std::fill(q, q + pl.GP * pl.Dk, 0.0f);
    for (int64_t g = 0; g < pr.G; ++g) {
      load_row(pr.q, offset_of(pr.q, row, hk * pr.G + g), pl.Dk, q + g * pl.Dk);
      scale_by(pr.scale, q + g * pl.Dk, pl.Dk);
    }
  }
}

// The window's chunks (SPEC 4 step 5) do not depend on the selection: they run in phase B,
// beside the selections (which are serial per item: with one sequence, one thread would idle).
// Phase C's table gets its size here and its entries in phase B.
void window_chunks(const Plan& pl, Tables& tb) {
  const nsa_config& cfg = pl.c->cfg;
  for (int64_t it = 0; it < pl.items; ++it) {
    int64_t s = tb.slc_slot0[it] + tb.slc_max[it];
    cut(it, kWin, false, std::max<int64_t>(0, pl.t[it] - cfg.window + 1), pl.t[it] + 1, kChunkKeys,
        &s, tb.wins);
  }
  tb.second.resize(static_cast<size_t>(tb.slc_off[pl.items]));
}

// Phase B for one item: merge its compressed (or dense) chunks; for NSA also the block scores
// (step 2), the top-n (step 3) and the item's phase C chunks; the dense baseline stores here.
void select_blocks(const Plan& pl, Tables& tb, int64_t it, float* tls) {
  const DecodeProblem& pr = *pl.pr;
  const nsa_config& cfg = pl.c->cfg;
  const int64_t row = it / pl.c->Hkv, hk = it % pl.c->Hkv, t = pl.t[it];
  float* f = pl.final_of(it, kCmp);
  merge(pl, pl.a_slot0[it], pl.a_count[it], f, f + pl.GP);
  if (pr.dense) {
    store_heads(pl, pr.o, row, hk, f + pl.GP);
    store_lse(pl, pr.lse, row, hk, f);
    return;
  }
  float* score = tls + pl.GP * tb.ld_max;
  block_scores(pl, it, f, score);
  int32_t* cand = tb.sel.data() + tb.sel_off[it];
  int32_t* blocks = cand + t / cfg.slc_block + 1;
  tb.num_slc[it] = top_blocks(cfg, t, score, cand, blocks);
  // This item's phase C chunks, in its own range of the table.
  for (int64_t k = 0; k < tb.num_slc[it]; ++k) {
    const int64_t a = int64_t{blocks[k]} * cfg.slc_block;
    tb.second[tb.slc_off[it] + k] =
        Chunk{it, kSlc, false, a, std::min(t + 1, a + cfg.slc_block), tb.slc_slot0[it] + k};
  }
}

// Phase D for one NSA item: merge the slc and win branches, gate, store (SPEC 4.6).
void combine_item(const Plan& pl, const Tables& tb, int64_t it, float* mixed) {
  const DecodeProblem& pr = *pl.pr;
  const nsa_config& cfg = pl.c->cfg;
  const int64_t row = it / pl.c->Hkv, hk = it % pl.c->Hkv, t = pl.t[it], GP = pl.GP;
  float* fs = pl.final_of(it, kSlc);
  float* fw = pl.final_of(it, kWin);
  merge(pl, tb.slc_slot0[it], tb.num_slc[it], fs, fs + GP);
  const int64_t wa = std::max<int64_t>(0, t - cfg.window + 1);
  const int64_t nwin = (t / kChunkKeys) - (wa / kChunkKeys) + 1;
  merge(pl, tb.slc_slot0[it] + tb.slc_max[it], nwin, fw, fw + GP);
  const nsa_decode_params& p = *pr.nsa;
  const float* fc = pl.final_of(it, kCmp);
  for (int64_t g = 0; g < pr.G; ++g) {
    const int64_t h = hk * pr.G + g;
    const float gc = load_f32(p.g_cmp, offset_of(p.g_cmp, row, h));
    const float gs = load_f32(p.g_slc, offset_of(p.g_slc, row, h));
    const float gw = load_f32(p.g_win, offset_of(p.g_win, row, h));
    const float* oc = fc + GP + g * pl.Dv_pad;
    const float* os = fs + GP + g * pl.Dv_pad;
    const float* ow = fw + GP + g * pl.Dv_pad;
    for (int64_t e = 0; e < pl.Dv; ++e) mixed[e] = gc * oc[e] + gs * os[e] + gw * ow[e];
    store_row(p.o, offset_of(p.o, row, h), mixed, pl.Dv);
  }
  store_lse(pl, p.lse_cmp, row, hk, fc);
  store_lse(pl, p.lse_slc, row, hk, fs);
  store_lse(pl, p.lse_win, row, hk, fw);
  if (present(p.slc_indices_out)) {
    const int32_t* blocks = tb.sel.data() + tb.sel_off[it] + t / cfg.slc_block + 1;
    int32_t* out = static_cast<int32_t*>(p.slc_indices_out.data);
    for (int64_t k = 0; k < cfg.slc_count; ++k) {
      out[offset_of(p.slc_indices_out, row, hk, k)] = k < tb.num_slc[it] ? blocks[k] : -1;
    }
  }
}

// The calling thread's wait at a barrier, added to *waited (StepThreading); every thread of the
// team must call it, as it is the barrier.
inline void timed_barrier(double* waited) {
  if (omp_get_thread_num() != 0) {
#pragma omp barrier
    return;
  }
  const double t0 = omp_get_wtime();
#pragma omp barrier
  *waited += omp_get_wtime() - t0;
}

// Whether a step whose calling thread waited `waited` of its `wall` seconds at barriers was held
// up by a descheduled thread: it waited longer than it worked, and longer than a quiet step's
// waits (one chunk, tens of microseconds).
inline bool held_up(double waited, double wall) { return waited > 250e-6 && waited > 0.5 * wall; }

template <bool kBf16>
bool Decode(const DecodeProblem& pr) {
  Plan pl;
  Tables tb;
  int64_t floats = 0, score_floats = 0;
  const int64_t slots = plan_items(pr, pl, tb, &floats, &score_floats);
  // bf16 arithmetic: a bf16 cache and bf16 queries (the forward's rule: f32 is never rounded).
  if (kBf16 && pr.q.dtype == NSA_DTYPE_BF16) pl.bf = bf16::kernels(pr.bf16_math);
  pl.Dk2 = (pl.Dk + 1) / 2;
  for (int64_t h = 0; h < pl.GP; ++h) pl.roff.push_back(static_cast<int32_t>(h * pl.Dk2));
  if (!allocate(pr, pl, tb, slots, floats, score_floats)) return false;
  load_queries(pr, pl);
  if (!pr.dense) window_chunks(pl, tb);
  std::vector<float>& buf = *pl.buf;
  const int64_t items = pl.items, ld_max = tb.ld_max;
  const int64_t phase_b = items + static_cast<int64_t>(tb.wins.size());
  StepThreading& threading = storage(*pr.cache).threading;
  const bool solo = tb.threads > 1 && threading.solo_steps > 0;
  if (solo) --threading.solo_steps;
  double waited = 0;
  const double start = omp_get_wtime();
#pragma omp parallel num_threads(solo ? 1 : tb.threads)
  {
    float* tls = buf.data() + tb.tls_off + omp_get_thread_num() * tb.tls_floats;
    uint32_t* pp = reinterpret_cast<uint32_t*>(tls + tb.pp_off);
    // Phase A: compressed keys (scores kept per item), or the dense baseline's keys.
#pragma omp for schedule(dynamic, 1) nowait
    for (size_t k = 0; k < tb.first.size(); ++k) {
      const Chunk& ch = tb.first[k];
      if (pr.dense) {
        run_chunk<kBf16>(pl, ch, tls, ld_max, pp);
      } else {
        float* S = buf.data() + pl.s_off[ch.item] + ch.a;  // tile-aligned: a % 256 == 0
        run_chunk<kBf16>(pl, ch, S, pl.s_ld[ch.item], pp);
      }
    }
    timed_barrier(&waited);
    // Phase B: merge; for NSA also block scores, top-n and the item's slc chunks; the window.
#pragma omp for schedule(dynamic, 1) nowait
    for (int64_t task = 0; task < phase_b; ++task) {
      if (task >= items) {
        run_chunk<kBf16>(pl, tb.wins[task - items], tls, ld_max, pp);
      } else {
        select_blocks(pl, tb, task, tls);
      }
    }
    timed_barrier(&waited);
    // Phase C: the selected blocks.
#pragma omp for schedule(dynamic, 1) nowait
    for (size_t k = 0; k < tb.second.size(); ++k) {
      if (tb.second[k].a < tb.second[k].b) run_chunk<kBf16>(pl, tb.second[k], tls, ld_max, pp);
    }
    timed_barrier(&waited);
    // Phase D: merge the branches, gate, store.
#pragma omp for schedule(static) nowait
    for (int64_t it = 0; it < items; ++it) {
      if (!pr.dense) combine_item(pl, tb, it, tls);  // tls: one mixed row [Dv_pad]
    }
    timed_barrier(&waited);  // the region's end, timed: the join waits for every thread
  }
  if (!solo && tb.threads > 1) threading.judge(held_up(waited, omp_get_wtime() - start));
  return true;
}

bool DecodeAny(const DecodeProblem& pr) {
  return pr.cache->dtype == NSA_DTYPE_BF16 ? Decode<true>(pr) : Decode<false>(pr);
}

}  // namespace HWY_NAMESPACE
}  // namespace nsa::cpu
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace nsa::cpu {

HWY_EXPORT(DecodeAny);

// Every allocation happens before the parallel regions and the first output write; a failed
// one (the plan's vectors throw) becomes `false` here, so the caller can restore the cache.
bool decode(const DecodeProblem& pr) {
  try {
    return HWY_DYNAMIC_DISPATCH(DecodeAny)(pr);
  } catch (const std::bad_alloc&) {
    return false;
  } catch (const std::length_error&) {  // a size past max_size: out of memory too
    return false;
  }
}

}  // namespace nsa::cpu
#endif
