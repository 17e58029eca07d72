// Host-side helpers of the CUDA backend's launches: the grid of a (token, KV head) kernel, its
// shared memory, the stream, and CUDA errors as Status (library code never aborts).
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <memory>

#include "common/problem.h"
#include "common/status.h"

namespace nsa::cuda {

// A CUDA runtime error as a Status naming the call: out of memory as NSA_ERR_OUT_OF_MEMORY,
// anything else NSA_ERR_INTERNAL.
Status cuda_status(cudaError_t e, const char* what);

// The grid and dynamic shared memory of a kernel with one block per (row, KV head).
struct LaunchShape {
  dim3 grid;
  size_t smem = 0;
};
// NSA_ERR_UNSUPPORTED, naming `call`, when rows or heads exceed the grid's limits or smem_bytes
// exceeds what one block of the current device may have; raises the kernel's dynamic
// shared-memory limit when it needs more than the default 48 KiB.
Status launch_shape(const char* call, const void* kernel, int64_t smem_bytes, int64_t rows,
                    int64_t heads, LaunchShape* out);
// The dynamic shared memory one block of `kernel` may have on the current device (its opt-in
// limit less the kernel's static shared memory).
Status smem_limit(const char* call, const void* kernel, int64_t* limit);
// The status of the launches just enqueued (cudaGetLastError).
Status launch_status(const char* call);
// A cuBLAS status as nsa's, naming what failed (out of memory where cuBLAS says so).
Status cublas_status(cublasStatus_t s, const char* what);

template <typename Problem>
cudaStream_t stream_of(const Problem& pr) {
  return static_cast<cudaStream_t>(pr.stream);
}

// The context's device scratch (nsa_cuda.h, "Scratch"): one cudaMalloc'd buffer, grown on demand.
class DeviceWorkspace final : public Workspace {
 public:
  ~DeviceWorkspace() override;
  size_t size() const override { return bytes_; }
  void* data() const { return ptr_; }
  // Grows to at least `bytes` (the contents are not kept); on failure it stays as it was.
  Status reserve(size_t bytes);
  // The cuBLAS handle (mlp compression), created on first use, set to run on `stream` with this
  // workspace's own cuBLAS scratch when it has one (cublasSetStream resets cuBLAS to its default
  // pool, which may allocate during a call: a KV cache's steps must not).
  Status cublas(cudaStream_t stream, cublasHandle_t* out);
  // Gives the handle `bytes` of cuBLAS scratch of its own (a KV cache, at creation).
  Status reserve_cublas_scratch(size_t bytes);

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
  cublasHandle_t cublas_ = nullptr;
  void* cublas_ws_ = nullptr;
  size_t cublas_ws_bytes_ = 0;
};

// The workspace of a call's context, created on first use, holding at least `bytes`.
Status workspace(std::unique_ptr<Workspace>* slot, size_t bytes, DeviceWorkspace** out);

}  // namespace nsa::cuda
