// Argument validation for the C API. Everything a kernel may assume is checked here, before any
// output is touched, and every failure names the argument (SPEC.md section 8).
#pragma once

#include <cstring>
#include <type_traits>

#include "common/problem.h"
#include "common/status.h"

namespace nsa {

// The integer a C caller stored in an enum argument or field. C may store any int there, and
// loading an out-of-range value as the C++ enum type is undefined (UBSan: "load of value ... not a
// valid value"), so the bytes are copied out instead of loading the enum.
template <typename E>
int enum_value(const E& e) {
  std::underlying_type_t<E> v;
  static_assert(sizeof v == sizeof e);
  std::memcpy(&v, &e, sizeof v);
  return static_cast<int>(v);
}

Status validate_config(const nsa_config& cfg);

// Checks `p` and builds the problem a backend runs. Reads cu_seqlens and slc_indices_in.
Status make_fwd_problem(const nsa_fwd_params& p, FwdProblem* out);
Status make_compress_problem(const nsa_compress_params& p, CompressProblem* out);
Status make_dense_problem(const nsa_dense_fwd_params& p, DenseProblem* out);
// The dense backward's checks (validate_bwd.cc): the forward's inputs as nsa_dense_fwd checks
// them, then o, lse, d_o, the outputs and their aliasing.
Status make_dense_bwd_problem(const nsa_dense_bwd_params& p, DenseBwdProblem* out);
// The backward's checks (validate_bwd.cc): the forward's inputs as nsa_fwd / nsa_compress check
// them, then the saved selection, the incoming gradient, the outputs and their aliasing.
Status make_bwd_problem(const nsa_bwd_params& p, BwdProblem* out);
Status make_compress_bwd_problem(const nsa_compress_bwd_params& p, CompressBwdProblem* out);

}  // namespace nsa
