// One warp's tile products through mma.cuh's loads and mma16816, for test_cuda_mma.cu (on the
// device) and test_cuda_emu.cc (on the SIMT emulator): both compare them with plain products on
// the host, so a fragment layout that differs from the hardware's fails on the device, and one
// the emulator reads differently fails here. The operands are 16-bit bits; every warp of the
// block computes the same tiles and warp 0 writes them.
#pragma once

#include <vector>

#include "cuda/mma.cuh"

namespace mma_tile {

constexpr int kLd = 24;        // the kernels' padded row stride for 16 columns (k16_ld(16))
constexpr int kThreads = 128;  // the block: four warps, as the kernels run

// a [16][16] row major, keys [8][16] (row n, dims k), vals [16][8] (row k, dims n), all 16-bit
// bits; qk [16][8] = a keys^T and pv [16][8] = a vals, f32. smem holds 3 * 16 * kLd elements.
template <typename In>
__device__ void tile_block(const uint16_t* a, const uint16_t* keys, const uint16_t* vals, float* qk,
                           float* pv, uint16_t* smem) {
  uint16_t* sa = smem;
  uint16_t* sk = sa + 16 * kLd;
  uint16_t* sv = sk + 16 * kLd;
  for (int i = threadIdx.x; i < 16 * 16; i += kThreads) {
    sa[(i / 16) * kLd + i % 16] = a[i];
    if (i < 8 * 16) sk[(i / 16) * kLd + i % 16] = keys[i];
    if (i < 16 * 8) sv[(i / 8) * kLd + i % 8] = vals[i];
  }
  __syncthreads();
  const int lane = threadIdx.x % 32;
  uint32_t fa[4], fb[2];
  nsa::cuda::load_a(fa, sa, kLd, lane);
  float c1[4] = {0.0f, 0.0f, 0.0f, 0.0f}, c2[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  nsa::cuda::load_b_rows(fb, sk, kLd, lane);
  nsa::cuda::mma16816<In>(c1, fa, fb);
  nsa::cuda::load_b_cols(fb, sv, kLd, lane);
  nsa::cuda::mma16816<In>(c2, fa, fb);
  if (threadIdx.x < 32) {
    for (int i = 0; i < 4; ++i) {
      const int r = nsa::cuda::acc_row(lane) + 8 * (i / 2), c = nsa::cuda::acc_col(lane) + i % 2;
      qk[r * 8 + c] = c1[i];
      pv[r * 8 + c] = c2[i];
    }
  }
}

// Operands of small integers, distinct in every row and column (a transposed or shifted
// fragment changes the products), exact in bf16 and f16 and summed exactly in f32; the products
// they must give.
struct Tiles {
  std::vector<uint16_t> a, keys, vals;
  std::vector<float> qk, pv;
};
template <typename In>
Tiles make_tiles() {
  Tiles t;
  const auto val = [](int i, int j, int m) { return float((i * 7 + j * 3 + i * j) % m) - 5.0f; };
  for (int r = 0; r < 16; ++r) {
    for (int k = 0; k < 16; ++k) t.a.push_back(nsa::cuda::to16<In>(val(r, k, 11)));
  }
  for (int n = 0; n < 8; ++n) {
    for (int k = 0; k < 16; ++k) t.keys.push_back(nsa::cuda::to16<In>(val(n + 3, k, 13)));
  }
  for (int k = 0; k < 16; ++k) {
    for (int n = 0; n < 8; ++n) t.vals.push_back(nsa::cuda::to16<In>(val(k, n + 5, 9)));
  }
  for (int r = 0; r < 16; ++r) {
    for (int n = 0; n < 8; ++n) {
      float qk = 0.0f, pv = 0.0f;
      for (int k = 0; k < 16; ++k) {
        const float a = val(r, k, 11);
        qk += a * val(n + 3, k, 13);
        pv += a * val(k, n + 5, 9);
      }
      t.qk.push_back(qk);
      t.pv.push_back(pv);
    }
  }
  return t;
}

}  // namespace mma_tile
