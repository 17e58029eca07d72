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

}  // namespace

bool pack(const FwdProblem& pr, const nsa_tensor& k, const nsa_tensor& v, bool cmp, int threads,
          bool keep_bf16, PackedKV& pk) {
  const int64_t Dk = pr.Dk, Dv = pr.Dv, Hkv = pr.Hkv;
  pk.Dk = Dk;
  pk.Dv = Dv;
  pk.half = keep_bf16 && k.dtype == NSA_DTYPE_BF16 && v.dtype == NSA_DTYPE_BF16;
  pk.first_tile.assign(1, 0);
  for (const Sequence& seq : pr.seqs) {
    const int64_t len = cmp ? seq.cmp_len : seq.len;
    pk.first_tile.push_back(pk.first_tile.back() + (len + kTileKeys - 1) / kTileKeys);
  }
  pk.tiles = pk.first_tile.back();
  const int64_t k_elems = Hkv * pk.tiles * kTileKeys * Dk,
                v_elems = Hkv * pk.tiles * kTileKeys * Dv;
  // Element counts rounded to 64 bytes, so that V starts on a line.
  const int64_t k_floats = pk.half ? (k_elems + 31) / 32 * 16 : k_elems;
  const int64_t v_floats = pk.half ? (v_elems + 1) / 2 : v_elems;
  pk.mem =
      hwy::AllocateAligned<float>(static_cast<size_t>(std::max<int64_t>(1, k_floats + v_floats)));
  if (!pk.mem) return false;
  pk.k = pk.mem.get();
  pk.v = pk.mem.get() + k_floats;
  return pk.half ? fill_tiles<uint16_t>(pr, k, v, cmp, threads, pk)
                 : fill_tiles<float>(pr, k, v, cmp, threads, pk);
}

}  // namespace nsa::cpu::fwd
