// The heads-in-lanes SIMD kernels (per Highway target; included by forward_lanes.cc after
// foreach_target.h). The G query heads of one position sit in the lanes of a vector, so every
// step of attention is vertical (see forward_lanes.cc). One or two query positions share each
// load of a key or value element: with two, every broadcast feeds two FMAs, which halves the
// loads per FMA and the cache traffic per position.
//
// Layouts: queries qt [Dk][GP] (scaled, zero past G); packed K tiles [Dk][kTileKeys] (keys
// innermost); V rows [key][Dv]; scores/probabilities s [key][GP]; outputs transposed o [Dv][GP].
// The online softmax between the two products is simd/softmax-inl.h's step_lanes.
#if defined(NSA_CPU_LANES_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef NSA_CPU_LANES_INL_H_
#undef NSA_CPU_LANES_INL_H_
#else
#define NSA_CPU_LANES_INL_H_
#endif

#include <cstdint>

#include <hwy/highway.h>

#include "cpu/simd/tile_size.h"

HWY_BEFORE_NAMESPACE();
namespace nsa::cpu {
namespace HWY_NAMESPACE {
namespace lanes {
namespace hn = hwy::HWY_NAMESPACE;

// Every kernel takes the vector type as DF: the full width, or fewer lanes for small groups
// (forward_lanes.cc picks it from G, so that a group of 4 or 8 heads does not pay for 16).

// Register blocks, sized to the register file: 32 vector registers on AVX-512, 16 elsewhere.
// One position: 16 keys (16 accumulators + the query). Two positions: 8 keys each (16
// accumulators + 2 queries + the broadcast). The output blocks use the same shapes over columns.
constexpr bool kWide = HWY_MAX_BYTES >= 64;
constexpr int kBlock1 = kWide ? 16 : 8;
constexpr int kBlock2 = kWide ? 8 : 4;

// ---- S = Q^T K for one head vector. ----

template <class DF, int KB>
HWY_INLINE void score_block1(const float* HWY_RESTRICT qa, int64_t GP, const float* HWY_RESTRICT kt,
                             int64_t Dk, float* HWY_RESTRICT sa) {
  const DF d;
  using VF = hn::Vec<DF>;
  VF a[KB];
  for (int j = 0; j < KB; ++j) a[j] = hn::Zero(d);
  for (int64_t i = 0; i < Dk; ++i) {
    const VF q = hn::Load(d, qa + i * GP);
    const float* k = kt + i * kTileKeys;
    for (int j = 0; j < KB; ++j) a[j] = hn::MulAdd(q, hn::Set(d, k[j]), a[j]);
  }
  for (int j = 0; j < KB; ++j) hn::Store(a[j], d, sa + j * GP);
}

template <class DF, int KB>
HWY_INLINE void score_block2(const float* HWY_RESTRICT qa, const float* HWY_RESTRICT qb, int64_t GP,
                             const float* HWY_RESTRICT kt, int64_t Dk, float* HWY_RESTRICT sa,
                             float* HWY_RESTRICT sb) {
  const DF d;
  using VF = hn::Vec<DF>;
  VF a[KB], b[KB];
  for (int j = 0; j < KB; ++j) a[j] = b[j] = hn::Zero(d);
  for (int64_t i = 0; i < Dk; ++i) {
    const VF q0 = hn::Load(d, qa + i * GP), q1 = hn::Load(d, qb + i * GP);
    const float* k = kt + i * kTileKeys;
    for (int j = 0; j < KB; ++j) {
      const VF kj = hn::Set(d, k[j]);
      a[j] = hn::MulAdd(q0, kj, a[j]);
      b[j] = hn::MulAdd(q1, kj, b[j]);
    }
  }
  for (int j = 0; j < KB; ++j) {
    hn::Store(a[j], d, sa + j * GP);
    hn::Store(b[j], d, sb + j * GP);
  }
}

// Scores of head vector hv for `tiles` packed tiles at kt: sa (and sb when qb is not null) get
// rows [0, tiles * kTileKeys).
template <class DF>
void score_tiles(const float* qa, const float* qb, int64_t GP, int64_t Dk, const float* kt,
                 int64_t tiles, float* sa, float* sb) {
  for (int64_t ti = 0; ti < tiles; ++ti) {
    const float* k = kt + ti * kTileKeys * Dk;
    const int64_t r = ti * kTileKeys;
    if (qb) {
      for (int64_t j = 0; j < kTileKeys; j += kBlock2) {
        score_block2<DF, kBlock2>(qa, qb, GP, k + j, Dk, sa + (r + j) * GP, sb + (r + j) * GP);
      }
    } else {
      for (int64_t j = 0; j < kTileKeys; j += kBlock1) {
        score_block1<DF, kBlock1>(qa, GP, k + j, Dk, sa + (r + j) * GP);
      }
    }
  }
}

// ---- O^T += P V for one head vector over keys [j0, j1). ----

template <class DF, int CB>
HWY_INLINE void out_block1(const float* HWY_RESTRICT pa, int64_t GP, const float* HWY_RESTRICT v,
                           int64_t Dv, int64_t j0, int64_t j1, float* HWY_RESTRICT oa) {
  const DF d;
  using VF = hn::Vec<DF>;
  VF a[CB];
  for (int c = 0; c < CB; ++c) a[c] = hn::Load(d, oa + c * GP);
  for (int64_t j = j0; j < j1; ++j) {
    const VF p = hn::Load(d, pa + j * GP);
    const float* vj = v + j * Dv;
    for (int c = 0; c < CB; ++c) a[c] = hn::MulAdd(p, hn::Set(d, vj[c]), a[c]);
  }
  for (int c = 0; c < CB; ++c) hn::Store(a[c], d, oa + c * GP);
}

template <class DF, int CB>
HWY_INLINE void out_block2(const float* HWY_RESTRICT pa, const float* HWY_RESTRICT pb, int64_t GP,
                           const float* HWY_RESTRICT v, int64_t Dv, int64_t j0, int64_t j1,
                           float* HWY_RESTRICT oa, float* HWY_RESTRICT ob) {
  const DF d;
  using VF = hn::Vec<DF>;
  VF a[CB], b[CB];
  for (int c = 0; c < CB; ++c) {
    a[c] = hn::Load(d, oa + c * GP);
    b[c] = hn::Load(d, ob + c * GP);
  }
  for (int64_t j = j0; j < j1; ++j) {
    const VF p0 = hn::Load(d, pa + j * GP), p1 = hn::Load(d, pb + j * GP);
    const float* vj = v + j * Dv;
    for (int c = 0; c < CB; ++c) {
      const VF vc = hn::Set(d, vj[c]);
      a[c] = hn::MulAdd(p0, vc, a[c]);
      b[c] = hn::MulAdd(p1, vc, b[c]);
    }
  }
  for (int c = 0; c < CB; ++c) {
    hn::Store(a[c], d, oa + c * GP);
    hn::Store(b[c], d, ob + c * GP);
  }
}

// oa += pa V (and ob += pb V when pb is not null) over keys [j0, j1); p rows and v rows are
// indexed from the same key 0.
template <class DF>
void accumulate(const float* pa, const float* pb, int64_t GP, const float* v, int64_t Dv,
                int64_t j0, int64_t j1, float* oa, float* ob) {
  if (j0 >= j1) return;
  int64_t c = 0;
  if (pb) {
    for (; c + kBlock2 <= Dv; c += kBlock2) {
      out_block2<DF, kBlock2>(pa, pb, GP, v + c, Dv, j0, j1, oa + c * GP, ob + c * GP);
    }
    for (; c < Dv; ++c) out_block2<DF, 1>(pa, pb, GP, v + c, Dv, j0, j1, oa + c * GP, ob + c * GP);
  } else {
    for (; c + kBlock1 <= Dv; c += kBlock1) {
      out_block1<DF, kBlock1>(pa, GP, v + c, Dv, j0, j1, oa + c * GP);
    }
    for (; c < Dv; ++c) out_block1<DF, 1>(pa, GP, v + c, Dv, j0, j1, oa + c * GP);
  }
}

}  // namespace lanes
}  // namespace HWY_NAMESPACE
}  // namespace nsa::cpu
HWY_AFTER_NAMESPACE();

#endif  // NSA_CPU_LANES_INL_H_
