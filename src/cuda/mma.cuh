// Tensor-core tiles for the 16-bit kernels: one warp's D = A B + C with mma.sync m16n8k16
// (sm_80 and newer), bf16 or f16 operands, f32 accumulation, and the loads of its fragments from
// 16-bit matrices in shared memory. Where each lane's registers sit in the tiles is the PTX ISA's
// layout for this shape ("Matrix Fragments for mma.m16n8k16"): lane = 4 r + c, r = lane / 4 its
// row group and c = lane % 4 its pair of columns. The SIMT emulator (tests/simt_emu.h) gives
// mma16816 the same meaning on the CPU, and test_cuda_mma checks that meaning against the device.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "nsa's CUDA kernels use mma.sync on bf16 and f16: build for sm_80 or newer"
#endif

namespace nsa::cuda {

// Whether a kernel's input type takes the tensor-core path (bf16 and f16; f32 stays on the
// CUDA cores, exact to f32 as the reference asks of it).
template <typename In>
constexpr bool kMma = sizeof(In) == 2;

// An f32 rounded to nearest even into In's bits, and In's bits widened (exact).
template <typename In>
__host__ __device__ __forceinline__ uint16_t to16(float x) {
  if constexpr (std::is_same_v<In, __half>) {
    return __half_as_ushort(__float2half_rn(x));
  } else {
    return __bfloat16_as_ushort(__float2bfloat16_rn(x));
  }
}
template <typename In>
__host__ __device__ __forceinline__ float from16(uint16_t b) {
  if constexpr (std::is_same_v<In, __half>) {
    return __half2float(__ushort_as_half(b));
  } else {
    return __bfloat162float(__ushort_as_bfloat16(b));
  }
}

// A 16-bit element's bits.
__host__ __device__ __forceinline__ uint16_t bits16(__nv_bfloat16 x) {
  return __bfloat16_as_ushort(x);
}
__host__ __device__ __forceinline__ uint16_t bits16(__half x) { return __half_as_ushort(x); }

// Two 16-bit elements in one register: the lower-indexed one in the low half (PTX's packing).
__device__ __forceinline__ uint32_t pack(uint16_t lo, uint16_t hi) {
  return uint32_t(lo) | uint32_t(hi) << 16;
}
// Two adjacent 16-bit elements of shared memory (p 4-byte aligned).
__device__ __forceinline__ uint32_t word(const uint16_t* p) {
#if defined(__CUDA_ARCH__)
  return *reinterpret_cast<const uint32_t*>(p);
#else
  uint32_t w;
  std::memcpy(&w, p, 4);
  return w;
#endif
}

// 16 bytes (16-byte aligned) at once: the zero padding of a key chunk's tiles.
__device__ __forceinline__ void store16B(void* p, uint4 w) {
#if defined(__CUDA_ARCH__)
  *reinterpret_cast<uint4*>(p) = w;
#else
  std::memcpy(p, &w, 16);
#endif
}

// c += a b for one warp: a a 16x16 tile (row major), b a 16x8 tile, c 16x8 in f32. Every lane
// of the warp calls it together (mma.sync.aligned).
template <typename In>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4],
                                         const uint32_t (&b)[2]) {
#if defined(NSA_SIMT_EMU)
  simt_emu::Machine::get().mma(c, a, b, std::is_same_v<In, __half>);
#elif defined(__CUDA_ARCH__)
  if constexpr (std::is_same_v<In, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#endif
}

// The A fragment of the 16x16 tile at p of a row-major matrix (row stride ld, even): rows r and
// r + 8, columns 2c, 2c + 1 and those + 8.
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const uint16_t* p, int ld, int lane) {
  const int r = lane / 4, c = 2 * (lane % 4);
  a[0] = word(p + r * ld + c);
  a[1] = word(p + (r + 8) * ld + c);
  a[2] = word(p + r * ld + c + 8);
  a[3] = word(p + (r + 8) * ld + c + 8);
}

// The B fragment of a 16x8 tile (k by n) stored n-major at p: element (k, n) at p[n * ld + k],
// as keys are stored (row n a key, k its dims) for scores = q k^T.
__device__ __forceinline__ void load_b_rows(uint32_t (&b)[2], const uint16_t* p, int ld, int lane) {
  const int n = lane / 4, k = 2 * (lane % 4);
  b[0] = word(p + n * ld + k);
  b[1] = word(p + n * ld + k + 8);
}

// The B fragment of a 16x8 tile stored k-major at p: element (k, n) at p[k * ld + n], as values
// are stored (row k a key, n its dims) for o = p v.
__device__ __forceinline__ void load_b_cols(uint32_t (&b)[2], const uint16_t* p, int ld, int lane) {
  const int n = lane / 4, k = 2 * (lane % 4);
  b[0] = pack(p[k * ld + n], p[(k + 1) * ld + n]);
  b[1] = pack(p[(k + 8) * ld + n], p[(k + 9) * ld + n]);
}

// Where lane's accumulators sit in the 16x8 tile: c[0], c[1] at row acc_row, columns acc_col and
// acc_col + 1; c[2], c[3] at row acc_row + 8, the same columns.
__device__ __forceinline__ int acc_row(int lane) { return lane / 4; }
__device__ __forceinline__ int acc_col(int lane) { return 2 * (lane % 4); }

}  // namespace nsa::cuda
