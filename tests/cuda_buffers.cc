// The CUDA buffer helper of the backend harness (backend_harness.h): device copies of the bytes a
// host view spans, strided gaps included, so that padding a kernel must not write comes back
// with the result and is checked like the host backends' own.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cstring>
#include <vector>

#include "backend_harness.h"
#include "common/kv_cache.h"
#include "cuda/ops.h"

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

void cuda_cache_cmp(const nsa_kv_cache& c, int64_t seq, int64_t b, int64_t row0, Tensor& k_cmp,
                    Tensor& v_cmp) {
  const nsa::cuda::CacheCmpView view = nsa::cuda::cache_cmp_view(c);
  const int64_t Tc = c.cmp_len(seq), esize = static_cast<int64_t>(nsa_dtype_size(c.dtype));
  for (int kind = 0; kind < 2; ++kind) {
    const int64_t D = kind == 0 ? c.Dk : c.Dv;
    // The sequence's rows [0, Tc) of [num_seqs, rows, Hkv, D], read back as the cache's dtype.
    std::vector<unsigned char> bytes(static_cast<size_t>(Tc * c.Hkv * D * esize));
    const char* src =
        static_cast<const char*>(kind == 0 ? view.k : view.v) + seq * view.rows * c.Hkv * D * esize;
    if (!bytes.empty()) {
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      ASSERT_EQ(cudaMemcpy(bytes.data(), src, bytes.size(), cudaMemcpyDeviceToHost), cudaSuccess);
    }
    copy_rows_into(bytes.data(), c.dtype, Tc, c.Hkv, D, b, row0, kind == 0 ? k_cmp : v_cmp);
  }
}

const BufferHelper& cuda_buffers() {
  static const CudaBuffers c;
  return c;
}

}  // namespace nsa_test
