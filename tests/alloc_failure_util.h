// The out-of-memory test's shared part (test_alloc_failure*.cc, one binary): the allocator kinds
// the hook tells apart, a call under test (Call) and what builds one, the small shapes the calls
// use. The hook itself (the global operator new/delete and the -Wl,--wrap functions) and the
// driver are in test_alloc_failure.cc, and only there: a replaced operator new must be defined
// once in the program. The calls are built in test_alloc_failure_fwd.cc (compression, forward,
// backward, dense) and test_alloc_failure_cache.cc (the KV cache and decoding).
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "nsa/nsa.h"
#include "decode_util.h"  // rows(), test_util.h

namespace alloc_hook {

// The allocators the hook covers; alloc_hook::fired says which one failed.
enum Kind { kNew, kMalloc, kCalloc, kRealloc, kAlignedAlloc, kPosixMemalign, kHwy };

}  // namespace alloc_hook

namespace alloc_failure {

using nsa_test::FwdCase;
using nsa_test::Shape;
using nsa_test::Tensor;

// ---- The calls under test. ----

// Every byte a call may write, labelled: output tensors (padding included), cache lengths.
using Snapshot = std::vector<std::pair<std::string, std::vector<unsigned char>>>;
using Named = std::vector<std::pair<std::string, const Tensor*>>;

struct Call {
  std::function<void()> reset;  // the start state: outputs poisoned, caches rebuilt
  std::function<nsa_status(nsa_context*)> run;
  std::function<Snapshot()> snapshot;
  bool ref_unsupported = false;  // the reference has no KV cache: NSA_ERR_UNSUPPORTED there
  bool keeps_scratch = false;    // the cache keeps decode's scratch: later calls allocate less
  std::set<int> must_fail;       // allocator kinds the CPU path reaches (so their hooks must fire)
};

// Small shapes, so that failing each allocation in turn stays fast: T = 128, G = 2, Dk != Dv;
// Tc = 15 compressed tokens, 8 selection blocks of which n = 4 are chosen, a window of 32.
inline Shape small_shape() {
  Shape s;
  s.B = 1, s.T = 128, s.Hq = 4, s.Hkv = 2, s.Dk = 16, s.Dv = 8;
  return s;
}
inline nsa_config small_cfg() { return nsa_test::config(16, 8, 16, 4, 1, 1, 32); }
inline constexpr int64_t kDh = 8;  // the mlp compressor's hidden width

inline void poison(const Tensor& t) {
  std::memset(const_cast<unsigned char*>(t.storage().data()), 0xA5, t.storage().size());
}

inline Tensor random_tensor(nsa_dtype dt, std::vector<int64_t> shape, std::mt19937_64& rng,
                            double lo = -1.0, double hi = 1.0) {
  Tensor t(dt, std::move(shape));
  t.fill_uniform(rng, lo, hi);
  return t;
}

// The mlp compressor's parameters for head dim D: pos, w1, b1, w2, b2.
struct Mlp {
  Tensor t[5];
  Mlp(int64_t Hkv, int64_t l, int64_t D, nsa_dtype dt, std::mt19937_64& rng) {
    t[0] = random_tensor(dt, {Hkv, l, D}, rng, -0.5, 0.5);
    t[1] = random_tensor(dt, {Hkv, kDh, l * D}, rng, -0.1, 0.1);
    t[2] = random_tensor(dt, {Hkv, kDh}, rng, -0.1, 0.1);
    t[3] = random_tensor(dt, {Hkv, D, kDh}, rng, -0.5, 0.5);
    t[4] = random_tensor(dt, {Hkv, D}, rng, -0.1, 0.1);
  }
  void set(nsa_tensor* const (&fields)[5]) const {
    for (int i = 0; i < 5; ++i) *fields[i] = t[i].desc();
  }
};

inline std::unique_ptr<nsa_context, void (*)(nsa_context*)> context(nsa_backend b, int threads) {
  nsa_context* ctx = nullptr;
  EXPECT_EQ(nsa_context_create(&ctx), NSA_OK);
  EXPECT_EQ(nsa_context_set_backend(ctx, b), NSA_OK);
  EXPECT_EQ(nsa_context_set_num_threads(ctx, threads), NSA_OK);
  return {ctx, nsa_context_destroy};
}

// ---- What builds each call (the driver lists them, test_alloc_failure.cc). ----

// test_alloc_failure_fwd.cc: compression and its backward, the forward, the backward, dense
// attention, nsa_cmp_seqlens.
enum class Fwd { kFull, kVarlenBf16, kGivenSelection };

Call compress_call(nsa_cmp_kind kind, bool backward);
Call fwd_call(Fwd kind);
Call bwd_call(Fwd kind, bool saved);
Call dense_call(bool backward);
Call cmp_seqlens_call();

// test_alloc_failure_cache.cc: the KV cache's create and append, prefill, decode.
enum class CacheOp { kCreate, kAppend, kPrefill, kDecode, kDecodeNoAppend, kDenseDecode };

Call cache_call(CacheOp op, nsa_cmp_kind kind, nsa_dtype dt);

}  // namespace alloc_failure
