// The K/V tile packer every CPU kernel shares (no SIMD: plain copies; the tile's size is in
// tile_size.h).
//
// A tile holds the K and V rows of consecutive key positions of one (sequence, KV head), in the
// forms a kernel's products read as vector operands: K transposed [Dk][keys] (keys innermost:
// the i-th element of every key of the tile is one contiguous run), K rows [keys][ldk], V
// transposed [Dv][keys], V rows [keys][ldv]. Positions past the sequence end are zero, so the
// kernels never branch on a partial tile.
#pragma once

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu/kernels.h"
#include "cpu/simd/tile_size.h"

namespace nsa::cpu {

// The sequence holding global tile `tile`, first_tile being the sequences' cumulative tile
// counts (first_tile[s] = tiles before sequence s).
inline int64_t sequence_of_tile(const std::vector<int64_t>& first_tile, int64_t tile) {
  return std::upper_bound(first_tile.begin(), first_tile.end(), tile) - first_tile.begin() - 1;
}

// One tile's destinations, of `keys` positions. A null form is not written.
template <typename E>
struct KVTile {
  int64_t keys = kTileKeys;
  E* kt = nullptr;  // [Dk][keys]
  E* kr = nullptr;  // [keys][ldk], ldk >= Dk, zero-padded
  E* vt = nullptr;  // [Dv][keys]
  E* vr = nullptr;  // [keys][ldv], ldv >= Dv, zero-padded
  int64_t ldk = 0, ldv = 0;
};

// One row of a [B, rows, H, D] tensor into dst as f32 (bf16 widens exactly), or as its raw bf16
// bits (dst uint16_t, the tensor bf16: kept as they are where a kernel reads bf16).
inline void copy_row(const nsa_tensor& t, int64_t b, int64_t row, int64_t h, int64_t n,
                     float* dst) {
  load_row(t, offset_of(t, b, row, h), n, dst);
}
inline void copy_row(const nsa_tensor& t, int64_t b, int64_t row, int64_t h, int64_t n,
                     uint16_t* dst) {
  const uint16_t* src = static_cast<const uint16_t*>(t.data) + offset_of(t, b, row, h);
  std::copy(src, src + n, dst);
}

// Fills tile `dst` with rows r0 .. r0 + nk - 1 (nk <= dst.keys) of KV head hk of batch b of k
// [B, T, Hkv, Dk] and v [B, T, Hkv, Dv]; the rest of the tile is zero. `row` holds a row on its
// way to a transposed form when the tile keeps no row form of it: Dk elements when kt is
// written without kr, Dv when vt is written without vr (else unused).
template <typename E>
void pack_kv_tile(const nsa_tensor& k, const nsa_tensor& v, int64_t b, int64_t r0, int64_t nk,
                  int64_t hk, int64_t Dk, int64_t Dv, const KVTile<E>& dst, E* row) {
  const int64_t keys = dst.keys;
  if (dst.kt) std::fill(dst.kt, dst.kt + Dk * keys, E(0));
  if (dst.kr) std::fill(dst.kr, dst.kr + keys * dst.ldk, E(0));
  if (dst.vt) std::fill(dst.vt, dst.vt + Dv * keys, E(0));
  if (dst.vr) std::fill(dst.vr, dst.vr + keys * dst.ldv, E(0));
  for (int64_t j = 0; j < nk; ++j) {
    E* kj = dst.kr ? dst.kr + j * dst.ldk : row;
    copy_row(k, b, r0 + j, hk, Dk, kj);
    if (dst.kt) {
      for (int64_t i = 0; i < Dk; ++i) dst.kt[i * keys + j] = kj[i];
    }
    E* vj = dst.vr ? dst.vr + j * dst.ldv : row;
    copy_row(v, b, r0 + j, hk, Dv, vj);
    if (dst.vt) {
      for (int64_t c = 0; c < Dv; ++c) dst.vt[c * keys + j] = vj[c];
    }
  }
}

// A K/V tensor pair and how its rows fall into tiles: sequence s contributes rows [start,
// start + len) of its batch (its raw tokens, or its compressed ones when `cmp`), cut into tiles
// of `keys` positions numbered across the sequences (first_tile[s]: the tiles before s;
// first_tile.back(): all of them). Unit u of the Hkv * tiles is tile (u % tiles) of head
// (u / tiles) when head_major (a head's tiles contiguous), else tile (u / Hkv) of head (u % Hkv).
struct TileSource {
  const nsa_tensor* k = nullptr;
  const nsa_tensor* v = nullptr;
  const std::vector<Sequence>* seqs = nullptr;
  const std::vector<int64_t>* first_tile = nullptr;
  int64_t Hkv = 0, Dk = 0, Dv = 0;
  bool cmp = false, head_major = true;
};

// The tiles of k/v over a problem's sequences (raw rows, or with cmp its compressed rows).
inline TileSource tile_source(const nsa_tensor& k, const nsa_tensor& v, const AttnDims& d,
                              const std::vector<Sequence>& seqs,
                              const std::vector<int64_t>& first_tile, bool cmp, bool head_major) {
  return TileSource{&k, &v, &seqs, &first_tile, d.Hkv, d.Dk, d.Dv, cmp, head_major};
}

// Packs every unit of src in parallel: unit u into dest(u) (a KVTile<E>). Thread i's row for
// pack_kv_tile is rows + i * row_stride, allocated by the caller: nothing is allocated inside
// the region (an exception cannot leave it).
template <typename E, typename Dest>
void pack_kv_tiles(const TileSource& src, Dest dest, E* rows, int64_t row_stride, int threads) {
  const std::vector<int64_t>& first_tile = *src.first_tile;
  const int64_t tiles = first_tile.back(), units = tiles * src.Hkv;
#pragma omp parallel num_threads(threads)
  {
    E* const row = rows + omp_get_thread_num() * row_stride;
#pragma omp for schedule(static)
    for (int64_t u = 0; u < units; ++u) {
      const int64_t tile = src.head_major ? u % tiles : u / src.Hkv;
      const int64_t hk = src.head_major ? u / tiles : u % src.Hkv;
      const int64_t si = sequence_of_tile(first_tile, tile);
      const Sequence& s = (*src.seqs)[si];
      const int64_t start = src.cmp ? s.cmp_start : s.start, len = src.cmp ? s.cmp_len : s.len;
      const KVTile<E> dst = dest(u);
      const int64_t k0 = (tile - first_tile[si]) * dst.keys;
      pack_kv_tile(*src.k, *src.v, s.batch, start + k0, std::min(dst.keys, len - k0), hk, src.Dk,
                   src.Dv, dst, row);
    }
  }
}

}  // namespace nsa::cpu
