// The tensor-core fragment layout on the device: mma.cuh's loads and mma16816 give the plain
// products of small-integer tiles, bf16 and f16 (mma_tile.cuh). Run first on a GPU machine
// (scripts/gpu-check.sh): every 16-bit kernel rests on this layout, and test_cuda_emu checks the
// kernels on the CPU against the same layout, so a failure here says the emulator's reading of
// the PTX ISA, not a kernel, is what is wrong. Skipped with a message where no device is.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <vector>

#include "mma_tile.cuh"

namespace {

template <typename In>
__global__ void tile_kernel(const uint16_t* a, const uint16_t* keys, const uint16_t* vals,
                            float* qk, float* pv) {
  __shared__ uint32_t smem[3 * 16 * mma_tile::kLd / 2];  // 4-byte aligned: fragment words
  mma_tile::tile_block<In>(a, keys, vals, qk, pv, reinterpret_cast<uint16_t*>(smem));
}

template <typename T>
T* to_device(const std::vector<T>& h) {
  T* d = nullptr;
  EXPECT_EQ(cudaMalloc(&d, h.size() * sizeof(T)), cudaSuccess);
  EXPECT_EQ(cudaMemcpy(d, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice), cudaSuccess);
  return d;
}

template <typename In>
void expect_tiles(const char* name) {
  SCOPED_TRACE(name);
  const mma_tile::Tiles t = mma_tile::make_tiles<In>();
  uint16_t* a = to_device(t.a);
  uint16_t* keys = to_device(t.keys);
  uint16_t* vals = to_device(t.vals);
  float* qk = to_device(std::vector<float>(128, -1.0f));
  float* pv = to_device(std::vector<float>(128, -1.0f));
  tile_kernel<In><<<1, mma_tile::kThreads>>>(a, keys, vals, qk, pv);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  std::vector<float> got_qk(128), got_pv(128);
  ASSERT_EQ(cudaMemcpy(got_qk.data(), qk, 512, cudaMemcpyDeviceToHost), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(got_pv.data(), pv, 512, cudaMemcpyDeviceToHost), cudaSuccess);
  EXPECT_EQ(got_qk, t.qk) << "q k^T through load_a / load_b_rows";
  EXPECT_EQ(got_pv, t.pv) << "p v through load_a / load_b_cols";
  for (void* p : {static_cast<void*>(a), static_cast<void*>(keys), static_cast<void*>(vals),
                  static_cast<void*>(qk), static_cast<void*>(pv)}) {
    cudaFree(p);
  }
}

TEST(CudaMma, TileProductsMatchTheHost) {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
    GTEST_SKIP() << "no CUDA device here: this case runs on a GPU machine (scripts/gpu-check.sh)";
  }
  expect_tiles<__nv_bfloat16>("bf16");
  expect_tiles<__half>("f16");
}

}  // namespace
