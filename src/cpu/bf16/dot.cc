// The two variants of bf16/dot-inl.h, and the CPU check that picks them.
#include "cpu/bf16/dot.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#define NSA_HAVE_BF16_KERNELS 1
#endif

// GCC 12 warns inside its own _mm512_slli_epi32 (an undefined pass-through operand it reads as
// uninitialised); nothing of ours is uninitialised.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace nsa::cpu::bf16 {
#if NSA_HAVE_BF16_KERNELS
namespace native {
#define NSA_BF16_NATIVE 1
#include "cpu/bf16/dot-inl.h"    // NOLINT(build/include)
#include "cpu/bf16/lanes-inl.h"  // NOLINT(build/include)
#undef NSA_BF16_NATIVE
}  // namespace native
namespace emulated {
#define NSA_BF16_NATIVE 0
#include "cpu/bf16/dot-inl.h"    // NOLINT(build/include)
#include "cpu/bf16/lanes-inl.h"  // NOLINT(build/include)
#undef NSA_BF16_NATIVE
}  // namespace emulated

namespace {

constexpr Kernels kNative = {native::to_pairs,       native::scores,
                             native::accumulate,     native::accumulate_row,
                             native::lane_scores,    native::lane_accumulate,
                             native::row_scores,     native::row_accumulate};
constexpr Kernels kEmulated = {emulated::to_pairs,       emulated::scores,
                               emulated::accumulate,     emulated::accumulate_row,
                               emulated::lane_scores,    emulated::lane_accumulate,
                               emulated::row_scores,     emulated::row_accumulate};

}  // namespace

const Kernels* kernels(nsa_bf16_math math) {
  if (math == NSA_BF16_MATH_NATIVE) return &kNative;
  if (math == NSA_BF16_MATH_EMULATED) return &kEmulated;
  return nullptr;
}
#else
const Kernels* kernels(nsa_bf16_math) { return nullptr; }  // x86 only: F32 elsewhere
#endif

}  // namespace nsa::cpu::bf16

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
