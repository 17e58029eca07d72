// Tensor elements on the device: f32 or bf16 storage, f32 arithmetic (bf16 widens exactly).
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

namespace nsa::cuda {

// Element loads, widened to f32 (bf16 is exact in f32).
__device__ __forceinline__ float ld(const float* p, int64_t i) { return p[i]; }
__device__ __forceinline__ float ld(const __nv_bfloat16* p, int64_t i) {
  return __bfloat162float(p[i]);
}

// An f32-or-bf16 tensor element, the dtype known only at run time (gates, outputs).
__device__ __forceinline__ float ld_any(const void* p, bool bf16, int64_t i) {
  return bf16 ? __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i])
              : static_cast<const float*>(p)[i];
}
__device__ __forceinline__ void st_any(void* p, bool bf16, int64_t i, float x) {
  if (bf16) {
    static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(x);
  } else {
    static_cast<float*>(p)[i] = x;
  }
}

}  // namespace nsa::cuda
