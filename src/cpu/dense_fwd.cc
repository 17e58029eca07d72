// Dense causal flash attention on the CPU (the baseline every NSA speedup is measured against),
// with Highway SIMD and runtime dispatch: one binary uses AVX-512 where the CPU has it, AVX2 or
// SSE4 elsewhere.
//
// Shape of the kernel (FlashAttention-2 on a CPU core): K and V are first packed once per call
// into f32 tiles of four vectors' width (K transposed, V rows padded to whole vectors), so no
// query tile repacks them. One work item is a tile of kQueryTile query rows of one head; it walks
// the visible key tiles, and per key tile computes
//   S = Q K^T   register-blocked 4 rows x 4 vectors (16 accumulators),
//   online softmax per row (running max m, running sum l, rescale of O only when m grows),
//   O += P V    register-blocked 4 rows x 4 vectors.
// Q, the packed K/V tiles, S and O stay in L1/L2; nothing grows with T except the output.
//
// bf16 arithmetic (nsa_bf16_math NATIVE or EMULATED, bf16 q, k and v): the same walk with the
// products of cpu/bf16/dot-inl.h, two elements per 32-bit lane. K is packed as pairs of dims
// ([Dk/2][64] words), V as pairs of keys ([32][DvP] words), Q as pairs of its (unscaled, exact)
// elements; S is scaled after the product, and P is rounded to bf16 pairs for O += P V.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <new>
#include <vector>

#include "cpu/ops.h"
#include "cpu/bf16/dot.h"
#include "common/dtype.h"
#include "cpu/kernels.h"
#include "cpu/simd/tiles.h"
#include "hwy/aligned_allocator.h"

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "cpu/dense_fwd.cc"
#include <hwy/foreach_target.h>  // IWYU pragma: keep
#include <hwy/highway.h>
#include <hwy/contrib/math/math-inl.h>

#include "cpu/simd/softmax-inl.h"

