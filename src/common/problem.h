// Validated problem descriptions: what the C API hands to a backend after every check passed.
// A backend may assume everything stated here; it never re-validates.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "nsa/nsa.h"

namespace nsa {

// Offset in elements of [i0, i1, i2, i3] in a tensor (unused trailing indices are 0).
inline int64_t offset_of(const nsa_tensor& t, int64_t i0, int64_t i1 = 0, int64_t i2 = 0,
                         int64_t i3 = 0) {
  return i0 * t.stride[0] + i1 * t.stride[1] + i2 * t.stride[2] + i3 * t.stride[3];
}

inline bool present(const nsa_tensor& t) { return t.data != nullptr; }

// The [T, H, D] rows of a [1, T, H, D] tensor (a prefill's prompt, as an append takes it).
inline nsa_tensor drop_batch(const nsa_tensor& t) {
  nsa_tensor r = t;
  r.ndim = 3;
  for (int i = 0; i < 3; ++i) r.shape[i] = t.shape[i + 1], r.stride[i] = t.stride[i + 1];
  r.shape[3] = r.stride[3] = 0;
  return r;
}

// One independent sequence: batch row `batch`, tokens [start, start + len) of that row, and
// compressed tokens [cmp_start, cmp_start + cmp_len). Without cu_seqlens there is one per batch
// row with start = cmp_start = 0.
struct Sequence {
  int64_t batch = 0;
  int64_t start = 0;
  int64_t len = 0;
  int64_t cmp_start = 0;
  int64_t cmp_len = 0;
};

// The sizes of an attention problem (SPEC 3's letters), shared by the forward, backward and dense
// problems. Tc is 0 for the dense ones.
struct AttnDims {
  int64_t B = 0, T = 0, Hq = 0, Hkv = 0, G = 0, Dk = 0, Dv = 0, Tc = 0;
};

// The sizes of a compression problem (SPEC 5): x [B, T, Hkv, D] to [B, Tc, Hkv, D]; Dh is the
// mlp's hidden width (0 for mean).
struct CmpDims {
  int64_t B = 0, T = 0, Hkv = 0, D = 0, Dh = 0, Tc = 0;
};

// Scratch a device backend keeps in a context between calls (nsa_cuda.h, "Scratch"): the context
// owns it, the backend that made it knows its type.
class Workspace {
 public:
  virtual ~Workspace() = default;
  virtual size_t size() const = 0;
};

// What every batched problem carries besides its sizes: the independent sequences (a device
// backend, which does not read cu_seqlens on the host, gets them only for fixed-length batches),
// and the context's settings.
struct Launch {
  std::vector<Sequence> seqs;
  int32_t num_threads = 0;  // 0: OpenMP's default
  // The context's bf16 arithmetic, resolved (never AUTO) and runnable on this CPU.
  nsa_bf16_math bf16_math = NSA_BF16_MATH_F32;
  void* stream = nullptr;                           // a device backend's stream (nsa_cuda.h)
  std::unique_ptr<Workspace>* workspace = nullptr;  // the context's device scratch
};

struct FwdProblem : AttnDims, Launch {
  // The caller's params, with k_slc/v_slc/k_win/v_win filled in from k/v when absent and
  // cfg.scale resolved to 1/sqrt(Dk) when it was 0.
  nsa_fwd_params p;
  nsa_fwd_profile* profile = nullptr;  // stage times to fill in, when profiling is on
};

struct CompressProblem : CmpDims, Launch {
  nsa_compress_params p;
};

struct BwdProblem : AttnDims, Launch {
  // The caller's params, with k_slc/v_slc/k_win/v_win filled in from k/v when absent and
  // cfg.scale resolved to 1/sqrt(Dk) when it was 0.
  nsa_bwd_params p;
  // Whether the forward was given the branch's own K/V: its gradients then go to dk_slc/dv_slc
  // (dk_win/dv_win) instead of adding up in dk/dv.
  bool slc_own_kv = false;
  bool win_own_kv = false;
  nsa_bwd_profile* profile = nullptr;  // stage times to fill in, when profiling is on
};

struct CompressBwdProblem : CmpDims, Launch {
  nsa_compress_bwd_params p;
};

struct DenseProblem : AttnDims, Launch {
  nsa_dense_fwd_params p;  // scale resolved to 1/sqrt(Dk) when it was 0
};

struct DenseBwdProblem : AttnDims, Launch {
  nsa_dense_bwd_params p;  // scale resolved to 1/sqrt(Dk) when it was 0
};

// One validated decode step (nsa_decode or nsa_dense_decode) on a cache, after any append: row s
// of q is the query at the last position of cache sequence seqs[s] (SPEC 7).
struct DecodeProblem {
  nsa_kv_cache* cache = nullptr;
  const nsa_decode_params* nsa = nullptr;  // the NSA step, or
  bool dense = false;                      // the dense baseline over the same cache
  nsa_tensor q{}, o{}, lse{};              // lse: the dense baseline's (optional)
  float scale = 0.0f;                      // resolved
  int64_t window = 0;                      // dense: 0 = every cached token
  int64_t S = 0, Hq = 0, G = 0;
  std::vector<int64_t> seqs;                    // the cache sequence of each row of q
  int32_t num_threads = 0;                      // 0: OpenMP's default
  nsa_bf16_math bf16_math = NSA_BF16_MATH_F32;  // resolved, as Launch::bf16_math
  void* stream = nullptr;                       // as Launch::stream
  std::unique_ptr<Workspace>* workspace = nullptr;
};

}  // namespace nsa
