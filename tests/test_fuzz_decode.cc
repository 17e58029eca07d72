// A seeded, randomized fuzzer of the KV cache and decode API inside ctest: the cache sessions of
// fuzz_decode.h (which says what each checks), drawn from a PRNG. The libFuzzer target
// fuzz_cache (fuzz/) runs the same sessions from its inputs.
// NSA_FUZZ_ITERS (operations; default ~2 s in Release) and NSA_FUZZ_SEED give longer runs.
#include <gtest/gtest.h>

#include <cstdio>
#include <cstdlib>
#include <map>

#include "fuzz_decode.h"

namespace {

int64_t env_int(const char* name, int64_t fallback) {
  const char* s = std::getenv(name);
  return s != nullptr && *s != '\0' ? std::strtoll(s, nullptr, 10) : fallback;
}

TEST(FuzzDecode, RandomOperationsKeepTheInvariants) {
  const int64_t ops = env_int("NSA_FUZZ_ITERS", 1500);
  const uint64_t seed = static_cast<uint64_t>(env_int("NSA_FUZZ_SEED", 777));
  nsa_fuzz::Fuzz f(seed);
  std::map<std::string, int64_t> counts;
  int64_t done = 0;
  while (done < ops) {
    SCOPED_TRACE("seed " + std::to_string(seed) + " op " + std::to_string(done));
    ASSERT_NO_FATAL_FAILURE(nsa_fuzz::fuzz_cache_session(f, ops, counts, &done));
  }
  for (const auto& [name, n] : counts) std::printf("%s: %lld\n", name.c_str(), (long long)n);
  EXPECT_GT(counts["NSA_OK"], ops / 4);  // the fuzzer exercises success, not only errors
}

}  // namespace