HWY_BEFORE_NAMESPACE();
namespace nsa::cpu {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

using DF = hn::ScalableTag<float>;

// Query rows per work item: every key tile read serves this many rows (64 rows x (Dk + Dv) FMAs
// per key against (Dk + Dv) floats loaded), and Q, O (64 x 128 f32 each) stay in L2.
constexpr int64_t kQueryTile = 64;
// Key tiles are kKeyVecs vectors wide. Rows of the S = Q K^T register block: 4 rows x 4 vectors
// = 16 accumulators (of 32 registers); a wide tile also amortises each row's softmax reductions.
constexpr int64_t kKeyVecs = 4;
constexpr int64_t kSRows = 4;
// Rows and vectors of the O += P V register block: 4 x 4 = 16 accumulators.
constexpr int64_t kORows = 4;
constexpr int64_t kOVecs = 4;

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// One thread's tiles, carved from a single allocation made before the parallel region.
struct Tiles {
  const bf16::Kernels* bf;  // the bf16 arithmetic's kernels, or null for f32
  uint32_t* qp;             // bf16: [kQueryTile, Dk2] query pairs (unscaled)
  uint32_t* pp;             // bf16: [kQueryTile, NK / 2] probability pairs
  float* q;         // [kQueryTile, Dk] queries, pre-multiplied by the softmax scale
  const float* kt;  // [Dk, NK] the current packed key tile (transposed: S rows are vector loads)
  const float* vp;  // [NK, DvP] the current packed value tile, rows padded to whole vectors
  float* s;         // [kQueryTile, NK] scores, then probabilities
  float* o;         // [kQueryTile, DvP] running output
  float* m;         // [kQueryTile] running max
  float* l;         // [kQueryTile] running sum
};

// K and V of every (sequence, KV head), packed into f32 key tiles of NK positions aligned to the
// sequence start: tile `ti` of sequence `seq` and head hk sits at index (first_tile[seq] + ti) *
// Hkv + hk. Positions past the sequence end are zero. Memory: T * Hkv * (Dk + DvP) floats.
struct Packed {
  std::vector<int64_t> first_tile;  // per sequence, cumulative
  float* k = nullptr;               // tiles of [Dk, NK] (bf16: [Dk2, NK] pairs of dims)
  float* v = nullptr;               // tiles of [NK, DvP] (bf16: [NK / 2, DvP] pairs of keys)
  int64_t NK = 0, DvP = 0, Hkv = 0, Dk = 0;  // bf16: Dk is Dk2, in words
  int64_t k_size = 0, v_size = 0;            // floats (or words) per tile
  const float* k_tile(int64_t seq, int64_t ti, int64_t hk) const {
    return k + ((first_tile[seq] + ti) * Hkv + hk) * k_size;
  }
  const float* v_tile(int64_t seq, int64_t ti, int64_t hk) const {
    return v + ((first_tile[seq] + ti) * Hkv + hk) * v_size;
  }
};

// bf16 arithmetic: the words of a tile (a 32-bit word holds a pair, the lower element first).
const uint32_t* words(const float* tile) { return reinterpret_cast<const uint32_t*>(tile); }

// bf16 arithmetic: packs K as pairs of dims and V as pairs of keys (Packed's comments), straight
// from the bf16 inputs (no rounding), in parallel over tiles; zeros past a sequence's end and in
// the odd dim's partner when Dk is odd.
void pack_pairs(const DenseProblem& pr, Packed& pk, int threads) {
  const nsa_dense_fwd_params& p = pr.p;
  const int64_t NK = pk.NK, DvP = pk.DvP, Hkv = pk.Hkv;
  const int64_t n_tiles = pk.first_tile.back() * Hkv;
  const uint16_t* kb = static_cast<const uint16_t*>(p.k.data);
  const uint16_t* vb = static_cast<const uint16_t*>(p.v.data);
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t u = 0; u < n_tiles; ++u) {
    const int64_t hk = u % Hkv, tile = u / Hkv;
    const int64_t si = sequence_of_tile(pk.first_tile, tile);
    const Sequence& seq = pr.seqs[si];
    const int64_t k0 = (tile - pk.first_tile[si]) * NK;
    uint16_t* kt = reinterpret_cast<uint16_t*>(pk.k + u * pk.k_size);
    uint16_t* vt = reinterpret_cast<uint16_t*>(pk.v + u * pk.v_size);
    std::fill(kt, kt + 2 * pk.k_size, uint16_t{0});
    std::fill(vt, vt + 2 * pk.v_size, uint16_t{0});
    for (int64_t j = 0; j < std::min(NK, seq.len - k0); ++j) {
      const int64_t tok = seq.start + k0 + j;
      const uint16_t* kr = kb + offset_of(p.k, seq.batch, tok, hk);
      const uint16_t* vr = vb + offset_of(p.v, seq.batch, tok, hk);
      for (int64_t i = 0; i < pr.Dk; ++i) {
        kt[((i / 2) * NK + j) * 2 + (i & 1)] = kr[i * p.k.stride[3]];
      }
      for (int64_t c = 0; c < pr.Dv; ++c) {
        vt[((j / 2) * DvP + c) * 2 + (j & 1)] = vr[c * p.v.stride[3]];
      }
    }
  }
}

