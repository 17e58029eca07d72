// The SIMT emulator itself (simt_emu.h), which test_cuda_emu.cc runs the CUDA kernels' block code
// on: its tensor-core tile through mma.cuh's loads (test_cuda_mma checks the device's), its
// cp.async model, and its report of a barrier that not every thread reaches.
#include <gtest/gtest.h>

#include <cstdint>
#include <stdexcept>
#include <vector>

// Last: the emulator redefines CUDA's qualifiers and threadIdx for the device code after it.
#include "simt_emu.h"
//
#include "cuda/async_copy.cuh"
#include "mma_tile.cuh"

namespace {

// The emulator's tensor-core tile (simt_emu.h) through mma.cuh's loads gives the plain products,
// as test_cuda_mma checks the device's.
template <typename In>
void expect_emulated_tiles(const char* name) {
  SCOPED_TRACE(name);
  const mma_tile::Tiles t = mma_tile::make_tiles<In>();
  std::vector<float> qk(128, -1.0f), pv(128, -1.0f);
  auto& m = simt_emu::Machine::get();
  m.launch({1, 1, 1}, 3 * 16 * mma_tile::kLd * 2, [&] {
    mma_tile::tile_block<In>(t.a.data(), t.keys.data(), t.vals.data(), qk.data(), pv.data(),
                             reinterpret_cast<uint16_t*>(m.smem()));
  });
  EXPECT_EQ(qk, t.qk);
  EXPECT_EQ(pv, t.pv);
}

TEST(CudaEmuMma, TileProductsMatchTheHost) {
  expect_emulated_tiles<__nv_bfloat16>("bf16");
  expect_emulated_tiles<__half>("f16");
}

// The emulator's cp.async: a copy is not visible before its wait, is visible to the block after
// the wait and a barrier, and a copy never waited for or misaligned fails the launch.
TEST(CudaEmu, AsyncCopiesLandAtTheWait) {
  auto& m = simt_emu::Machine::get();
  std::vector<uint4> src(128);
  for (unsigned i = 0; i < 128; ++i) src[i] = make_uint4(i, i + 1, i + 2, i + 3);
  std::vector<unsigned> before(128, 7), after(128, 7);
  m.launch({1, 1, 1}, 128 * 16, [&] {
    uint4* sm = reinterpret_cast<uint4*>(m.smem());
    const unsigned t = threadIdx.x;
    sm[t] = make_uint4(0, 0, 0, 0);
    nsa::cuda::cp_async16(&sm[t], &src[t]);
    nsa::cuda::cp_async_commit();
    before[t] = sm[t].y;
    nsa::cuda::cp_async_wait<0>();
    __syncthreads();
    after[t] = sm[(t + 1) % 128].y;
  });
  for (unsigned i = 0; i < 128; ++i) {
    EXPECT_EQ(before[i], 0u) << i;
    EXPECT_EQ(after[i], (i + 1) % 128 + 1) << i;
  }
  EXPECT_THROW(m.launch({1, 1, 1}, 128 * 16,
                        [&] {
                          nsa::cuda::cp_async16(m.smem() + 4 * threadIdx.x, &src[threadIdx.x]);
                          nsa::cuda::cp_async_commit();
                        }),
               std::runtime_error);
  EXPECT_THROW(m.launch({1, 1, 1}, 128 * 16 + 4,
                        [&] {
                          nsa::cuda::cp_async16(m.smem() + 1 + 4 * threadIdx.x, &src[threadIdx.x]);
                          nsa::cuda::cp_async_commit();
                          nsa::cuda::cp_async_wait<0>();
                        }),
               std::runtime_error);
}

// The emulator itself: a barrier that only some threads reach is reported, not hung on.
TEST(CudaEmu, DivergentBarrierIsReported) {
  auto& m = simt_emu::Machine::get();
  EXPECT_THROW(m.launch({1, 1, 1}, 0,
                        [] {
                          if (threadIdx.x < 64) __syncthreads();
                        }),
               std::runtime_error);
}

}  // namespace
