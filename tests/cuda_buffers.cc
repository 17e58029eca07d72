// The CUDA buffer helper of the backend harness (backend_harness.h): device copies of the bytes a
// host view spans, strided gaps included, so that padding a kernel must not write comes back
// with the result and is checked like the host backends' own.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include "backend_harness.h"

namespace nsa_test {
namespace {

void cuda_free(void* p) { cudaFree(p); }

// A device copy of `bytes` host bytes (at least one byte allocated, so the pointer is never NULL
// for a present tensor of size 0).
BackendMemory device_copy(const void* host, int64_t bytes) {
  void* dev = nullptr;
  const cudaError_t e = cudaMalloc(&dev, static_cast<size_t>(bytes > 0 ? bytes : 1));
  EXPECT_EQ(e, cudaSuccess) << "cudaMalloc(" << bytes << "): " << cudaGetErrorString(e);
  if (e != cudaSuccess) return {};
  if (bytes > 0) {
    EXPECT_EQ(cudaMemcpy(dev, host, static_cast<size_t>(bytes), cudaMemcpyHostToDevice),
              cudaSuccess);
  }
  return BackendMemory(dev, cuda_free);
}

class CudaBuffers final : public BufferHelper {
 public:
  BackendTensor upload(const nsa_tensor& host_view) const override {
    BackendTensor t;
    t.desc = host_view;
    t.memory = device_copy(host_view.data, view_bytes(host_view));
    t.desc.data = t.memory.get();
    return t;
  }
  void download(const BackendTensor& t, const nsa_tensor& host_view) const override {
    EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess) << "a kernel failed";
    const int64_t bytes = view_bytes(host_view);
    if (bytes == 0) return;
    EXPECT_EQ(
        cudaMemcpy(host_view.data, t.desc.data, static_cast<size_t>(bytes), cudaMemcpyDeviceToHost),
        cudaSuccess);
  }
  BackendInts upload_ints(const int32_t* host, int64_t n) const override {
    BackendInts b;
    b.memory = device_copy(host, n * static_cast<int64_t>(sizeof(int32_t)));
    b.data = static_cast<const int32_t*>(b.memory.get());
    return b;
  }
};

}  // namespace

const BufferHelper& cuda_buffers() {
  static const CudaBuffers c;
  return c;
}

}  // namespace nsa_test