// S[0 .. rows) = Q K^T for one key tile of NK = 4 vectors, in blocks of 4 rows.
void scores(const Tiles& w, int64_t rows, int64_t Dk, int64_t NK) {
  const DF d;
  const int64_t N = hn::Lanes(d);
  for (int64_t r0 = 0; r0 < rows; r0 += kSRows) {
    auto a00 = hn::Zero(d), a01 = hn::Zero(d), a02 = hn::Zero(d), a03 = hn::Zero(d);
    auto a10 = hn::Zero(d), a11 = hn::Zero(d), a12 = hn::Zero(d), a13 = hn::Zero(d);
    auto a20 = hn::Zero(d), a21 = hn::Zero(d), a22 = hn::Zero(d), a23 = hn::Zero(d);
    auto a30 = hn::Zero(d), a31 = hn::Zero(d), a32 = hn::Zero(d), a33 = hn::Zero(d);
    const float* q = w.q + r0 * Dk;
    for (int64_t i = 0; i < Dk; ++i) {
      const float* kt = w.kt + i * NK;
      const auto k0 = hn::Load(d, kt), k1 = hn::Load(d, kt + N);
      const auto k2 = hn::Load(d, kt + 2 * N), k3 = hn::Load(d, kt + 3 * N);
#define NSA_S_ROW(r, x0, x1, x2, x3)           \
  {                                            \
    const auto qb = hn::Set(d, q[r * Dk + i]); \
    x0 = hn::MulAdd(qb, k0, x0);               \
    x1 = hn::MulAdd(qb, k1, x1);               \
    x2 = hn::MulAdd(qb, k2, x2);               \
    x3 = hn::MulAdd(qb, k3, x3);               \
  }
      // clang-format off: one macro row per line
      NSA_S_ROW(0, a00, a01, a02, a03)
      NSA_S_ROW(1, a10, a11, a12, a13)
      NSA_S_ROW(2, a20, a21, a22, a23)
      NSA_S_ROW(3, a30, a31, a32, a33)
      // clang-format on
#undef NSA_S_ROW
    }
    float* s = w.s + r0 * NK;
    hn::Store(a00, d, s);
    hn::Store(a01, d, s + N);
    hn::Store(a02, d, s + 2 * N);
    hn::Store(a03, d, s + 3 * N);
    s += NK;
    hn::Store(a10, d, s);
    hn::Store(a11, d, s + N);
    hn::Store(a12, d, s + 2 * N);
    hn::Store(a13, d, s + 3 * N);
    s += NK;
    hn::Store(a20, d, s);
    hn::Store(a21, d, s + N);
    hn::Store(a22, d, s + 2 * N);
    hn::Store(a23, d, s + 3 * N);
    s += NK;
    hn::Store(a30, d, s);
    hn::Store(a31, d, s + N);
    hn::Store(a32, d, s + 2 * N);
    hn::Store(a33, d, s + 3 * N);
  }
}

