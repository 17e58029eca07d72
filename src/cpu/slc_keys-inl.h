// The forward's selected branch with the keys in the lanes (per Highway target; included by
// forward_lanes.cc after foreach_target.h), for groups smaller than a vector.
//
// Why: the heads-in-lanes kernels (lanes-inl.h) fill a vector with the G heads of a position, so
// a group of 4 runs 4-lane vectors and each selected block's keys are broadcast one element at a
// time for only 4 FMAs. Here a tile of 16 keys sits in the lanes and the G heads are the rows of
// the register block (the backward's layout, backward_tiles-inl.h, whose products this reuses):
//   S [GH][keys]  += q^T[i][h] (broadcast) x K tile row i    (GH = padded_heads(G) rows)
//   online softmax per head row (softmax-inl.h's step_row: the same non-finite rule)
//   O [GH][Dvp]   += P[h][j] (broadcast) x V row j             (columns in lanes)
// so every FMA is full width whatever G is. A selected block is walked in groups of up to four
// tiles (64 keys, one default block), lanes outside the block or past t masked to -inf.
#if defined(NSA_CPU_SLC_KEYS_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef NSA_CPU_SLC_KEYS_INL_H_
#undef NSA_CPU_SLC_KEYS_INL_H_
#else
#define NSA_CPU_SLC_KEYS_INL_H_
#endif

#include <algorithm>
#include <cstdint>
#include <limits>

#include <hwy/highway.h>

#include "cpu/backward_tiles-inl.h"
#include "cpu/simd/softmax-inl.h"
#include "cpu/simd/tile_size.h"

HWY_BEFORE_NAMESPACE();
namespace nsa::cpu {
namespace HWY_NAMESPACE {
namespace slc_keys {
namespace hn = hwy::HWY_NAMESPACE;

using bwd_tiles::DT;
using bwd_tiles::kGroupKeys;
using bwd_tiles::kN;
using bwd_tiles::VT;

// o[h][c0, c0 + CB kN) += sum_{j in [j0, j1)} p[h][j] v[j][c0 ...] for QH rows from h0: QH x CB
// accumulators in registers (compile-time shapes, or the compiler spills them).
template <int QH, int CB>
HWY_INLINE void pv_block(const float* HWY_RESTRICT p, int64_t ldp, int64_t h0,
                         const float* HWY_RESTRICT v,
                         int64_t Dv, int64_t c0, int64_t j0, int64_t j1, float* HWY_RESTRICT o,
                         int64_t ldo) {
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

// o[h][0, Dv) += sum_{j in [j0, j1)} p[h][j] v[j][0, Dv) for h < rows (a multiple of QH): p rows
// of stride ldp, v rows of stride Dv, o rows of stride ldo (>= Dv rounded up to kN). Only
// the live keys are read: a key outside the set may hold a non-finite value, and 0 * inf is NaN.
template <int QH>
inline void pv_rows(const float* HWY_RESTRICT p, int64_t ldp, int64_t rows,
                    const float* HWY_RESTRICT v, int64_t Dv, int64_t j0, int64_t j1,
                    float* HWY_RESTRICT o, int64_t ldo) {
  constexpr int kCB = bwd_tiles::kCB;
  const int64_t full = Dv / kN * kN;  // whole vectors of columns; the rest one column at a time
  for (int64_t h0 = 0; h0 < rows; h0 += QH) {
    int64_t c0 = 0;
    for (; c0 + kCB * kN <= full; c0 += kCB * kN) pv_block<QH, kCB>(p, ldp, h0, v, Dv, c0, j0, j1, o, ldo);
    for (; c0 < full; c0 += kN) pv_block<QH, 1>(p, ldp, h0, v, Dv, c0, j0, j1, o, ldo);
    for (int64_t c = full; c < Dv; ++c) {
      for (int h = 0; h < QH; ++h) {
        float acc = o[(h0 + h) * ldo + c];
        for (int64_t j = j0; j < j1; ++j) acc += p[(h0 + h) * ldp + j] * v[j * Dv + c];
        o[(h0 + h) * ldo + c] = acc;
      }
    }
  }
}

// The per-position state of the branch, heads as rows: running max m[h], sum l[h] (the heads-in-
// lanes Branch's own m and l, same meaning) and the unnormalised output o[h][ldo].
struct Rows {
  int64_t G = 0, GH = 0;  // heads, and the rows the products compute (padded_heads(G))
  float* m = nullptr;
  float* l = nullptr;
  float* o = nullptr;
  int64_t ldo = 0;
  float* s = nullptr;  // [GH][kGroupKeys] scores, then probabilities
};

// Adds keys [f, e) to the rows' softmax, keys counted from the start of a packed K/V run: kt its
// tiles [Dk][16], v its rows [key][Dv]; qt the position's scaled queries [Dk][ld].
inline void attend_range(const float* qt, int64_t ld, int64_t Dk, int64_t Dv, const float* kt,
                         const float* v, int64_t f, int64_t e, Rows& r) {
  const DT d;
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  for (int64_t g0 = f / kTileKeys * kTileKeys; g0 < e; g0 += kGroupKeys) {
    const int nt = static_cast<int>(std::min<int64_t>(kGroupKeys, e - g0) + kTileKeys - 1) /
                   static_cast<int>(kTileKeys);
    const int64_t n = nt * kTileKeys;
    const int64_t a = std::max(f, g0) - g0, b = std::min(e, g0 + kGroupKeys) - g0;  // live [a, b)
    bwd_tiles::group_products(qt, ld, r.GH, kt + g0 * Dk, Dk, nt, r.s);
    for (int64_t h = 0; h < r.G; ++h) {
      float* row = r.s + h * kGroupKeys;
      std::fill(row, row + a, kNegInf);
      std::fill(row + b, row + n, kNegInf);
      softmax::step_row(d, row, n, r.m + h, r.l + h, r.o + h * r.ldo, r.ldo);
    }
    bwd_tiles::with_heads(r.GH, [&](auto heads) {
      constexpr int QH = std::min(bwd_tiles::kQH, decltype(heads)::value);
      pv_rows<QH>(r.s, kGroupKeys, r.GH, v + g0 * Dv, Dv, a, b, r.o, r.ldo);
    });
  }
}

}  // namespace slc_keys
}  // namespace HWY_NAMESPACE
}  // namespace nsa::cpu
HWY_AFTER_NAMESPACE();

#endif  // NSA_CPU_SLC_KEYS_INL_H_
