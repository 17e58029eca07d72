// Packing K/V for the CPU forward (forward_state.h): tiles of keys for the QK products, rows for
// PV, once per call, in parallel over (sequence, KV head) tiles.
#include <algorithm>
#include <new>
#include <vector>

#include "cpu/forward_state.h"
#include "cpu/simd/tiles.h"

namespace nsa::cpu::fwd {
namespace {

// Fills the tiles of pk (allocated) with elements of type E: f32, or bf16 bits when pk.half.
// Returns false when out of memory.
template <typename E>
bool fill_tiles(const FwdProblem& pr, const nsa_tensor& k, const nsa_tensor& v, bool cmp,
                int threads, PackedKV& pk) {
  const int64_t Dk = pr.Dk, Dv = pr.Dv;
  E* const kbase = static_cast<E*>(pk.k);
  E* const vbase = static_cast<E*>(pk.v);
  // One key row per thread for the transposition, allocated here: never inside the region.
  std::vector<E> rows;
  int64_t row_elems = 0;
  if (!mul_size(threads, Dk, &row_elems)) return false;
  try {
    rows.resize(static_cast<size_t>(row_elems));
  } catch (const std::bad_alloc&) {
    return false;
  }
  const TileSource src = tile_source(k, v, pr, pr.seqs, pk.first_tile, cmp, /*head_major=*/true);
  auto dest = [&](int64_t u) {
    KVTile<E> dst;
    dst.kt = kbase + u * kTileKeys * Dk;
    dst.vr = vbase + u * kTileKeys * Dv;
    dst.ldv = Dv;
    return dst;
  };
  pack_kv_tiles(src, dest, rows.data(), Dk, threads);
  return true;
}

// Fills pk's pair layouts from bf16 k and v (forward_state.h): per tile of kTileKeys keys, K
// as [Dk2][kTileKeys] pairs of dims and V as [kTileKeys / 2][ldv] pairs of keys, zero past the
// sequence end, past Dk and past Dv. Exact: the bf16 bits are moved, not converted.
void fill_pairs(const FwdProblem& pr, const nsa_tensor& k, const nsa_tensor& v, bool cmp,
                int threads, PackedKV& pk) {
  const int64_t Dk = pr.Dk, Dv = pr.Dv, Dk2 = pk.Dk2, ldv = pk.ldv, tiles = pk.tiles;
  const int64_t k_words = kTileKeys * Dk2, v_words = kTileKeys / 2 * ldv;
  const uint16_t* kb = static_cast<const uint16_t*>(k.data);
  const uint16_t* vb = static_cast<const uint16_t*>(v.data);
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t u = 0; u < pr.Hkv * tiles; ++u) {
    const int64_t hk = u / tiles, tile = u % tiles;
    const int64_t si = sequence_of_tile(pk.first_tile, tile);
    const Sequence& seq = pr.seqs[si];
    const int64_t start = cmp ? seq.cmp_start : seq.start, len = cmp ? seq.cmp_len : seq.len;
    const int64_t k0 = (tile - pk.first_tile[si]) * kTileKeys;
    uint16_t* kt = reinterpret_cast<uint16_t*>(static_cast<uint32_t*>(pk.k) + u * k_words);
    uint16_t* vt = reinterpret_cast<uint16_t*>(static_cast<uint32_t*>(pk.v) + u * v_words);
    std::fill(kt, kt + 2 * k_words, uint16_t{0});
    std::fill(vt, vt + 2 * v_words, uint16_t{0});
    for (int64_t j = 0; j < std::min(kTileKeys, len - k0); ++j) {
      const uint16_t* kr = kb + offset_of(k, seq.batch, start + k0 + j, hk);
      const uint16_t* vr = vb + offset_of(v, seq.batch, start + k0 + j, hk);
      for (int64_t i = 0; i < Dk; ++i) {
        kt[((i / 2) * kTileKeys + j) * 2 + (i & 1)] = kr[i * k.stride[3]];
      }
      for (int64_t c = 0; c < Dv; ++c) vt[((j / 2) * ldv + c) * 2 + (j & 1)] = vr[c * v.stride[3]];
    }
  }
}

}  // namespace

bool pack(const FwdProblem& pr, const nsa_tensor& k, const nsa_tensor& v, bool cmp, int threads,
          Form form, PackedKV& pk) {
  const int64_t Dk = pr.Dk, Dv = pr.Dv, Hkv = pr.Hkv;
  const bool bf16 = k.dtype == NSA_DTYPE_BF16 && v.dtype == NSA_DTYPE_BF16;
  pk.Dk = Dk;
  pk.Dv = Dv;
  pk.Dk2 = (Dk + 1) / 2;
  pk.ldv = round_up(Dv, int64_t{16});
  pk.half = form == Form::kBf16 && bf16;
  pk.pairs = form == Form::kPairs && bf16;
  pk.first_tile.assign(1, 0);
  for (const Sequence& seq : pr.seqs) {
    const int64_t len = cmp ? seq.cmp_len : seq.len;
    pk.first_tile.push_back(pk.first_tile.back() + (len + kTileKeys - 1) / kTileKeys);
  }
  pk.tiles = pk.first_tile.back();
  // Pairs: Dk rounded up to even, 2 elements per word.
  const int64_t k_elems = Hkv * pk.tiles * kTileKeys * (pk.pairs ? 2 * pk.Dk2 : Dk),
                v_elems = Hkv * pk.tiles * kTileKeys * (pk.pairs ? pk.ldv : Dv);
  // Element counts rounded to 64 bytes, so that V starts on a line.
  const bool two_bytes = pk.half || pk.pairs;
  const int64_t k_floats = two_bytes ? (k_elems + 31) / 32 * 16 : k_elems;
  const int64_t v_floats = two_bytes ? (v_elems + 1) / 2 : v_elems;
  pk.mem =
      hwy::AllocateAligned<float>(static_cast<size_t>(std::max<int64_t>(1, k_floats + v_floats)));
  if (!pk.mem) return false;
  pk.k = pk.mem.get();
  pk.v = pk.mem.get() + k_floats;
  if (pk.pairs) {
    fill_pairs(pr, k, v, cmp, threads, pk);
    return true;
  }
  return pk.half ? fill_tiles<uint16_t>(pr, k, v, cmp, threads, pk)
                 : fill_tiles<float>(pr, k, v, cmp, threads, pk);
}

}  // namespace nsa::cpu::fwd