// O[0 .. rows) += P V over the first nk keys of the tile.
void accumulate(const Tiles& w, int64_t rows, int64_t nk, int64_t NK, int64_t DvP) {
  const DF d;
  const int64_t N = hn::Lanes(d);
  for (int64_t r0 = 0; r0 < rows; r0 += kORows) {
    int64_t c0 = 0;
    for (; c0 + kOVecs * N <= DvP; c0 += kOVecs * N) {
      float* o = w.o + r0 * DvP + c0;
      auto a00 = hn::Load(d, o), a01 = hn::Load(d, o + N), a02 = hn::Load(d, o + 2 * N),
           a03 = hn::Load(d, o + 3 * N);
      auto a10 = hn::Load(d, o + DvP), a11 = hn::Load(d, o + DvP + N),
           a12 = hn::Load(d, o + DvP + 2 * N), a13 = hn::Load(d, o + DvP + 3 * N);
      auto a20 = hn::Load(d, o + 2 * DvP), a21 = hn::Load(d, o + 2 * DvP + N),
           a22 = hn::Load(d, o + 2 * DvP + 2 * N), a23 = hn::Load(d, o + 2 * DvP + 3 * N);
      auto a30 = hn::Load(d, o + 3 * DvP), a31 = hn::Load(d, o + 3 * DvP + N),
           a32 = hn::Load(d, o + 3 * DvP + 2 * N), a33 = hn::Load(d, o + 3 * DvP + 3 * N);
      const float* p = w.s + r0 * NK;
      for (int64_t j = 0; j < nk; ++j) {
        const float* v = w.vp + j * DvP + c0;
        const auto v0 = hn::Load(d, v), v1 = hn::Load(d, v + N), v2 = hn::Load(d, v + 2 * N),
                   v3 = hn::Load(d, v + 3 * N);
#define NSA_O_ROW(r, x0, x1, x2, x3)           \
  {                                            \
    const auto pb = hn::Set(d, p[r * NK + j]); \
    x0 = hn::MulAdd(pb, v0, x0);               \
    x1 = hn::MulAdd(pb, v1, x1);               \
    x2 = hn::MulAdd(pb, v2, x2);               \
    x3 = hn::MulAdd(pb, v3, x3);               \
  }
        // clang-format off: one macro row per line
        NSA_O_ROW(0, a00, a01, a02, a03)
        NSA_O_ROW(1, a10, a11, a12, a13)
        NSA_O_ROW(2, a20, a21, a22, a23)
        NSA_O_ROW(3, a30, a31, a32, a33)
        // clang-format on
#undef NSA_O_ROW
      }
      hn::Store(a00, d, o);
      hn::Store(a01, d, o + N);
      hn::Store(a02, d, o + 2 * N);
      hn::Store(a03, d, o + 3 * N);
      hn::Store(a10, d, o + DvP);
      hn::Store(a11, d, o + DvP + N);
      hn::Store(a12, d, o + DvP + 2 * N);
      hn::Store(a13, d, o + DvP + 3 * N);
      hn::Store(a20, d, o + 2 * DvP);
      hn::Store(a21, d, o + 2 * DvP + N);
      hn::Store(a22, d, o + 2 * DvP + 2 * N);
      hn::Store(a23, d, o + 2 * DvP + 3 * N);
      hn::Store(a30, d, o + 3 * DvP);
      hn::Store(a31, d, o + 3 * DvP + N);
      hn::Store(a32, d, o + 3 * DvP + 2 * N);
      hn::Store(a33, d, o + 3 * DvP + 3 * N);
    }
    // Columns left over (Dv not a multiple of four vectors): one vector at a time.
    for (; c0 < DvP; c0 += N) {
      for (int64_t r = r0; r < r0 + kORows; ++r) {
        float* o = w.o + r * DvP + c0;
        auto acc = hn::Load(d, o);
        for (int64_t j = 0; j < nk; ++j) {
          acc = hn::MulAdd(hn::Set(d, w.s[r * NK + j]), hn::Load(d, w.vp + j * DvP + c0), acc);
        }
        hn::Store(acc, d, o);
      }
    }
  }
}

// O[r] += P[r] V over the keys row r may see, one row at a time: for tiles on the causal
// diagonal or the window's edge, where a masked key's weight is 0 but its value must not reach
// the row (0 * NaN would).
void accumulate_masked(const Tiles& w, int64_t rows, int64_t k0, int64_t nk, int64_t q0,
                       int32_t window, int64_t NK, int64_t DvP) {
  const DF d;
  const int64_t N = hn::Lanes(d);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t qpos = q0 + r;
    const int64_t j_end = std::min(nk, qpos - k0 + 1);
    const int64_t j_first = window > 0 ? std::max<int64_t>(0, qpos - window + 1 - k0) : 0;
    float* o = w.o + r * DvP;
    for (int64_t j = j_first; j < j_end; ++j) {
      const auto pb = hn::Set(d, w.s[r * NK + j]);
      const float* v = w.vp + j * DvP;
      for (int64_t c = 0; c < DvP; c += N) {
        hn::Store(hn::MulAdd(pb, hn::Load(d, v + c), hn::Load(d, o + c)), d, o + c);
      }
    }
  }
}

// bf16 arithmetic: query rows [tok0, tok0 + rows) of head h as pairs of their bf16 elements
// (exact; the scale is applied to S), zero past `rows` and in an odd Dk's last partner.
void load_query_pairs(const DenseProblem& pr, int64_t b, int64_t tok0, int64_t h, int64_t rows,
                      int64_t Dk2, uint32_t* qp) {
  const nsa_tensor& q = pr.p.q;
  std::fill(qp, qp + kQueryTile * Dk2, 0u);
  uint16_t* e = reinterpret_cast<uint16_t*>(qp);  // little-endian: the lower half first
  for (int64_t r = 0; r < rows; ++r) {
    const uint16_t* src = static_cast<const uint16_t*>(q.data) + offset_of(q, b, tok0 + r, h);
    for (int64_t i = 0; i < pr.Dk; ++i) e[r * 2 * Dk2 + i] = src[i * q.stride[3]];
  }
}

