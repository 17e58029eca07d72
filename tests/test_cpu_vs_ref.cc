// The forward of every backend under test (backend_harness.h; f32 accumulation) against the
// float64 reference (the oracle of SPEC.md) on awkward shapes: T around block edges, G in
// {1, 3, 16}, Dk != Dv, four configs, strided views, variable-length packing, f32 and bf16, and
// caller-supplied indices. Selected indices must be equal; values agree to bounds derived from
// f32 rounding. The thread-count and Highway-target tests are the CPU backend's alone.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <sstream>

#include "backend_harness.h"
#include "ref/ref.h"
#include "test_util.h"

namespace {
using namespace nsa_test;

constexpr double kEps = 1.0 / (1 << 24);  // f32 unit roundoff, 2^-24
// One bf16 ulp is at most 2^-7 of the value: the f32 and f64 results, each rounded to bf16 on
// store, can land on the two sides of one rounding boundary.
constexpr double kBf16Rel = 1.0 / (1 << 7);
constexpr double kBf16U = 1.0 / (1 << 8);  // bf16 unit roundoff (8-bit significand, nearest)

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
      os << "[" << a << "," << b << "," << c << "," << d << "] got " << x << " ref " << y;
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

// Runs the oracle and backend `be` (with bf16 arithmetic `math`: F32 unless a test is about it)
// on identical copies of a case and compares every output.
void compare_fwd(const BackendUnderTest& be, const Shape& s, const nsa_config& cfg, nsa_dtype dt,
                 uint64_t seed, bool padded, std::vector<int32_t> cu = {},
                 nsa_dtype out_dt = NSA_DTYPE_F32, const Tensor* idx_in = nullptr,
                 nsa_bf16_math math = NSA_BF16_MATH_F32) {
  SCOPED_TRACE(describe(s, cfg, dt, padded) + " seed=" + std::to_string(seed) +
               " bf16_math=" + std::to_string(math));
  FwdCase ref = make_case(s, cfg, dt, seed, padded, cu, out_dt);
  FwdCase cpu = make_case(s, cfg, dt, seed, padded, cu, out_dt);
  nsa_fwd_params pr = ref.params(), pc = cpu.params();
  if (idx_in) pr.slc_indices_in = pc.slc_indices_in = idx_in->desc();
  std::string msg;
  ASSERT_EQ(run_on(oracle(), pr, 0, &msg), NSA_OK) << msg;
  ASSERT_EQ(run_on(be, pc, 0, &msg, math), NSA_OK) << msg;

  // K: the most terms any f32 sum of this case adds, a Dk-term score dot plus up to
  // min(T, max(n l', w)) softmax-weighted O(1) values (Tc is smaller in every case here); each
  // rounding costs <= 2^-24 relative, so the error is ~K 2^-24. x16: |s| stays below ~16 here,
  // and exp turns a relative score error into a relative weight error |s| times larger.
  const int64_t keys = std::min<int64_t>(
      s.T, std::max<int64_t>({int64_t{cfg.slc_count} * cfg.slc_block, cfg.window}));
  const double tol = 16.0 * static_cast<double>(s.Dk + keys) * kEps;
  const double rel = out_dt == NSA_DTYPE_BF16 ? kBf16Rel : 0.0;
  // bf16 arithmetic: each softmax weight rounded to bf16 for P V (relative error <= 2^-8, the
  // sum l stays f32) moves a branch's output by at most 2^-8 max|v|, and o, their sum weighted
  // by three gates in [0, 1], by three times that. Q K^T of bf16 elements is exact term by term.
  const double pv =
      math == NSA_BF16_MATH_F32 ? 0.0 : kBf16U * std::max(max_abs(cpu.v), max_abs(cpu.v_cmp));
  expect_close("o", cpu.o, ref.o, tol + 3 * pv, rel);
  expect_close("o_cmp", cpu.o_cmp, ref.o_cmp, tol + pv, rel);
  expect_close("o_slc", cpu.o_slc, ref.o_slc, tol + pv, rel);
  expect_close("o_win", cpu.o_win, ref.o_win, tol + pv, rel);
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

class FwdVsRef : public ::testing::TestWithParam<BackendUnderTest> {};
INSTANTIATE_TEST_SUITE_P(Backends, FwdVsRef, ::testing::ValuesIn(backends_under_test(kOpFwd)),
                         backend_test_name);

TEST_P(FwdVsRef, ShortShapes) {
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
          compare_fwd(GetParam(), s, cfg, dt, kSeed + i, (i % 2) == 1);
          ++i;
        }
      }
    }
  }
}

