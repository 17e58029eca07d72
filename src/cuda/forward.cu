// The CUDA forward (SPEC 4) and the dense baseline over [B, T] batches, fixed-length or packed
// (cu_seqlens, read on the device): one block per (token, KV head) running query.cuh.
#include <cuda_runtime.h>

#include "cuda/device.h"
#include "cuda/ops.h"
#include "cuda/query.cuh"

namespace nsa::cuda {
namespace {

template <typename In>
__global__ void __launch_bounds__(kThreads) fwd_kernel(const FwdArgs a) {
  extern __shared__ float smem[];
  fwd_block<In>(a, smem);
}

template <typename In>
__global__ void __launch_bounds__(kThreads) dense_kernel(const DenseArgs a) {
  extern __shared__ float smem[];
  dense_block<In>(a, smem);
}

}  // namespace

Status forward(const FwdProblem& pr) {
  const nsa_fwd_params& p = pr.p;
  if (pr.B * pr.T == 0) return Status::ok();
  const FwdArgs a = fwd_args(pr);
  const bool bf16 = p.in.q.dtype == NSA_DTYPE_BF16;
  const void* fn = bf16 ? reinterpret_cast<const void*>(&fwd_kernel<__nv_bfloat16>)
                        : reinterpret_cast<const void*>(&fwd_kernel<float>);
  LaunchShape ls;
  NSA_RETURN_IF_ERROR(launch_shape("nsa_fwd", fn, nsa_smem_bytes(a.G, a.Dk, a.Dv, a.nblk, a.n),
                                   pr.B * pr.T, pr.Hkv, &ls));
  if (bf16) {
    fwd_kernel<__nv_bfloat16><<<ls.grid, kThreads, ls.smem, stream_of(pr)>>>(a);
  } else {
    fwd_kernel<float><<<ls.grid, kThreads, ls.smem, stream_of(pr)>>>(a);
  }
  return launch_status("nsa_fwd");
}

Status dense_forward(const DenseProblem& pr) {
  const nsa_dense_fwd_params& p = pr.p;
  if (pr.B * pr.T == 0) return Status::ok();
  const DenseArgs a = dense_args(pr);
  const bool bf16 = p.q.dtype == NSA_DTYPE_BF16;
  const void* fn = bf16 ? reinterpret_cast<const void*>(&dense_kernel<__nv_bfloat16>)
                        : reinterpret_cast<const void*>(&dense_kernel<float>);
  LaunchShape ls;
  NSA_RETURN_IF_ERROR(launch_shape("nsa_dense_fwd", fn, smem_floats(a.G, a.Dk, a.Dv) * 4,
                                   pr.B * pr.T, pr.Hkv, &ls));
  if (bf16) {
    dense_kernel<__nv_bfloat16><<<ls.grid, kThreads, ls.smem, stream_of(pr)>>>(a);
  } else {
    dense_kernel<float><<<ls.grid, kThreads, ls.smem, stream_of(pr)>>>(a);
  }
  return launch_status("nsa_dense_fwd");
}

}  // namespace nsa::cuda
