// The backends' entry points, as the C API dispatches to them. Each receives a validated problem.
#pragma once

#include "common/problem.h"
#include "common/status.h"

namespace nsa {

namespace ref {
Status forward(const FwdProblem& problem);
Status compress(const CompressProblem& problem);
Status dense_forward(const DenseProblem& problem);
Status dense_backward(const DenseBwdProblem& problem);
Status backward(const BwdProblem& problem);
Status compress_backward(const CompressBwdProblem& problem);
}  // namespace ref

namespace cpu {
// Whether this build carries the CPU kernels.
bool available();
Status forward(const FwdProblem& problem);
Status compress(const CompressProblem& problem);
Status dense_forward(const DenseProblem& problem);
Status dense_backward(const DenseBwdProblem& problem);
// backward.cc: nsa_bwd (SPEC 6).
Status backward(const BwdProblem& problem);
// compress_bwd.cc: nsa_compress_bwd (SPEC 5, 6), f32 accumulation, deterministic.
Status compress_backward(const CompressBwdProblem& problem);
}  // namespace cpu

}  // namespace nsa
