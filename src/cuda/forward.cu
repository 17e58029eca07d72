// The CUDA forward (SPEC 4) and the dense baseline over [B, T] batches, fixed-length or packed
// (cu_seqlens, read on the device): one block per (tile of tokens, KV head) running query.cuh
// (the dense baseline: one token a block).
#include <cuda_runtime.h>

#include "cuda/device.h"
#include "cuda/ops.h"
#include "cuda/query.cuh"

namespace nsa::cuda {
namespace {

// Two blocks an SM: all that the shared memory of a long sequence's block allows (about 100 KiB
// at G = 16, 64k; query.cuh). Saying so lets ptxas keep the 16-bit kernels' state in registers
// (about 215 of them) where it would otherwise cap them at 168 and spill some 400 bytes.
template <typename In>
__global__ void __launch_bounds__(kThreads, 2) fwd_kernel(const FwdArgs a) {
  extern __shared__ __align__(16) float smem[];  // 16: cp.async's chunk tiles (attend.cuh)
  fwd_block<In>(a, smem);
}

template <typename In>
__global__ void __launch_bounds__(kThreads) dense_kernel(const DenseArgs a) {
  extern __shared__ __align__(16) float smem[];  // 16: cp.async's chunk tiles (attend.cuh)
  dense_block<In>(a, smem);
}

}  // namespace

// One block per (token, KV head) of a [B, T] batch: the kernel for the inputs' dtype, its shape
// checked before the launch.
template <typename Args>
Status launch_tokens(const char* call, nsa_dtype dt, void (*const (&kernels)[3])(Args),
                     const Args& a, int64_t smem, int64_t tokens, int64_t heads, void* stream) {
  void (*kernel)(Args) = kernels[static_cast<int>(elem_of(dt))];
  LaunchShape ls;
  NSA_RETURN_IF_ERROR(
      launch_shape(call, reinterpret_cast<const void*>(kernel), smem, tokens, heads, &ls));
  kernel<<<ls.grid, kThreads, ls.smem, static_cast<cudaStream_t>(stream)>>>(a);
  return launch_status(call);
}

Status forward(const FwdProblem& pr) {
  if (pr.B * pr.T == 0) return Status::ok();
  void (*const kernels[3])(FwdArgs) = {fwd_kernel<float>, fwd_kernel<__nv_bfloat16>,
                                       fwd_kernel<__half>};  // Elem order
  // Positions per block as this device's shared memory allows (query.cuh, fwd_positions).
  int64_t limit = 0;
  NSA_RETURN_IF_ERROR(smem_limit(
      "nsa_fwd", reinterpret_cast<const void*>(kernels[static_cast<int>(elem_of(pr.p.in.q.dtype))]),
      &limit));
  const FwdArgs a = fwd_args(pr, limit);
  return launch_tokens<FwdArgs>("nsa_fwd", pr.p.in.q.dtype, kernels, a,
                                nsa_smem_bytes(a.G, a.Dk, a.Dv, a.nblk, a.n, a.P),
                                pr.B * fwd_tiles(a), pr.Hkv, pr.stream);
}

Status dense_forward(const DenseProblem& pr) {
  if (pr.B * pr.T == 0) return Status::ok();
  const DenseArgs a = dense_args(pr);
  void (*const kernels[3])(DenseArgs) = {dense_kernel<float>, dense_kernel<__nv_bfloat16>,
                                         dense_kernel<__half>};  // Elem order
  return launch_tokens<DenseArgs>("nsa_dense_fwd", pr.p.q.dtype, kernels, a,
                                  smem_floats(a.G, a.Dk, a.Dv) * 4, pr.B * pr.T, pr.Hkv, pr.stream);
}

}  // namespace nsa::cuda
