// The CUDA backend's ops, as its table (cuda_backend.cc) lists them. Each receives a validated
// problem (common/problem.h) whose pointers are device memory, enqueues its kernels on the
// problem's stream and returns without waiting (nsa_cuda.h).
#pragma once

#include "common/problem.h"
#include "common/status.h"

namespace nsa::cuda {

Status forward(const FwdProblem& problem);          // forward.cu (SPEC 4)
Status dense_forward(const DenseProblem& problem);  // forward.cu
Status compress(const CompressProblem& problem);    // compress.cu (SPEC 5)

}  // namespace nsa::cuda
