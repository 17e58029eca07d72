// Element conversions shared by every backend. bf16 is stored as uint16_t (the upper half of an
// IEEE float32); conversion to bf16 rounds to nearest even and keeps NaN a NaN. f16 below.
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

// IEEE binary16 (f16), stored as uint16_t. Widening is exact; narrowing rounds to nearest even,
// overflows to infinity, keeps NaN a (quiet) NaN and produces subnormals below 2^-14.
inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1fu) {
    bits = sign | 0x7f800000u | (man << 13);  // inf, or NaN with its payload
  } else if (exp != 0) {
    bits = sign | ((exp + 112u) << 23) | (man << 13);  // rebias 15 -> 127
  } else {
    // Zero or subnormal: man * 2^-24, exact in f32.
    float f = static_cast<float>(man) * (1.0f / 16777216.0f);
    std::memcpy(&bits, &f, sizeof bits);
    bits |= sign;
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline uint16_t f32_to_f16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t abs = bits & 0x7fffffffu;
  if (abs > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u | ((abs >> 13) & 0x3ffu));
  if (abs >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds past 65504
  if (abs >= 0x38800000u) {  // normal in f16 (>= 2^-14)
    const uint32_t rounded = abs + 0xfffu + ((abs >> 13) & 1u);  // half to even on bit 13
    return static_cast<uint16_t>(sign | ((rounded - (112u << 23)) >> 13));
  }
  // Subnormal or zero in f16: abs * 2^24 rounded to an integer (f32 addition rounds half to
  // even: adding 2^23 + the value puts its integer part in the mantissa's low bits).
  float a;
  std::memcpy(&a, &abs, sizeof a);
  const float shifted = a * 16777216.0f + 8388608.0f;
  uint32_t sb;
  std::memcpy(&sb, &shifted, sizeof sb);
  return static_cast<uint16_t>(sign | (sb - 0x4b000000u));
}

// Reads element `offset` (in elements) of a float-like buffer (f32, bf16 or f16) as double.
inline double load_as_double(const void* data, nsa_dtype dtype, int64_t offset) {
  if (dtype == NSA_DTYPE_BF16) return bf16_to_f32(static_cast<const uint16_t*>(data)[offset]);
  if (dtype == NSA_DTYPE_F16) return f16_to_f32(static_cast<const uint16_t*>(data)[offset]);
  return static_cast<const float*>(data)[offset];
}

// Writes `value` to element `offset` of a float-like buffer, rounding to its dtype (through f32
// first: the same bits as a backend that rounds its f32 result).
inline void store_from_double(void* data, nsa_dtype dtype, int64_t offset, double value) {
  if (dtype == NSA_DTYPE_BF16) {
    static_cast<uint16_t*>(data)[offset] = f32_to_bf16(static_cast<float>(value));
  } else if (dtype == NSA_DTYPE_F16) {
    static_cast<uint16_t*>(data)[offset] = f32_to_f16(static_cast<float>(value));
  } else {
    static_cast<float*>(data)[offset] = static_cast<float>(value);
  }
}

}  // namespace nsa
