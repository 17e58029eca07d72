// The CPU backward's per-tile products (Highway, per target; included by backward_lanes.cc after
// foreach_target.h). A tile of 16 keys sits in the lanes of a vector, the G heads of one query
// position are the rows of the register block (layouts in backward_lanes.cc's file comment):
//   S, dP   [G][keys] += q^T[i][h] / do^T[c][h] (broadcast) x K / V tile row
//   dK^T, dV^T [D][16] += q^T[i][h] / do^T[c][h] (broadcast) x dS[h] / g P[h]
//   dq      [G][Dk]  += dS[h][j] (broadcast) x K row j
// over groups of up to 4 consecutive tiles, plus the softmax pieces between them.
#if defined(NSA_CPU_BACKWARD_TILES_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef NSA_CPU_BACKWARD_TILES_INL_H_
#undef NSA_CPU_BACKWARD_TILES_INL_H_
#else
#define NSA_CPU_BACKWARD_TILES_INL_H_
#endif

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include <hwy/highway.h>
#include <hwy/contrib/math/math-inl.h>

#include "cpu/simd/tile_size.h"

HWY_BEFORE_NAMESPACE();
namespace nsa::cpu {
namespace HWY_NAMESPACE {
namespace bwd_tiles {
namespace hn = hwy::HWY_NAMESPACE;

// A tile of kTileKeys (16) keys: the lanes of one AVX-512 f32 vector.
using DT = hn::CappedTag<float, kTileKeys>;
using VT = hn::Vec<DT>;
constexpr int kN = static_cast<int>(hn::MaxLanes(DT()));
constexpr int kNV = static_cast<int>(kTileKeys) / kN;  // vectors per tile row (1 on AVX-512)
// Head rows per register block: 16 accumulators with AVX-512's 32 registers, 8 elsewhere.
constexpr int kHB = std::max(1, (HWY_MAX_BYTES >= 64 ? 16 : 8) / kNV);
// The dq block: kQH heads x kCB vectors of columns.
constexpr int kQH = 4, kCB = 4;

// The G heads of a position are padded to GP rows: the next power of two up to 16, then a
// multiple of 16. Every register block below spans min(its heads, GP) rows, so a group of 4
// computes 4 rows, not 16 (padding rows cost as much as real ones: issue "every group size").
inline int64_t padded_heads(int64_t G) {
  if (G > 16) return (G + 15) / 16 * 16;
  int64_t gp = 1;
  while (gp < G) gp *= 2;
  return gp;
}

// Calls f(std::integral_constant<int, H>{}) with H = min(GP, 16): the head rows a block may span.
template <class F>
HWY_INLINE void with_heads(int64_t GP, F&& f) {
  switch (GP) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 8: return f(std::integral_constant<int, 8>{});
    default: return f(std::integral_constant<int, 16>{});
  }
}

// ---- Products over a group of up to kGroup consecutive key tiles. ----
//
// S and dP of a group are [GP][kGroupKeys] (row stride kGroupKeys). Register blocks span several
// tiles where the vector unit allows (AVX-512): HB heads x V tiles of accumulators load V tile
// rows and broadcast HB query elements per step, (V + HB) loads per V HB FMAs; one tile with 16
// heads needed 17 loads per 16 FMAs, which bound the kernels (measured 1.4x slower per FMA).

constexpr int kGroup = 4;                           // tiles per group
constexpr int64_t kGroupKeys = kGroup * kTileKeys;  // 64: one default selection block
constexpr bool kWideBlocks = kNV == 1;              // AVX-512: one vector per tile row

// out[h][v*16 + j] = sum_i x(i, h) tile_v[i][j] for V tiles at `tiles` (stride tile_stride),
// h < rows (a multiple of HB; out's row stride ldo): the scores (x = scaled Q^T, tiles = K) or
// dP (x = dO^T, tiles = V). x(i, h) = xT[i ld + h], or xT[i ld + roff[h]] when kGather (the
// forward's stacked rows: the heads of several positions, each position's [Dk][GH] block
// where it lies, so nothing is copied to stack them).
template <int HB, int V, bool kGather>
inline void products(const float* HWY_RESTRICT xT, int64_t ld, int64_t rows,
                     const int32_t* HWY_RESTRICT roff, const float* HWY_RESTRICT tiles,
                     int64_t tile_stride, int64_t D, float* HWY_RESTRICT out, int64_t ldo) {
  const DT d;
  // Rows in chunks small enough that the chunk's tile rows stay in L1 while every head block
  // reads them (without: each head block re-read the whole group from L2, which bound the loop).
  constexpr int64_t kRowChunk = 32;
  for (int64_t i0 = 0; i0 < D; i0 += kRowChunk) {
    const int64_t i1 = std::min(D, i0 + kRowChunk);
    for (int64_t h0 = 0; h0 < rows; h0 += HB) {
      VT acc[HB][V * kNV];
      float* o = out + h0 * ldo;
      int64_t off[HB];
      for (int h = 0; h < HB; ++h) off[h] = kGather ? roff[h0 + h] : h0 + h;
      for (int h = 0; h < HB; ++h)
        for (int v = 0; v < V * kNV; ++v)
          acc[h][v] = i0 == 0 ? hn::Zero(d) : hn::Load(d, o + h * ldo + v * kN);
      for (int64_t i = i0; i < i1; ++i) {
        VT kv[V * kNV];
        for (int v = 0; v < V; ++v)
          for (int w = 0; w < kNV; ++w)
            kv[v * kNV + w] = hn::Load(d, tiles + v * tile_stride + i * kTileKeys + w * kN);
        const float* x = xT + i * ld;
        for (int h = 0; h < HB; ++h) {
          const VT b = hn::Set(d, x[off[h]]);
          for (int v = 0; v < V * kNV; ++v) acc[h][v] = hn::MulAdd(b, kv[v], acc[h][v]);
        }
      }
      for (int h = 0; h < HB; ++h)
        for (int v = 0; v < V * kNV; ++v) hn::Store(acc[h][v], d, o + h * ldo + v * kN);
    }
  }
}

// The products of nt tiles for `rows` rows (padded_heads of the group, GP, or a forward stack),
// into out with row stride ldo; rows gathered through roff when given.
template <bool kGather>
inline void products_nt(const float* xT, int64_t ld, int64_t rows, const int32_t* roff,
                        const float* tiles, int64_t D, int nt, float* out, int64_t ldo) {
  const int64_t stride = kTileKeys * D;
  with_heads(rows, [&](auto heads) {
    constexpr int H = decltype(heads)::value;
    if constexpr (kWideBlocks) {
      auto run = [&](auto hb, auto v) {
        products<decltype(hb)::value, decltype(v)::value, kGather>(xT, ld, rows, roff, tiles,
                                                                   stride, D, out, ldo);
      };
      using std::integral_constant;
      switch (nt) {
        case 1: return run(integral_constant<int, std::min(16, H)>{}, integral_constant<int, 1>{});
        case 2: return run(integral_constant<int, std::min(8, H)>{}, integral_constant<int, 2>{});
        case 3: return run(integral_constant<int, std::min(4, H)>{}, integral_constant<int, 3>{});
        default: return run(integral_constant<int, std::min(4, H)>{}, integral_constant<int, 4>{});
      }
    } else {
      for (int v = 0; v < nt; ++v) {
        products<std::min(kHB, H), 1, kGather>(xT, ld, rows, roff, tiles + v * stride, stride, D,
                                               out + v * kTileKeys, ldo);
      }
    }
  });
}

inline void group_products(const float* xT, int64_t ld, int64_t rows, const float* tiles,
                           int64_t D, int nt, float* out, int64_t ldo = kGroupKeys) {
  products_nt<false>(xT, ld, rows, nullptr, tiles, D, nt, out, ldo);
}

// The forward's stacked rows: row h reads xT[i ld + roff[h]].
inline void gathered_products(const float* xT, int64_t ld, int64_t rows, const int32_t* roff,
                              const float* tiles, int64_t D, int nt, float* out, int64_t ldo) {
  products_nt<true>(xT, ld, rows, roff, tiles, D, nt, out, ldo);
}

// acc_v[i][16] += sum_h xT[i][h] w[h][v*16 .. v*16 + 16) for V tiles (accumulators at stride
// tile_stride): dK^T (xT = scaled Q^T, w = dS) or dV^T (xT = dO^T, w = g P). R rows x V tiles
// of accumulators per block; each accumulator's sum over h is a chain of dependent FMAs, and
// R V >= 8 chains in flight hide the FMA latency.
template <int R, int V>
HWY_INLINE void gradient_block(const float* HWY_RESTRICT x, int64_t GP, int64_t heads,
                               const float* HWY_RESTRICT w, float* HWY_RESTRICT acc,
                               int64_t tile_stride) {
  const DT d;
  VT a[R][V * kNV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v)
      for (int u = 0; u < kNV; ++u)
        a[r][v * kNV + u] = hn::Load(d, acc + v * tile_stride + r * kTileKeys + u * kN);
  for (int64_t h = 0; h < heads; ++h) {
    VT wv[V * kNV];
    for (int v = 0; v < V * kNV; ++v) wv[v] = hn::Load(d, w + h * kGroupKeys + v * kN);
    for (int r = 0; r < R; ++r) {
      const VT b = hn::Set(d, x[r * GP + h]);
      for (int v = 0; v < V * kNV; ++v) a[r][v] = hn::MulAdd(b, wv[v], a[r][v]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v)
      for (int u = 0; u < kNV; ++u)
        hn::Store(a[r][v * kNV + u], d, acc + v * tile_stride + r * kTileKeys + u * kN);
}

template <int R, int V>
inline void gradient(const float* xT, int64_t GP, const float* w, int64_t D, float* acc,
                     int64_t tile_stride) {
  int64_t i = 0;
  for (; i + R <= D; i += R)
    gradient_block<R, V>(xT + i * GP, GP, GP, w, acc + i * kTileKeys, tile_stride);
  for (; i < D; ++i) gradient_block<1, V>(xT + i * GP, GP, GP, w, acc + i * kTileKeys, tile_stride);
}

// One tile on AVX-512: the kHeads (16, or GP when fewer) weight vectors of a head block stay in
// registers while the rows stream, 8 rows at a time (8 broadcasts per 8 FMAs, no weight loads).
template <int kHeads>
inline void gradient_one_tile(const float* HWY_RESTRICT xT, int64_t GP, const float* HWY_RESTRICT w,
                              int64_t D, float* HWY_RESTRICT acc) {
  const DT d;
  constexpr int kRows = 8;
  for (int64_t h0 = 0; h0 < GP; h0 += kHeads) {
    VT wv[kHeads];
    for (int h = 0; h < kHeads; ++h) wv[h] = hn::Load(d, w + (h0 + h) * kGroupKeys);
    int64_t i = 0;
    for (; i < D; i += kRows) {
      const int rows = static_cast<int>(std::min<int64_t>(kRows, D - i));
      VT a[kRows];
      for (int r = 0; r < kRows; ++r)
        a[r] = r < rows ? hn::Load(d, acc + (i + r) * kTileKeys) : hn::Zero(d);
      for (int h = 0; h < kHeads; ++h) {
        for (int r = 0; r < kRows; ++r) {
          if (r < rows) a[r] = hn::MulAdd(hn::Set(d, xT[(i + r) * GP + h0 + h]), wv[h], a[r]);
        }
      }
      for (int r = 0; r < kRows; ++r)
        if (r < rows) hn::Store(a[r], d, acc + (i + r) * kTileKeys);
    }
  }
}

inline void group_gradient(const float* xT, int64_t GP, const float* w, int64_t D, int nt,
                           float* acc) {
  const int64_t stride = kTileKeys * D;
  if constexpr (kWideBlocks) {
    switch (nt) {
      case 1:
        return with_heads(GP, [&](auto heads) {
          gradient_one_tile<std::min(16, decltype(heads)::value)>(xT, GP, w, D, acc);
        });
      case 2: return gradient<4, 2>(xT, GP, w, D, acc, stride);
      case 3: return gradient<4, 3>(xT, GP, w, D, acc, stride);
      default: return gradient<4, 4>(xT, GP, w, D, acc, stride);
    }
  } else {
    for (int v = 0; v < nt; ++v)
      gradient<2, 1>(xT, GP, w + v * kTileKeys, D, acc + v * stride, stride);
  }
}

// dq[h][Dkp] += sum_{j = j0..j1} ds[h][j] kr[j][Dkp]: the group's K rows (padded to Dkp)
// weighted by dS, QH heads x kCB column vectors per register block.
template <int QH>
inline void dq_blocks(const float* HWY_RESTRICT ds, int64_t GP, const float* HWY_RESTRICT kr,
                      int64_t Dkp, int64_t j0, int64_t j1, float* HWY_RESTRICT dq) {
  const DT d;
  // Column blocks outer: a block's K rows (64 keys x kCB vectors) stay in L1 for every head block.
  for (int64_t c0 = 0; c0 < Dkp; c0 += kCB * kN) {
    for (int64_t h0 = 0; h0 < GP; h0 += QH) {
      VT a[QH][kCB];
      for (int h = 0; h < QH; ++h)
        for (int c = 0; c < kCB; ++c) a[h][c] = hn::Load(d, dq + (h0 + h) * Dkp + c0 + c * kN);
      for (int64_t j = j0; j <= j1; ++j) {
        VT kv[kCB];
        for (int c = 0; c < kCB; ++c) kv[c] = hn::Load(d, kr + j * Dkp + c0 + c * kN);
        for (int h = 0; h < QH; ++h) {
          const VT b = hn::Set(d, ds[(h0 + h) * kGroupKeys + j]);
          for (int c = 0; c < kCB; ++c) a[h][c] = hn::MulAdd(b, kv[c], a[h][c]);
        }
      }
      for (int h = 0; h < QH; ++h)
        for (int c = 0; c < kCB; ++c) hn::Store(a[h][c], d, dq + (h0 + h) * Dkp + c0 + c * kN);
    }
  }
}

inline void group_dq(const float* ds, int64_t GP, const float* kr, int64_t Dkp, int64_t j0,
                     int64_t j1, float* dq) {
  with_heads(GP, [&](auto heads) {
    dq_blocks<std::min(kQH, decltype(heads)::value)>(ds, GP, kr, Dkp, j0, j1, dq);
  });
}

// The softmax pieces of a group of nt tiles, keys [lo, hi] live: s (scores) becomes
// dS = P (g dP - D) and dp becomes g P, with P = exp(s - lse) and both 0 in the dead lanes.
// Padding heads have lse = +inf, g = D = 0, so they give exact zeros.
inline void group_softmax(float* HWY_RESTRICT s, float* HWY_RESTRICT dp, int64_t GP, int nt,
                          const float* HWY_RESTRICT lse, const float* HWY_RESTRICT g,
                          const float* HWY_RESTRICT dsum, int64_t lo, int64_t hi) {
  const DT d;
  const int64_t vecs = nt * kNV;
  hn::Mask<DT> live[kGroup * kNV];
  for (int64_t v = 0; v < vecs; ++v) {
    const VT idx = hn::Iota(d, static_cast<float>(v * kN));
    live[v] = hn::And(hn::Ge(idx, hn::Set(d, static_cast<float>(lo))),
                      hn::Le(idx, hn::Set(d, static_cast<float>(hi))));
  }
  for (int64_t h = 0; h < GP; ++h) {
    const VT l = hn::Set(d, lse[h]), gv = hn::Set(d, g[h]), dv = hn::Set(d, dsum[h]);
    for (int64_t v = 0; v < vecs; ++v) {
      float* sp = s + h * kGroupKeys + v * kN;
      float* dpp = dp + h * kGroupKeys + v * kN;
      const VT p = hn::IfThenElseZero(live[v], hn::Exp(d, hn::Sub(hn::Load(d, sp), l)));
      const VT ds = hn::Mul(p, hn::MulSub(gv, hn::Load(d, dpp), dv));
      hn::Store(hn::IfThenElseZero(live[v], ds), d, sp);
      hn::Store(hn::Mul(p, gv), d, dpp);
    }
  }
}

}  // namespace bwd_tiles
}  // namespace HWY_NAMESPACE
}  // namespace nsa::cpu
HWY_AFTER_NAMESPACE();

#endif  // NSA_CPU_BACKWARD_TILES_INL_H_
