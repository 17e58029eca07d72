// The CPU backend (f32 accumulation) against the float64 reference (the oracle of SPEC.md) on
// awkward shapes: T around block edges, G in {1, 3, 16}, Dk != Dv, three configs, strided views,
// variable-length packing, f32 and bf16, caller-supplied indices, and both compression functions.
// Selected indices must be equal; values agree to bounds derived from f32 rounding.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <sstream>

#include "test_util.h"

namespace {
using namespace nsa_test;

constexpr double kEps = 1.0 / (1 << 24);  // f32 unit roundoff, 2^-24
// One bf16 ulp is at most 2^-7 of the value: the f32 and f64 results, each rounded to bf16 on
// store, can land on the two sides of one rounding boundary.
constexpr double kBf16Rel = 1.0 / (1 << 7);

// The configs: paper defaults (top-n never binds at T <= 1024, so a second default-shaped one
// with n = 5 exercises selection), non-overlapping blocks all of 64, and small blocks.
std::vector<nsa_config> configs() {
  nsa_config def;
  nsa_config_default(&def);
  return {def, config(32, 16, 64, 5, 1, 2, 512), config(64, 64, 64, 4, 1, 2, 100),
          config(16, 8, 32, 6, 1, 2, 48)};
}

std::string describe(const Shape& s, const nsa_config& c, nsa_dtype dt, bool padded) {
  std::ostringstream os;
  os << "B=" << s.B << " T=" << s.T << " Hq=" << s.Hq << " Hkv=" << s.Hkv << " Dk=" << s.Dk
     << " Dv=" << s.Dv << " l=" << c.cmp_block << " d=" << c.cmp_stride << " l'=" << c.slc_block
     << " n=" << c.slc_count << " w=" << c.window << " " << nsa_dtype_name(dt)
     << (padded ? " padded" : "");
  return os.str();
}

// Forward on `backend` with `threads` threads (0: default).
nsa_status run(nsa_backend backend, int threads, const nsa_fwd_params& p, std::string* msg) {
  nsa_context* ctx = nullptr;
  nsa_context_create(&ctx);
  nsa_context_set_backend(ctx, backend);
  nsa_context_set_num_threads(ctx, threads);
  const nsa_status st = nsa_fwd(ctx, &p);
  *msg = nsa_last_error(ctx);
  nsa_context_destroy(ctx);
  return st;
}

// Every logical element within abs_tol + rel_tol * |ref|; infinities must match exactly.
void expect_close(const char* name, const Tensor& got, const Tensor& want, double abs_tol,
                  double rel_tol) {
  int64_t bad = 0;
  double worst = 0.0;
  std::string first;
  got.for_each([&](int64_t a, int64_t b, int64_t c, int64_t d) {
    const int64_t off = got.logical_offset(a, b, c, d);
    const double x = got.get_raw(off), y = want.get_raw(off);
    const bool ok = std::isinf(y) ? x == y : std::fabs(x - y) <= abs_tol + rel_tol * std::fabs(y);
    if (!std::isinf(y)) worst = std::max(worst, std::fabs(x - y));
    if (!ok && bad++ == 0) {
      std::ostringstream os;
      os << "[" << a << "," << b << "," << c << "," << d << "] cpu " << x << " ref " << y;
      first = os.str();
    }
  });
  EXPECT_EQ(bad, 0) << name << ": " << bad << " elements off (tol " << abs_tol << " + " << rel_tol
                    << "*|ref|), first " << first << ", worst abs error " << worst;
}

// A strided output's padding must still hold the NaN it was filled with: nothing written outside.
void expect_padding_untouched(const char* name, const Tensor& t) {
  const int64_t elems = static_cast<int64_t>(t.storage().size() / nsa_dtype_size(t.desc().dtype));
  int64_t nan = 0;
  for (int64_t i = 0; i < elems; ++i) nan += std::isnan(t.get_raw(i)) ? 1 : 0;
  EXPECT_EQ(nan, elems - t.numel()) << name << ": padding written or NaN produced";
}

// Runs both backends on identical copies of a case and compares every output.
void compare_fwd(const Shape& s, const nsa_config& cfg, nsa_dtype dt, uint64_t seed, bool padded,
                 std::vector<int32_t> cu = {}, nsa_dtype out_dt = NSA_DTYPE_F32,
                 const Tensor* idx_in = nullptr) {
  SCOPED_TRACE(describe(s, cfg, dt, padded) + " seed=" + std::to_string(seed));
  FwdCase ref = make_case(s, cfg, dt, seed, padded, cu, out_dt);
  FwdCase cpu = make_case(s, cfg, dt, seed, padded, cu, out_dt);
  nsa_fwd_params pr = ref.params(), pc = cpu.params();
  if (idx_in) pr.slc_indices_in = pc.slc_indices_in = idx_in->desc();
  std::string msg;
  ASSERT_EQ(run(NSA_BACKEND_REF, 0, pr, &msg), NSA_OK) << msg;
  ASSERT_EQ(run(NSA_BACKEND_CPU, 0, pc, &msg), NSA_OK) << msg;

  // K: the most terms any f32 sum of this case adds, a Dk-term score dot plus up to
  // min(T, max(n l', w)) softmax-weighted O(1) values (Tc is smaller in every case here); each
  // rounding costs <= 2^-24 relative, so the error is ~K 2^-24. x16: |s| stays below ~16 here,
  // and exp turns a relative score error into a relative weight error |s| times larger.
  const int64_t keys = std::min<int64_t>(
      s.T, std::max<int64_t>({int64_t{cfg.slc_count} * cfg.slc_block, cfg.window}));
  const double tol = 16.0 * static_cast<double>(s.Dk + keys) * kEps;
  const double rel = out_dt == NSA_DTYPE_BF16 ? kBf16Rel : 0.0;
  expect_close("o", cpu.o, ref.o, tol, rel);
  expect_close("o_cmp", cpu.o_cmp, ref.o_cmp, tol, rel);
  expect_close("o_slc", cpu.o_slc, ref.o_slc, tol, rel);
  expect_close("o_win", cpu.o_win, ref.o_win, tol, rel);
  // lse = max s + log(sum): the same relative error as the sum, on a value of size |lse|.
  for (auto [name, a, b] : {std::tuple{"lse_cmp", &cpu.lse_cmp, &ref.lse_cmp},
                            std::tuple{"lse_slc", &cpu.lse_slc, &ref.lse_slc},
                            std::tuple{"lse_win", &cpu.lse_win, &ref.lse_win}}) {
    expect_close(name, *a, *b, tol, tol);
  }
  // Indices are integers: equal, or a near-tie the seed must avoid (see the seeds below).
  int64_t diff = 0;
  cpu.idx_out.for_each([&](int64_t a, int64_t b, int64_t c, int64_t d) {
    diff += cpu.idx_out.at_i32({a, b, c, d}) != ref.idx_out.at_i32({a, b, c, d});
  });
  EXPECT_EQ(diff, 0) << "selected indices differ";
  if (padded) {
    for (auto [name, t] : {std::pair{"o", &cpu.o}, std::pair{"o_slc", &cpu.o_slc},
                           std::pair{"lse_win", &cpu.lse_win}}) {
      expect_padding_untouched(name, *t);
    }
  }
}

// Seeds are fixed, and with them every selected index matches. Another seed can meet a genuine
// near-tie (two candidate scores within ~1e-6 relative at the top-n boundary, which f32 and f64
// may rank differently): pick another then, and say so here.
constexpr uint64_t kSeed = 20250211;

TEST(CpuVsRef, ShortShapes) {
  int i = 0;
  for (int64_t T : {1, 31, 32, 33, 64, 65}) {
    for (int64_t G : {1, 3, 16}) {
      for (const nsa_config& cfg : configs()) {
        for (nsa_dtype dt : {NSA_DTYPE_F32, NSA_DTYPE_BF16}) {
          Shape s;
          s.B = (T == 31 || T == 64) ? 2 : 1;
          s.Hkv = G == 16 ? 1 : 2;
          s.Hq = G * s.Hkv;
          s.T = T, s.Dk = 24, s.Dv = 16;
          compare_fwd(s, cfg, dt, kSeed + i, (i % 2) == 1);
          ++i;
        }
      }
    }
  }
}

TEST(CpuVsRef, LongSequence) {
  int i = 0;
  for (const nsa_config& cfg : configs()) {
    Shape s;
    s.T = 1000, s.Hq = 3, s.Hkv = 1, s.Dk = 24, s.Dv = 16;
    compare_fwd(s, cfg, NSA_DTYPE_F32, kSeed + 100 + i, i % 2 == 0);
    s.Hq = 2, s.Hkv = 2;  // G = 1
    compare_fwd(s, cfg, NSA_DTYPE_BF16, kSeed + 200 + i, i % 2 == 1);
    ++i;
  }
  Shape s;
  s.T = 1000, s.Hq = 16, s.Hkv = 1, s.Dk = 24, s.Dv = 16;
  compare_fwd(s, configs()[3], NSA_DTYPE_F32, kSeed + 300, true);
}

TEST(CpuVsRef, Varlen) {
  // Lengths 1, 0 (empty), 32, 64, 63, 240: positions restart in every sequence.
  const std::vector<int32_t> cu = {0, 1, 1, 33, 97, 160, 400};
  int i = 0;
  for (const nsa_config& cfg : configs()) {
    for (int64_t G : {1, 3}) {
      Shape s;
      s.T = 400, s.Hkv = 2, s.Hq = 2 * G, s.Dk = 24, s.Dv = 16;
      compare_fwd(s, cfg, i % 2 ? NSA_DTYPE_BF16 : NSA_DTYPE_F32, kSeed + 400 + i, true, cu);
      ++i;
    }
  }
}

TEST(CpuVsRef, HeadDimsAndBf16Outputs) {
  // Head dims off the 16-lane vector width, Dk > Dv and Dk < Dv; outputs stored as bf16.
  int i = 0;
  for (auto [dk, dv] : {std::pair{5, 3}, std::pair{40, 8}, std::pair{8, 40}, std::pair{17, 33}}) {
    Shape s;
    s.B = 2, s.T = 150, s.Hq = 6, s.Hkv = 2, s.Dk = dk, s.Dv = dv;
    compare_fwd(s, configs()[i % 4], NSA_DTYPE_F32, kSeed + 500 + i, i % 2 == 0, {},
                NSA_DTYPE_BF16);
    compare_fwd(s, configs()[(i + 1) % 4], NSA_DTYPE_BF16, kSeed + 600 + i, true, {},
                i % 2 ? NSA_DTYPE_BF16 : NSA_DTYPE_F32);
    ++i;
  }
}

// Random caller indices: -1 (unused) about a third of the time, otherwise any visible block,
// duplicates allowed; row (t = T-1, head 0) all -1, an empty selected branch.
Tensor random_indices(const Shape& s, const nsa_config& cfg, const std::vector<int32_t>& cu,
                      uint64_t seed) {
  std::mt19937_64 rng(seed);
  Tensor ix(NSA_DTYPE_I32, {s.B, s.T, s.Hkv, cfg.slc_count}, true);
  ix.for_each([&](int64_t b, int64_t tok, int64_t h, int64_t k) {
    int64_t t = tok;
    for (size_t q = 0; q + 1 < cu.size(); ++q) {
      if (tok >= cu[q] && tok < cu[q + 1]) t = tok - cu[q];
    }
    const int64_t last = t / cfg.slc_block;
    int64_t j = rng() % 3 == 0 ? -1 : static_cast<int64_t>(rng() % (last + 1));
    if (tok == s.T - 1 && h == 0) j = -1;
    ix.set({b, tok, h, k}, static_cast<double>(j));
  });
  return ix;
}

TEST(CpuVsRef, CallerIndices) {
  int i = 0;
  for (const nsa_config& cfg : configs()) {
    Shape s;
    s.B = 2, s.T = 300, s.Hq = 6, s.Hkv = 2, s.Dk = 24, s.Dv = 16;
    Tensor ix = random_indices(s, cfg, {}, kSeed + 700 + i);
    compare_fwd(s, cfg, i % 2 ? NSA_DTYPE_BF16 : NSA_DTYPE_F32, kSeed + 800 + i, true, {},
                NSA_DTYPE_F32, &ix);
    const std::vector<int32_t> cu = {0, 100, 100, 300};
    s.B = 1;
    Tensor ixv = random_indices(s, cfg, cu, kSeed + 900 + i);
    compare_fwd(s, cfg, NSA_DTYPE_F32, kSeed + 1000 + i, false, cu, NSA_DTYPE_F32, &ixv);
    ++i;
  }
}

TEST(CpuVsRef, ExactTiesGoToLowerIndex) {
  // Equal compressed keys make every probability exactly 1/|C_t| in f32 and f64 alike, so the
  // fully covered blocks tie exactly; SPEC 4.3 breaks ties to the lower block index.
  Shape s;
  s.T = 640, s.Hq = 3, s.Hkv = 1, s.Dk = 24, s.Dv = 16;
  const nsa_config cfg = configs()[1];  // l = 32, d = 16, l' = 64, n = 5
  for (nsa_dtype dt : {NSA_DTYPE_F32, NSA_DTYPE_BF16}) {
    FwdCase c = make_case(s, cfg, dt, kSeed + 1200, true);
    FwdCase r = make_case(s, cfg, dt, kSeed + 1200, true);
    c.k_cmp.fill(0.5);
    r.k_cmp.fill(0.5);
    std::string msg;
    ASSERT_EQ(run(NSA_BACKEND_CPU, 0, c.params(), &msg), NSA_OK) << msg;
    ASSERT_EQ(run(NSA_BACKEND_REF, 0, r.params(), &msg), NSA_OK) << msg;
    // t = 639: J = 9; forced {0, 8, 9}; blocks 1 .. 7 tie, so 1 and 2 fill the two free slots.
    const int32_t want[5] = {0, 1, 2, 8, 9};
    for (int k = 0; k < 5; ++k) EXPECT_EQ(c.idx_out.at_i32({0, 639, 0, k}), want[k]) << k;
    EXPECT_TRUE(c.idx_out.storage() == r.idx_out.storage()) << "cpu and ref selections differ";
  }
}

TEST(CpuVsRef, ThreadsBitwiseIdentical) {
  Shape s;
  s.T = 400, s.Hq = 6, s.Hkv = 2, s.Dk = 24, s.Dv = 16;
  for (nsa_dtype dt : {NSA_DTYPE_F32, NSA_DTYPE_BF16}) {
    FwdCase one = make_case(s, configs()[1], dt, kSeed + 1100, true, {0, 7, 300, 400});
    FwdCase two = make_case(s, configs()[1], dt, kSeed + 1100, true, {0, 7, 300, 400});
    std::string msg;
    ASSERT_EQ(run(NSA_BACKEND_CPU, 1, one.params(), &msg), NSA_OK) << msg;
    ASSERT_EQ(run(NSA_BACKEND_CPU, 2, two.params(), &msg), NSA_OK) << msg;
    for (auto [a, b] : {std::pair{&one.o, &two.o}, std::pair{&one.o_cmp, &two.o_cmp},
                        std::pair{&one.o_slc, &two.o_slc}, std::pair{&one.o_win, &two.o_win},
                        std::pair{&one.lse_cmp, &two.lse_cmp}, std::pair{&one.lse_slc, &two.lse_slc},
                        std::pair{&one.lse_win, &two.lse_win}, std::pair{&one.idx_out, &two.idx_out}}) {
      EXPECT_TRUE(a->storage() == b->storage()) << "1 and 2 threads differ";
    }
  }
}

}  // namespace
