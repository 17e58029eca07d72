// The compression functions (SPEC.md section 5: mean and mlp) of every backend under test
// (backend_harness.h) against the float64 reference: T around block edges and below a block,
// overlapping and non-overlapping blocks, strided views, variable-length packing, f32 and bf16
// inputs and outputs; and, for the CPU backend alone, 1 vs 2 threads bitwise.
#include <gtest/gtest.h>

#include <algorithm>
#include <sstream>

#include "backend_harness.h"
#include "test_util.h"

namespace {
using namespace nsa_test;

constexpr double kEps = 1.0 / (1 << 24);  // f32 unit roundoff, 2^-24
// One bf16 ulp is at most 2^-7 of the value: both results are rounded to bf16 on store and can
// land on the two sides of one rounding boundary.
constexpr double kBf16Rel = 1.0 / (1 << 7);

struct CmpCase {
  nsa_config cfg{};
  nsa_cmp_kind kind = NSA_CMP_MEAN;
  std::vector<int32_t> cu;
  Tensor x, pos, w1, b1, w2, b2, out;

  nsa_compress_params params() {
    nsa_compress_params p;
    nsa_compress_params_init(&p);
    p.cfg = cfg;
    p.kind = kind;
    p.x = x.desc();
    if (!cu.empty()) {
      p.cu_seqlens = cu.data();
      p.num_seqs = static_cast<int64_t>(cu.size()) - 1;
    }
    if (kind == NSA_CMP_MLP) {
      p.pos = pos.desc(), p.w1 = w1.desc(), p.b1 = b1.desc(), p.w2 = w2.desc(), p.b2 = b2.desc();
    }
    p.out = out.desc();
    return p;
  }
};

// x ~ U(-1, 1); the weights are scaled by 1/sqrt(fan-in) so every layer stays O(1).
CmpCase make_cmp(int64_t B, int64_t T, int64_t H, int64_t D, int64_t Dh, const nsa_config& cfg,
                 nsa_cmp_kind kind, nsa_dtype dt, nsa_dtype out_dt, bool padded, uint64_t seed,
                 std::vector<int32_t> cu = {}) {
  CmpCase c;
  c.cfg = cfg, c.kind = kind, c.cu = std::move(cu);
  std::mt19937_64 rng(seed);
  const int64_t l = cfg.cmp_block, L = l * D;
  c.x = Tensor(dt, {B, T, H, D}, padded);
  c.x.fill_uniform(rng, -1.0, 1.0);
  if (kind == NSA_CMP_MLP) {
    c.pos = Tensor(dt, {H, l, D}, padded);
    c.w1 = Tensor(dt, {H, Dh, L}, padded);
    c.b1 = Tensor(dt, {H, Dh}, padded);
    c.w2 = Tensor(dt, {H, D, Dh}, padded);
    c.b2 = Tensor(dt, {H, D}, padded);
    c.pos.fill_uniform(rng, -0.5, 0.5);
    c.w1.fill_uniform(rng, -1.0 / std::sqrt(double(L)), 1.0 / std::sqrt(double(L)));
    c.b1.fill_uniform(rng, -0.5, 0.5);
    c.w2.fill_uniform(rng, -1.0 / std::sqrt(double(Dh)), 1.0 / std::sqrt(double(Dh)));
    c.b2.fill_uniform(rng, -0.5, 0.5);
  }
  c.out = Tensor(out_dt, {B, cmp_rows(cfg, T, c.cu), H, D}, padded);
  return c;
}

nsa_status run(const BackendUnderTest& be, CmpCase& c, int threads, std::string* msg) {
  return run_on(be, c.params(), threads, msg);
}

void compare(const BackendUnderTest& be, int64_t B, int64_t T, int64_t H, int64_t D, int64_t Dh,
             const nsa_config& cfg, nsa_cmp_kind kind, nsa_dtype dt, nsa_dtype out_dt, bool padded,
             uint64_t seed, std::vector<int32_t> cu = {}) {
  std::ostringstream os;
  os << "B=" << B << " T=" << T << " H=" << H << " D=" << D << " Dh=" << Dh
     << " l=" << cfg.cmp_block << " d=" << cfg.cmp_stride
     << (kind == NSA_CMP_MLP ? " mlp " : " mean ") << nsa_dtype_name(dt) << "->"
     << nsa_dtype_name(out_dt) << (padded ? " padded" : "") << (cu.empty() ? "" : " varlen");
  SCOPED_TRACE(os.str());
  CmpCase ref = make_cmp(B, T, H, D, Dh, cfg, kind, dt, out_dt, padded, seed, cu);
  CmpCase cpu = make_cmp(B, T, H, D, Dh, cfg, kind, dt, out_dt, padded, seed, cu);
  std::string msg;
  ASSERT_EQ(run(oracle(), ref, 0, &msg), NSA_OK) << msg;
  ASSERT_EQ(run(be, cpu, 0, &msg), NSA_OK) << msg;
  // mean: an f32 sum of l values of size <= 1, error <= l 2^-24. mlp: two f32 dot products of
  // l*D and Dh terms whose sums of |terms| are O(sqrt(fan-in)) <= O(fan-in); x4 for the O(1)
  // biases and position terms added on the way.
  const int64_t terms = kind == NSA_CMP_MEAN ? cfg.cmp_block : cfg.cmp_block * D + Dh;
  const double tol = 4.0 * static_cast<double>(terms) * kEps;
  const double rel = out_dt == NSA_DTYPE_BF16 ? kBf16Rel : 0.0;
  int64_t bad = 0;
  double worst = 0.0;
  cpu.out.for_each([&](int64_t a, int64_t b, int64_t c, int64_t d) {
    const int64_t off = cpu.out.logical_offset(a, b, c, d);
    const double x = cpu.out.get_raw(off), y = ref.out.get_raw(off);
    worst = std::max(worst, std::fabs(x - y));
    bad += !(std::fabs(x - y) <= tol + rel * std::fabs(y));
  });
  EXPECT_EQ(bad, 0) << "elements off; tol " << tol << " + " << rel << "*|ref|, worst " << worst;
  if (padded) {  // the padding of a strided output holds NaN until something writes it
    const int64_t elems = static_cast<int64_t>(cpu.out.storage().size() / nsa_dtype_size(out_dt));
    int64_t nan = 0;
    for (int64_t i = 0; i < elems; ++i) nan += std::isnan(cpu.out.get_raw(i)) ? 1 : 0;
    EXPECT_EQ(nan, elems - cpu.out.numel()) << "padding written or NaN produced";
  }
}

std::vector<nsa_config> cmp_configs() {
  nsa_config def;
  nsa_config_default(&def);  // l = 32, d = 16: overlapping blocks
  return {def, config(64, 64, 64, 4, 1, 2, 100), config(16, 8, 32, 6, 1, 2, 48),
          config(5, 3, 8, 4, 1, 2, 16)};
}

class CompressVsRef : public ::testing::TestWithParam<BackendUnderTest> {};
INSTANTIATE_TEST_SUITE_P(Backends, CompressVsRef, ::testing::ValuesIn(backends_under_test(kOpCompress)),
                         backend_test_name);

TEST_P(CompressVsRef, Mean) {
  int i = 0;
  for (int64_t T : {1, 31, 32, 33, 65, 300}) {
    for (const nsa_config& cfg : cmp_configs()) {
      const nsa_dtype dt = i % 2 ? NSA_DTYPE_BF16 : NSA_DTYPE_F32;
      const nsa_dtype out_dt = i % 3 ? NSA_DTYPE_F32 : NSA_DTYPE_BF16;
      compare(GetParam(), 2, T, 3, 24, 0, cfg, NSA_CMP_MEAN, dt, out_dt, i % 2 == 0, 77 + i);
      ++i;
    }
  }
  compare(GetParam(), 1, 300, 2, 17, 0, cmp_configs()[0], NSA_CMP_MEAN, NSA_DTYPE_F32,
          NSA_DTYPE_F32, true, 1, {0, 31, 31, 64, 300});
}

TEST_P(CompressVsRef, Mlp) {
  int i = 0;
  for (int64_t T : {1, 31, 32, 33, 65, 300}) {
    for (const nsa_config& cfg : cmp_configs()) {
      const nsa_dtype dt = i % 2 ? NSA_DTYPE_BF16 : NSA_DTYPE_F32;
      const nsa_dtype out_dt = i % 3 ? NSA_DTYPE_F32 : NSA_DTYPE_BF16;
      compare(GetParam(), 1, T, 2, 12, 20, cfg, NSA_CMP_MLP, dt, out_dt, i % 2 == 1, 300 + i);
      ++i;
    }
  }
  compare(GetParam(), 1, 300, 2, 12, 20, cmp_configs()[0], NSA_CMP_MLP, NSA_DTYPE_BF16,
          NSA_DTYPE_F32, true, 2, {0, 31, 31, 64, 300});
}

// CPU only: the thread count is the CPU kernels' notion.
TEST(CpuCompress, ThreadsBitwiseIdentical) {
  for (nsa_cmp_kind kind : {NSA_CMP_MEAN, NSA_CMP_MLP}) {
    CmpCase one = make_cmp(1, 700, 2, 12, 20, cmp_configs()[0], kind, NSA_DTYPE_F32, NSA_DTYPE_F32,
                           true, 9, {0, 100, 700});
    CmpCase two = make_cmp(1, 700, 2, 12, 20, cmp_configs()[0], kind, NSA_DTYPE_F32, NSA_DTYPE_F32,
                           true, 9, {0, 100, 700});
    std::string msg;
    ASSERT_EQ(run(backend(NSA_BACKEND_CPU), one, 1, &msg), NSA_OK) << msg;
    ASSERT_EQ(run(backend(NSA_BACKEND_CPU), two, 2, &msg), NSA_OK) << msg;
    EXPECT_TRUE(one.out.storage() == two.out.storage()) << "1 and 2 threads differ";
  }
}

}  // namespace
