// Out of memory, one allocation at a time (nsa.h: every call returns a status, the library never
// aborts, and a failed call writes no output). For each public call, on REF and CPU, with 1 and 2
// threads, allocation k of the call (k = 1, 2, ...; for the reference, which allocates per query,
// the first and last ones and a spread between) is made to fail. The call must then return
// NSA_ERR_OUT_OF_MEMORY with a message and leave every output byte and every KV-cache length as
// it was (or, where the library absorbs the failure, succeed with exactly a clean run's results),
// and once k passes the call's last allocation it must succeed.
//
// The hook sees every allocation of this process's C++ code (this file replaces the global
// operator new/delete, every variant) and the C allocations of libnsa.a's objects: the test is
// linked with -Wl,--wrap for malloc, calloc, realloc, aligned_alloc, posix_memalign and Highway's
// hwy::AllocateAlignedBytes (tests/CMakeLists.txt), which redirects the references of the
// objects in this link, the static library's included, to the __wrap_ functions below. It does
// not see what shared libraries allocate with their own malloc calls: OpenBLAS (the mlp
// compression's sgemm), libgomp (its thread pool) and libhwy (inside AllocateAlignedBytes, which
// is hooked as a whole). The hook is armed only around the call under test (GoogleTest
// allocates too). Run by hand, set OMP_WAIT_POLICY=passive as ctest does (tests/CMakeLists.txt).
//
// This file holds the hook and the driver; alloc_failure_util.h declares what the calls under
// test are, test_alloc_failure_fwd.cc and test_alloc_failure_cache.cc build them.
#include <gtest/gtest.h>
#include <hwy/aligned_allocator.h>

#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <execinfo.h>
#include <functional>
#include <new>
#include <set>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "alloc_failure_util.h"

// ---- The hook. ----

namespace alloc_hook {

std::atomic<bool> armed{false};
std::atomic<int64_t> seen{0};     // allocations since arming
std::atomic<int64_t> fail_at{0};  // the allocation to fail (1-based); 0: none, count only
std::atomic<int> fired{-1};       // the Kind that failed, -1 while none

// Whether this allocation (of `kind`) fails: it is the fail_at-th since arming. With
// NSA_ALLOC_BACKTRACE=k, failing allocation k prints where it was made (stderr), to find the
// code behind a reported failure.
bool should_fail(Kind kind) {
  if (!armed.load()) return false;
  const int64_t k = seen.fetch_add(1) + 1;
  if (k != fail_at.load()) return false;
  fired.store(kind);
  const char* trace = std::getenv("NSA_ALLOC_BACKTRACE");
  if (trace != nullptr && std::atoll(trace) == k) {
    void* frames[32];
    backtrace_symbols_fd(frames, backtrace(frames, 32), 2);
  }
  return true;
}

void arm(int64_t k) {
  seen.store(0);
  fail_at.store(k);
  fired.store(-1);
  armed.store(true);
}

void disarm() { armed.store(false); }

}  // namespace alloc_hook

using alloc_hook::should_fail;

// The real allocators (--wrap=X makes __real_X name X itself).
extern "C" {
void* __real_malloc(size_t n);
void* __real_calloc(size_t n, size_t size);
void* __real_realloc(void* p, size_t n);
void* __real_aligned_alloc(size_t align, size_t n);
int __real_posix_memalign(void** p, size_t align, size_t n);

void* __wrap_malloc(size_t n) {
  return should_fail(alloc_hook::kMalloc) ? nullptr : __real_malloc(n);
}
void* __wrap_calloc(size_t n, size_t size) {
  return should_fail(alloc_hook::kCalloc) ? nullptr : __real_calloc(n, size);
}
void* __wrap_realloc(void* p, size_t n) {
  return should_fail(alloc_hook::kRealloc) ? nullptr : __real_realloc(p, n);
}
void* __wrap_aligned_alloc(size_t align, size_t n) {
  return should_fail(alloc_hook::kAlignedAlloc) ? nullptr : __real_aligned_alloc(align, n);
}
int __wrap_posix_memalign(void** p, size_t align, size_t n) {
  return should_fail(alloc_hook::kPosixMemalign) ? ENOMEM : __real_posix_memalign(p, align, n);
}

// hwy::AllocateAlignedBytes(size_t, AllocPtr, void*), by its mangled name (Highway 1.0):
// hwy::AllocateAligned<T> is a header template, so every call site sits in libnsa.a's objects.
void* __real__ZN3hwy20AllocateAlignedBytesEmPFPvS0_mES0_(size_t n, hwy::AllocPtr alloc,
                                                         void* opaque);
void* __wrap__ZN3hwy20AllocateAlignedBytesEmPFPvS0_mES0_(size_t n, hwy::AllocPtr alloc,
                                                         void* opaque) {
  if (should_fail(alloc_hook::kHwy)) return nullptr;
  return __real__ZN3hwy20AllocateAlignedBytesEmPFPvS0_mES0_(n, alloc, opaque);
}
}  // extern "C"

