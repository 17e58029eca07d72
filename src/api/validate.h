// Argument validation for the C API. Everything a kernel may assume is checked here, before any
// output is touched, and every failure names the argument (SPEC.md section 8).
#pragma once

#include <cstring>
#include <type_traits>
#include <vector>

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

enum class Role { kInput, kOutput };

// Checks presence, rank, shape, strides and dtype of one tensor, naming it in the message.
// `shape` entries of -1 accept any size; `dtypes` lists the accepted dtypes; an output must not
// overlap itself.
Status check_tensor(const char* name, const nsa_tensor& t, const std::vector<int64_t>& shape,
                    const std::vector<nsa_dtype>& dtypes, Role role);
// The same for an optional tensor: absent (NULL data) passes.
Status check_optional(const char* name, const nsa_tensor& t, const std::vector<int64_t>& shape,
                      const std::vector<nsa_dtype>& dtypes, Role role);

// Checks `p` and builds the problem a backend runs. Reads cu_seqlens and slc_indices_in.
Status make_fwd_problem(const nsa_fwd_params& p, FwdProblem* out);
Status make_compress_problem(const nsa_compress_params& p, CompressProblem* out);
Status make_dense_problem(const nsa_dense_fwd_params& p, DenseProblem* out);

}  // namespace nsa
