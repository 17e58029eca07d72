// The validation building blocks that validate.cc, validate_bwd.cc and validate_decode.cc share:
// tensor descriptor checks, the packing rules, the hand-off of contents to the backend's checks,
// and the forward's input checks, which the backward reuses since it takes the forward's inputs
// (SPEC.md section 6).
#pragma once

#include <initializer_list>
#include <new>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "common/backend.h"
#include "common/problem.h"
#include "common/status.h"

namespace nsa {

std::string shape_str(const nsa_tensor& t);

enum class Role { kInput, kOutput };

// The float dtypes a data tensor may have (nsa.h, "f32, bf16 or f16"): each is widened exactly to
// f32 for the arithmetic and rounded back on output.
inline const std::vector<nsa_dtype> kFloatDtypes = {NSA_DTYPE_F32, NSA_DTYPE_BF16, NSA_DTYPE_F16};

// Checks presence, rank, shape, strides and dtype of one tensor. `shape` entries of -1 accept any
// size. `dtypes` lists the accepted dtypes.
Status check_tensor(const char* name, const nsa_tensor& t, const std::vector<int64_t>& shape,
                    const std::vector<nsa_dtype>& dtypes, Role role);
// check_tensor when `t` is present; an absent tensor passes.
Status check_optional(const char* name, const nsa_tensor& t, const std::vector<int64_t>& shape,
                      const std::vector<nsa_dtype>& dtypes, Role role);

// The descriptor rules of cu_seqlens / num_seqs, reading no entry (nsa.h, nsa_fwd_inputs): a
// fixed-length batch gets its B sequences here; a packed one gets them from packed_contents.
Status check_packing(const nsa_config& cfg, int64_t B, int64_t T, const int32_t* cu_seqlens,
                     int64_t num_seqs, std::vector<Sequence>* seqs);

// A named tensor argument, for the aliasing check and the content checks' messages.
using NamedTensor = std::pair<const char*, nsa_tensor>;

// The backend's content checks (common/backend.h), run after every descriptor check passed:
// a packed batch's sequences from cu_seqlens, and the rows its compressed tensors `cmp` (at
// most two) must have. A fixed-length call (cu_seqlens NULL) has nothing to check.
Status packed_contents(const Backend& be, const nsa_config& cfg, int64_t T,
                       const int32_t* cu_seqlens, int64_t num_seqs,
                       std::initializer_list<NamedTensor> cmp, std::vector<Sequence>* seqs);
// Every entry of the [B, T, Hkv, n] index tensor `ix` (named `name` in messages) is -1 or a
// visible block of its query, [0, t / l'].
Status indices_contents(const Backend& be, const char* name, const nsa_tensor& ix,
                        const nsa_config& cfg, const std::vector<Sequence>& seqs, int64_t Hkv);

// The rows a compressed tensor [B, Tc, H, D] must have: Tc of T for a fixed-length call; -1
// (any, compared by the content check) for a packed one.
struct CmpRows {
  const nsa_config* cfg = nullptr;
  int64_t T = 0;
  int64_t Tc = -1;
  bool derived = false;  // Tc is nsa_cmp_len(T), and a wrong row count is explained so
};
inline CmpRows cmp_rows(const nsa_config& cfg, int64_t T, bool packed) {
  return packed ? CmpRows{&cfg, T, -1, false} : CmpRows{&cfg, T, nsa_cmp_len(&cfg, T), true};
}
// check_tensor for a compressed tensor, a wrong row count explained (Tc is derived, SPEC 3).
Status check_cmp_tensor(const char* name, const nsa_tensor& t, const CmpRows& rows, int64_t B,
                        int64_t H, int64_t D, const std::vector<nsa_dtype>& dtypes, Role role);

// The forward's inputs in problem->p.in (config, q, k, v, per-branch K/V, cu_seqlens, k_cmp,
// v_cmp, gates): descriptors checked, the sizes filled in (Tc from k_cmp), absent per-branch K/V
// aliased to k/v. Then check_fwd_contents: the packed sequences, through the backend.
Status check_fwd_inputs(FwdProblem* problem);
Status check_fwd_contents(const Backend& be, FwdProblem* problem);
// The dense op's inputs in *p (q, k, v, cu_seqlens, scale, window): descriptors checked, the
// sizes of *problem filled in, p->scale resolved to 1/sqrt(Dk) when it was 0. Then
// dense_contents: the packed sequences, through the backend.
Status check_dense_inputs(nsa_dense_fwd_params* p, DenseProblem* problem);
Status dense_contents(const Backend& be, const int32_t* cu_seqlens, int64_t num_seqs, int64_t T,
                      std::vector<Sequence>* seqs);
// The compression's inputs in problem->p (config, kind, x, cu_seqlens, the mlp parameters);
// then its compressed tensor (`out`, or the backward's `dout`), which sets Tc; then the contents.
Status check_compress_inputs(CompressProblem* problem);
// phi's parameters (SPEC 5) pos, w1, b1, w2, b2 = phi[0..4] for H heads, blocks of l tokens of
// dimension D, named with `prefix`; sets *Dh from w1.
Status check_mlp_params(const char* prefix, const nsa_tensor* phi, int64_t H, int64_t l, int64_t D,
                        const std::vector<nsa_dtype>& dtypes, int64_t* Dh);
Status check_compressed_rows(const char* name, const nsa_tensor& t, Role role,
                             CompressProblem* problem);
Status compress_contents(const Backend& be, const char* cmp_name, const nsa_tensor& cmp,
                         CompressProblem* problem);

// No output shares memory with another output or with an input. Conservative: the memory spans
// (first to last element) must be disjoint. Absent tensors are skipped.
Status check_no_aliasing(const std::vector<NamedTensor>& outputs,
                         const std::vector<NamedTensor>& inputs);

}  // namespace nsa
