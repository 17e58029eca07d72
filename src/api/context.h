// The context behind the opaque nsa_context handle.
#pragma once

#include <memory>
#include <string>

#include "common/problem.h"
#include "nsa/nsa.h"

struct nsa_context {
  nsa_backend backend = NSA_BACKEND_AUTO;
  int32_t num_threads = 0;  // 0: OpenMP's default
  nsa_bf16_math bf16_math = NSA_BF16_MATH_AUTO;
  bool profiling = false;
  nsa_fwd_profile fwd_profile{};
  nsa_bwd_profile bwd_profile{};
  std::string last_error;
  void* cuda_stream = nullptr;                   // nsa_cuda.h: the CUDA backend's stream
  std::unique_ptr<nsa::Workspace> workspace;     // nsa_cuda.h: device scratch, kept between calls
};