TEST_P(FwdVsRef, LongSequence) {
  int i = 0;
  for (const nsa_config& cfg : configs()) {
    Shape s;
    s.T = 1000, s.Hq = 3, s.Hkv = 1, s.Dk = 24, s.Dv = 16;
    compare_fwd(GetParam(), s, cfg, NSA_DTYPE_F32, kSeed + 100 + i, i % 2 == 0);
    s.Hq = 2, s.Hkv = 2;  // G = 1
    compare_fwd(GetParam(), s, cfg, NSA_DTYPE_BF16, kSeed + 200 + i, i % 2 == 1);
    ++i;
  }
  Shape s;
  s.T = 1000, s.Hq = 16, s.Hkv = 1, s.Dk = 24, s.Dv = 16;
  compare_fwd(GetParam(), s, configs()[3], NSA_DTYPE_F32, kSeed + 300, true);
}

TEST_P(FwdVsRef, Varlen) {
  // Lengths 1, 0 (empty), 32, 64, 63, 240: positions restart in every sequence.
  const std::vector<int32_t> cu = {0, 1, 1, 33, 97, 160, 400};
  int i = 0;
  for (const nsa_config& cfg : configs()) {
    for (int64_t G : {1, 3}) {
      Shape s;
      s.T = 400, s.Hkv = 2, s.Hq = 2 * G, s.Dk = 24, s.Dv = 16;
      const nsa_dtype dt = i % 2 ? NSA_DTYPE_BF16 : NSA_DTYPE_F32;
      compare_fwd(GetParam(), s, cfg, dt, kSeed + 400 + i, true, cu);
      ++i;
    }
  }
}

