// The arguments of the CUDA compression kernels (compress.cu), filled on the host from a
// validated problem: plain values, passed to the kernels by value.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "common/status.h"
#include "cuda/elem.h"
#include "nsa/nsa.h"

namespace nsa::cuda {

struct CmpArgs {
  const void* x = nullptr;  // [B, T, Hkv, D]
  Elem x_el = Elem::kF32;
  int64_t xs0 = 0, xs1 = 0, xs2 = 0;
  void* out = nullptr;  // [B, Tc, Hkv, D] (packed: [1, sum of Tc, Hkv, D])
  Elem out_el = Elem::kF32;
  int64_t os0 = 0, os1 = 0, os2 = 0;
  const int32_t* cu = nullptr;  // device memory; nullptr: B fixed-length sequences
  int64_t S = 0, T = 0, D = 0;
  int64_t Tc = 0;    // fixed length: compressed rows to produce per batch row
  int64_t row0 = 0;  // fixed length: the first of them (a cache appends rows row0 .. row0 + Tc)
  int64_t rows = 0;  // compressed rows to produce: B Tc, or out's rows when packed
  int l = 0, d = 0;
};

// mlp (SPEC 5): the sizes of phi's parameters, one set per KV head.
struct MlpShape {
  int64_t H = 0;
  int l = 0;
  int64_t D = 0, Dh = 0;
};

class DeviceWorkspace;

// Enqueues the mean compression of a.rows rows for `heads` KV heads (compress.cu).
Status launch_mean(const CmpArgs& a, int64_t heads, cudaStream_t stream);

// mlp, in three parts so that a cache widens its parameters once (decode.cu) and nsa_compress on
// every call: floats of the widened parameters (pos, w1, b1, w2, b2, each [H][...] contiguous),
// floats of the intermediates for `rows` rows, the widening, and phi over a.rows rows (gather,
// two cuBLAS GEMMs batched over heads, bias and relu, scatter; ws lends its cuBLAS handle).
int64_t mlp_weight_floats(const MlpShape& m);
int64_t mlp_scratch_floats(const MlpShape& m, int64_t rows);
Status widen_mlp(const MlpShape& m, const nsa_tensor& pos, const nsa_tensor& w1,
                 const nsa_tensor& b1, const nsa_tensor& w2, const nsa_tensor& b2, float* dst,
                 cudaStream_t stream);
Status mlp_rows(const CmpArgs& a, const MlpShape& m, const float* weights, float* scratch,
                DeviceWorkspace* ws, cudaStream_t stream);

inline CmpArgs cmp_args(const nsa_config& cfg, const nsa_tensor& x, const nsa_tensor& out,
                        const int32_t* cu, int64_t num_seqs, int64_t B, int64_t T) {
  CmpArgs a;
  a.x = x.data;
  a.x_el = elem_of(x.dtype);
  a.xs0 = x.stride[0], a.xs1 = x.stride[1], a.xs2 = x.stride[2];
  a.out = out.data;
  a.out_el = elem_of(out.dtype);
  a.os0 = out.stride[0], a.os1 = out.stride[1], a.os2 = out.stride[2];
  a.cu = cu;
  a.S = num_seqs;
  a.T = T;
  a.D = x.shape[3];
  a.l = cfg.cmp_block;
  a.d = cfg.cmp_stride;
  a.Tc = T >= a.l ? (T - a.l) / a.d + 1 : 0;
  a.rows = cu != nullptr ? out.shape[1] : B * a.Tc;
  return a;
}

}  // namespace nsa::cuda
