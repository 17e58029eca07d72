// Host-side helpers of the CUDA backend's launches (device.h).
#include "cuda/device.h"

namespace nsa::cuda {

Status cuda_status(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return Status::ok();
  return error(e == cudaErrorMemoryAllocation ? NSA_ERR_OUT_OF_MEMORY : NSA_ERR_INTERNAL,
               cat(what, ": CUDA error ", cudaGetErrorName(e), " (", cudaGetErrorString(e), ")"));
}

Status smem_limit(const char* call, const void* kernel, int64_t* limit) {
  int dev = 0, optin = 0;
  NSA_RETURN_IF_ERROR(cuda_status(cudaGetDevice(&dev), call));
  NSA_RETURN_IF_ERROR(cuda_status(
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev), call));
  cudaFuncAttributes fa{};
  NSA_RETURN_IF_ERROR(cuda_status(cudaFuncGetAttributes(&fa, kernel), call));
  *limit = int64_t(optin) - int64_t(fa.sharedSizeBytes);  // static shared memory counts too
  return Status::ok();
}

Status launch_shape(const char* call, const void* kernel, int64_t smem_bytes, int64_t rows,
                    int64_t heads, LaunchShape* out) {
  if (rows > INT32_MAX || heads > 65535) {
    return error(NSA_ERR_UNSUPPORTED, cat(call,
                                          ": the CUDA backend launches one block per token "
                                          "and KV head: at most 2^31 - 1 tokens (B T = ",
                                          rows, ") and 65535 KV heads (", heads, ")"));
  }
  int64_t limit = 0;
  NSA_RETURN_IF_ERROR(smem_limit(call, kernel, &limit));
  if (smem_bytes > limit) {
    return error(NSA_ERR_UNSUPPORTED,
                 cat(call,
                     ": one thread block holds the group's queries and accumulators, two "
                     "key chunks and the block scores in shared memory: ",
                     smem_bytes,
                     " bytes for these sizes (G, Dk, Dv, T / slc_block), more "
                     "than the ",
                     limit, " this device allows"));
  }
  // The device's whole allowance, the same value on every call: a call never lowers what another
  // host thread's launch of the same kernel, between its check and its launch, relies on.
  NSA_RETURN_IF_ERROR(cuda_status(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(limit)), call));
  out->grid = dim3(static_cast<unsigned>(rows), static_cast<unsigned>(heads));
  out->smem = static_cast<size_t>(smem_bytes);
  return Status::ok();
}

Status launch_status(const char* call) { return cuda_status(cudaGetLastError(), call); }

DeviceWorkspace::~DeviceWorkspace() {
  if (cublas_ != nullptr) cublasDestroy(cublas_);
  if (cublas_ws_ != nullptr) cudaFree(cublas_ws_);
  if (ptr_ != nullptr) cudaFree(ptr_);
}

Status cublas_status(cublasStatus_t s, const char* what) {
  if (s == CUBLAS_STATUS_SUCCESS) return Status::ok();
  return error(s == CUBLAS_STATUS_ALLOC_FAILED ? NSA_ERR_OUT_OF_MEMORY : NSA_ERR_INTERNAL,
               cat("cuBLAS: ", what, " failed with status ", int(s)));
}

Status DeviceWorkspace::cublas(cudaStream_t stream, cublasHandle_t* out) {
  if (cublas_ == nullptr) {
    const Status st = cublas_status(cublasCreate(&cublas_), "creating a handle");
    if (!st.is_ok()) {
      cublas_ = nullptr;
      return st;
    }
  }
  NSA_RETURN_IF_ERROR(cublas_status(cublasSetStream(cublas_, stream), "cublasSetStream"));
  if (cublas_ws_ != nullptr) {
    NSA_RETURN_IF_ERROR(cublas_status(cublasSetWorkspace(cublas_, cublas_ws_, cublas_ws_bytes_),
                                      "cublasSetWorkspace"));
  }
  *out = cublas_;
  return Status::ok();
}

namespace {
// Grows the device buffer *ptr (*have bytes) to at least `bytes`, contents not kept; on failure
// it stays as it was. The old buffer may still be read by work queued on a stream: cudaFree
// waits for the device.
Status grow(void** ptr, size_t* have, size_t bytes, const char* what) {
  if (bytes <= *have) return Status::ok();
  void* p = nullptr;
  NSA_RETURN_IF_ERROR(cuda_status(cudaMalloc(&p, bytes), what));
  if (*ptr != nullptr) cudaFree(*ptr);
  *ptr = p;
  *have = bytes;
  return Status::ok();
}
}  // namespace

Status DeviceWorkspace::reserve_cublas_scratch(size_t bytes) {
  return grow(&cublas_ws_, &cublas_ws_bytes_, bytes, "cuBLAS scratch");
}

Status DeviceWorkspace::reserve(size_t bytes) { return grow(&ptr_, &bytes_, bytes, "workspace"); }

Status workspace(std::unique_ptr<Workspace>* slot, size_t bytes, DeviceWorkspace** out) {
  if (*slot == nullptr) *slot = std::make_unique<DeviceWorkspace>();
  auto* ws = dynamic_cast<DeviceWorkspace*>(slot->get());
  if (ws == nullptr) return error(NSA_ERR_INTERNAL, "workspace: not the CUDA backend's");
  NSA_RETURN_IF_ERROR(ws->reserve(bytes));
  *out = ws;
  return Status::ok();
}

}  // namespace nsa::cuda
