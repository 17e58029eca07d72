// Argument validation for the C API. Everything a kernel may assume is checked here, before any
// output is touched, and every failure names the argument (SPEC.md section 8).
#pragma once

#include "common/problem.h"
#include "common/status.h"

namespace nsa {

Status validate_config(const nsa_config& cfg);

// Checks `p` and builds the problem a backend runs. Reads cu_seqlens and slc_indices_in.
Status make_fwd_problem(const nsa_fwd_params& p, FwdProblem* out);
Status make_compress_problem(const nsa_compress_params& p, CompressProblem* out);

}  // namespace nsa
