// The compression backward (nsa_compress_bwd, SPEC.md sections 5 and 6: mean and mlp) of every
// backend under test (backend_harness.h) against the float64 reference: overlapping (d < l) and
// disjoint (d = l) blocks, T off every block edge and T < l, several KV heads, D and hidden widths
// down to 1, variable-length packing with empty and one-token sequences, more compressed tokens
// than one mlp chunk (256), f32/bf16 inputs and outputs, strided views; and, for the CPU backend
// alone, 1/2/3 threads bitwise.
#include <gtest/gtest.h>

#include <algorithm>
#include <map>
#include <sstream>

#include "api_util.h"
#include "backend_harness.h"

namespace nsa_test {
namespace {

constexpr double kEps = 1.0 / (1 << 24);  // f32 unit roundoff, 2^-24
// One bf16 ulp is at most 2^-7 of the value: both results are rounded to bf16 on store and can
// land on the two sides of one rounding boundary.
constexpr double kBf16Rel = 1.0 / (1 << 7);

struct Dims {
  int64_t B = 1, T = 0, H = 1, D = 1, Dh = 1;
};

// One nsa_compress_bwd call, owned: random inputs, outputs NaN-filled where padded.
struct BwdCase {
  nsa_config cfg{};
  nsa_cmp_kind kind = NSA_CMP_MEAN;
  std::vector<int32_t> cu;
  Tensor x, pos, w1, b1, w2, b2, dout, dx, dpos, dw1, db1, dw2, db2;

  BwdCase(const Dims& s, const nsa_config& c, nsa_cmp_kind k, nsa_dtype dt, nsa_dtype out_dt,
          bool padded, uint64_t seed, std::vector<int32_t> cu_seqlens)
      : cfg(c), kind(k), cu(std::move(cu_seqlens)) {
    std::mt19937_64 rng(seed);
    const int64_t l = cfg.cmp_block, L = l * s.D, H = s.H;
    x = Tensor(dt, {s.B, s.T, H, s.D}, padded);
    x.fill_uniform(rng, -1.0, 1.0);
    dout = Tensor(dt, {s.B, cmp_rows(cfg, s.T, cu), H, s.D}, padded);
    dout.fill_uniform(rng, -1.0, 1.0);
    dx = Tensor(out_dt, {s.B, s.T, H, s.D}, padded);
    if (kind != NSA_CMP_MLP) return;
    // Weights scaled by 1/sqrt(fan-in), so every layer stays O(1).
    pos = Tensor(dt, {H, l, s.D}, padded);
    w1 = Tensor(dt, {H, s.Dh, L}, padded);
    b1 = Tensor(dt, {H, s.Dh}, padded);
    w2 = Tensor(dt, {H, s.D, s.Dh}, padded);
    b2 = Tensor(dt, {H, s.D}, padded);
    pos.fill_uniform(rng, -0.5, 0.5);
    w1.fill_uniform(rng, -1.0 / std::sqrt(double(L)), 1.0 / std::sqrt(double(L)));
    b1.fill_uniform(rng, -0.5, 0.5);
    w2.fill_uniform(rng, -1.0 / std::sqrt(double(s.Dh)), 1.0 / std::sqrt(double(s.Dh)));
    b2.fill_uniform(rng, -0.5, 0.5);
    dpos = Tensor(out_dt, {H, l, s.D}, padded);
    dw1 = Tensor(out_dt, {H, s.Dh, L}, padded);
    db1 = Tensor(out_dt, {H, s.Dh}, padded);
    dw2 = Tensor(out_dt, {H, s.D, s.Dh}, padded);
    db2 = Tensor(out_dt, {H, s.D}, padded);
  }

