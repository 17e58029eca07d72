// Which bf16 arithmetic this CPU runs (nsa_bf16_math, nsa.h): a property of the machine, read by
// the API (validation, AUTO) and by the CPU kernels.
#pragma once

#include "nsa/nsa.h"

namespace nsa {

// Whether this CPU runs `math`: AUTO and F32 always; EMULATED with AVX-512 F, BW, DQ and VL;
// NATIVE with those and AVX512_BF16.
bool bf16_math_runs(nsa_bf16_math math);

// AUTO resolved on this CPU: NATIVE where it runs, else F32.
nsa_bf16_math bf16_math_resolve(nsa_bf16_math math);

}  // namespace nsa
