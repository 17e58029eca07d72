// The CUDA backend's device code run on the CPU by the SIMT emulator (simt_emu.h), against the
// float64 reference: the forward's blocks (query.cuh: cmp, block scores in shared memory, top-n,
// slc, win, gates) and the dense baseline's, on awkward shapes (T below and around the blocks,
// G in {1, 3, 16}, Dk != Dv and odd, strided views, packed sequences, bf16 inputs and outputs,
// caller indices). This runs where no GPU is: it checks the kernels' arithmetic and indexing and
// that every barrier is reached by every thread, not races or speed (simt_emu.h says what it
// cannot see); the same cases run on a real device through the parameterised suites.
#include <gtest/gtest.h>

#include <sstream>
#include <string>
#include <vector>

#include "api/validate.h"
#include "backend_harness.h"
#include "common/backend.h"
#include "decode_util.h"
#include "test_util.h"
// Last: the emulator redefines CUDA's qualifiers and threadIdx for the device code after it.
#include "simt_emu.h"
//
#include "cuda/query.cuh"

namespace {
using namespace nsa_test;

constexpr double kEps = 1.0 / (1 << 24);  // f32 unit roundoff

// Runs the forward's blocks of validated params p on the emulator, as forward.cu launches them.
void emu_forward(const nsa_fwd_params& p) {
  nsa::FwdProblem pr;
  const nsa::Status st = nsa::make_fwd_problem(p, nsa::cpu::backend(), &pr);
  ASSERT_TRUE(st.is_ok()) << st.message;
  if (pr.B * pr.T == 0) return;
  const nsa::cuda::FwdArgs a = nsa::cuda::fwd_args(pr);
  const size_t smem = size_t(nsa::cuda::nsa_smem_bytes(a.G, a.Dk, a.Dv, a.nblk, a.n));
  auto& m = simt_emu::Machine::get();
  const simt_emu::Dim grid{unsigned(pr.B * pr.T), unsigned(pr.Hkv), 1};
  if (p.in.q.dtype == NSA_DTYPE_BF16) {
    m.launch(grid, smem, [&] { nsa::cuda::fwd_block<__nv_bfloat16>(a, m.smem()); });
  } else {
    m.launch(grid, smem, [&] { nsa::cuda::fwd_block<float>(a, m.smem()); });
  }
}

void emu_dense(const nsa_dense_fwd_params& p) {
  nsa::DenseProblem pr;
  const nsa::Status st = nsa::make_dense_problem(p, nsa::cpu::backend(), &pr);
  ASSERT_TRUE(st.is_ok()) << st.message;
  const nsa::cuda::DenseArgs a = nsa::cuda::dense_args(pr);
  const size_t smem = size_t(4 * nsa::cuda::smem_floats(a.G, a.Dk, a.Dv));
  auto& m = simt_emu::Machine::get();
  const simt_emu::Dim grid{unsigned(pr.B * pr.T), unsigned(pr.Hkv), 1};
  if (p.q.dtype == NSA_DTYPE_BF16) {
    m.launch(grid, smem, [&] { nsa::cuda::dense_block<__nv_bfloat16>(a, m.smem()); });
  } else {
    m.launch(grid, smem, [&] { nsa::cuda::dense_block<float>(a, m.smem()); });
  }
}

void expect_near(const char* name, const Tensor& got, const Tensor& want, double abs_tol,
                 double rel_tol) {
  std::string first;
  EXPECT_EQ(count_off(got, want, 0, got.desc().shape[1], abs_tol, rel_tol, &first), 0)
      << name << ": " << first;
}

// The forward of case (s, cfg, dt, ...) on the emulator against the reference: values to the
// f32 bound of test_cpu_vs_ref.cc (K terms per sum, 2^-24 each, x16 for |s| up to ~16), bf16
// outputs one bf16 rounding apart, selections equal.
void compare(const Shape& s, const nsa_config& cfg, nsa_dtype dt, bool padded,
             std::vector<int32_t> cu = {}, nsa_dtype out_dt = NSA_DTYPE_F32,
             const Tensor* idx_in = nullptr) {
  std::ostringstream what;
  what << "T=" << s.T << " Hq=" << s.Hq << " Hkv=" << s.Hkv << " Dk=" << s.Dk << " Dv=" << s.Dv
       << " n=" << cfg.slc_count << " " << nsa_dtype_name(dt) << (padded ? " padded" : "")
       << (cu.empty() ? "" : " packed");
  SCOPED_TRACE(what.str());
  FwdCase ref = make_case(s, cfg, dt, 77 + s.T, padded, cu, out_dt);
  FwdCase emu = make_case(s, cfg, dt, 77 + s.T, padded, cu, out_dt);
  nsa_fwd_params pr = ref.params(), pe = emu.params();
  if (idx_in) pr.slc_indices_in = pe.slc_indices_in = idx_in->desc();
  std::string msg;
  ASSERT_EQ(run_on(oracle(), pr, 0, &msg), NSA_OK) << msg;
  emu_forward(pe);
  const int64_t keys = std::min<int64_t>(
      s.T, std::max<int64_t>({int64_t{cfg.slc_count} * cfg.slc_block, cfg.window}));
  const double tol = 16.0 * static_cast<double>(s.Dk + keys) * kEps;
  const double rel = out_dt == NSA_DTYPE_BF16 ? 1.0 / (1 << 7) : 0.0;  // one bf16 ulp
  expect_near("o", emu.o, ref.o, tol, rel);
  expect_near("o_cmp", emu.o_cmp, ref.o_cmp, tol, rel);
  expect_near("o_slc", emu.o_slc, ref.o_slc, tol, rel);
  expect_near("o_win", emu.o_win, ref.o_win, tol, rel);
  expect_near("lse_cmp", emu.lse_cmp, ref.lse_cmp, tol, tol);
  expect_near("lse_slc", emu.lse_slc, ref.lse_slc, tol, tol);
  expect_near("lse_win", emu.lse_win, ref.lse_win, tol, tol);
  int64_t diff = 0;
  emu.idx_out.for_each([&](int64_t a, int64_t b, int64_t c, int64_t d) {
    diff += emu.idx_out.at_i32({a, b, c, d}) != ref.idx_out.at_i32({a, b, c, d});
  });
  EXPECT_EQ(diff, 0) << "selected blocks differ";
}

// Small blocks, so that the top-n binds at small T; the paper's proportions.
nsa_config small_cfg(int32_t n = 4) { return config(16, 8, 16, n, 1, 1, 24); }

TEST(CudaEmuFwd, ShortShapesEveryGroupSize) {
  for (int64_t T : {1, 15, 16, 17, 70}) {
    for (int64_t G : {1, 3, 16}) {
      compare({1, T, G * 2, 2, 24, 20}, small_cfg(), NSA_DTYPE_F32, false);
    }
  }
}

TEST(CudaEmuFwd, SelectionBindsBf16OddDims) {
  compare({1, 150, 3, 1, 17, 33}, small_cfg(3), NSA_DTYPE_BF16, false);
  compare({2, 90, 16, 1, 40, 24}, small_cfg(5), NSA_DTYPE_BF16, false, {}, NSA_DTYPE_BF16);
}

TEST(CudaEmuFwd, PaperConfigAtT1100) {
  nsa_config def;
  nsa_config_default(&def);  // J + 1 = 18 > n = 16 from t = 1024: the top-n binds at the end
  compare({1, 1100, 4, 1, 32, 16}, def, NSA_DTYPE_BF16, false);
}

TEST(CudaEmuFwd, StridedViewsAndPackedSequences) {
  compare({1, 120, 6, 2, 20, 12}, small_cfg(), NSA_DTYPE_F32, /*padded=*/true);
  compare({1, 150, 6, 2, 20, 12}, small_cfg(), NSA_DTYPE_BF16, false, {0, 37, 37, 40, 150});
}

TEST(CudaEmuFwd, CallerIndices) {
  const Shape s{1, 80, 3, 1, 16, 16};
  const nsa_config cfg = small_cfg();
  Tensor idx(NSA_DTYPE_I32, {1, s.T, 1, cfg.slc_count});
  for (int64_t t = 0; t < s.T; ++t) {  // duplicates, -1 and blocks out of order
    const int64_t J = t / cfg.slc_block;
    const int64_t v[4] = {J, 0, J / 2, J};
    for (int64_t i = 0; i < cfg.slc_count; ++i) idx.set({0, t, 0, i}, double(i == 3 ? -1 : v[i]));
  }
  compare(s, cfg, NSA_DTYPE_F32, false, {}, NSA_DTYPE_F32, &idx);
}

TEST(CudaEmuDense, WindowAndFull) {
  for (int32_t window : {0, 7}) {
    const Shape s{1, 50, 6, 2, 24, 20};
    FwdCase ref = make_case(s, small_cfg(), NSA_DTYPE_BF16, 5);
    FwdCase emu = make_case(s, small_cfg(), NSA_DTYPE_BF16, 5);
    auto params = [&](FwdCase& c) {
      nsa_dense_fwd_params p;
      nsa_dense_fwd_params_init(&p);
      p.q = c.q.desc(), p.k = c.k.desc(), p.v = c.v.desc(), p.o = c.o.desc();
      p.lse = c.lse_win.desc();
      p.window = window;
      return p;
    };
    std::string msg;
    ASSERT_EQ(run_on(oracle(), params(ref), 0, &msg), NSA_OK) << msg;
    emu_dense(params(emu));
    const double tol = 16.0 * (s.Dk + s.T) * kEps;
    expect_near("o", emu.o, ref.o, tol, 0.0);
    expect_near("lse", emu.lse_win, ref.lse_win, tol, tol);
  }
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
