// The seam between the C API and the backends: one table of entry points per backend. src/api
// checks every descriptor on the host, builds a problem (common/problem.h) and calls the table's
// entry; a backend never re-validates descriptors. A null entry is a call the backend does not
// have: the API answers NSA_ERR_UNSUPPORTED naming the backend and the call.
//
// Adding a backend: implement the entries it has, export one `const Backend& backend()` from its
// folder (src/<name>/), and list it in src/api/backends.cc. Nothing else in src/api changes.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "common/kv_cache.h"
#include "common/problem.h"
#include "common/status.h"

namespace nsa {

// The variable-length arguments whose contents a backend checks (nsa.h, "Where memory lives"):
// cu_seqlens [S + 1] packing T tokens, and the compressed tensors given with them (up to two:
// k_cmp and v_cmp, or a compression's out / dout; name nullptr: none), whose rows must be the
// compressed tokens the sequences imply.
struct PackedArgs {
  struct Rows {
    const char* name = nullptr;
    int64_t rows = 0;
  };
  const nsa_config* cfg = nullptr;
  const int32_t* cu_seqlens = nullptr;
  int64_t num_seqs = 0;
  int64_t T = 0;
  Rows cmp[2];
};

// Caller-supplied selection indices [B, T, Hkv, n], named `name`, over the sequences `seqs`.
struct IndexArgs {
  const char* name = nullptr;
  const nsa_tensor* indices = nullptr;
  const nsa_config* cfg = nullptr;
  const std::vector<Sequence>* seqs = nullptr;
  int64_t Hkv = 0;
};

struct Backend {
  nsa_backend id = NSA_BACKEND_AUTO;
  const char* name = nullptr;
  bool (*available)() = nullptr;  // compiled in and, for a device backend, a device present

  // Content checks, run after every descriptor check of a call passed. `packed` fills the
  // sequence list of a packed batch from cu_seqlens; `indices` checks caller indices.
  Status (*packed)(const PackedArgs& a, std::vector<Sequence>* seqs) = nullptr;
  Status (*indices)(const IndexArgs& a) = nullptr;

  // Ops on validated problems (nsa.h states what each computes).
  Status (*forward)(const FwdProblem& pr) = nullptr;
  Status (*backward)(const BwdProblem& pr) = nullptr;
  Status (*compress)(const CompressProblem& pr) = nullptr;
  Status (*compress_backward)(const CompressBwdProblem& pr) = nullptr;
  Status (*dense_forward)(const DenseProblem& pr) = nullptr;
  Status (*dense_backward)(const DenseBwdProblem& pr) = nullptr;

  // The KV cache (SPEC 7). cache_create receives a handle whose common fields are set and
  // attaches its storage (a device backend copies mlp parameters on `stream`, the context's);
  // cache_append appends rows [0, n) of k [n, Hkv, Dk] / v [n, Hkv, Dv] (on the context's thread
  // count, or, for a device backend, its stream) (checked to fit) to sequence seq and compresses
  // what they complete, leaving the storage as it was on failure (the API restores the lengths);
  // prefill appends the prompt of `fwd` (a validated forward of one sequence whose k_cmp/v_cmp the
  // backend supplies from the cache) to an empty sequence and runs its forward; decode runs one
  // step (DecodeProblem::dense: the dense baseline).
  Status (*cache_create)(const nsa_kv_cache_params& p, nsa_kv_cache* cache, void* stream) = nullptr;
  Status (*cache_append)(nsa_kv_cache& cache, int64_t seq, const nsa_tensor& k, const nsa_tensor& v,
                         int32_t num_threads, void* stream) = nullptr;
  // Optional, a decode step's appends at once: row r of k [S, Hkv, Dk] / v [S, Hkv, Dv] to
  // sequence seqs[r] (distinct, none full; checked), as cache_append would append each, and with
  // its failure rule. Without it the API appends the rows one by one through cache_append; a
  // device backend has it so that a step's appends cost a few launches, not a few per row.
  Status (*cache_append_rows)(nsa_kv_cache& cache, const int64_t* seqs, int64_t S,
                              const nsa_tensor& k, const nsa_tensor& v, int32_t num_threads,
                              void* stream) = nullptr;
  Status (*prefill)(nsa_kv_cache& cache, int64_t seq, FwdProblem& fwd) = nullptr;
  Status (*decode)(const DecodeProblem& pr) = nullptr;
  Status (*dense_decode)(const DecodeProblem& pr) = nullptr;

  // A device backend: grows the context's workspace (*slot, created on first use) to `bytes`
  // (nsa_context_reserve_cuda_workspace).
  Status (*reserve_workspace)(std::unique_ptr<Workspace>* slot, size_t bytes) = nullptr;
};

// The content checks of every host-memory backend (REF, CPU): host_checks.cc. host_sequences
// is host_packed without T and the compressed rows (nsa_cmp_seqlens has neither).
Status host_sequences(const nsa_config& cfg, const int32_t* cu_seqlens, int64_t num_seqs,
                      std::vector<Sequence>* seqs);
Status host_packed(const PackedArgs& a, std::vector<Sequence>* seqs);
Status host_indices(const IndexArgs& a);

namespace ref {
const Backend& backend();  // src/ref/ref_backend.cc
}
namespace cpu {
const Backend& backend();  // src/cpu/cpu_backend.cc
}
#ifdef NSA_HAVE_CUDA
namespace cuda {
const Backend& backend();  // src/cuda/cuda_backend.cc
int32_t device_count();    // 0 without a driver or a device
Status reserve_workspace(std::unique_ptr<Workspace>* slot, size_t bytes);
}  // namespace cuda
#endif

}  // namespace nsa
