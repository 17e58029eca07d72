// The CUDA backend's ops, as its table (cuda_backend.cc) lists them. Each receives a validated
// problem (common/problem.h) whose pointers are device memory, enqueues its kernels on the
// problem's stream and returns without waiting (nsa_cuda.h).
#pragma once

#include "common/kv_cache.h"
#include "common/problem.h"
#include "common/status.h"

namespace nsa::cuda {

Status forward(const FwdProblem& problem);          // forward.cu (SPEC 4)
Status dense_forward(const DenseProblem& problem);  // forward.cu
Status compress(const CompressProblem& problem);    // compress.cu (SPEC 5)

// decode.cu: the KV cache in device memory (SPEC 7), its appends, prefill and decode steps.
Status kv_cache_create(const nsa_kv_cache_params& p, nsa_kv_cache* cache, void* stream);
Status kv_cache_append(nsa_kv_cache& c, int64_t seq, const nsa_tensor& k, const nsa_tensor& v,
                       int32_t num_threads, void* stream);
Status kv_cache_append_rows(nsa_kv_cache& c, const int64_t* seqs, int64_t S, const nsa_tensor& k,
                            const nsa_tensor& v, int32_t num_threads, void* stream);
Status kv_cache_prefill(nsa_kv_cache& c, int64_t seq, FwdProblem& fwd);
Status decode(const DecodeProblem& pr);  // DecodeProblem::dense: the dense baseline

// A CUDA cache's compressed tokens, [num_seqs, rows, Hkv, D] in device memory (the test harness
// reads them back to give the reference what decode read).
struct CacheCmpView {
  const void* k = nullptr;
  const void* v = nullptr;
  int64_t rows = 0;
};
CacheCmpView cache_cmp_view(const nsa_kv_cache& c);

}  // namespace nsa::cuda
