// The key tile's size, shared by every CPU kernel and the KV cache, and round_up. No
// dependencies, so that the cache's layout (kv_cache.h) can include it wherever it lives.
#pragma once

#include <cstdint>

namespace nsa::cpu {

// Keys per tile: 16 f32, the lanes of one AVX-512 vector. The heads-in-lanes forward
// (lanes-inl.h) broadcasts a tile row's keys, the backward (backward_tiles-inl.h) puts a tile
// in the lanes, the KV cache (kv_cache.h) stores K in tiles of this many positions. Selection
// blocks (64 keys by default) are whole tiles.
constexpr int64_t kTileKeys = 16;

// n rounded up to a multiple of `to` (> 0): padded dimensions and 64-byte buffer carving.
constexpr int64_t round_up(int64_t n, int64_t to) { return (n + to - 1) / to * to; }

}  // namespace nsa::cpu