TEST_P(FwdVsRef, HeadDimsAndBf16Outputs) {
  // Head dims off the 16-lane vector width, Dk > Dv and Dk < Dv; outputs stored as bf16.
  int i = 0;
  for (auto [dk, dv] : {std::pair{5, 3}, std::pair{40, 8}, std::pair{8, 40}, std::pair{17, 33}}) {
    Shape s;
    s.B = 2, s.T = 150, s.Hq = 6, s.Hkv = 2, s.Dk = dk, s.Dv = dv;
    compare_fwd(GetParam(), s, configs()[i % 4], NSA_DTYPE_F32, kSeed + 500 + i, i % 2 == 0, {},
                NSA_DTYPE_BF16);
    compare_fwd(GetParam(), s, configs()[(i + 1) % 4], NSA_DTYPE_BF16, kSeed + 600 + i, true, {},
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

TEST_P(FwdVsRef, CallerIndices) {
  int i = 0;
  for (const nsa_config& cfg : configs()) {
    Shape s;
    s.B = 2, s.T = 300, s.Hq = 6, s.Hkv = 2, s.Dk = 24, s.Dv = 16;
    Tensor ix = random_indices(s, cfg, {}, kSeed + 700 + i);
    compare_fwd(GetParam(), s, cfg, i % 2 ? NSA_DTYPE_BF16 : NSA_DTYPE_F32, kSeed + 800 + i, true,
                {}, NSA_DTYPE_F32, &ix);
    const std::vector<int32_t> cu = {0, 100, 100, 300};
    s.B = 1;
    Tensor ixv = random_indices(s, cfg, cu, kSeed + 900 + i);
    compare_fwd(GetParam(), s, cfg, NSA_DTYPE_F32, kSeed + 1000 + i, false, cu, NSA_DTYPE_F32,
                &ixv);
    ++i;
  }
}

TEST_P(FwdVsRef, ExactTiesGoToLowerIndex) {
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
    ASSERT_EQ(run_on(GetParam(), c.params(), 0, &msg), NSA_OK) << msg;
    ASSERT_EQ(run_on(oracle(), r.params(), 0, &msg), NSA_OK) << msg;
    // t = 639: J = 9; forced {0, 8, 9}; blocks 1 .. 7 tie, so 1 and 2 fill the two free slots.
    const int32_t want[5] = {0, 1, 2, 8, 9};
    for (int k = 0; k < 5; ++k) EXPECT_EQ(c.idx_out.at_i32({0, 639, 0, k}), want[k]) << k;
    EXPECT_TRUE(c.idx_out.storage() == r.idx_out.storage()) << "backend and ref selections differ";
  }
}

// 1 and 2 threads (G = 3, padded lanes) or 1 and 3 threads (G = 16): the same bits in every
// output. CPU only: the thread count is the CPU kernels' notion (nsa.h promises no thread
// dependence of the CPU backend).
TEST(CpuFwd, ThreadsBitwiseIdentical) {
  struct Run {
    int64_t T, Hq;
    int threads;
    std::vector<int32_t> cu;
  };
  for (const Run& r : {Run{400, 6, 2, {0, 7, 300, 400}}, Run{300, 32, 3, {0, 7, 200, 300}}}) {
    Shape s;
    s.T = r.T, s.Hq = r.Hq, s.Hkv = 2, s.Dk = 24, s.Dv = 16;
    for (nsa_dtype dt : {NSA_DTYPE_F32, NSA_DTYPE_BF16}) {
      FwdCase one = make_case(s, configs()[1], dt, kSeed + 1100, true, r.cu);
      FwdCase many = make_case(s, configs()[1], dt, kSeed + 1100, true, r.cu);
      std::string msg;
      ASSERT_EQ(run_on(backend(NSA_BACKEND_CPU), one.params(), 1, &msg), NSA_OK) << msg;
      ASSERT_EQ(run_on(backend(NSA_BACKEND_CPU), many.params(), r.threads, &msg), NSA_OK) << msg;
      for (auto [a, b] :
           {std::pair{&one.o, &many.o}, std::pair{&one.o_cmp, &many.o_cmp},
            std::pair{&one.o_slc, &many.o_slc}, std::pair{&one.o_win, &many.o_win},
            std::pair{&one.lse_cmp, &many.lse_cmp}, std::pair{&one.lse_slc, &many.lse_slc},
            std::pair{&one.lse_win, &many.lse_win}, std::pair{&one.idx_out, &many.idx_out}}) {
        EXPECT_TRUE(a->storage() == b->storage())
            << "1 and " << r.threads << " threads differ, Hq=" << r.Hq;
      }
    }
  }
}

// ---- Group sizes around the SIMD width (the CPU's forward_lanes.cc puts a group's heads in
// lanes; for any other backend these are more group sizes against the oracle). ----

TEST_P(FwdVsRef, HeadsInLanes) {
  // G = 8 and 24 leave padding lanes (AVX-512), 32 needs two head vectors; Dv = 33 leaves a
  // tail after the 16-column output blocks; T = 700 walks many 64-key chunks and, with n = 5,
  // merges and splits runs of adjacent selected blocks.
  int i = 0;
  for (int64_t G : {8, 16, 24, 32}) {
    for (auto [T, dk, dv] : {std::tuple{65, 24, 16}, std::tuple{700, 40, 33}}) {
      Shape s;
      s.B = T == 65 ? 2 : 1, s.T = T, s.Hkv = G == 32 ? 1 : 2, s.Dk = dk, s.Dv = dv;
      s.Hq = G * s.Hkv;
      const nsa_config cfg = configs()[i % 4];
      compare_fwd(GetParam(), s, cfg, i % 2 ? NSA_DTYPE_BF16 : NSA_DTYPE_F32, kSeed + 1300 + i,
                  i % 3 == 0, {}, i % 4 == 3 ? NSA_DTYPE_BF16 : NSA_DTYPE_F32);
      ++i;
    }
  }
  Shape s;
  s.T = 400, s.Hq = 32, s.Hkv = 2, s.Dk = 24, s.Dv = 16;
  const std::vector<int32_t> cu = {0, 1, 1, 33, 97, 160, 400};
  for (const nsa_config& cfg : configs()) {
    compare_fwd(GetParam(), s, cfg, i % 2 ? NSA_DTYPE_BF16 : NSA_DTYPE_F32, kSeed + 1300 + i, true,
                cu);
    Tensor ix = random_indices(s, cfg, cu, kSeed + 1400 + i);
    compare_fwd(GetParam(), s, cfg, NSA_DTYPE_F32, kSeed + 1500 + i, false, cu, NSA_DTYPE_F32, &ix);
    ++i;
  }
}

// ---- Selection up to genuine near-ties. ----

// The reference's block scores for (batch b, position t, KV head hk) of a fixed-length case.
std::vector<double> reference_scores(const FwdCase& c, int64_t b, int64_t t, int64_t hk) {
  const Shape& s = c.shape;
  const int64_t G = s.Hq / s.Hkv, nc = nsa::ref::visible_cmp_count(c.cfg, t);
  const double scale = c.cfg.scale != 0 ? c.cfg.scale : 1.0 / std::sqrt(double(s.Dk));
  std::vector<std::vector<double>> keys(nc, std::vector<double>(s.Dk));
  for (int64_t i = 0; i < nc; ++i) {
    for (int64_t x = 0; x < s.Dk; ++x) keys[i][x] = c.k_cmp.at({b, i, hk, x});
  }
  std::vector<std::vector<double>> p_cmp(G);
  for (int64_t h = 0; h < G; ++h) {
    std::vector<double> q(s.Dk);
    for (int64_t x = 0; x < s.Dk; ++x) q[x] = c.q.at({b, t, hk * G + h, x});
    p_cmp[h] = nsa::ref::attend(q, keys, keys, scale).p;
  }
  return nsa::ref::block_scores(c.cfg, t, p_cmp);
}

// Whether `got` is the reference selection `want` up to near-ties: the same number of blocks,
// and every block in one set but not the other scores within `gap` of every such block of the
// other set (so an f32 ranking may swap them). Both are the reported form (-1 padded).
bool same_up_to_near_ties(const std::vector<double>& score, const std::vector<int32_t>& got,
                          const std::vector<int32_t>& want, double gap, std::string* why) {
  auto present = [](const std::vector<int32_t>& set, int32_t j) {
    return std::find(set.begin(), set.end(), j) != set.end();
  };
  std::vector<int32_t> only_got, only_want;
  for (int32_t j : got)
    if (j >= 0 && !present(want, j)) only_got.push_back(j);
  for (int32_t j : want)
    if (j >= 0 && !present(got, j)) only_want.push_back(j);
  if (only_got.size() != only_want.size()) {
    *why = "different set sizes";
    return false;
  }
  for (int32_t a : only_got) {
    for (int32_t b : only_want) {
      if (std::fabs(score[a] - score[b]) > gap) {
        *why = "block " + std::to_string(a) + " replaced block " + std::to_string(b) +
               ", score gap " + std::to_string(std::fabs(score[a] - score[b]));
        return false;
      }
    }
  }
  return true;
}

// The score-gap tolerance: a block score sums at most G * Tc f32 probabilities, each within
// ~(Dk + Tc) 2^-24 relative of the f64 one (the dot, then the softmax sum), x16 for |s| up to
// ~16 as in compare_fwd. Scores are O(G), so this is relative to the largest score.
double score_gap(const Shape& s, int64_t Tc, double max_score) {
  return 16.0 * static_cast<double>(s.Dk + Tc) * kEps * max_score;
}

TEST_P(FwdVsRef, SelectionEqualUpToNearTies) {
  // Compressed keys drawn from a few values make many block scores nearly equal, so the f32 and
  // f64 rankings may differ at the top-n boundary; they must differ only by near-tied blocks.
  Shape s;
  s.T = 1000, s.Hq = 16, s.Hkv = 1, s.Dk = 24, s.Dv = 16;
  const nsa_config cfg = configs()[1];  // n = 5: the selection binds from t = 320
  FwdCase c = make_case(s, cfg, NSA_DTYPE_F32, kSeed + 1700);
  FwdCase r = make_case(s, cfg, NSA_DTYPE_F32, kSeed + 1700);
  for (FwdCase* x : {&c, &r}) {
    std::mt19937_64 same(kSeed);
    x->k_cmp.for_each([&](int64_t a, int64_t b, int64_t h, int64_t d) {
      const double noise = 1e-6 * (double(same() % 1000) / 1000.0);  // breaks exact ties, barely
      x->k_cmp.set({a, b, h, d}, (d < 2 ? 0.25 * double(same() % 3) : 0.0) + noise);
    });
  }
  std::string msg;
  ASSERT_EQ(run_on(GetParam(), c.params(), 0, &msg), NSA_OK) << msg;
  ASSERT_EQ(run_on(oracle(), r.params(), 0, &msg), NSA_OK) << msg;
  const int64_t Tc = nsa_cmp_len(&cfg, s.T);
  int64_t differ = 0;
  for (int64_t t = 0; t < s.T; ++t) {
    std::vector<int32_t> got(cfg.slc_count), want(cfg.slc_count);
    for (int k = 0; k < cfg.slc_count; ++k) {
      got[k] = c.idx_out.at_i32({0, t, 0, k});
      want[k] = r.idx_out.at_i32({0, t, 0, k});
    }
    if (got == want) continue;
    ++differ;
    const std::vector<double> score = reference_scores(r, 0, t, 0);
    const double gap = score_gap(s, Tc, *std::max_element(score.begin(), score.end()));
    std::string why;
    EXPECT_TRUE(same_up_to_near_ties(score, got, want, gap, &why)) << "t=" << t << ": " << why;
  }
  // The checker itself must reject a real difference: swap the best free block for the worst.
  const int64_t t = s.T - 1;
  const std::vector<double> score = reference_scores(r, 0, t, 0);
  std::vector<int32_t> want(cfg.slc_count);
  for (int k = 0; k < cfg.slc_count; ++k) want[k] = r.idx_out.at_i32({0, t, 0, k});
  std::vector<int32_t> wrong = want;
  const int64_t last = t / cfg.slc_block;
  int32_t worst = -1;
  for (int32_t j = 1; j < last - 1; ++j) {
    if (std::find(want.begin(), want.end(), j) == want.end() &&
        (worst < 0 || score[j] < score[worst])) {
      worst = j;
    }
  }
  ASSERT_GE(worst, 0);
  wrong[1] = worst;  // want[0] is forced block 0, want[1] the best-ranked free block
  std::string why;
  const double gap = score_gap(s, Tc, *std::max_element(score.begin(), score.end()));
  EXPECT_FALSE(same_up_to_near_ties(score, wrong, want, gap, &why));
  // ... and accept a swap of two blocks whose scores are closer than the gap.
  const std::vector<double> close = {1.0, 0.5, 0.5 + 0.5 * gap, 0.1, 1.0};
  EXPECT_TRUE(same_up_to_near_ties(close, {0, 1, 4, -1}, {0, 2, 4, -1}, gap, &why)) << why;
  EXPECT_FALSE(same_up_to_near_ties(close, {0, 3, 4, -1}, {0, 2, 4, -1}, gap, &why));
  std::printf("near-tie check: %lld of %lld rows differ from the reference, all within the gap\n",
              (long long)differ, (long long)s.T);
}

// The CPU kernels dispatch at run time to the best Highway target; every other target this
// machine runs must match the reference too (as CpuBwd.EveryTargetMatchesReference): G = 1, 3,
// 5 and 8 (the keys in lanes for steps 1-2, 4 and 5: head rows padded to 1, 4, 8, 8; Dv = 36
// leaves a column tail; T = 700 with d = 8 spans two groups of 64 compressed keys), G = 16
// (heads in lanes), bf16, varlen, caller indices, and bf16 arithmetic at G = 4 and 16. CPU only:
// targets are a CPU notion. Small shapes, to keep the suite's time.
TEST(CpuFwd, EveryTargetMatchesReference) {
  const BackendUnderTest cpu = backend(NSA_BACKEND_CPU);
  const std::vector<int32_t> cu = {0, 1, 1, 33, 97, 130};
  for_each_hwy_target([&] {
    Shape s;
    s.T = 130, s.Hq = 2, s.Hkv = 2, s.Dk = 24, s.Dv = 16;  // G = 1
    compare_fwd(cpu, s, configs()[3], NSA_DTYPE_F32, kSeed + 1800, false);
    s.Hq = 6;  // G = 3, bf16 in and out, strided
    compare_fwd(cpu, s, configs()[1], NSA_DTYPE_BF16, kSeed + 1801, true, {}, NSA_DTYPE_BF16);
    s.Hq = 32;  // G = 16, varlen
    compare_fwd(cpu, s, configs()[3], NSA_DTYPE_F32, kSeed + 1802, true, cu);
    s.Hq = 6, s.B = 2, s.T = 100;
    Tensor ix = random_indices(s, configs()[2], {}, kSeed + 1803);
    compare_fwd(cpu, s, configs()[2], NSA_DTYPE_F32, kSeed + 1804, true, {}, NSA_DTYPE_F32, &ix);
    s.B = 1, s.T = 700, s.Hq = 10, s.Dk = 20, s.Dv = 36;  // G = 5
    compare_fwd(cpu, s, configs()[3], NSA_DTYPE_F32, kSeed + 1805, false);
    s.T = 300, s.Hq = 16;  // G = 8, bf16
    compare_fwd(cpu, s, configs()[1], NSA_DTYPE_BF16, kSeed + 1806, false);
    // bf16 arithmetic (the first variant this CPU runs): G = 4 with the keys in lanes on any
    // target, G = 16 with the heads in lanes (16-lane targets; f32 on the others).
    const std::vector<nsa_bf16_math> maths = runnable_bf16_maths();
    if (maths.empty()) return;
    s.T = 300, s.Hq = 8, s.Dk = 24, s.Dv = 20;
    compare_fwd(cpu, s, configs()[1], NSA_DTYPE_BF16, kSeed + 1807, true, {}, NSA_DTYPE_F32,
                nullptr, maths[0]);
    s.Hq = 32;
    compare_fwd(cpu, s, configs()[3], NSA_DTYPE_BF16, kSeed + 1808, false, {}, NSA_DTYPE_F32,
                nullptr, maths[0]);
  });
}

// ---- bf16 arithmetic (nsa_bf16_math), CPU only: the heads-in-lanes path (G > 8, 16 lanes)
// multiplies bf16 pairs with f32 accumulation where every input is bf16. Each variant this CPU
// runs is compared with the reference (tolerance in compare_fwd); the variants it cannot run are
// reported as not run. ----

// T below a block and off every block (1, 40, 130, 301), G = 16, 12 (padding lanes) and 32 (two
// head vectors) with the heads in lanes, G = 1, 3, 5 and 8 with the keys in lanes (stacks of 1
// to 32 rows), odd Dk (an unpaired last dim), Dv off the column blocks (20, 33, 36), the paper's
// dims, windows and selected blocks that start on odd keys (every config), strided views, bf16
// outputs, varlen and caller indices.
TEST(CpuFwdBf16Math, MatchesReferenceOnAwkwardShapes) {
  const std::vector<nsa_bf16_math> maths = runnable_bf16_maths();
  if (maths.empty()) GTEST_SKIP() << "no bf16 arithmetic variant runs on this CPU (no AVX-512)";
  const BackendUnderTest cpu = backend(NSA_BACKEND_CPU);
  const nsa_dtype bf = NSA_DTYPE_BF16, f32 = NSA_DTYPE_F32;
  const std::vector<int32_t> cu = {0, 1, 1, 33, 97, 130};
  for (nsa_bf16_math m : maths) {
    uint64_t seed = kSeed + 2000;
    for (int64_t T : {1, 40, 130, 301}) {
      compare_fwd(cpu, {1, T, 16, 1, 24, 16}, configs()[3], bf, ++seed, false, {}, f32, nullptr,
                  m);
    }
    compare_fwd(cpu, {2, 100, 24, 2, 17, 20}, configs()[1], bf, ++seed, true, {}, bf, nullptr, m);
    compare_fwd(cpu, {1, 300, 32, 1, 32, 33}, configs()[2], bf, ++seed, false, {}, f32, nullptr,
                m);
    compare_fwd(cpu, {1, 130, 32, 2, 24, 16}, configs()[3], bf, ++seed, true, cu, f32, nullptr, m);
    compare_fwd(cpu, {1, 700, 16, 1, 192, 128}, configs()[0], bf, ++seed, false, {}, f32, nullptr,
                m);
    const Shape s{2, 100, 32, 2, 24, 16};
    const Tensor ix = random_indices(s, configs()[2], {}, ++seed);
    compare_fwd(cpu, s, configs()[2], bf, ++seed, true, {}, f32, &ix, m);
    // The keys in lanes.
    for (int64_t T : {1, 40, 301}) {
      compare_fwd(cpu, {1, T, 2, 2, 24, 16}, configs()[3], bf, ++seed, false, {}, f32, nullptr,
                  m);
    }
    compare_fwd(cpu, {2, 130, 6, 2, 17, 20}, configs()[1], bf, ++seed, true, {}, bf, nullptr, m);
    compare_fwd(cpu, {1, 700, 10, 2, 20, 36}, configs()[3], bf, ++seed, false, {}, f32, nullptr,
                m);
    compare_fwd(cpu, {1, 130, 16, 2, 24, 33}, configs()[2], bf, ++seed, true, cu, f32, nullptr, m);
    compare_fwd(cpu, {1, 700, 4, 1, 192, 128}, configs()[0], bf, ++seed, false, {}, f32, nullptr,
                m);
    const Shape s4{2, 100, 8, 2, 24, 16};
    const Tensor ix4 = random_indices(s4, configs()[2], {}, ++seed);
    compare_fwd(cpu, s4, configs()[2], bf, ++seed, true, {}, f32, &ix4, m);
  }
}

// The CPU forward of case c with bf16 arithmetic `math` on `threads` threads.
FwdCase run_cpu_fwd(const Shape& s, uint64_t seed, nsa_bf16_math math, int threads,
                    std::vector<int32_t> cu = {}) {
  FwdCase c = make_case(s, configs()[1], NSA_DTYPE_BF16, seed, false, std::move(cu));
  std::string msg;
  EXPECT_EQ(run_on(backend(NSA_BACKEND_CPU), c.params(), threads, &msg, math), NSA_OK) << msg;
  return c;
}

// The emulation is the same arithmetic: equal bits where both run (no subnormal values here).
TEST(CpuFwdBf16Math, EmulationEqualsNativeBitForBit) {
  if (!nsa_bf16_math_available(NSA_BF16_MATH_NATIVE) ||
      !nsa_bf16_math_available(NSA_BF16_MATH_EMULATED)) {
    GTEST_SKIP() << "needs both NATIVE (AVX512_BF16) and EMULATED (AVX-512) on this CPU";
  }
  for (const Shape& s : {Shape{1, 301, 16, 1, 24, 16}, Shape{2, 150, 24, 2, 17, 33},
                         Shape{1, 301, 4, 1, 24, 16}, Shape{2, 150, 6, 2, 17, 33}}) {
    const FwdCase a = run_cpu_fwd(s, kSeed + 2100, NSA_BF16_MATH_NATIVE, 0);
    const FwdCase b = run_cpu_fwd(s, kSeed + 2100, NSA_BF16_MATH_EMULATED, 0);
    for (auto [x, y] : {std::pair{&a.o, &b.o}, std::pair{&a.o_cmp, &b.o_cmp},
                        std::pair{&a.lse_slc, &b.lse_slc}, std::pair{&a.idx_out, &b.idx_out}}) {
      EXPECT_TRUE(x->storage() == y->storage()) << "Hq=" << s.Hq << " Dk=" << s.Dk;
    }
  }
}

// The path runs (rounding P changes bits against F32; the selection, from f32 probabilities,
// does not change here), and its bits do not depend on the thread count.
TEST(CpuFwdBf16Math, TakesThePathWithBitsIndependentOfThreads) {
  const std::vector<nsa_bf16_math> maths = runnable_bf16_maths();
  if (maths.empty()) GTEST_SKIP() << "no bf16 arithmetic variant runs on this CPU (no AVX-512)";
  const std::vector<int32_t> cu = {0, 7, 200, 300};
  for (const Shape& s : {Shape{1, 300, 32, 2, 24, 16}, Shape{1, 300, 8, 2, 24, 16}})
  for (nsa_bf16_math m : maths) {
    const FwdCase f32 = run_cpu_fwd(s, kSeed + 2200, NSA_BF16_MATH_F32, 0, cu);
    const FwdCase one = run_cpu_fwd(s, kSeed + 2200, m, 1, cu);
    const FwdCase three = run_cpu_fwd(s, kSeed + 2200, m, 3, cu);
    EXPECT_FALSE(one.o.storage() == f32.o.storage()) << "math " << m << " computed as F32";
    EXPECT_TRUE(one.idx_out.storage() == f32.idx_out.storage()) << "math " << m;
    for (auto [x, y] : {std::pair{&one.o, &three.o}, std::pair{&one.o_slc, &three.o_slc},
                        std::pair{&one.o_win, &three.o_win}, std::pair{&one.lse_cmp, &three.lse_cmp},
                        std::pair{&one.idx_out, &three.idx_out}}) {
      EXPECT_TRUE(x->storage() == y->storage()) << "math " << m << ": 1 and 3 threads differ";
    }
  }
}

}  // namespace
