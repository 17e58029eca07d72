// Shared by the `nsa bench` commands: the keys a query attends, and robust timing.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "nsa/nsa.h"

// Progress of a run on stderr, one line as each figure starts (a 64k forward with its dense
// baseline takes minutes): stdout, with its table or --json rows, is unchanged.
inline void bench_progress(const char* what, int64_t T, int64_t batch = 0) {
  if (batch > 0) {
    std::fprintf(stderr, "nsa bench %s: T = %lld, batch %lld ...\n", what, (long long)T,
                 (long long)batch);
  } else {
    std::fprintf(stderr, "nsa bench %s: T = %lld ...\n", what, (long long)T);
  }
}

// Keys attended by the query at position t, summed over the three branches (SPEC 4).
inline double attended_keys(const nsa_config& c, int64_t t) {
  const double cmp = t + 1 >= c.cmp_block ? double((t + 1 - c.cmp_block) / c.cmp_stride + 1) : 0;
  const int64_t blocks = t / c.slc_block + 1;
  // All blocks when they fit in n; otherwise n blocks, the query's own (forced, partial) among
  // them when n_local >= 1.
  const double slc = blocks <= c.slc_count ? double(t + 1)
                     : c.slc_local >= 1
                         ? double(c.slc_count - 1) * c.slc_block + double(t % c.slc_block + 1)
                         : double(c.slc_count) * c.slc_block;
  const double win = double(std::min<int64_t>(c.window, t + 1));
  return cmp + slc + win;
}

// The median over `repeats` measurements of the mean time of `steps` calls of run, in ms, after
// one warm-up call (first-touch page faults and caches).
template <typename F>
double median_of_means_ms(int repeats, int steps, F&& run) {
  run();
  std::vector<double> ms;
  for (int r = 0; r < repeats; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int s = 0; s < steps; ++s) run();
    const auto t1 = std::chrono::steady_clock::now();
    ms.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count() / steps);
  }
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

// The options of `nsa bench` (forward and backward passes).
struct BenchOptions {
  std::string pass = "fwd", lengths = "4096,8192,16384,32768", dtype = "f32", bf16_math = "auto";
  int32_t threads = 0, repeats = 3;
  bool json = false, no_dense = false;
  int64_t hq = 16, hkv = 1, dk = 192, dv = 128;
};

template <typename F>
double median_ms(int repeats, F&& run) {
  run();  // warm-up: first-touch page faults and caches
  std::vector<double> ms;
  for (int r = 0; r < repeats; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    run();
    ms.push_back(
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

struct Buf {
  std::vector<uint16_t> bytes;  // bf16, or f32 as two halves
  nsa_tensor t{};
  Buf(nsa_dtype dt, std::vector<int64_t> shape, std::mt19937_64& rng, float lo, float hi) {
    int64_t n = 1;
    for (int64_t s : shape) n *= s;
    bytes.resize(static_cast<size_t>(n) * (dt == NSA_DTYPE_F32 ? 2 : 1) + 2);
    t = nsa_tensor_contiguous(bytes.data(), dt, int32_t(shape.size()), shape.data());
    std::uniform_real_distribution<float> u(lo, hi);
    for (int64_t i = 0; i < n; ++i) {
      const float f = u(rng);
      if (dt == NSA_DTYPE_F32) {
        reinterpret_cast<float*>(bytes.data())[i] = f;
      } else {
        uint32_t b;
        std::memcpy(&b, &f, 4);
        bytes[i] = uint16_t((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
      }
    }
  }
};

// The nsa_bf16_math named by --bf16-math (auto, f32, native, emulated).
inline nsa_bf16_math bf16_math_of(const std::string& name) {
  if (name == "f32") return NSA_BF16_MATH_F32;
  if (name == "native") return NSA_BF16_MATH_NATIVE;
  if (name == "emulated") return NSA_BF16_MATH_EMULATED;
  return NSA_BF16_MATH_AUTO;
}

// Sets ctx's bf16 arithmetic from --bf16-math; where this CPU cannot run it, says so on stderr
// (naming the command) and returns false.
inline bool apply_bf16_math(nsa_context* ctx, const std::string& name, const char* command) {
  if (nsa_context_set_bf16_math(ctx, bf16_math_of(name)) == NSA_OK) return true;
  std::fprintf(stderr, "%s: --bf16-math %s: %s\n", command, name.c_str(), nsa_last_error(ctx));
  return false;
}

// What a context's bf16 arithmetic means on this CPU, for the benchmark's header and rows.
inline const char* bf16_math_label(nsa_bf16_math math) {
  if (math == NSA_BF16_MATH_AUTO) math = nsa_bf16_math_auto();
  switch (math) {
    case NSA_BF16_MATH_NATIVE: return "native";
    case NSA_BF16_MATH_EMULATED: return "emulated";
    default: return "f32";
  }
}

// `nsa bench --pass bwd|fwdbwd` (cmd_bench_bwd.cc).
int run_bench_bwd(const BenchOptions& opt);
