// The CPU backend's storage of a KV cache (nsa.h, "Decode with a KV cache"; the handle itself is
// common/kv_cache.h): raw and compressed K/V per (sequence, KV head), laid out for the decode
// kernels (decode.cc), and the incremental compression of SPEC.md section 7.
#pragma once

#include <cstdint>
#include <vector>

#include "common/kv_cache.h"
#include "common/problem.h"
#include "common/status.h"
#include "cpu/simd/tile_size.h"
#include "nsa/nsa.h"

namespace nsa::cpu {

// K is stored in tiles of kTileKeys (16, cpu/simd/tile_size.h) positions laid out [Dk][16]
// (positions innermost), so the decode score kernel loads the i-th element of 16 consecutive
// keys as one vector and every query head of the group reuses it (keys in lanes, heads in
// registers).

// The tokens of one kind (raw, or compressed) of every (sequence, KV head), in the cache's dtype.
// f32: K tiles [rows / 16][Dk][16], V rows [rows][Dv_pad] (Dv padded with zeros to 16).
// bf16: pairs, two bf16 in a 32-bit word (the lower element first), as the bf16 arithmetic's
// products read them (cpu/bf16/lanes-inl.h): K tiles [rows / 16][Dk2][16] words (dims 2i, 2i + 1
// of a key; Dk2 = Dk rounded up to even, halved), V [rows / 2][Dv_pad] words (a column of keys
// 2j, 2j + 1). The widening f32 kernels read one half of each word.
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
  int64_t Dk_rows = 0;  // K elements per key: Dk, or 2 Dk2 for bf16 pairs
  bool bf16 = false;

  // Element offsets inside the (seq, head) block, and the blocks' bases.
  int64_t k_offset(int64_t pos, int64_t i) const {
    const int64_t tile = (pos / kTileKeys) * Dk_rows * kTileKeys;
    if (bf16) return tile + ((i / 2) * kTileKeys + pos % kTileKeys) * 2 + (i & 1);
    return tile + i * kTileKeys + pos % kTileKeys;
  }
  int64_t v_offset(int64_t pos, int64_t c) const {
    return bf16 ? ((pos / 2) * Dv_pad + c) * 2 + (pos & 1) : pos * Dv_pad + c;
  }
  const void* k_base(int64_t seq, int64_t h) const {
    return at(k_, (seq * heads_ + h) * rows * Dk_rows);
  }
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

// The storage a CPU cache owns (nsa_kv_cache::storage).
// How a cache's decode steps are threaded on shared cores. A step lasts a fraction of a
// millisecond. When a process outside ours keeps one of the two cores busy, every few dozen
// steps one of the step's threads is descheduled for the OS's slice (about 16 ms measured here)
// and the calling thread waits for it at a barrier: such stalls cost 5.8x the quiet mean (2
// threads beside one busy process; one thread: 1.0x). A quiet machine stalls too, but rarely (a
// hypervisor's or another tenant's moment). So the calling thread times its waits at the
// barriers; a step that waited longer than it worked is a stall, and the second stall within
// kWindow steps sends the next `period` steps to one thread, the period doubling at each such
// pair (up to kMaxPeriod) and falling back to kMinPeriod after kCleanSteps steps without a
// stall. The cache's first kWarmup steps are not judged (the thread pool's start and first-touch
// page faults stall them on a quiet machine). The results do not depend on the thread count
// (decode.cc): this changes times only.
struct StepThreading {
  static constexpr int32_t kWarmup = 4, kWindow = 64, kMinPeriod = 64, kMaxPeriod = 4096,
                           kCleanSteps = 256;
  int64_t steps = 0;              // steps on every thread so far
  int64_t last_stall = -kWindow;  // the step of the last stall
  int32_t solo_steps = 0;         // steps still to run on one thread
  int32_t period = kMinPeriod;
  int32_t clean = 0;  // steps since the last stall
  // After a step on every thread: whether its calling thread was held up.
  void judge(bool held_up) {
    if (++steps <= kWarmup) return;
    if (!held_up) {
      if (++clean >= kCleanSteps) period = kMinPeriod;
      return;
    }
    clean = 0;
    const bool again = steps - last_stall <= kWindow;
    last_stall = steps;
    if (!again) return;
    solo_steps = period;
    period = period < kMaxPeriod ? 2 * period : kMaxPeriod;
  }
};

struct CpuCache : CacheStorage {
  TokenStore raw, cmp;
  MlpParams k_mlp, v_mlp;
  std::vector<float> scratch;  // reused by decode calls (the cache is not thread-safe)
  StepThreading threading;     // decode.cc and kv_cache_append
};

// The CPU storage of a cache this backend created.
inline CpuCache& storage(nsa_kv_cache& c) { return static_cast<CpuCache&>(*c.storage); }
inline const CpuCache& storage(const nsa_kv_cache& c) {
  return static_cast<const CpuCache&>(*c.storage);
}

// The backend table's cache entries (common/backend.h).
// Allocates the stores and copies the mlp parameters of a validated nsa_kv_cache_params.
Status kv_cache_create(const nsa_kv_cache_params& p, nsa_kv_cache* c, void* stream);  // stream: unused
// Writes rows [0, n) of k [n, Hkv, Dk] and v [n, Hkv, Dv] (validated: fits the capacity) at the
// positions after sequence seq's length, and computes every compressed token they complete
// (SPEC 7): compressed token i exactly when position i*d + l - 1 arrives. The length is the
// caller's to advance. Out of memory: an error before any row is written.
Status kv_cache_append(nsa_kv_cache& c, int64_t seq, const nsa_tensor& k, const nsa_tensor& v,
                       int32_t threads, void* stream);  // stream: unused (host memory)
// Appends the prompt of a validated forward of one sequence, then runs the CPU forward over it
// with the cache's own compressed tokens as k_cmp/v_cmp.
Status kv_cache_prefill(nsa_kv_cache& c, int64_t seq, FwdProblem& fwd);

// decode.cc: one step, NSA or the dense baseline (DecodeProblem::dense). Returns false when its
// buffers cannot be allocated.
bool decode(const DecodeProblem& pr);

}  // namespace nsa::cpu