  nsa_compress_bwd_params params() {
    nsa_compress_bwd_params p;
    nsa_compress_bwd_params_init(&p);
    p.cfg = cfg;
    p.kind = kind;
    p.x = x.desc();
    if (!cu.empty()) {
      p.cu_seqlens = cu.data();
      p.num_seqs = static_cast<int64_t>(cu.size()) - 1;
    }
    p.dout = dout.desc();
    p.dx = dx.desc();
    if (kind == NSA_CMP_MLP) {
      p.pos = pos.desc(), p.w1 = w1.desc(), p.b1 = b1.desc(), p.w2 = w2.desc(), p.b2 = b2.desc();
      p.dpos = dpos.desc(), p.dw1 = dw1.desc(), p.db1 = db1.desc(), p.dw2 = dw2.desc();
      p.db2 = db2.desc();
    }
    return p;
  }
  std::vector<std::pair<const char*, const Tensor*>> outputs() const {
    if (kind != NSA_CMP_MLP) return {{"dx", &dx}};
    return {{"dx", &dx},   {"dpos", &dpos}, {"dw1", &dw1},
            {"db1", &db1}, {"dw2", &dw2},   {"db2", &db2}};
  }
};

void run(const BackendUnderTest& be, BwdCase& c, int threads) {
  std::string msg;
  ASSERT_EQ(run_on(be, c.params(), threads, &msg), NSA_OK) << msg;
}

// The padding of a strided output holds NaN until something writes it: every padding element
// must still be NaN and no logical element may be.
void expect_padding_intact(const char* name, const Tensor& t) {
  const int64_t elems = static_cast<int64_t>(t.storage().size() / nsa_dtype_size(t.desc().dtype));
  int64_t nan = 0;
  for (int64_t i = 0; i < elems; ++i) nan += std::isnan(t.get_raw(i)) ? 1 : 0;
  EXPECT_EQ(nan, elems - t.numel()) << name << ": padding written or NaN produced";
}

void compare(const BackendUnderTest& be, const Dims& s, const nsa_config& cfg, nsa_cmp_kind kind,
             nsa_dtype dt, nsa_dtype out_dt, bool padded, uint64_t seed,
             std::vector<int32_t> cu = {}) {
  std::ostringstream os;
  os << "B=" << s.B << " T=" << s.T << " H=" << s.H << " D=" << s.D << " Dh=" << s.Dh
     << " l=" << cfg.cmp_block << " d=" << cfg.cmp_stride
     << (kind == NSA_CMP_MLP ? " mlp " : " mean ") << nsa_dtype_name(dt) << "->"
     << nsa_dtype_name(out_dt) << (padded ? " padded" : "") << (cu.empty() ? "" : " varlen");
  SCOPED_TRACE(os.str());
  BwdCase ref(s, cfg, kind, dt, out_dt, padded, seed, cu);
  BwdCase cpu(s, cfg, kind, dt, out_dt, padded, seed, cu);
  ASSERT_NO_FATAL_FAILURE(run(oracle(), ref, 0));
  ASSERT_NO_FATAL_FAILURE(run(be, cpu, 0));
  const int64_t l = cfg.cmp_block, d = cfg.cmp_stride;
  const int64_t blocks = s.B * cmp_rows(cfg, s.T, cu);  // per KV head, all sequences
  const int64_t cover = (l + d - 1) / d;                // blocks covering one token, at most
  // Per output, the f32 sums its elements go through, each of n terms erring by about n 2^-24 of
  // its terms' size, taken as the tensor's largest |ref|, x4 for the O(1) biases on the way.
  // mean dx: <= ceil(l/d) covering blocks, then the 1/l scaling. mlp: pre = W1 flat (l*D terms)
  // reaches hid, so dw2/db2 (+ a sum over every block); dHid = dout W2 (D terms) reaches dPre,
  // so db1/dw1 (+ every block); dFlat = dPre W1 (Dh terms) reaches dx (+ ceil(l/d) blocks) and
  // dpos (+ every block).
  std::map<std::string, int64_t> chain = {{"dx", cover + 1}};
  if (kind == NSA_CMP_MLP) {
    chain = {{"dx", s.D + s.Dh + cover}, {"dpos", s.D + s.Dh + blocks}, {"dw1", s.D + blocks},
             {"db1", s.D + blocks},      {"dw2", l * s.D + blocks},     {"db2", blocks}};
  }
  const double rel = out_dt == NSA_DTYPE_BF16 ? kBf16Rel : 0.0;
  const auto refs = ref.outputs(), cpus = cpu.outputs();
  for (size_t n = 0; n < refs.size(); ++n) {
    const Tensor &want = *refs[n].second, &got = *cpus[n].second;
    double scale = 0.0;
    want.for_each([&](int64_t a, int64_t b, int64_t c, int64_t e) {
      scale = std::max(scale, std::fabs(want.get_raw(want.logical_offset(a, b, c, e))));
    });
    const double tol = 4.0 * static_cast<double>(chain.at(refs[n].first)) * kEps * scale;
    int64_t bad = 0;
    double worst = 0.0;
    got.for_each([&](int64_t a, int64_t b, int64_t c, int64_t e) {
      const int64_t off = got.logical_offset(a, b, c, e);
      const double x = got.get_raw(off), y = want.get_raw(off);
      worst = std::max(worst, std::fabs(x - y));
      bad += !(std::fabs(x - y) <= tol + rel * std::fabs(y));
    });
    EXPECT_EQ(bad, 0) << refs[n].first << ": elements off; tol " << tol << " + " << rel
                      << "*|ref|, worst " << worst;
    if (padded) expect_padding_intact(cpus[n].first, got);
  }
}

// l = 32, d = 16 (the default, overlapping); d = l; small, odd overlaps; and up to 6 blocks
// covering a token (with 2 the order of a sum cannot show, as f32 addition commutes).
std::vector<nsa_config> cmp_configs() {
  nsa_config def;
  nsa_config_default(&def);
  return {def, config(16, 16, 16, 4, 1, 2, 16), config(4, 2, 8, 4, 1, 2, 16),
          config(5, 3, 8, 4, 1, 2, 16), config(16, 3, 16, 4, 1, 2, 16)};
}

void sweep(const BackendUnderTest& be, nsa_cmp_kind kind) {
  int i = 0;
  for (int64_t T : {3, 31, 33, 100}) {
    for (const nsa_config& cfg : cmp_configs()) {
      Dims s;
      s.B = 1 + i % 2, s.T = T, s.H = 1 + i % 3;
      s.D = std::vector<int64_t>{1, 17, 64}[i % 3];
      s.Dh = std::vector<int64_t>{1, 8, 33}[i % 3];
      const nsa_dtype dt = i % 2 ? NSA_DTYPE_BF16 : NSA_DTYPE_F32;
      const nsa_dtype out_dt = i % 3 ? NSA_DTYPE_F32 : NSA_DTYPE_BF16;
      compare(be, s, cfg, kind, dt, out_dt, i % 2 == 0, 100 * kind + i);
      ++i;
    }
  }
}

class CompressBwdVsRef : public ::testing::TestWithParam<BackendUnderTest> {};
INSTANTIATE_TEST_SUITE_P(Backends, CompressBwdVsRef, ::testing::ValuesIn(backends_under_test(kOpCompressBwd)),
                         backend_test_name);

TEST_P(CompressBwdVsRef, MeanMatchesRef) { sweep(GetParam(), NSA_CMP_MEAN); }
TEST_P(CompressBwdVsRef, MlpMatchesRef) { sweep(GetParam(), NSA_CMP_MLP); }

TEST_P(CompressBwdVsRef, VarlenMatchesRef) {
  const BackendUnderTest& be = GetParam();
  // Sequences of 37, 0, 1, 103 and 5 tokens: an empty one, and two without a complete block.
  const std::vector<int32_t> cu = {0, 37, 37, 38, 141, 146};
  Dims s;
  s.T = 146, s.H = 2, s.D = 17, s.Dh = 8;
  for (nsa_cmp_kind kind : {NSA_CMP_MEAN, NSA_CMP_MLP}) {
    for (const nsa_config& cfg : cmp_configs()) {
      compare(be, s, cfg, kind, NSA_DTYPE_BF16, NSA_DTYPE_F32, true, 7, cu);
      compare(be, s, cfg, kind, NSA_DTYPE_F32, NSA_DTYPE_BF16, false, 8, cu);
    }
  }
}

TEST_P(CompressBwdVsRef, MoreBlocksThanOneMlpChunk) {
  const BackendUnderTest& be = GetParam();
  // 299 / 299 / 261 compressed tokens: the mlp's dx carries partial sums across its chunks of
  // 256, and a second varlen sequence starts after a partial chunk.
  Dims s;
  s.H = 2, s.D = 6, s.Dh = 5;
  s.T = 600;
  compare(be, s, cmp_configs()[2], NSA_CMP_MLP, NSA_DTYPE_F32, NSA_DTYPE_F32, true, 11);
  s.T = 900;
  compare(be, s, cmp_configs()[3], NSA_CMP_MLP, NSA_DTYPE_BF16, NSA_DTYPE_F32, false, 12);
  s.T = 4200;
  compare(be, s, cmp_configs()[0], NSA_CMP_MLP, NSA_DTYPE_F32, NSA_DTYPE_BF16, true, 13);
  compare(be, s, cmp_configs()[0], NSA_CMP_MLP, NSA_DTYPE_F32, NSA_DTYPE_F32, false, 14,
          {0, 2100, 2101, 4200});
  compare(be, s, cmp_configs()[0], NSA_CMP_MEAN, NSA_DTYPE_F32, NSA_DTYPE_F32, false, 15,
          {0, 2100, 2101, 4200});
}

TEST_P(CompressBwdVsRef, NoCompleteBlockGivesExactZeros) {
  const BackendUnderTest& be = GetParam();
  // T < l: no compressed token, so every gradient is exactly 0 (and the padding untouched).
  Dims s;
  s.B = 2, s.T = 31, s.H = 3, s.D = 17, s.Dh = 8;
  for (nsa_cmp_kind kind : {NSA_CMP_MEAN, NSA_CMP_MLP}) {
    BwdCase c(s, cmp_configs()[0], kind, NSA_DTYPE_F32, NSA_DTYPE_BF16, true, 21, {});
    ASSERT_NO_FATAL_FAILURE(run(be, c, 0));
    for (const auto& out : c.outputs()) {
      const auto& name = out.first;  // not a structured binding: clang < 16 cannot capture one
      const auto& t = out.second;
      int64_t nonzero = 0;
      t->for_each([&](int64_t a, int64_t b, int64_t e, int64_t f) {
        nonzero += t->get_raw(t->logical_offset(a, b, e, f)) != 0.0;
      });
      EXPECT_EQ(nonzero, 0) << name;
      expect_padding_intact(name, *t);
    }
  }
}

// CPU only: the thread count is the CPU kernels' notion.
TEST(CpuCompressBwd, ThreadsBitwiseIdentical) {
  const BackendUnderTest cpu = backend(NSA_BACKEND_CPU);
  Dims s;
  s.T = 1300, s.H = 2, s.D = 12, s.Dh = 9;
  const std::vector<int32_t> cu = {0, 100, 101, 1300};
  // f32 inputs: sums of a few bf16 values are often exact in f32, in any order.
  for (nsa_cmp_kind kind : {NSA_CMP_MEAN, NSA_CMP_MLP}) {
    for (const nsa_config& cfg : {cmp_configs()[0], cmp_configs()[4]}) {
      SCOPED_TRACE(std::string(kind == NSA_CMP_MLP ? "mlp" : "mean") +
                   " l=" + std::to_string(cfg.cmp_block) + " d=" + std::to_string(cfg.cmp_stride));
      BwdCase one(s, cfg, kind, NSA_DTYPE_F32, NSA_DTYPE_F32, true, 31, cu);
      ASSERT_NO_FATAL_FAILURE(run(cpu, one, 1));
      for (int threads : {2, 3}) {
        BwdCase other(s, cfg, kind, NSA_DTYPE_F32, NSA_DTYPE_F32, true, 31, cu);
        ASSERT_NO_FATAL_FAILURE(run(cpu, other, threads));
        const auto a = one.outputs(), b = other.outputs();
        for (size_t n = 0; n < a.size(); ++n) {
          EXPECT_TRUE(a[n].second->storage() == b[n].second->storage())
              << a[n].first << ": 1 and " << threads << " threads differ";
        }
      }
    }
  }
}

}  // namespace
}  // namespace nsa_test
