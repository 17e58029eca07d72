// A libFuzzer target: one structured call of the C API per input (tests/fuzz_api.h and the
// headers beside it build the call from the input's bytes and check it against nsa.h's promises
// with GoogleTest assertions). NSA_FUZZ_CALL (nsa_fuzz::fuzz_<name>) selects the call at
// compile time, so each entry point gets its own binary, corpus and coverage
// (fuzz/CMakeLists.txt). A broken promise is a crash for libFuzzer: the assertion's message is
// printed, then the process aborts and libFuzzer saves the input. scripts/fuzz.sh builds and
// runs them.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>

#include "fuzz_api.h"
#include "fuzz_bwd.h"
#include "fuzz_compress_bwd.h"
#include "fuzz_config.h"
#include "fuzz_decode.h"
#include "fuzz_dense.h"

namespace {

void one_call(const uint8_t* data, size_t size) {
#if defined(NSA_FUZZ_READS_BYTES)  // the cache target reads the bytes itself (fuzz_decode.h)
  nsa_fuzz::NSA_FUZZ_CALL(data, size);
#else
  nsa_fuzz::Rng r(data, size);
  nsa_fuzz::NSA_FUZZ_CALL(r);
#endif
}

}  // namespace

// Cheaper calls than the ctest fuzzer's (fuzz_util.h, Budget): more executions per second.
extern "C" int LLVMFuzzerInitialize(int*, char***) {
  nsa_fuzz::Budget& b = nsa_fuzz::budget();
  b.max_T = 40;
  b.max_B = 2;
  b.max_D = 20;
  b.every_backend = false;
  // No comparison with the reference: an input-guided search drifts to near-cancelling sums,
  // where any fixed f32 tolerance fails without a bug. The seeded ctest fuzzer and the numeric
  // suites compare; these targets check the promises of nsa.h on every backend.
  b.compare_cost = 0;
  b.cache_ops = 6;
  b.max_capacity = 48;
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  one_call(data, size);
  // Outside a running test, GoogleTest records failures in its ad hoc result.
  if (::testing::Test::HasFailure()) {
    std::fprintf(stderr, "nsa fuzz: a promise of nsa.h was broken (the failure is above)\n");
    std::abort();
  }
  return 0;
}
