// Element conversions shared by every backend. bf16 is stored as uint16_t (the upper half of an
// IEEE float32); conversion to bf16 rounds to nearest even and keeps NaN a NaN.
#pragma once

#include <cstdint>
#include <cstring>

#include "nsa/nsa.h"

namespace nsa {

inline float bf16_to_f32(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline uint16_t f32_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  if ((bits & 0x7f800000u) == 0x7f800000u && (bits & 0x007fffffu) != 0) {
    return static_cast<uint16_t>((bits >> 16) | 0x0040u);  // quiet NaN, sign kept
  }
  uint32_t rounding = 0x7fffu + ((bits >> 16) & 1u);  // round half to even
  return static_cast<uint16_t>((bits + rounding) >> 16);
}

// Reads element `offset` (in elements) of a float-like buffer as double.
inline double load_as_double(const void* data, nsa_dtype dtype, int64_t offset) {
  if (dtype == NSA_DTYPE_BF16) return bf16_to_f32(static_cast<const uint16_t*>(data)[offset]);
  return static_cast<const float*>(data)[offset];
}

// Writes `value` to element `offset` of a float-like buffer, rounding to its dtype.
inline void store_from_double(void* data, nsa_dtype dtype, int64_t offset, double value) {
  if (dtype == NSA_DTYPE_BF16) {
    static_cast<uint16_t*>(data)[offset] = f32_to_bf16(static_cast<float>(value));
  } else {
    static_cast<float*>(data)[offset] = static_cast<float>(value);
  }
}

}  // namespace nsa
