// The KV cache behind the opaque nsa_kv_cache handle (nsa.h, "Decode with a KV cache"): raw and
// compressed K/V per (sequence, KV head), laid out for the decode kernels (decode.cc), and the
// incremental compression of SPEC.md section 7.
#pragma once

#include <cstdint>
#include <vector>

#include "common/status.h"
#include "cpu/simd/tile_size.h"
#include "nsa/nsa.h"

namespace nsa::cpu {

// K is stored in tiles of kTileKeys (16, cpu/simd/tile_size.h) positions laid out [Dk][16]
// (positions innermost), so the decode score kernel loads the i-th element of 16 consecutive
// keys as one vector and every query head of the group reuses it (keys in lanes, heads in
// registers).

// The tokens of one kind (raw, or compressed) of every (sequence, KV head), in the cache's dtype.
// K: tiles [rows / 16][Dk][16]; V: rows [rows][Dv_pad] (Dv padded with zeros to whole vectors).
// The memory is zeroed at creation (calloc: the OS commits pages as they are first written) and
// never moves; positions past a sequence's length read as zeros.
class TokenStore {
 public:
  TokenStore() = default;
  TokenStore(const TokenStore&) = delete;
  TokenStore& operator=(const TokenStore&) = delete;
  ~TokenStore();

  // rows: positions per (sequence, head); returns false when out of memory.
  bool allocate(int64_t seqs, int64_t heads, int64_t rows, int64_t Dk, int64_t Dv, bool bf16);

  int64_t rows = 0, Dk = 0, Dv = 0, Dv_pad = 0;
  bool bf16 = false;

  // Element offsets inside the (seq, head) block, and the blocks' bases.
  int64_t k_offset(int64_t pos, int64_t i) const {
    return (pos / kTileKeys) * Dk * kTileKeys + i * kTileKeys + pos % kTileKeys;
  }
  const void* k_base(int64_t seq, int64_t h) const { return at(k_, (seq * heads_ + h) * rows * Dk); }
  const void* v_base(int64_t seq, int64_t h) const {
    return at(v_, (seq * heads_ + h) * rows * Dv_pad);
  }

  void write_k(int64_t seq, int64_t h, int64_t pos, const float* row);
  void write_v(int64_t seq, int64_t h, int64_t pos, const float* row);
  void read_k(int64_t seq, int64_t h, int64_t pos, float* row) const;
  void read_v(int64_t seq, int64_t h, int64_t pos, float* row) const;

 private:
  const void* at(void* base, int64_t elems) const {
    return static_cast<const char*>(base) + elems * (bf16 ? 2 : 4);
  }
  void* k_alloc_ = nullptr;  // calloc's pointers; k_ and v_ are them rounded up to 64 bytes
  void* v_alloc_ = nullptr;
  void* k_ = nullptr;
  void* v_ = nullptr;
  int64_t heads_ = 0;
};

// phi = mlp's parameters (SPEC 5) for every KV head, as f32: pos [H][l*D], w1 [H][Dh][l*D],
// b1 [H][Dh], w2 [H][D][Dh], b2 [H][D].
struct MlpParams {
  int64_t Dh = 0;
  std::vector<float> pos, w1, b1, w2, b2;
};

}  // namespace nsa::cpu

struct nsa_kv_cache {
  nsa_config cfg{};  // scale resolved to 1/sqrt(Dk) when it was 0
  int64_t num_seqs = 0, capacity = 0, Hkv = 0, Dk = 0, Dv = 0;
  nsa_dtype dtype = NSA_DTYPE_F32;
  nsa_cmp_kind cmp_kind = NSA_CMP_MEAN;
  nsa::cpu::TokenStore raw, cmp;
  nsa::cpu::MlpParams k_mlp, v_mlp;
  std::vector<int64_t> len;  // tokens held, per sequence
  std::vector<float> scratch;  // reused by decode calls (the cache is not thread-safe)
};

namespace nsa::cpu {

// Allocates the stores and copies the mlp parameters of a validated nsa_kv_cache_params.
Status kv_cache_init(const nsa_kv_cache_params& p, nsa_kv_cache* c);

// Appends rows [0, n) of k [n, Hkv, Dk] and v [n, Hkv, Dv] (validated: fits the capacity) to
// sequence seq, and computes every compressed token they complete (SPEC 7): compressed token i
// exactly when position i*d + l - 1 arrives. Out of memory: an error, and the cache unchanged.
Status kv_cache_append(nsa_kv_cache& c, int64_t seq, const nsa_tensor& k, const nsa_tensor& v,
                     int threads);

// Compressed tokens held by sequence seq.
int64_t kv_cache_cmp_len(const nsa_kv_cache& c, int64_t seq);

// One validated decode call (nsa_decode or nsa_dense_decode), after any append.
struct DecodeProblem {
  nsa_kv_cache* cache = nullptr;
  const nsa_decode_params* nsa = nullptr;  // the NSA step, or
  bool dense = false;                      // the dense baseline over the same cache
  nsa_tensor q{}, o{}, lse{};              // lse: the dense baseline's (optional)
  float scale = 0.0f;                      // resolved
  int64_t window = 0;                      // dense: 0 = every cached token
  int64_t S = 0, Hq = 0, G = 0;
  std::vector<int64_t> seqs;  // the cache sequence of each row of q
  int32_t num_threads = 0;    // 0: OpenMP's default
};

// decode.cc. Returns false when its buffers cannot be allocated.
bool decode(const DecodeProblem& pr);

}  // namespace nsa::cpu
