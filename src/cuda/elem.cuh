// Tensor elements on the device: f32, bf16 or f16 storage, f32 arithmetic (bf16 and f16 widen
// exactly; outputs round to nearest even).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "cuda/elem.h"

namespace nsa::cuda {

// Element loads, widened to f32 (the kernels' In types).
__device__ __forceinline__ float ld(const float* p, int64_t i) { return p[i]; }
__device__ __forceinline__ float ld(const __nv_bfloat16* p, int64_t i) {
  return __bfloat162float(p[i]);
}
__device__ __forceinline__ float ld(const __half* p, int64_t i) { return __half2float(p[i]); }

// The Elem of a kernel's input type.
template <typename In>
constexpr Elem elem_v = std::is_same_v<In, __half>          ? Elem::kF16
                        : std::is_same_v<In, __nv_bfloat16> ? Elem::kBf16
                                                            : Elem::kF32;

// A tensor element whose dtype is known only at run time (queries, gates, outputs).
__device__ __forceinline__ float ld_any(const void* p, Elem e, int64_t i) {
  switch (e) {
    case Elem::kBf16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    case Elem::kF16: return __half2float(static_cast<const __half*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}
__device__ __forceinline__ void st_any(void* p, Elem e, int64_t i, float x) {
  switch (e) {
    case Elem::kBf16: static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(x); break;
    case Elem::kF16: static_cast<__half*>(p)[i] = __float2half_rn(x); break;
    default: static_cast<float*>(p)[i] = x;
  }
}

}  // namespace nsa::cuda
