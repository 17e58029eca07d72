// A seeded, randomized fuzzer of the C API on every available backend, inside ctest: the
// structured calls of fuzz_api.h (nsa_fwd, nsa_compress, nsa_cmp_seqlens and the context
// setters; it says what each checks), fuzz_bwd.h (nsa_bwd), fuzz_compress_bwd.h
// (nsa_compress_bwd), fuzz_dense.h (nsa_dense_fwd, nsa_dense_bwd) and fuzz_config.h
// (nsa_config_validate, nsa_cmp_len, nsa_tensor_contiguous), drawn from a PRNG. The
// coverage-guided targets in fuzz/ run the same calls from libFuzzer's inputs.
// NSA_FUZZ_ITERS (default 5000: about 10 s in Release on 2 cores) and NSA_FUZZ_SEED set a longer
// run; iteration i uses seed NSA_FUZZ_SEED + i, so NSA_FUZZ_SEED=<printed seed> NSA_FUZZ_ITERS=1
// replays one failing case. NSA_FUZZ_ONLY=<name> (fwd, compress, misc, bwd, compress_bwd, dense,
// dense_bwd, config) runs that call alone in every iteration, for a long run of one entry point.
#include <gtest/gtest.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "fuzz_api.h"
#include "fuzz_bwd.h"
#include "fuzz_compress_bwd.h"
#include "fuzz_config.h"
#include "fuzz_dense.h"

namespace {
using namespace nsa_fuzz;

int64_t env_int(const char* name, int64_t fallback) {
  const char* s = std::getenv(name);
  return s != nullptr && *s != '\0' ? std::strtoll(s, nullptr, 10) : fallback;
}

int64_t failures_so_far() {
  return ::testing::UnitTest::GetInstance()->current_test_info()->result()->total_part_count();
}

// The structured calls, by the name NSA_FUZZ_ONLY takes, with the wall time each took.
struct Entry {
  const char* name;
  void (*call)(Rng&);
  double secs;
};
std::vector<Entry>& entries() {
  static std::vector<Entry> e = {{"fwd", fuzz_fwd, 0},
                                 {"compress", fuzz_compress, 0},
                                 {"misc", fuzz_misc, 0},
                                 {"bwd", fuzz_bwd, 0},
                                 {"compress_bwd", fuzz_compress_bwd, 0},
                                 {"dense", fuzz_dense, 0},
                                 {"dense_bwd", fuzz_dense_bwd, 0},
                                 {"config", fuzz_config, 0}};
  return e;
}
void timed(const char* name, Rng& r) {
  for (Entry& e : entries()) {
    if (std::string(e.name) != name) continue;
    const auto t0 = std::chrono::steady_clock::now();
    e.call(r);
    e.secs += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }
}

// One iteration: a forward or a compression call, then, each with its own probability, the
// other entry points. Their shares give them about half of the default run's time (the backward
// costs a forward and two backwards per valid call). A seed replays its case only with the fuzz
// headers it was found with: any change to how they draw gives it another case.
void iteration(Rng& r, const std::string& only) {
  if (!only.empty()) return timed(only.c_str(), r);
  timed(chance(r, 0.65) ? "fwd" : "compress", r);
  if (chance(r, 0.1)) timed("misc", r);
  if (chance(r, 0.25)) timed("bwd", r);
  if (chance(r, 0.2)) timed("compress_bwd", r);
  if (chance(r, 0.15)) timed("dense", r);
  if (chance(r, 0.15)) timed("dense_bwd", r);
  if (chance(r, 0.3)) timed("config", r);
}

TEST(Fuzz, Api) {
  const int64_t iters = env_int("NSA_FUZZ_ITERS", 5000);
  const uint64_t seed = static_cast<uint64_t>(env_int("NSA_FUZZ_SEED", 20250211));
  const char* only_env = std::getenv("NSA_FUZZ_ONLY");  // one call alone, e.g. "bwd"
  const std::string only = only_env != nullptr ? only_env : "";
  bool known = only.empty();
  for (const Entry& e : entries()) known = known || only == e.name;
  ASSERT_TRUE(known) << "NSA_FUZZ_ONLY=" << only << ": no such call";
  const auto t0 = std::chrono::steady_clock::now();
  int64_t failed_iters = 0, done = 0;
  for (int64_t i = 0; i < iters && failed_iters < 3; ++i, ++done) {
    const uint64_t s = seed + static_cast<uint64_t>(i);
    SCOPED_TRACE("replay: NSA_FUZZ_SEED=" + std::to_string(s) + " NSA_FUZZ_ITERS=1" +
                 (only.empty() ? "" : " NSA_FUZZ_ONLY=" + only));
    Rng r(s);
    const int64_t before = failures_so_far();
    iteration(r, only);
    if (failures_so_far() != before) ++failed_iters;
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf(
      "[fuzz] seed %llu: %lld iterations, %lld API calls in %.2f s (%.0f calls/s, %.0f "
      "iterations/s); %lld cpu-vs-ref comparisons, %lld near-tied selections\n",
      static_cast<unsigned long long>(seed), static_cast<long long>(done),
      static_cast<long long>(exec_count()), secs, exec_count() / secs, done / secs,
      static_cast<long long>(compare_count()), static_cast<long long>(tie_count()));
  for (const auto& [name, n] : status_counts())
    std::printf("[fuzz]   %-26s %lld\n", name.c_str(), static_cast<long long>(n));
  for (const Entry& e : entries()) std::printf("[fuzz]   time in %-14s %.2f s\n", e.name, e.secs);
  EXPECT_EQ(failed_iters, 0) << "failing iterations (stopped after 3)";
  // The generator must reach both sides: enough runs give every status it can produce, and a
  // good share of valid cases small enough for the comparison with the reference.
  if (done >= 500 && only.empty()) {
    EXPECT_GT(compare_count(), done / 10)
        << "too few valid cases reached the cpu-vs-ref comparison";
    for (const char* name :
         {"NSA_OK", "NSA_ERR_NULL_POINTER", "NSA_ERR_INVALID_CONFIG", "NSA_ERR_INVALID_SHAPE",
          "NSA_ERR_INVALID_STRIDE", "NSA_ERR_INVALID_DTYPE", "NSA_ERR_INVALID_SEQLENS",
          "NSA_ERR_INVALID_INDEX", "NSA_ERR_INVALID_ARGUMENT"}) {
      EXPECT_GT(status_counts()[name], 0) << name << " never produced";
    }
  }
}

}  // namespace
