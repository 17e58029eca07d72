// bf16 arithmetic on the CPU (the bf16 products of the dense and NSA forwards, f32 accumulation):
// the instructions of AVX512_BF16 where the CPU has them, an emulation of the same arithmetic
// with AVX-512F (for tests on CPUs without them), chosen per call from nsa_bf16_math.
#pragma once

#include <cstdint>

#include "nsa/nsa.h"

namespace nsa::cpu::bf16 {

// The kernels of one variant (dot-inl.h has the shapes and layouts).
struct Kernels {
  void (*to_pairs)(const float* x, int64_t n, uint32_t* out);
  void (*scores)(const uint32_t* qp, int64_t rows, int64_t Dk2, const uint32_t* kt, float scale,
                 float* s);
  void (*accumulate)(const uint32_t* pp, int64_t rows, int64_t nk2, const uint32_t* vt, int64_t DvP,
                     float* o);
  void (*accumulate_row)(const float* p, int64_t j0, int64_t j1, const uint32_t* vt, int64_t DvP,
                         float* o);
  // The NSA forward's heads-in-lanes products (lanes-inl.h).
  void (*lane_scores)(const uint32_t* qa, const uint32_t* qb, int64_t GP, int64_t Dk2,
                      const uint32_t* kp, int64_t tiles, float scale, float* sa, float* sb);
  void (*lane_accumulate)(float* pa, float* pb, int64_t GP, const uint32_t* vp, int64_t ldv,
                          int64_t Dv, int64_t j0, int64_t j1, float* oa, float* ob);
  // The NSA forward's keys-in-lanes products (stacked rows; lanes-inl.h).
  void (*row_scores)(const uint32_t* xT, int64_t ld, int64_t rows, const int32_t* roff,
                     const uint32_t* kp, int64_t Dk2, int nt, float scale, float* out,
                     int64_t ldo);
  void (*row_accumulate)(const float* p, int64_t ldp, int64_t rows, const uint32_t* vp,
                         int64_t ldv, int64_t j0, int64_t j1, float* o, int64_t ldo,
                         uint32_t* pp);
};

// NATIVE or EMULATED (the caller checked nsa::bf16_math_runs); nullptr for any other value.
const Kernels* kernels(nsa_bf16_math math);

}  // namespace nsa::cpu::bf16