// The global operator new and delete, every variant: malloc and free underneath (the real ones,
// so that an allocation counts once).
namespace {
void* new_or_null(size_t n, size_t align) {
  if (should_fail(alloc_hook::kNew)) return nullptr;
  if (n == 0) n = 1;
  if (align <= alignof(std::max_align_t)) return __real_malloc(n);
  void* p = nullptr;
  return __real_posix_memalign(&p, align, n) == 0 ? p : nullptr;
}
void* new_or_throw(size_t n, size_t align) {
  void* p = new_or_null(n, align);
  if (p == nullptr) throw std::bad_alloc();
  return p;
}
constexpr size_t kPlain = alignof(std::max_align_t);
size_t al(std::align_val_t a) { return static_cast<size_t>(a); }
}  // namespace

void* operator new(size_t n) { return new_or_throw(n, kPlain); }
void* operator new[](size_t n) { return new_or_throw(n, kPlain); }
void* operator new(size_t n, std::align_val_t a) { return new_or_throw(n, al(a)); }
void* operator new[](size_t n, std::align_val_t a) { return new_or_throw(n, al(a)); }
void* operator new(size_t n, const std::nothrow_t&) noexcept { return new_or_null(n, kPlain); }
void* operator new[](size_t n, const std::nothrow_t&) noexcept { return new_or_null(n, kPlain); }
void* operator new(size_t n, std::align_val_t a, const std::nothrow_t&) noexcept {
  return new_or_null(n, al(a));
}
void* operator new[](size_t n, std::align_val_t a, const std::nothrow_t&) noexcept {
  return new_or_null(n, al(a));
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, size_t) noexcept { std::free(p); }
void operator delete[](void* p, size_t) noexcept { std::free(p); }
void operator delete(void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete(void* p, size_t, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, size_t, std::align_val_t) noexcept { std::free(p); }
void operator delete(void* p, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete[](void* p, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete(void* p, std::align_val_t, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete[](void* p, std::align_val_t, const std::nothrow_t&) noexcept { std::free(p); }

namespace alloc_failure {
namespace {

// ---- The driver. ----

struct Builder {
  const char* name;
  std::function<Call()> make;
};

const std::vector<Builder>& builders() {
  static const std::vector<Builder> all = [] {
    std::vector<Builder> b = {
        {"compress_mean", [] { return compress_call(NSA_CMP_MEAN, false); }},
        {"compress_mlp", [] { return compress_call(NSA_CMP_MLP, false); }},
        {"fwd_all_outputs_win_kv", [] { return fwd_call(Fwd::kFull); }},
        {"fwd_cu_seqlens_bf16", [] { return fwd_call(Fwd::kVarlenBf16); }},
        {"fwd_slc_indices_in", [] { return fwd_call(Fwd::kGivenSelection); }},
        {"bwd_saved_state", [] { return bwd_call(Fwd::kFull, true); }},
        {"bwd_recompute_cu_seqlens_bf16", [] { return bwd_call(Fwd::kVarlenBf16, false); }},
        {"compress_bwd_mean", [] { return compress_call(NSA_CMP_MEAN, true); }},
        {"compress_bwd_mlp", [] { return compress_call(NSA_CMP_MLP, true); }},
        {"dense_fwd", [] { return dense_call(false); }},
        {"dense_bwd", [] { return dense_call(true); }},
        {"cmp_seqlens", [] { return cmp_seqlens_call(); }},
    };
    using K = CacheOp;
    const nsa_cmp_kind mean = NSA_CMP_MEAN, mlp = NSA_CMP_MLP;
    const nsa_dtype f32 = NSA_DTYPE_F32, bf16 = NSA_DTYPE_BF16;
    struct {
      const char* name;
      CacheOp op;
      nsa_cmp_kind kind;
      nsa_dtype dt;
    } const caches[] = {
        {"kv_cache_create_mean", K::kCreate, mean, f32},
        {"kv_cache_create_mlp_bf16", K::kCreate, mlp, bf16},
        {"kv_cache_append_mean", K::kAppend, mean, f32},
        {"kv_cache_append_mlp_bf16", K::kAppend, mlp, bf16},
        {"prefill_mean", K::kPrefill, mean, f32},
        {"prefill_mlp_bf16", K::kPrefill, mlp, bf16},
        {"decode_append_mean", K::kDecode, mean, f32},
        {"decode_append_mlp_bf16", K::kDecode, mlp, bf16},
        {"decode_mean", K::kDecodeNoAppend, mean, f32},
        {"dense_decode_append", K::kDenseDecode, mean, f32},
    };
    for (const auto& c : caches) {
      b.push_back({c.name, [c] { return cache_call(c.op, c.kind, c.dt); }});
    }
    return b;
  }();
  return all;
}

const char* kind_name(int kind) {
  static const char* const names[] = {"operator new",
                                      "malloc",
                                      "calloc",
                                      "realloc",
                                      "aligned_alloc",
                                      "posix_memalign",
                                      "hwy::AllocateAlignedBytes"};
  return kind >= 0 && kind < 7 ? names[kind] : "none";
}

struct Outcome {
  nsa_status status;
  int fired;     // the kind of the allocation that failed; -1: none did
  int64_t seen;  // allocations the call made
  std::string error;
};

// Runs the call with allocation k failing (k = 0: none, only counted).
Outcome run_failing(const Call& c, nsa_context* ctx, int64_t k) {
  alloc_hook::arm(k);
  const nsa_status st = c.run(ctx);
  alloc_hook::disarm();
  return {st, alloc_hook::fired.load(), alloc_hook::seen.load(), nsa_last_error(ctx)};
}

// The allocations to fail for a call that makes n: every one while there are a few hundred; the
// reference allocates per query (thousands), so then the first and last kEdge and kSpread spread
// between them. Last, n + 1: nothing fails, and the call must succeed.
std::vector<int64_t> schedule(int64_t n) {
  constexpr int64_t kAll = 400, kEdge = 60, kSpread = 60;
  std::vector<int64_t> ks;
  if (n <= kAll) {
    for (int64_t k = 1; k <= n; ++k) ks.push_back(k);
  } else {
    for (int64_t k = 1; k <= kEdge; ++k) ks.push_back(k);
    for (int64_t i = 1; i <= kSpread; ++i) {
      ks.push_back(kEdge + (n - 2 * kEdge) * i / (kSpread + 1));
    }
    for (int64_t k = n - kEdge + 1; k <= n; ++k) ks.push_back(k);
  }
  ks.push_back(n + 1);
  return ks;
}

std::string first_change(const Snapshot& before, const Snapshot& after) {
  for (size_t i = 0; i < before.size() && i < after.size(); ++i) {
    if (before[i] != after[i]) return before[i].first;
  }
  return before.size() == after.size() ? "" : "the snapshot's size";
}

// What the failures of one call came to.
struct Tally {
  std::set<int> kinds;  // the allocator kinds that failed
  int64_t failed = 0, absorbed = 0;
};

// Checks a call whose allocation failed (outcome o): NSA_ERR_OUT_OF_MEMORY, a message, nothing
// written (as `before`); or a failure the library absorbed, with results exactly as a clean
// run's. Records fatal failures in the running test.
void check_failed_call(const Call& call, const Outcome& o, const std::string& where,
                       nsa_status want, const Snapshot& before, const Snapshot& clean,
                       Tally* tally) {
  tally->kinds.insert(o.fired);
  if (o.status == want) {
    // Absorbed: a failure the call recovers from (a library's fallback path). Then the results
    // must be exactly a clean run's.
    ++tally->absorbed;
    ASSERT_EQ(first_change(clean, call.snapshot()), "") << where << ": absorbed, but wrong";
    call.reset();
    return;
  }
  ++tally->failed;
  ASSERT_EQ(o.status, NSA_ERR_OUT_OF_MEMORY)
      << where << ": " << nsa_status_name(o.status) << ": " << o.error;
  ASSERT_FALSE(o.error.empty()) << where << ": no message";
  const std::string changed = first_change(before, call.snapshot());
  ASSERT_EQ(changed, "") << where << ": the failed call changed " << changed;
}

using Param = std::tuple<int, nsa_backend, int>;  // builder, backend, threads

class AllocFailure : public testing::TestWithParam<Param> {};

TEST_P(AllocFailure, EveryFailedAllocationIsCleanOutOfMemory) {
  const auto [index, backend, threads] = GetParam();
  const Call call = builders()[index].make();
  auto ctx = context(backend, threads);
  const bool unsupported = call.ref_unsupported && backend == NSA_BACKEND_REF;
  const nsa_status want = unsupported ? NSA_ERR_UNSUPPORTED : NSA_OK;
  // The call's allocations, counted on a second clean run (the first may also build what the
  // process builds once), and what a clean run writes.
  int64_t n = 0;
  for (int rep = 0; rep < 2; ++rep) {
    call.reset();
    const Outcome o = run_failing(call, ctx.get(), 0);
    ASSERT_EQ(o.status, want) << nsa_status_name(o.status) << ": " << o.error;
    n = o.seen;
  }
  const Snapshot clean = call.snapshot();
  call.reset();
  const Snapshot before = call.snapshot();
  Tally tally;
  for (int64_t k : schedule(n)) {
    const Outcome o = run_failing(call, ctx.get(), k);
    const std::string where = "allocation " + std::to_string(k) + " of " + std::to_string(n) +
                              " (" + kind_name(o.fired) + ")";
    if (o.fired >= 0) {
      check_failed_call(call, o, where, want, before, clean, &tally);
      if (HasFatalFailure()) return;
      continue;
    }
    // Past the last allocation: the call succeeds. A cache keeps decode's scratch from an
    // earlier failed call that got past allocating it, so there the end may come sooner.
    if (!call.keeps_scratch) {
      EXPECT_EQ(k, n + 1) << where << " never came";
    }
    EXPECT_EQ(o.status, want) << nsa_status_name(o.status) << ": " << o.error;
    EXPECT_EQ(first_change(clean, call.snapshot()), "") << "the call after the failures";
    break;
  }
  if (!unsupported && backend == NSA_BACKEND_CPU) {
    for (int kind : call.must_fail) {
      EXPECT_TRUE(tally.kinds.count(kind)) << "no " << kind_name(kind) << " failed: no hook?";
    }
  }
  std::printf("[   alloc  ] %lld allocations; %lld failed one at a time, %lld of them absorbed\n",
              static_cast<long long>(n), static_cast<long long>(tally.failed + tally.absorbed),
              static_cast<long long>(tally.absorbed));
}

std::string param_name(const testing::TestParamInfo<Param>& info) {
  const auto [index, backend, threads] = info.param;
  return std::string(builders()[index].name) + "_" + nsa_backend_name(backend) + "_" +
         std::to_string(threads) + "t";
}

INSTANTIATE_TEST_SUITE_P(Calls, AllocFailure,
                         testing::Combine(testing::Range(0, int(builders().size())),
                                          testing::Values(NSA_BACKEND_REF, NSA_BACKEND_CPU),
                                          testing::Values(1, 2)),
                         param_name);

// The hook itself: every allocator it covers fails when told to, through the same references
// libnsa.a's objects make (called through volatile pointers, so the compiler keeps the calls).
TEST(AllocHook, EachHookedAllocatorFails) {
  void* (*volatile p_malloc)(size_t) = &malloc;
  void* (*volatile p_calloc)(size_t, size_t) = &calloc;
  void* (*volatile p_realloc)(void*, size_t) = &realloc;
  void* (*volatile p_aligned)(size_t, size_t) = &aligned_alloc;
  int (*volatile p_memalign)(void**, size_t, size_t) = &posix_memalign;
  void* (*volatile p_new)(size_t) = &::operator new;
  const std::pair<int, std::function<bool()>> probes[] = {
      {alloc_hook::kMalloc, [&] { return p_malloc(16) == nullptr; }},
      {alloc_hook::kCalloc, [&] { return p_calloc(4, 4) == nullptr; }},
      {alloc_hook::kRealloc, [&] { return p_realloc(nullptr, 16) == nullptr; }},
      {alloc_hook::kAlignedAlloc, [&] { return p_aligned(64, 64) == nullptr; }},
      {alloc_hook::kPosixMemalign,
       [&] {
         void* q = nullptr;
         return p_memalign(&q, 64, 64) != 0;
       }},
      {alloc_hook::kHwy, [] { return !hwy::AllocateAligned<float>(16); }},
      {alloc_hook::kNew,
       [&] {
         try {
           ::operator delete(p_new(16));
           return false;
         } catch (const std::bad_alloc&) {
           return true;
         }
       }},
  };
  for (const auto& [kind, fails] : probes) {
    alloc_hook::arm(1);
    const bool failed = fails();
    alloc_hook::disarm();
    EXPECT_TRUE(failed) << kind_name(kind);
    EXPECT_EQ(alloc_hook::fired.load(), kind) << kind_name(kind);
  }
}

}  // namespace
}  // namespace alloc_failure
