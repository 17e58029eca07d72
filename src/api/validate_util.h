// The validation building blocks that validate.cc and validate_bwd.cc share: tensor checks,
// sequence lists, index checks and the forward's input checks, which the backward reuses since it
// takes the forward's inputs (SPEC.md section 6).
#pragma once

#include <new>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "common/problem.h"
#include "common/status.h"

namespace nsa {

// Concatenates the arguments into a message. A stream that fails to allocate sets its badbit
// instead of throwing; that becomes std::bad_alloc here (so NSA_ERR_OUT_OF_MEMORY), never a
// silently truncated message.
template <typename... Args>
std::string cat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  if (!os) throw std::bad_alloc();
  return os.str();
}

std::string shape_str(const nsa_tensor& t);

enum class Role { kInput, kOutput };

// Checks presence, rank, shape, strides and dtype of one tensor. `shape` entries of -1 accept any
// size. `dtypes` lists the accepted dtypes.
Status check_tensor(const char* name, const nsa_tensor& t, const std::vector<int64_t>& shape,
                    const std::vector<nsa_dtype>& dtypes, Role role);
// check_tensor when `t` is present; an absent tensor passes.
Status check_optional(const char* name, const nsa_tensor& t, const std::vector<int64_t>& shape,
                      const std::vector<nsa_dtype>& dtypes, Role role);

// Builds the sequence list from cu_seqlens (or from B rows of T tokens).
Status make_sequences(const nsa_config& cfg, int64_t B, int64_t T, const int32_t* cu_seqlens,
                      int64_t num_seqs, std::vector<Sequence>* seqs);
// Rows of the compressed tensors: Tc of T, or the per-sequence Tc summed when packed.
int64_t total_cmp_len(const nsa_config& cfg, int64_t T, const std::vector<Sequence>& seqs,
                      bool packed);
// Adds how Tc was derived to a shape error on a compressed tensor's row count.
Status explain_cmp_rows(Status s, const nsa_tensor& t, int64_t Tc, const nsa_config& cfg,
                        int64_t T, int64_t num_seqs, bool packed);
// Every entry of the [B, T, Hkv, n] index tensor `ix` (named `name` in messages) is -1 or a
// visible block of its query, [0, t / l'].
Status check_indices(const char* name, const nsa_tensor& ix, const nsa_config& cfg,
                     const std::vector<Sequence>& seqs, int64_t Hkv);

// The forward's inputs in problem->p (config, q, k, v, per-branch K/V, cu_seqlens, k_cmp, v_cmp,
// gates): checked, the sizes and sequences filled in, absent per-branch K/V aliased to k/v.
Status check_fwd_inputs(FwdProblem* problem);
// The dense op's inputs in *p (q, k, v, cu_seqlens, scale, window): checked, the sizes and
// sequences of *problem filled in, p->scale resolved to 1/sqrt(Dk) when it was 0.
Status check_dense_inputs(nsa_dense_fwd_params* p, DenseProblem* problem);
// The compression's inputs in problem->p (config, kind, x, cu_seqlens, the mlp parameters).
Status check_compress_inputs(CompressProblem* problem);

// A named tensor argument, for the aliasing check.
using NamedTensor = std::pair<const char*, nsa_tensor>;
// No output shares memory with another output or with an input. Conservative: the memory spans
// (first to last element) must be disjoint. Absent tensors are skipped.
Status check_no_aliasing(const std::vector<NamedTensor>& outputs,
                         const std::vector<NamedTensor>& inputs);

}  // namespace nsa
