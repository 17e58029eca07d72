// Argument validation for the C API. Everything a kernel may assume is checked here, before any
// output is touched, and every failure names the argument (SPEC.md section 8).
#pragma once

#include <cstring>
#include <type_traits>
#include <vector>

#include "common/backend.h"
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

// Each checks `p` and builds the problem a backend runs: every descriptor on the host first, then
// the contents (cu_seqlens, caller indices) through `be`'s content checks (common/backend.h).
Status make_fwd_problem(const nsa_fwd_params& p, const Backend& be, FwdProblem* out);
Status make_compress_problem(const nsa_compress_params& p, const Backend& be, CompressProblem* out);
Status make_dense_problem(const nsa_dense_fwd_params& p, const Backend& be, DenseProblem* out);
// The dense backward's checks (validate_bwd.cc): the forward's inputs as nsa_dense_fwd checks
// them, then o, lse, d_o, the outputs and their aliasing.
Status make_dense_bwd_problem(const nsa_dense_bwd_params& p, const Backend& be,
                              DenseBwdProblem* out);
// The backward's checks (validate_bwd.cc): the forward's inputs as nsa_fwd / nsa_compress check
// them, then the saved selection, the incoming gradient, the outputs and their aliasing.
Status make_bwd_problem(const nsa_bwd_params& p, const Backend& be, BwdProblem* out);
Status make_compress_bwd_problem(const nsa_compress_bwd_params& p, const Backend& be,
                                 CompressBwdProblem* out);

// The KV-cache calls (validate_decode.cc). check_cache_seq: seq in [0, num_seqs), named `name`.
// check_append: k [n, Hkv, Dk] / v [n, Hkv, Dv] in `dtypes`, within the sequence's capacity.
Status check_cache_params(const nsa_kv_cache_params& p);
Status check_cache_seq(const nsa_kv_cache& c, int64_t seq, const char* name);
Status check_append(const nsa_kv_cache& c, int64_t seq, const nsa_tensor& k, const nsa_tensor& v,
                    int64_t n, const std::vector<nsa_dtype>& dtypes);
// Prefill as a validated forward of one sequence (q, k, v in the cache's dtype); its k_cmp/v_cmp
// describe the rows the cache will hold, with placeholder data the backend replaces.
Status make_prefill_problem(const nsa_kv_cache& c, const nsa_prefill_params& p, const Backend& be,
                            FwdProblem* out);
// One decode step's rows, new tokens, gates and outputs; the problem points at the cache.
Status make_decode_problem(nsa_kv_cache& c, const nsa_decode_params& p, DecodeProblem* out);
Status make_dense_decode_problem(nsa_kv_cache& c, const nsa_dense_decode_params& p,
                                 DecodeProblem* out);

}  // namespace nsa
