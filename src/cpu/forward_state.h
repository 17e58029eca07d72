// The CPU forward's work types (forward_lanes.cc and the keys-in-lanes steps of
// forward_keys-inl.h): packed K/V, the per-position state, and the shapes of a call. Plain
// structs, the same for every Highway target.
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

#include "cpu/bf16/dot.h"
#include "cpu/kernels.h"
#include "cpu/simd/tile_size.h"
#include "hwy/aligned_allocator.h"

namespace nsa::cpu::fwd {

// K and V of one tensor pair, for every (sequence, KV head), as f32: K in tiles of kTileKeys keys
// ([Dk][kTileKeys], keys innermost), V in rows [pos][Dv]. The rows of one (sequence, head) are
// contiguous; positions past the sequence end (up to the tile) are zero.
struct PackedKV {
  std::vector<int64_t> first_tile;  // per sequence, cumulative (tiles of one head)
  hwy::AlignedFreeUniquePtr<float[]> mem;
  // bf16 elements instead of f32: bf16 inputs packed as they are (exact), for the selected
  // branch, whose blocks come from DRAM at long T and so cost bytes more than conversions.
  bool half = false;
  // bf16 pairs for bf16 arithmetic (bf16/lanes-inl.h): K tiles [Dk2][kTileKeys] of pairs of dims,
  // V [kTileKeys / 2][ldv] pairs of keys per tile (ldv = Dv rounded up to 16, zero-padded).
  bool pairs = false;
  void* k = nullptr;
  void* v = nullptr;
  int64_t tiles = 0, Dk = 0, Dv = 0, Dk2 = 0, ldv = 0;
  int64_t k_index(int64_t seq, int64_t hk) const {
    return (hk * tiles + first_tile[seq]) * kTileKeys * Dk;
  }
  int64_t v_index(int64_t seq, int64_t hk) const {
    return (hk * tiles + first_tile[seq]) * kTileKeys * Dv;
  }
  const float* k_at(int64_t seq, int64_t hk) const {
    return static_cast<const float*>(k) + k_index(seq, hk);
  }
  const float* v_at(int64_t seq, int64_t hk) const {
    return static_cast<const float*>(v) + v_index(seq, hk);
  }
  const uint16_t* k16_at(int64_t seq, int64_t hk) const {
    return static_cast<const uint16_t*>(k) + k_index(seq, hk);
  }
  const uint16_t* v16_at(int64_t seq, int64_t hk) const {
    return static_cast<const uint16_t*>(v) + v_index(seq, hk);
  }
  const uint32_t* kp_at(int64_t seq, int64_t hk) const {
    return static_cast<const uint32_t*>(k) + (hk * tiles + first_tile[seq]) * kTileKeys * Dk2;
  }
  const uint32_t* vp_at(int64_t seq, int64_t hk) const {
    return static_cast<const uint32_t*>(v) + (hk * tiles + first_tile[seq]) * kTileKeys / 2 * ldv;
  }
};

// The packed K/V of one (sequence, KV head) from key key0 (a multiple of kTileKeys): f32 K tiles
// and V rows, or bf16 pairs with bf16 arithmetic.
struct KV {
  const float* kt = nullptr;
  const float* v = nullptr;
  const uint32_t* kp = nullptr;
  const uint32_t* vp = nullptr;
  int64_t key0 = 0;
};

inline KV kv_of(const PackedKV& pk, int64_t si, int64_t hk) {
  KV kv;
  if (pk.pairs) {
    kv.kp = pk.kp_at(si, hk), kv.vp = pk.vp_at(si, hk);
  } else {
    kv.kt = pk.k_at(si, hk), kv.v = pk.v_at(si, hk);
  }
  return kv;
}

// The element form of a pack: f32, bf16 as given (when k and v are bf16), or bf16 pairs (the
// same condition).
enum class Form { kF32, kBf16, kPairs };

// Packs (k, v) for every sequence: the raw tokens, or the compressed ones when `cmp`; in `form`
// where k and v are bf16, else f32 (forward_pack.cc). Returns false when out of memory.
bool pack(const FwdProblem& pr, const nsa_tensor& k, const nsa_tensor& v, bool cmp, int threads,
          Form form, PackedKV& pk);

struct Packs {
  PackedKV slc, win, cmp;
  const PackedKV* win_kv = nullptr;  // &win, or &slc when the branches share K/V
};

// The running state of one branch for the G heads of one position.
struct Branch {
  float* o;  // [Dv][GP] output, transposed
  float* m;  // [GP] running max
  float* l;  // [GP] running sum (NaN once a NaN or +inf score was seen)
};

// One query position of a work item, with its buffers.
struct Pos {
  Group g;
  float* qt;  // [Dk][Dims::ldq] queries, scaled, heads in lanes (zero past G)
  // [Dk2][Dims::ldq] the queries as bf16 pairs, unscaled (bf16 arithmetic); with the keys in
  // lanes it is qt's memory, so that the stack's row offsets serve both.
  uint32_t* qp = nullptr;
  float* s;   // [s_rows][GP] scores, then probabilities (heads in lanes)
  Branch cmp, slc, win;
  float* lse;              // [3][GP]: cmp, slc, win
  Scratch sel;             // score, cand, blocks for slc_select (topk.cc)
  float* orows = nullptr;  // [GH][ldo] step 4's running output with the keys in lanes
};

struct Dims {
  int64_t G, GP, Dk, Dv;
  bool keys;    // steps 1-2, 4 and 5 with the keys in lanes (forward_keys-inl.h): small groups
  int64_t ldq;  // Pos::qt's row: GP, or padded_heads(G) with the keys in lanes
  // bf16 arithmetic (heads in lanes, 16 lanes, bf16 inputs): its kernels, the query pairs' rows
  // (Pos::qp) and the scale the scores take after the products. bf null: f32.
  const bf16::Kernels* bf = nullptr;
  int64_t Dk2 = 0, ldv = 0;  // query/key pairs per row; V pairs' row (PackedKV::ldv)
  float scale = 0.0f;
};

// A (selected block, position in the tile) pair of step 4's block-major walk.
using BlockPos = std::pair<int32_t, int32_t>;

// The keys-in-lanes steps' buffers (one set per thread): up to kMaxRows stacked rows (the
// GH = padded_heads(G) heads of several positions), their scores and outputs.
constexpr int64_t kMaxRows = 32;
struct Stack {
  int64_t G = 0, GH = 0, ldo = 0, s_ld = 0;
  const float* qbase = nullptr;  // every Pos::qt of the thread lies after it
  int32_t* roff = nullptr;       // [kMaxRows] row r's queries: qbase + roff[r] + i GH, i < Dk
  float* s = nullptr;            // [kMaxRows][s_ld] scores, then exp(s - m)
  float* o = nullptr;            // [kMaxRows][ldo] outputs
  float* w = nullptr;            // [s_ld] the group's mass per compressed token
  float* inv = nullptr;          // [kMaxRows] 1 / l per head
  uint32_t* pp = nullptr;        // [kMaxRows][32] bf16 pairs of weights (bf16 arithmetic)
  BlockPos* pairs = nullptr;     // [tile positions x set room]
};

}  // namespace nsa::cpu::fwd