// bf16 arithmetic: O += P V for one key tile. Inside the triangle every row sees every key, and
// P is rounded to pairs for the bf16 products; on an edge tile each row adds its own keys in f32
// (a pair may hold a key the row must not read, and 0 * NaN is NaN).
void accumulate_pairs(Tiles& w, int64_t rows, int64_t rows_o, bool edge, int64_t k0, int64_t nk,
                      int64_t q0, int32_t window, int64_t NK, int64_t DvP) {
  const uint32_t* vt = words(w.vp);
  if (edge) {
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t qpos = q0 + r;
      const int64_t j_end = std::min(nk, qpos - k0 + 1);
      const int64_t j_first = window > 0 ? std::max<int64_t>(0, qpos - window + 1 - k0) : 0;
      w.bf->accumulate_row(w.s + r * NK, j_first, j_end, vt, DvP, w.o + r * DvP);
    }
    return;
  }
  for (int64_t r = 0; r < rows; ++r) w.bf->to_pairs(w.s + r * NK, NK, w.pp + r * NK / 2);
  std::fill(w.pp + rows * NK / 2, w.pp + rows_o * NK / 2, 0u);
  w.bf->accumulate(w.pp, rows_o, NK / 2, vt, DvP, w.o);
}

// One work item: rows [q0, q0 + rows) of query head h of sequence `seq`.
void query_tile(const DenseProblem& pr, const Packed& packed, int64_t seq_index, int64_t h,
                int64_t q0, int64_t rows, Tiles& w) {
  const Sequence& seq = pr.seqs[seq_index];
  const DF d;
  const int64_t NK = packed.NK, DvP = packed.DvP;
  const nsa_dense_fwd_params& p = pr.p;
  const int64_t Dk = pr.Dk, Dv = pr.Dv, hk = h / pr.G, b = seq.batch;
  // Rows are processed in whole register blocks; rows past `rows` are zero and never stored.
  const int64_t rows_s = round_up(rows, kSRows), rows_o = round_up(rows, kORows);
  if (w.bf) {
    load_query_pairs(pr, b, seq.start + q0, h, rows, packed.Dk, w.qp);
  } else {
    std::fill(w.q, w.q + kQueryTile * Dk, 0.0f);
    for (int64_t r = 0; r < rows; ++r) {
      copy_row(p.q, b, seq.start + q0 + r, h, Dk, w.q + r * Dk);
      for (int64_t i = 0; i < Dk; ++i) w.q[r * Dk + i] *= p.scale;
    }
  }
  std::fill(w.o, w.o + kQueryTile * DvP, 0.0f);
  std::fill(w.m, w.m + kQueryTile, kNegInf);
  std::fill(w.l, w.l + kQueryTile, 0.0f);

  // Keys visible to some row of the tile: [lo, q0 + rows) (causal, optionally windowed), walked
  // in the packed tiles, which start at multiples of NK.
  const int64_t lo = p.window > 0 ? std::max<int64_t>(0, q0 - p.window + 1) : 0;
  const int64_t hi = q0 + rows;
  for (int64_t k0 = lo / NK * NK; k0 < hi; k0 += NK) {
    const int64_t nk = std::min(NK, hi - k0);
    w.kt = packed.k_tile(seq_index, k0 / NK, hk);
    w.vp = packed.v_tile(seq_index, k0 / NK, hk);
    if (w.bf) {
      w.bf->scores(w.qp, rows_s, packed.Dk, words(w.kt), p.scale, w.s);
    } else {
      scores(w, rows_s, Dk, NK);
    }
    // Mask keys past the query (causal), before its window, or past the tile's end.
    const bool edge =
        k0 + NK - 1 > q0 || nk < NK || (p.window > 0 && k0 <= q0 + rows - 1 - p.window);
    for (int64_t r = 0; r < rows; ++r) {
      float* s = w.s + r * NK;
      if (edge) {
        const int64_t qpos = q0 + r;
        for (int64_t j = 0; j < NK; ++j) {
          const int64_t pos = k0 + j;
          if (j >= nk || pos > qpos || (p.window > 0 && pos <= qpos - p.window)) s[j] = kNegInf;
        }
      }
      softmax::step_row(d, s, NK, w.m + r, w.l + r, w.o + r * DvP, DvP);
    }
    if (w.bf) {
      accumulate_pairs(w, rows, rows_o, edge, k0, nk, q0, p.window, NK, DvP);
    } else if (edge) {
      accumulate_masked(w, rows, k0, nk, q0, p.window, NK, DvP);
    } else {
      for (int64_t r = rows; r < rows_o; ++r) std::fill(w.s + r * NK, w.s + (r + 1) * NK, 0.0f);
      accumulate(w, rows_o, nk, NK, DvP);
    }
  }

  for (int64_t r = 0; r < rows; ++r) {
    const int64_t tok = seq.start + q0 + r;
    float* o = w.o + r * DvP;
    const bool empty = w.l[r] == 0.0f;  // NaN l (a NaN score) is not empty: it poisons the row
    const float inv = empty ? 0.0f : 1.0f / w.l[r];
    for (int64_t c = 0; c < Dv; ++c) o[c] *= inv;
    const int64_t off = offset_of(p.o, b, tok, h);
    store_row(p.o, off, o, Dv);
    if (present(p.lse)) {
      static_cast<float*>(p.lse.data)[offset_of(p.lse, b, tok, h)] =
          softmax::row_lse(w.m[r], w.l[r]);
    }
  }
}

