// The CUDA backend's device code run on the CPU by the SIMT emulator (simt_emu.h), against the
// float64 reference: the forward's blocks (query.cuh: cmp, block scores in shared memory, top-n,
// slc, win, gates) and the dense baseline's, on awkward shapes (T below and around the blocks,
// G in {1, 3, 16}, Dk != Dv and odd, strided views, packed sequences, bf16 inputs and outputs,
// caller indices). This runs where no GPU is: it checks the kernels' arithmetic and indexing and
// that every barrier is reached by every thread, not races or speed (simt_emu.h says what it
// cannot see); the same cases run on a real device through the parameterised suites.
#include <gtest/gtest.h>

#include <algorithm>
#include <functional>
#include <optional>
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
#include "cuda/compress.cuh"
#include "cuda/decode.cuh"
#include "cuda/query.cuh"
#include "cuda/split.cuh"

namespace {
using namespace nsa_test;

constexpr double kEps = 1.0 / (1 << 24);  // f32 unit roundoff

// Calls f with a value of the kernels' input type for dtype dt (forward.cu's dispatch).
template <typename F>
void with_in(nsa_dtype dt, F&& f) {
  if (dt == NSA_DTYPE_BF16) {
    f(__nv_bfloat16{});
  } else if (dt == NSA_DTYPE_F16) {
    f(__half{});
  } else {
    f(float{});
  }
}

// Runs the forward's blocks of validated params p on the emulator, as forward.cu launches them.
void emu_forward(const nsa_fwd_params& p) {
  nsa::FwdProblem pr;
  const nsa::Status st = nsa::make_fwd_problem(p, nsa::cpu::backend(), &pr);
  ASSERT_TRUE(st.is_ok()) << st.message;
  if (pr.B * pr.T == 0) return;
  const nsa::cuda::FwdArgs a = nsa::cuda::fwd_args(pr);
  const size_t smem = size_t(nsa::cuda::nsa_smem_bytes(a.G, a.Dk, a.Dv, a.nblk, a.n, a.P));
  auto& m = simt_emu::Machine::get();
  const simt_emu::Dim grid{unsigned(pr.B * nsa::cuda::fwd_tiles(a)), unsigned(pr.Hkv), 1};
  with_in(p.in.q.dtype, [&](auto in) {
    m.launch(grid, smem, [&] { nsa::cuda::fwd_block<decltype(in)>(a, m.smem()); });
  });
}

void emu_dense(const nsa_dense_fwd_params& p) {
  nsa::DenseProblem pr;
  const nsa::Status st = nsa::make_dense_problem(p, nsa::cpu::backend(), &pr);
  ASSERT_TRUE(st.is_ok()) << st.message;
  const nsa::cuda::DenseArgs a = nsa::cuda::dense_args(pr);
  const size_t smem = size_t(4 * nsa::cuda::smem_floats(a.G, a.Dk, a.Dv));
  auto& m = simt_emu::Machine::get();
  const simt_emu::Dim grid{unsigned(pr.B * pr.T), unsigned(pr.Hkv), 1};
  with_in(p.q.dtype, [&](auto in) {
    m.launch(grid, smem, [&] { nsa::cuda::dense_block<decltype(in)>(a, m.smem()); });
  });
}

void expect_near(const char* name, const Tensor& got, const Tensor& want, double abs_tol,
                 double rel_tol) {
  std::string first;
  EXPECT_EQ(count_off(got, want, 0, got.desc().shape[1], abs_tol, rel_tol, &first), 0)
      << name << ": " << first;
}

// o, the three LSEs (lse = max s + log(sum): the sum's relative error on a value of size |lse|)
// and the selected blocks (integers: equal; the seeds avoid near-ties).
void expect_outputs(const FwdCase& got, const FwdCase& want, double tol, double rel) {
  expect_near("o", got.o, want.o, tol, rel);
  expect_near("lse_cmp", got.lse_cmp, want.lse_cmp, tol, tol);
  expect_near("lse_slc", got.lse_slc, want.lse_slc, tol, tol);
  expect_near("lse_win", got.lse_win, want.lse_win, tol, tol);
  int64_t diff = 0;
  got.idx_out.for_each([&](int64_t a, int64_t b, int64_t c, int64_t d) {
    diff += got.idx_out.at_i32({a, b, c, d}) != want.idx_out.at_i32({a, b, c, d});
  });
  EXPECT_EQ(diff, 0) << "selected blocks differ";
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
  // One rounding of the output: 2^-8 (bf16) or 2^-11 (f16) relative, doubled for the reference's
  // own rounding of the same value.
  const double rel = out_dt == NSA_DTYPE_BF16  ? 1.0 / (1 << 7)
                     : out_dt == NSA_DTYPE_F16 ? 1.0 / (1 << 10)
                                               : 0.0;
  expect_outputs(emu, ref, tol, rel);
  expect_near("o_cmp", emu.o_cmp, ref.o_cmp, tol, rel);
  expect_near("o_slc", emu.o_slc, ref.o_slc, tol, rel);
  expect_near("o_win", emu.o_win, ref.o_win, tol, rel);
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

// The paper's head dims (Dk = 192, Dv = 128) with G = 16 and G = 32 (two heads per warp pass):
// the shared-memory carve at its largest here.
TEST(CudaEmuFwd, PaperHeadDimsLargeGroups) {
  compare({1, 100, 16, 1, 192, 128}, small_cfg(5), NSA_DTYPE_BF16, false);
  compare({1, 40, 32, 1, 64, 48}, small_cfg(3), NSA_DTYPE_F32, false);
}

// f16 inputs (the kernels' __half instantiation) and f16 outputs: inputs widen exactly, so the
// f32 bounds hold, plus one f16 rounding of the output.
TEST(CudaEmuFwd, F16InputsAndOutputs) {
  compare({1, 90, 6, 2, 20, 12}, small_cfg(), NSA_DTYPE_F16, false);
  compare({1, 120, 16, 1, 24, 17}, small_cfg(5), NSA_DTYPE_F16, true, {}, NSA_DTYPE_F16);
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

// A window narrower than a block's positions (G = 1: 32 positions a block, window 7): the
// positions share no window key and each takes its own.
TEST(CudaEmuFwd, BlocksWiderThanTheWindow) {
  compare({1, 70, 2, 2, 24, 16}, config(16, 8, 16, 4, 1, 1, 7), NSA_DTYPE_BF16, false);
  compare({1, 45, 2, 2, 24, 16}, config(16, 8, 16, 4, 1, 1, 7), NSA_DTYPE_F32, false, {0, 13, 45});
}

// A NaN value poisons exactly the positions whose branches read it (SPEC 4), also where a
// block's positions share key chunks (G = 1: 32 positions a block): the positions before it in
// the same block stay equal to the reference. v row 40 is in the windows of t >= 40 (and the
// slc of some); compressed token 2 covers keys [16, 32) and is seen from t = 31.
TEST(CudaEmuFwd, NonFiniteValuesStayWithThePositionsThatReadThem) {
  const Shape s{1, 70, 2, 2, 24, 16};
  struct Poison {
    const char* what;
    bool cmp;
    int64_t row, first_seen;
  };
  for (const Poison& x : {Poison{"v", false, 40, 40}, Poison{"v_cmp", true, 2, 31}}) {
    for (nsa_dtype dt : {NSA_DTYPE_F32, NSA_DTYPE_BF16}) {
      SCOPED_TRACE(std::string(x.what) + " " + nsa_dtype_name(dt));
      FwdCase ref = make_case(s, small_cfg(), dt, 13), emu = make_case(s, small_cfg(), dt, 13);
      for (FwdCase* c : {&ref, &emu}) {
        (x.cmp ? c->v_cmp : c->v).set({0, x.row, 0, 3}, std::numeric_limits<double>::quiet_NaN());
      }
      std::string msg;
      ASSERT_EQ(run_on(oracle(), ref.params(), 0, &msg), NSA_OK) << msg;
      emu_forward(emu.params());
      const double tol = 16.0 * double(s.Dk + s.T) * kEps;
      EXPECT_EQ(count_off(emu.o, ref.o, 0, x.first_seen, tol, 0.0, &msg), 0) << msg;
      EXPECT_TRUE(std::isnan(emu.o.at({0, x.first_seen, 0, 3})));
      EXPECT_FALSE(std::isnan(emu.o.at({0, x.first_seen, 1, 3})));  // the other KV head's
    }
  }
}

// An infinite value under a weight exact in 16 bits (1 for the only key position 0 sees, and for
// the largest score of any chunk) stays infinite, as in the reference: the lo parts' 0 * inf =
// NaN does not reach the output (attend.cuh, add_lo). Every output is NaN, infinite (same sign)
// or within the f32 bound exactly where the reference's is.
TEST(CudaEmuFwd, InfiniteValuesStayInfinite) {
  const Shape s{1, 70, 2, 2, 24, 16};
  for (nsa_dtype dt : {NSA_DTYPE_BF16, NSA_DTYPE_F16}) {
    SCOPED_TRACE(nsa_dtype_name(dt));
    FwdCase ref = make_case(s, small_cfg(), dt, 17), emu = make_case(s, small_cfg(), dt, 17);
    for (FwdCase* c : {&ref, &emu}) c->v.set({0, 0, 0, 3}, std::numeric_limits<double>::infinity());
    std::string msg;
    ASSERT_EQ(run_on(oracle(), ref.params(), 0, &msg), NSA_OK) << msg;
    emu_forward(emu.params());
    const double tol = 16.0 * double(s.Dk + s.T) * kEps;
    int64_t off = 0, infs = 0;
    ref.o.for_each([&](int64_t b, int64_t t, int64_t h, int64_t d) {
      const double want = ref.o.at({b, t, h, d}), got = emu.o.at({b, t, h, d});
      infs += std::isinf(want);
      const bool same = std::isnan(want)   ? std::isnan(got)
                        : std::isinf(want) ? got == want
                                           : std::fabs(got - want) <= tol * (1.0 + std::fabs(want));
      if (!same && off++ == 0)
        ADD_FAILURE() << "t=" << t << " h=" << h << " d=" << d << ": " << got << " vs " << want;
    });
    EXPECT_EQ(off, 0);
    EXPECT_GT(infs, 0);  // the case does reach infinite outputs
  }
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
    const nsa_dtype dt = window == 0 ? NSA_DTYPE_BF16 : NSA_DTYPE_F16;
    SCOPED_TRACE(nsa_dtype_name(dt));
    const Shape s{1, 50, 6, 2, 24, 20};
    FwdCase ref = make_case(s, small_cfg(), dt, 5);
    FwdCase emu = make_case(s, small_cfg(), dt, 5);
    std::string msg;
    ASSERT_EQ(run_on(oracle(), dense_params(ref, window), 0, &msg), NSA_OK) << msg;
    emu_dense(dense_params(emu, window));
    const double tol = 16.0 * (s.Dk + s.T) * kEps;
    expect_near("o", emu.o, ref.o, tol, 0.0);
    expect_near("lse", emu.lse_win, ref.lse_win, tol, tol);
  }
}

// A CUDA cache's buffers in host memory, for the emulated kernels (decode.cuh's layout).
struct EmuCache {
  nsa_kv_cache c;
  std::vector<unsigned char> k, v, kc, vc;
  nsa::cuda::CacheBufs bufs;
  EmuCache(const nsa_config& cfg, int64_t seqs, int64_t capacity, const Shape& s, nsa_dtype dt) {
    c.cfg = cfg;
    if (c.cfg.scale == 0.0f) c.cfg.scale = float(1.0 / std::sqrt(double(s.Dk)));
    c.num_seqs = seqs, c.capacity = capacity, c.Hkv = s.Hkv, c.Dk = s.Dk, c.Dv = s.Dv;
    c.dtype = dt;
    c.len.assign(size_t(seqs), 0);
    const size_t e = nsa_dtype_size(dt), cmp = size_t(nsa_cmp_len(&cfg, capacity));
    k.assign(size_t(seqs * capacity * s.Hkv * s.Dk) * e, 0);
    v.assign(size_t(seqs * capacity * s.Hkv * s.Dv) * e, 0);
    kc.assign(size_t(seqs) * cmp * size_t(s.Hkv * s.Dk) * e, 0);
    vc.assign(size_t(seqs) * cmp * size_t(s.Hkv * s.Dv) * e, 0);
    bufs = {k.data(), v.data(), kc.data(), vc.data(), capacity, int64_t(cmp)};
  }
  // Appends row t of x [1, T, Hkv, D] to sequence seq as decode.cu does: the rows, then the
  // compressed tokens they complete.
  void append(int64_t seq, const Tensor& xk, const Tensor& xv, int64_t t) {
    auto& m = simt_emu::Machine::get();
    const size_t e = nsa_dtype_size(c.dtype);
    const int64_t len = c.len[size_t(seq)];
    for (int kind = 0; kind < 2; ++kind) {
      const nsa_tensor x = rows(kind == 0 ? xk : xv, t, 1);
      const int64_t D = kind == 0 ? c.Dk : c.Dv;
      void* slice = (kind == 0 ? k.data() : v.data()) + size_t(seq * c.capacity * c.Hkv * D) * e;
      m.launch({1, unsigned(c.Hkv), 1}, 0, [&] {
        nsa::cuda::append_block(x.data, nsa::cuda::elem_of(x.dtype), x.stride[0], x.stride[1],
                                slice, nsa::cuda::elem_of(c.dtype), len, c.Hkv, D);
      });
    }
    const int64_t before = nsa_cmp_len(&c.cfg, len), after = nsa_cmp_len(&c.cfg, len + 1);
    for (int kind = 0; kind < 2 && after > before; ++kind) {
      const nsa::cuda::CmpArgs a = nsa::cuda::cache_cmp_args(c, bufs, seq, kind, before, after);
      m.launch({unsigned(after - before), unsigned(c.Hkv), 1}, 0,
               [&] { nsa::cuda::mean_block(a); });
    }
    ++c.len[size_t(seq)];
  }
  // A decode step's appends as decode.cu's append_step_rows makes them: rows [t0, t0 + S) of x
  // [1, T, Hkv, D] to sequences seqs (distinct) in one launch each for k and v, then the mean of
  // every compressed token they complete in one launch each.
  void append_step(const std::vector<int32_t>& seqs, const Tensor& xk, const Tensor& xv,
                   int64_t t0) {
    auto& m = simt_emu::Machine::get();
    const unsigned S = unsigned(seqs.size());
    nsa::cuda::StepRows r, done;
    r.row0 = 0;
    unsigned nc = 0;
    for (unsigned i = 0; i < S; ++i) {
      const int64_t len = c.len[size_t(seqs[i])], before = nsa_cmp_len(&c.cfg, len);
      r.seq[i] = seqs[i], r.t[i] = int32_t(len);
      if (nsa_cmp_len(&c.cfg, len + 1) > before) {
        done.seq[nc] = seqs[i];
        done.t[nc++] = int32_t(before);
      }
    }
    for (int kind = 0; kind < 2; ++kind) {
      const nsa_tensor x = rows(kind == 0 ? xk : xv, t0, S);
      m.launch({S, unsigned(c.Hkv), 1}, 0, [&] {
        nsa::cuda::append_step_block(x.data, nsa::cuda::elem_of(x.dtype), x.stride[0], x.stride[1],
                                     kind == 0 ? k.data() : v.data(), nsa::cuda::elem_of(c.dtype),
                                     c.capacity, c.Hkv, kind == 0 ? c.Dk : c.Dv, r);
      });
    }
    for (int kind = 0; kind < 2 && nc > 0; ++kind) {
      const nsa::cuda::CmpArgs a = nsa::cuda::cache_cmp_all(c, bufs, kind);
      m.launch({nc, unsigned(c.Hkv), 1}, 0, [&] { nsa::cuda::mean_step_block(a, done); });
    }
    for (int32_t s : seqs) ++c.len[size_t(s)];
  }
};

// A step's appends to sequences at different lengths, in one launch each (decode.cu,
// kv_cache_append_rows), leave the cache's raw and compressed tokens bit for bit as appending
// each row alone does: three sequences in the order 2, 0, 1, from lengths 5, 0 and 11, over 20
// steps that complete compressed tokens of different sequences at different steps (l = 16, d = 8).
TEST(CudaEmuDecode, StepAppendsEqualRowByRowAppends) {
  const Shape s{1, 80, 6, 2, 24, 20};
  const nsa_config cfg = small_cfg();
  const FwdCase x = make_case(s, cfg, NSA_DTYPE_F32, 3);
  EmuCache rowwise(cfg, 3, 40, s, NSA_DTYPE_BF16), stepped(cfg, 3, 40, s, NSA_DTYPE_BF16);
  for (EmuCache* c : {&rowwise, &stepped}) {
    for (int64_t t = 0; t < 5; ++t) c->append(0, x.k, x.v, t);
    for (int64_t t = 5; t < 16; ++t) c->append(2, x.k, x.v, t);
  }
  const std::vector<int32_t> order = {2, 0, 1};
  for (int64_t j = 0; j < 20; ++j) {
    const int64_t t0 = 16 + 3 * j;  // rows 16 .. 75 of x
    for (size_t i = 0; i < order.size(); ++i) rowwise.append(order[i], x.k, x.v, t0 + int64_t(i));
    stepped.append_step(order, x.k, x.v, t0);
  }
  EXPECT_EQ(stepped.c.len, rowwise.c.len);
  EXPECT_EQ(stepped.c.len, (std::vector<int64_t>{25, 20, 31}));
  EXPECT_TRUE(stepped.k == rowwise.k && stepped.v == rowwise.v) << "raw tokens differ";
  EXPECT_TRUE(stepped.kc == rowwise.kc && stepped.vc == rowwise.vc) << "compressed tokens differ";
  // Each sequence's last compressed token (2, 1 and 3 of them) was written: not all zero bytes.
  const size_t e = 2, per_seq = size_t(nsa_cmp_len(&cfg, 40) * s.Hkv * s.Dk) * e;
  const size_t token = size_t(s.Hkv * s.Dk) * e;
  for (int64_t q = 0; q < 3; ++q) {
    const size_t at =
        size_t(q) * per_seq + size_t(nsa_cmp_len(&cfg, stepped.c.len[size_t(q)]) - 1) * token;
    EXPECT_TRUE(std::any_of(stepped.kc.begin() + long(at), stepped.kc.begin() + long(at + token),
                            [](unsigned char b) { return b != 0; }))
        << "sequence " << q;
  }
}

// A split step's launches (decode.cu's launch_split) with scratch in host memory, refilled with
// NaN first so that a slot no launch wrote shows up.
template <typename In>
void emu_split(const nsa::DecodeProblem& pr, const nsa::cuda::StepRows& rows, int64_t t_max,
               nsa::cuda::SplitPlan plan, const nsa::cuda::CacheBufs& cb) {
  using namespace nsa::cuda;
  auto& m = simt_emu::Machine::get();
  const nsa_kv_cache& c = *pr.cache;
  SplitScratch w;
  w.plan = plan;
  w.P = plan.parts() + 1;  // room past the plan's parts, as decode.cu lays it out
  w.Hkv = c.Hkv, w.G = int(pr.G), w.Dv = int(c.Dv);
  if (!pr.dense) w.ncmax = cb.cmp_rows, w.n = c.cfg.slc_count;
  std::vector<float> scratch(size_t(split_scratch_bytes(w, pr.S) / 4),
                             std::numeric_limits<float>::quiet_NaN());
  w.base = scratch.data();
  const unsigned S = unsigned(pr.S), H = unsigned(c.Hkv);
  if (pr.dense) {
    const DenseArgs a = dense_step_args(pr, cb);
    const size_t smem = size_t(4 * smem_floats(a.G, a.Dk, a.Dv));
    m.launch({S, H, unsigned(plan.win)}, smem, [&] { dense_part_block<In>(a, rows, w, m.smem()); });
    m.launch({S, H, 1}, smem, [&] { dense_combine_block(a, rows, w, m.smem()); });
    return;
  }
  const FwdArgs a = nsa_step_args(pr, cb, t_max);
  const size_t smem = size_t(nsa_smem_bytes(a.G, a.Dk, a.Dv, a.nblk, a.n));
  const unsigned cmp = unsigned(plan.cmp), sw = unsigned(plan.slc + plan.win);
  m.launch({S, H, cmp}, smem, [&] { cmp_part_block<In>(a, rows, w, m.smem()); });
  m.launch({S, H, cmp}, smem, [&] { probs_block<In>(a, rows, w, m.smem()); });
  m.launch({S, H, 1}, smem, [&] { select_block(a, rows, w, m.smem()); });
  m.launch({S, H, sw}, smem, [&] { sw_part_block<In>(a, rows, w, m.smem()); });
  m.launch({S, H, 1}, smem, [&] { combine_block(a, rows, w, m.smem()); });
}

// One decode step of row t of case x into out, on the emulated cache (decode.cu's launches):
// one block per KV head, or split by `plan`.
template <typename In>
void emu_step(EmuCache& ec, int64_t seq, FwdCase& x, FwdCase& out, int64_t t, bool dense,
              int32_t window, nsa::cuda::SplitPlan plan = {}) {
  nsa_decode_params p = decode_row(x, out, t, false);
  nsa::DecodeProblem pr;
  pr.cache = &ec.c;
  pr.nsa = &p;
  pr.dense = dense;
  pr.q = p.q, pr.o = p.o, pr.lse = p.lse_win;
  pr.scale = ec.c.cfg.scale;
  pr.window = window;
  pr.S = 1, pr.Hq = x.shape.Hq, pr.G = x.shape.Hq / x.shape.Hkv;
  pr.seqs = {seq};
  std::vector<int32_t> pos;
  const int64_t t_max = nsa::cuda::step_positions(pr, &pos);
  const nsa::cuda::StepRows rows = nsa::cuda::step_rows(pr, pos, 0);
  if (plan.parts() > 0) return emu_split<In>(pr, rows, t_max, plan, ec.bufs);
  auto& m = simt_emu::Machine::get();
  const simt_emu::Dim grid{1, unsigned(ec.c.Hkv), 1};
  if (dense) {
    const nsa::cuda::DenseArgs a = nsa::cuda::dense_step_args(pr, ec.bufs);
    m.launch(grid, size_t(4 * nsa::cuda::smem_floats(a.G, a.Dk, a.Dv)),
             [&] { nsa::cuda::dense_decode_block<In>(a, rows, m.smem()); });
  } else {
    const nsa::cuda::FwdArgs a = nsa::cuda::nsa_step_args(pr, ec.bufs, t_max);
    m.launch(grid, size_t(nsa::cuda::nsa_smem_bytes(a.G, a.Dk, a.Dv, a.nblk, a.n)),
             [&] { nsa::cuda::decode_block<In>(a, rows, m.smem()); });
  }
}

// Decodes case c position by position into sequence 1 of a two-sequence emulated cache (steps
// at t >= split_from split by plan), then runs the reference forward over the whole sequence
// with the cache's compressed tokens: equal outputs (decode_tol: the f32 bound of
// test_decode.cc) and selections. A bf16 cache under f32 or f16 queries (cache_dt) holds the
// case's keys and values rounded to bf16 first, so the reference sees the values it holds.
void decode_vs_reference(const Shape& s, const nsa_config& cfg, nsa_dtype dt,
                         nsa::cuda::SplitPlan plan = {}, int64_t split_from = 0,
                         std::optional<nsa_dtype> cache = std::nullopt,
                         const std::function<void(FwdCase&)>& edit = {}) {
  const nsa_dtype cache_dt = cache.value_or(dt);
  FwdCase c = make_case(s, cfg, dt, 31), got = make_case(s, cfg, dt, 31);
  if (edit) edit(c), edit(got);
  if (cache_dt != dt) {
    for (Tensor* x : {&c.k, &c.v}) {
      x->for_each([&](int64_t a, int64_t b, int64_t h, int64_t d) {
        x->set({a, b, h, d}, bf16_bits_to_float(float_to_bf16_bits(float(x->at({a, b, h, d})))));
      });
    }
  }
  EmuCache ec(cfg, 2, s.T + 7, s, cache_dt);
  for (int64_t t = 0; t < s.T; ++t) {
    ec.append(1, c.k, c.v, t);
    const nsa::cuda::SplitPlan pt = t >= split_from ? plan : nsa::cuda::SplitPlan{};
    if (cache_dt == NSA_DTYPE_BF16) {
      emu_step<__nv_bfloat16>(ec, 1, c, got, t, false, 0, pt);
    } else {
      emu_step<float>(ec, 1, c, got, t, false, 0, pt);
    }
  }
  // The reference reads the compressed tokens the cache holds (SPEC 7).
  const size_t e = nsa_dtype_size(cache_dt);
  const int64_t Tc = nsa_cmp_len(&cfg, s.T);
  copy_rows_into(ec.kc.data() + size_t(ec.bufs.cmp_rows * s.Hkv * s.Dk) * e, cache_dt, Tc, s.Hkv,
                 s.Dk, 0, 0, c.k_cmp);
  copy_rows_into(ec.vc.data() + size_t(ec.bufs.cmp_rows * s.Hkv * s.Dv) * e, cache_dt, Tc, s.Hkv,
                 s.Dv, 0, 0, c.v_cmp);
  std::string msg;
  ASSERT_EQ(run_on(oracle(), c.params(), 0, &msg), NSA_OK) << msg;
  const int64_t keys = std::min<int64_t>(
      s.T, std::max<int64_t>({int64_t{cfg.slc_count} * cfg.slc_block, cfg.window, Tc}));
  expect_outputs(got, c, 16.0 * double(s.Dk + keys) * kEps, 0.0);
}

TEST(CudaEmuDecode, EveryPositionMatchesTheReference) {
  for (nsa_dtype dt : {NSA_DTYPE_F32, NSA_DTYPE_BF16}) {
    SCOPED_TRACE(nsa_dtype_name(dt));
    decode_vs_reference({1, 90, 6, 2, 20, 12}, small_cfg(), dt);
  }
}

// f32 and f16 queries on a bf16 cache: the tensor cores take the queries as bf16 hi + lo pairs
// (attend.cuh), within the f32 bound of the reference's full-precision queries.
TEST(CudaEmuDecode, WiderQueriesOnABf16Cache) {
  for (nsa_dtype dt : {NSA_DTYPE_F32, NSA_DTYPE_F16}) {
    SCOPED_TRACE(nsa_dtype_name(dt));
    decode_vs_reference({1, 90, 6, 2, 20, 12}, small_cfg(), dt, {}, 0, NSA_DTYPE_BF16);
  }
}

// An infinite key channel under a query channel exact in bf16 (1.0, so its lo part is 0): the
// score is -inf and the key weighs nothing, as in the reference, not 0 * -inf = NaN from the lo
// part (attend.cuh, add_lo). f32 queries on a bf16 cache take the hi + lo path.
TEST(CudaEmuDecode, InfiniteKeyUnderAnExactQueryWeighsNothing) {
  decode_vs_reference({1, 90, 6, 2, 24, 16}, small_cfg(), NSA_DTYPE_F32, {}, 0, NSA_DTYPE_BF16,
                      [](FwdCase& c) {
                        c.q.for_each([&](int64_t b, int64_t t, int64_t h, int64_t d) {
                          if (d == 0) c.q.set({b, t, h, d}, 1.0);
                        });
                        c.k.set({0, 50, 0, 0}, -std::numeric_limits<double>::infinity());
                      });
}

// Split-key steps (split.cuh) against the reference. Parts are whole 32-key chunks, so the
// stride 4 and the 80-key window give every branch several non-empty parts at T = 400: cmp 3
// parts of up to 97 tokens, slc 3 shares of 4 blocks (the last empty), win 3 parts (32, 32, 16).
// Positions 0-5 (no compressed token yet, J + 1 <= n) and the last 30 run split.
TEST(CudaEmuDecode, SplitStepsMatchTheReference) {
  const nsa_config cfg = config(16, 4, 16, 4, 1, 1, 80);
  for (nsa_dtype dt : {NSA_DTYPE_F32, NSA_DTYPE_BF16}) {
    SCOPED_TRACE(nsa_dtype_name(dt));
    decode_vs_reference({1, 6, 6, 2, 20, 12}, cfg, dt, {3, 3, 3});
    decode_vs_reference({1, 400, 6, 2, 20, 12}, cfg, dt, {3, 3, 3}, 370);
  }
  // More parts than chunks (empty parts weigh nothing), G = 16 and odd head dims.
  decode_vs_reference({1, 300, 16, 1, 17, 33}, cfg, NSA_DTYPE_BF16, {9, 5, 7}, 290);
}

// Two rows at different lengths (sequences 0 and 1 of one cache) in one split step: each row's
// outputs are the bits of that row stepped alone (slot i > 0 of the scratch, per-row positions).
TEST(CudaEmuDecode, SplitStepOfTwoRowsEqualsEachRowAlone) {
  using nsa::cuda::SplitPlan;
  const Shape s{1, 300, 6, 2, 20, 12};
  const nsa_config cfg = config(16, 4, 16, 4, 1, 1, 80);
  const nsa_dtype dt = NSA_DTYPE_BF16;
  FwdCase c = make_case(s, cfg, dt, 41), alone = make_case(s, cfg, dt, 41);
  EmuCache ec(cfg, 2, s.T, s, dt);
  const int64_t len[2] = {300, 257};
  for (int64_t seq = 0; seq < 2; ++seq) {
    for (int64_t t = 0; t < len[seq]; ++t) ec.append(seq, c.k, c.v, t);
  }
  const SplitPlan plan{3, 2, 3};
  for (int64_t seq = 0; seq < 2; ++seq) {
    emu_step<__nv_bfloat16>(ec, seq, c, alone, len[seq] - 1, false, 0, plan);
  }
  // The same rows as one step of S = 2.
  Tensor q(dt, {2, s.Hq, s.Dk}), o(NSA_DTYPE_F32, {2, s.Hq, s.Dv}), g[3], lse[3];
  Tensor idx(NSA_DTYPE_I32, {2, s.Hkv, cfg.slc_count});
  for (int i = 0; i < 3; ++i) {
    g[i] = Tensor(dt, {2, s.Hq});
    lse[i] = Tensor(NSA_DTYPE_F32, {2, s.Hq});
  }
  const Tensor* cg[3] = {&c.g_cmp, &c.g_slc, &c.g_win};
  for (int64_t r = 0; r < 2; ++r) {
    for (int64_t h = 0; h < s.Hq; ++h) {
      for (int64_t x = 0; x < s.Dk; ++x) q.set({r, h, x}, c.q.at({0, len[r] - 1, h, x}));
      for (int i = 0; i < 3; ++i) g[i].set({r, h}, cg[i]->at({0, len[r] - 1, h}));
    }
  }
  nsa_decode_params p;
  nsa_decode_params_init(&p);
  p.q = q.desc(), p.o = o.desc(), p.slc_indices_out = idx.desc();
  p.g_cmp = g[0].desc(), p.g_slc = g[1].desc(), p.g_win = g[2].desc();
  p.lse_cmp = lse[0].desc(), p.lse_slc = lse[1].desc(), p.lse_win = lse[2].desc();
  nsa::DecodeProblem pr;
  pr.cache = &ec.c;
  pr.nsa = &p;
  pr.q = p.q, pr.o = p.o;
  pr.scale = ec.c.cfg.scale;
  pr.S = 2, pr.Hq = s.Hq, pr.G = s.Hq / s.Hkv;
  pr.seqs = {0, 1};
  std::vector<int32_t> pos;
  const int64_t t_max = nsa::cuda::step_positions(pr, &pos);
  ASSERT_EQ(t_max, 299);
  emu_split<__nv_bfloat16>(pr, nsa::cuda::step_rows(pr, pos, 0), t_max, plan, ec.bufs);
  int64_t off = 0;
  for (int64_t r = 0; r < 2; ++r) {
    const int64_t t = len[r] - 1;
    for (int64_t h = 0; h < s.Hq; ++h) {
      for (int64_t x = 0; x < s.Dv; ++x) off += o.at({r, h, x}) != alone.o.at({0, t, h, x});
      off += lse[0].at({r, h}) != alone.lse_cmp.at({0, t, h});
      off += lse[2].at({r, h}) != alone.lse_win.at({0, t, h});
    }
    for (int64_t hk = 0; hk < s.Hkv; ++hk) {
      for (int64_t i = 0; i < cfg.slc_count; ++i) {
        off += idx.at_i32({r, hk, i}) != alone.idx_out.at_i32({0, t, hk, i});
      }
    }
  }
  EXPECT_EQ(off, 0);
}

// The host plan (decode.cu's choice): batch 1 at 64k on an H100's 132 SMs splits cmp into 64
// parts of 64 compressed tokens, slc into its 16 blocks, win into 8 parts of 64 keys; batch 16
// into 5 each; nothing where the blocks are already two per SM or below 1024 keys; dense by 4
// chunks from 1024 keys of its window on. Every plan fits the scratch's layout (max_split_parts).
TEST(CudaSplitPlan, PaperShapes) {
  using nsa::cuda::SplitPlan;
  nsa_config def;
  nsa_config_default(&def);
  auto same = [](SplitPlan a, SplitPlan b) {
    return a.cmp == b.cmp && a.slc == b.slc && a.win == b.win;
  };
  EXPECT_TRUE(same(nsa::cuda::nsa_split_plan(4, 132, 65535, def), {64, 16, 8}));
  EXPECT_TRUE(same(nsa::cuda::nsa_split_plan(64, 132, 65535, def), {5, 5, 5}));
  EXPECT_EQ(nsa::cuda::nsa_split_plan(264, 132, 65535, def).parts(), 0);
  EXPECT_EQ(nsa::cuda::nsa_split_plan(4, 132, 1022, def).parts(), 0);
  EXPECT_EQ(nsa::cuda::dense_split_plan(4, 132, 65535, 0).win, 66);
  EXPECT_EQ(nsa::cuda::dense_split_plan(4, 132, 65535, 100).parts(), 0);
  EXPECT_EQ(nsa::cuda::dense_split_plan(4, 132, 1500, 0).win, 12);
  for (int64_t blocks : {1, 4, 64, 131}) {
    for (int64_t t = 0; t < 70000; t += 997) {
      const SplitPlan n = nsa::cuda::nsa_split_plan(blocks, 132, t, def);
      const SplitPlan d = nsa::cuda::dense_split_plan(blocks, 132, t, 0);
      EXPECT_LE(n.parts(), nsa::cuda::max_split_parts(blocks, 132, &def)) << blocks << " " << t;
      EXPECT_LE(d.parts(), nsa::cuda::max_split_parts(blocks, 132, nullptr)) << blocks << " " << t;
    }
  }
}

// The dense decode baseline over the emulated cache against the reference's dense attention,
// one block per KV head or split into parts (window 0: every key).
void dense_vs_reference(int64_t T, int32_t window, nsa::cuda::SplitPlan plan) {
  const Shape s{1, T, 6, 2, 20, 12};
  FwdCase c = make_case(s, small_cfg(), NSA_DTYPE_BF16, 8),
          got = make_case(s, small_cfg(), NSA_DTYPE_BF16, 8);
  EmuCache ec(small_cfg(), 1, s.T, s, NSA_DTYPE_BF16);
  for (int64_t t = 0; t < s.T; ++t) {
    ec.append(0, c.k, c.v, t);
    emu_step<__nv_bfloat16>(ec, 0, c, got, t, true, window, plan);
  }
  std::string msg;
  ASSERT_EQ(run_on(oracle(), dense_params(c, window), 0, &msg), NSA_OK) << msg;
  const double tol = 16.0 * double(s.Dk + (window > 0 ? window : T)) * kEps;
  expect_near("o", got.o, c.o, tol, 0.0);
  expect_near("lse", got.lse_win, c.lse_win, tol, tol);
}

TEST(CudaEmuDecode, DenseStepMatchesTheReference) { dense_vs_reference(60, 9, {}); }

// Parts of 32 keys from 130 keys on: 1 to 5 of them non-empty.
TEST(CudaEmuDecode, DenseSplitStepsMatchTheReference) {
  dense_vs_reference(130, 0, {0, 0, 5});
  dense_vs_reference(100, 70, {0, 0, 3});
}

// The emulator lands cp.async copies at the issuing thread's wait by default, so a chunk read
// before its wait and barrier shows stale data. Here they land at once instead, so that a copy
// into buffers that other threads still read (attend.cuh, stream_keys: the next chunk's) would
// corrupt their reads: the 16-bit cases with head dims a multiple of 8 (the cp.async path) again,
// G = 16 and G = 1 (32 positions a block), packed sequences, a split decode step.
TEST(CudaEmuAsync, CopiesThatLandAtOnceGiveTheSameResults) {
  using simt_emu::Machine;
  struct Early {
    Early() { Machine::get().set_async_copies(Machine::AsyncCopies::kEarly); }
    ~Early() { Machine::get().set_async_copies(Machine::AsyncCopies::kLate); }
  } early;
  compare({1, 100, 16, 1, 192, 128}, small_cfg(5), NSA_DTYPE_BF16, false);
  compare({1, 150, 6, 2, 24, 16}, small_cfg(), NSA_DTYPE_F16, false, {0, 37, 37, 40, 150});
  compare({1, 70, 2, 2, 24, 16}, config(16, 8, 16, 4, 1, 1, 7), NSA_DTYPE_BF16, false);
  decode_vs_reference({1, 400, 6, 2, 24, 16}, config(16, 4, 16, 4, 1, 1, 80), NSA_DTYPE_BF16,
                      {3, 3, 3}, 390);
}

}  // namespace
