// The random source of the API fuzzers. Two modes, one interface:
//   - seeded: a PRNG, for the fuzzers that run inside ctest (test_fuzz.cc, test_fuzz_decode.cc);
//   - driven: the bytes of a libFuzzer input (fuzz/), read as a stream of choices, so that a
//     mutation of the input changes the choices it encodes and coverage can guide the search.
//     Once the bytes run out, a PRNG seeded from them continues, so every input is a whole case
//     and the same input always gives the same case.
// Tensor contents come from a separate stream (values()): they do not steer validation, and
// drawing them from the input would spend its bytes on numbers instead of choices.
#pragma once

#include <cstddef>
#include <cstdint>
#include <limits>
#include <random>

namespace nsa_fuzz {

class Rng {
 public:
  using result_type = uint64_t;

  explicit Rng(uint64_t seed) : prng_(seed), values_(seed ^ 0x9e3779b97f4a7c15ull) {}
  Rng(const uint8_t* data, size_t size)
      : data_(data), size_(size), driven_(true), prng_(hash(data, size)), values_(1) {}

  static constexpr result_type min() { return 0; }
  static constexpr result_type max() { return std::numeric_limits<result_type>::max(); }
  result_type operator()() { return bits(8); }

  // A uniform integer in [lo, hi]; driven, it reads only the bytes the range needs.
  int64_t uniform(int64_t lo, int64_t hi) {
    if (!driven_) return std::uniform_int_distribution<int64_t>(lo, hi)(prng_);
    const uint64_t range = static_cast<uint64_t>(hi) - static_cast<uint64_t>(lo);
    int n = 1;
    while (n < 8 && (range >> (8 * n)) != 0) ++n;
    const uint64_t x = bits(n);
    const uint64_t r = range == max() ? x : x % (range + 1);
    return static_cast<int64_t>(static_cast<uint64_t>(lo) + r);
  }
  // True with probability p; driven, one byte.
  bool chance(double p) {
    if (!driven_) return std::uniform_real_distribution<double>(0, 1)(prng_) < p;
    return static_cast<double>(bits(1)) < p * 256.0;
  }
  // The stream for tensor contents.
  std::mt19937_64& values() { return values_; }
  // Bytes of the input used so far (driven mode), for the harness's statistics.
  size_t used() const { return pos_; }

 private:
  static uint64_t hash(const uint8_t* d, size_t n) {
    uint64_t h = 1469598103934665603ull;  // FNV-1a
    for (size_t i = 0; i < n; ++i) h = (h ^ d[i]) * 1099511628211ull;
    return h;
  }
  uint64_t bits(int n) {
    if (pos_ >= size_) {
      const uint64_t x = prng_();
      return n == 8 ? x : x & ((uint64_t{1} << (8 * n)) - 1);
    }
    uint64_t x = 0;
    for (int i = 0; i < n && pos_ < size_; ++i) x |= uint64_t{data_[pos_++]} << (8 * i);
    return x;
  }

  const uint8_t* data_ = nullptr;
  size_t size_ = 0, pos_ = 0;
  bool driven_ = false;
  std::mt19937_64 prng_, values_;
};

}  // namespace nsa_fuzz
