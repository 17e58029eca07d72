// A float tensor's element type as the CUDA kernels test it at run time (elem.cuh loads and
// stores it); host code fills it in from the descriptor's dtype.
#pragma once

#include <cstdint>

#include "nsa/nsa.h"

namespace nsa::cuda {

enum class Elem : uint8_t { kF32, kBf16, kF16 };

inline Elem elem_of(nsa_dtype dt) {
  return dt == NSA_DTYPE_BF16 ? Elem::kBf16 : dt == NSA_DTYPE_F16 ? Elem::kF16 : Elem::kF32;
}

}  // namespace nsa::cuda
