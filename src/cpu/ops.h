// The CPU backend's ops, as its table (cpu_backend.cc) lists them. Each receives a validated
// problem (common/problem.h) and never re-validates it.
#pragma once

#include "common/problem.h"
#include "common/status.h"

namespace nsa::cpu {

Status forward(const FwdProblem& problem);              // forward.cc (SPEC 4)
Status compress(const CompressProblem& problem);        // compress.cc (SPEC 5)
Status dense_forward(const DenseProblem& problem);      // dense_fwd.cc
Status dense_backward(const DenseBwdProblem& problem);  // dense_bwd.cc
// backward.cc: nsa_bwd (SPEC 6).
Status backward(const BwdProblem& problem);
// compress_bwd.cc: nsa_compress_bwd (SPEC 5, 6), f32 accumulation, deterministic.
Status compress_backward(const CompressBwdProblem& problem);

}  // namespace nsa::cpu
