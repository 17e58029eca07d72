#include "common/bf16_math.h"

namespace nsa {
namespace {

bool has_avx512() {
#if defined(__x86_64__) || defined(__i386__)
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
#else
  return false;
#endif
}

bool has_avx512bf16() {
#if defined(__x86_64__) || defined(__i386__)
  return has_avx512() && __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

}  // namespace

bool bf16_math_runs(nsa_bf16_math math) {
  switch (math) {
    case NSA_BF16_MATH_AUTO:
    case NSA_BF16_MATH_F32: return true;
    case NSA_BF16_MATH_EMULATED: return has_avx512();
    case NSA_BF16_MATH_NATIVE: return has_avx512bf16();
  }
  return false;
}

nsa_bf16_math bf16_math_resolve(nsa_bf16_math math) {
  if (math != NSA_BF16_MATH_AUTO) return math;
  return has_avx512bf16() ? NSA_BF16_MATH_NATIVE : NSA_BF16_MATH_F32;
}

}  // namespace nsa