// Packs K and V of every sequence and KV head (see Packed), in parallel over tiles. Thread i
// transposes key rows in rows + i * stride (Dk floats, allocated by the caller: nothing is
// allocated inside the region).
void pack(const DenseProblem& pr, Packed& pk, int threads, float* rows, int64_t stride) {
  const nsa_dense_fwd_params& p = pr.p;
  const TileSource src =
      tile_source(p.k, p.v, pr, pr.seqs, pk.first_tile, /*cmp=*/false, /*head_major=*/false);
  auto dest = [&](int64_t i) {
    KVTile<float> dst;
    dst.keys = pk.NK;
    dst.kt = pk.k + i * pr.Dk * pk.NK;
    dst.vr = pk.v + i * pk.NK * pk.DvP;
    dst.ldv = pk.DvP;
    return dst;
  };
  pack_kv_tiles(src, dest, rows, stride, threads);
}

// Returns false when the tiles cannot be allocated.
bool DenseForward(const DenseProblem& pr) {
  const DF d;
  const nsa_dense_fwd_params& p = pr.p;
  // bf16 arithmetic when asked for (resolved: NATIVE or EMULATED) and every input is bf16; its
  // tiles are 64 keys and DvP a multiple of 16 whatever this target's vector (dot-inl.h).
  const bool all_bf16 = p.q.dtype == NSA_DTYPE_BF16 && p.k.dtype == NSA_DTYPE_BF16 &&
                        p.v.dtype == NSA_DTYPE_BF16;
  const bf16::Kernels* bf = all_bf16 ? bf16::kernels(pr.bf16_math) : nullptr;
  const int64_t N = bf ? 16 : hn::Lanes(d), NK = kKeyVecs * N, DvP = round_up(pr.Dv, N);
  const int64_t Dk2 = (pr.Dk + 1) / 2;
  // Work items (sequence, query tile, head): neighbouring items share K/V tiles when G > 1.
  struct Item {
    int64_t seq, q0, h;
  };
  std::vector<Item> items;
  for (int64_t s = 0; s < static_cast<int64_t>(pr.seqs.size()); ++s) {
    for (int64_t q0 = 0; q0 < pr.seqs[s].len; q0 += kQueryTile) {
      for (int64_t h = 0; h < pr.Hq; ++h) items.push_back({s, q0, h});
    }
  }
  const int threads = pr.num_threads > 0 ? pr.num_threads : omp_get_max_threads();
  Packed packed;
  packed.NK = NK;
  packed.DvP = DvP;
  packed.Hkv = pr.Hkv;
  packed.Dk = bf ? Dk2 : pr.Dk;
  packed.k_size = packed.Dk * NK;
  packed.v_size = bf ? NK / 2 * DvP : NK * DvP;
  packed.first_tile.push_back(0);
  for (const Sequence& seq : pr.seqs) {
    packed.first_tile.push_back(packed.first_tile.back() + (seq.len + NK - 1) / NK);
  }
  const int64_t tiles = packed.first_tile.back() * pr.Hkv;
  // Everything is allocated before the first parallel region and the first output write.
  const int64_t sizes[] = {bf ? 0 : kQueryTile * pr.Dk, kQueryTile * NK, kQueryTile * DvP,
                           kQueryTile, kQueryTile, bf ? kQueryTile * Dk2 : 0,
                           bf ? kQueryTile * NK / 2 : 0};
  // Per thread: the query tile's buffers (sizes), then the packing's key row of Dk.
  int64_t per_thread = round_up(pr.Dk, 16);
  for (int64_t size : sizes) per_thread += round_up(size, 16);
  int64_t kv_floats = 0, buf_floats = 0;
  if (!mul_size(tiles, packed.k_size + packed.v_size, &kv_floats) ||
      !mul_size(threads, per_thread, &buf_floats)) {
    return false;
  }
  const auto kv = hwy::AllocateAligned<float>(static_cast<size_t>(kv_floats));
  const auto buf = hwy::AllocateAligned<float>(static_cast<size_t>(buf_floats));
  if (!kv || !buf) return false;
  packed.k = kv.get();
  packed.v = kv.get() + tiles * packed.k_size;
  if (bf) {
    pack_pairs(pr, packed, threads);
  } else {
    pack(pr, packed, threads, buf.get() + per_thread - round_up(pr.Dk, 16), per_thread);
  }
  const int64_t n = static_cast<int64_t>(items.size());
#pragma omp parallel num_threads(threads)
  {
    // Every tile starts on a 64-byte boundary (aligned vector loads).
    float* f = buf.get() + omp_get_thread_num() * per_thread;
    auto take = [&f](int64_t count) {
      float* at = f;
      f += round_up(count, 16);
      return at;
    };
    Tiles w;
    w.bf = bf;
    w.q = take(sizes[0]);
    w.s = take(sizes[1]);
    w.o = take(sizes[2]);
    w.m = take(sizes[3]);
    w.l = take(sizes[4]);
    w.qp = reinterpret_cast<uint32_t*>(take(sizes[5]));
    w.pp = reinterpret_cast<uint32_t*>(take(sizes[6]));
    // Later tiles see more keys: dynamic scheduling balances the threads. Each item is computed
    // by the same code whatever thread takes it, so results do not depend on the thread count.
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < n; ++i) {
      const Item& it = items[i];
      const int64_t rows = std::min(kQueryTile, pr.seqs[it.seq].len - it.q0);
      query_tile(pr, packed, it.seq, it.h, it.q0, rows, w);
    }
  }
  return true;
}

}  // namespace HWY_NAMESPACE
}  // namespace nsa::cpu
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace nsa::cpu {

HWY_EXPORT(DenseForward);

Status dense_forward(const DenseProblem& problem) {
  // Allocation happens before the parallel regions and the first output write: a failure
  // (false, or a vector's bad_alloc) leaves the outputs untouched.
  bool ok = false;
  try {
    ok = HWY_DYNAMIC_DISPATCH(DenseForward)(problem);
  } catch (const std::bad_alloc&) {
    ok = false;
  }
  if (!ok) {
    return error(NSA_ERR_OUT_OF_MEMORY, "dense forward: cannot allocate the per-thread tiles");
  }
  return Status::ok();
}

}  // namespace nsa::cpu
#endif
