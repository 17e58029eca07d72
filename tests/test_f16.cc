// f16 storage (nsa.h: tensors "f32, bf16 or f16"). f16 widens exactly to f32, so on every CPU
// backend, the float64 reference included, a call with f16 inputs gives the bits of the same call
// with f32 inputs holding the same values, and an f16 output is that call's f32 output rounded
// once (to nearest even). On CUDA, f16 attention runs on the tensor cores and f32 on the CUDA
// cores (nsa_cuda.h, "Arithmetic"): there the forward and dense cases agree within the f32
// bound and select the same blocks. Checked for the forward, the dense forward, compression (mean
// and mlp), the backward and decode, on awkward shapes; and the library's conversions against the
// CPU's own F16C instructions (test_util.h), exhaustively for widening.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "backend_harness.h"
#include "common/dtype.h"
#include "decode_util.h"
#include "test_util.h"

namespace {
using namespace nsa_test;

TEST(F16Conversions, WideningIsExactForEveryValue) {
  int64_t bad = 0;
  for (uint32_t h = 0; h < 65536; ++h) {
    const float want = f16_bits_to_float(uint16_t(h)), got = nsa::f16_to_f32(uint16_t(h));
    if (std::isnan(want) ? !std::isnan(got) : std::memcmp(&want, &got, 4) != 0) {
      if (bad++ < 3) ADD_FAILURE() << "f16 " << std::hex << h;
    }
  }
  EXPECT_EQ(bad, 0);
}

// Narrowing: f32 bit patterns at a prime stride (2^32 / 65521 of them, every exponent), the
// rounding boundaries around the largest f16 (65504, half an ulp above, 65520), the subnormal
// range's halfway points, and NaN (a quiet NaN of the same sign).
TEST(F16Conversions, NarrowingRoundsToNearestEven) {
  std::vector<float> xs = {
      0.0f,         -0.0f,    65504.0f,        65519.99f,         65520.0f, -65520.0f,
      0x1p-24f,     0x1p-25f, 0x1.8p-24f,      0x1.8p-25f,        0x1p-26f, 0x1.ffcp-15f,
      0x1.ffep-15f, 0x1p-14f, 1.0f + 0x1p-11f, 1.0f + 0x1.8p-11f, INFINITY, -INFINITY};
  for (uint64_t b = 0; b < (uint64_t{1} << 32); b += 65521) {
    const uint32_t bits = uint32_t(b);
    float f;
    std::memcpy(&f, &bits, 4);
    xs.push_back(f);
  }
  int64_t bad = 0;
  for (float f : xs) {
    const uint16_t want = float_to_f16_bits(f), got = nsa::f32_to_f16(f);
    if (want != got && bad++ < 3) ADD_FAILURE() << f << ": " << want << " vs " << got;
  }
  EXPECT_EQ(bad, 0);
  const uint16_t nan = nsa::f32_to_f16(-NAN);
  EXPECT_TRUE(std::isnan(nsa::f16_to_f32(nan)));
  EXPECT_EQ(nan & 0x8000, 0x8000);
}

// dst's elements set to src's values (the same shape; exact when src is f16 and dst f32).
void copy_values(const Tensor& src, Tensor& dst) {
  src.for_each([&](int64_t a, int64_t b, int64_t c, int64_t d) {
    dst.set_raw(dst.logical_offset(a, b, c, d), src.get_raw(src.logical_offset(a, b, c, d)));
  });
}

// got equals want bit for bit (as values: NaN matches NaN), or, when got is f16, equals want
// rounded once to f16; with tol > 0, within tol (and one f16 rounding, 2^-11 relative, when
// got is f16).
void expect_same(const char* name, const Tensor& got, const Tensor& want, double tol = 0.0) {
  const bool round = got.desc().dtype == NSA_DTYPE_F16 && want.desc().dtype != NSA_DTYPE_F16;
  int64_t bad = 0;
  got.for_each([&](int64_t a, int64_t b, int64_t c, int64_t d) {
    const double g = got.get_raw(got.logical_offset(a, b, c, d));
    double w = want.get_raw(want.logical_offset(a, b, c, d));
    if (round && tol == 0.0) w = f16_bits_to_float(float_to_f16_bits(float(w)));
    const double bound = tol > 0.0 ? tol + (round ? std::ldexp(std::fabs(w), -11) : 0.0) : 0.0;
    const bool ok = g == w || (std::isnan(g) && std::isnan(w)) || std::fabs(g - w) <= bound;
    if (!ok && bad++ < 3) {
      ADD_FAILURE() << name << " at " << a << "," << b << "," << c << "," << d << ": " << g
                    << " vs " << w;
    }
  });
  EXPECT_EQ(bad, 0) << name;
}

// A forward case with f16 inputs and its twin with f32 inputs of the same values. Outputs: f32,
// or f16 for o and o_* with out16.
struct Twins {
  FwdCase h, f;
};
Twins twins(const Shape& s, const nsa_config& cfg, bool padded, bool out16,
            std::vector<int32_t> cu = {}) {
  Twins t{make_case(s, cfg, NSA_DTYPE_F16, 16, padded, cu, out16 ? NSA_DTYPE_F16 : NSA_DTYPE_F32),
          make_case(s, cfg, NSA_DTYPE_F32, 16, false, cu)};
  const Tensor* from[] = {&t.h.q,     &t.h.k,     &t.h.v,     &t.h.k_cmp,
                          &t.h.v_cmp, &t.h.g_cmp, &t.h.g_slc, &t.h.g_win};
  Tensor* to[] = {&t.f.q,     &t.f.k,     &t.f.v,     &t.f.k_cmp,
                  &t.f.v_cmp, &t.f.g_cmp, &t.f.g_slc, &t.f.g_win};
  for (size_t i = 0; i < std::size(from); ++i) copy_values(*from[i], *to[i]);
  return t;
}

void expect_same_outputs(const FwdCase& got, const FwdCase& want, double tol = 0.0) {
  expect_same("o", got.o, want.o, tol);
  expect_same("o_cmp", got.o_cmp, want.o_cmp, tol);
  expect_same("o_slc", got.o_slc, want.o_slc, tol);
  expect_same("o_win", got.o_win, want.o_win, tol);
  expect_same("lse_cmp", got.lse_cmp, want.lse_cmp, tol);
  expect_same("lse_slc", got.lse_slc, want.lse_slc, tol);
  expect_same("lse_win", got.lse_win, want.lse_win, tol);
  expect_same("idx", got.idx_out, want.idx_out);  // integers: equal
}

// 0 (bit for bit) but on CUDA, where f16 and f32 take different arithmetic: there the f32 bound
// of test_cpu_vs_ref.cc for sums of Dk + keys terms (16 (Dk + keys) 2^-24, scores up to ~16),
// doubled for the two results' own errors.
double f16_tol(const BackendUnderTest& be, const Shape& s, int64_t keys) {
  return be.id == NSA_BACKEND_CUDA ? 32.0 * double(s.Dk + keys) * std::ldexp(1.0, -24) : 0.0;
}

// Every backend of `ops` and the reference.
std::vector<BackendUnderTest> with_oracle(uint32_t ops) {
  std::vector<BackendUnderTest> v = backends_under_test(ops);
  v.insert(v.begin(), oracle());
  return v;
}

class F16OnBackend : public ::testing::TestWithParam<BackendUnderTest> {};

// The forward: the top-n binds (T = 150, n = 4 of up to 10 blocks), G = 3, odd Dk != Dv;
// strided f16 views; f32 and f16 outputs; packed sequences.
TEST_P(F16OnBackend, ForwardEqualsF32OfTheSameValues) {
  const Shape s{1, 150, 6, 2, 21, 12};
  const nsa_config cfg = config(16, 8, 16, 4, 1, 1, 24);
  for (bool out16 : {false, true}) {
    for (bool packed : {false, true}) {
      SCOPED_TRACE(std::string(out16 ? "f16 out" : "f32 out") + (packed ? " packed" : ""));
      const std::vector<int32_t> cu =
          packed ? std::vector<int32_t>{0, 40, 41, 150} : std::vector<int32_t>{};
      Twins t = twins(s, cfg, /*padded=*/!packed, out16, cu);
      std::string msg;
      ASSERT_EQ(run_on(GetParam(), t.f.params(), 0, &msg), NSA_OK) << msg;
      ASSERT_EQ(run_on(GetParam(), t.h.params(), 0, &msg), NSA_OK) << msg;
      expect_same_outputs(t.h, t.f, f16_tol(GetParam(), s, s.T));
    }
  }
}
INSTANTIATE_TEST_SUITE_P(Fwd, F16OnBackend, ::testing::ValuesIn(with_oracle(kOpFwd)),
                         backend_test_name);

class F16Dense : public ::testing::TestWithParam<BackendUnderTest> {};

TEST_P(F16Dense, EqualsF32OfTheSameValues) {
  const Shape s{2, 70, 6, 2, 24, 17};
  for (int32_t window : {0, 9}) {
    SCOPED_TRACE(window);
    Twins t = twins(s, config(16, 8, 16, 4, 1, 1, 24), true, window > 0);
    std::string msg;
    ASSERT_EQ(run_on(GetParam(), dense_params(t.f, window), 0, &msg), NSA_OK) << msg;
    ASSERT_EQ(run_on(GetParam(), dense_params(t.h, window), 0, &msg), NSA_OK) << msg;
    expect_same("o", t.h.o, t.f.o, f16_tol(GetParam(), s, s.T));
    expect_same("lse", t.h.lse_win, t.f.lse_win, f16_tol(GetParam(), s, s.T));
  }
}
INSTANTIATE_TEST_SUITE_P(Dense, F16Dense, ::testing::ValuesIn(with_oracle(kOpDense)),
                         backend_test_name);

class F16Compress : public ::testing::TestWithParam<BackendUnderTest> {};

// Mean and mlp compression (f16 parameters too), f32 and f16 outputs.
TEST_P(F16Compress, EqualsF32OfTheSameValues) {
  const nsa_config cfg = config(16, 8, 16, 4, 1, 1, 24);
  const int64_t B = 2, T = 75, H = 2, D = 13, Dh = 10, Tc = nsa_cmp_len(&cfg, T);
  std::mt19937_64 rng(3);
  for (nsa_cmp_kind kind : {NSA_CMP_MEAN, NSA_CMP_MLP}) {
    SCOPED_TRACE(kind == NSA_CMP_MEAN ? "mean" : "mlp");
    Tensor xh(NSA_DTYPE_F16, {B, T, H, D}, true), xf(NSA_DTYPE_F32, {B, T, H, D});
    xh.fill_uniform(rng, -2.0, 2.0);
    copy_values(xh, xf);
    Tensor wh[5], wf[5];
    make_mlp(wh, H, cfg.cmp_block, D, Dh, NSA_DTYPE_F16, rng);
    for (int i = 0; i < 5; ++i) {
      std::vector<int64_t> shape(wh[i].desc().shape, wh[i].desc().shape + wh[i].desc().ndim);
      wf[i] = Tensor(NSA_DTYPE_F32, shape);
      copy_values(wh[i], wf[i]);
    }
    Tensor of(NSA_DTYPE_F32, {B, Tc, H, D}), oh(NSA_DTYPE_F16, {B, Tc, H, D}, true);
    for (auto [x, w, o] : {std::tuple{&xf, wf, &of}, std::tuple{&xh, wh, &oh}}) {
      nsa_compress_params p;
      nsa_compress_params_init(&p);
      p.cfg = cfg;
      p.kind = kind;
      p.x = x->desc();
      if (kind == NSA_CMP_MLP) {
        p.pos = w[0].desc(), p.w1 = w[1].desc(), p.b1 = w[2].desc();
        p.w2 = w[3].desc(), p.b2 = w[4].desc();
      }
      p.out = o->desc();
      std::string msg;
      ASSERT_EQ(run_on(GetParam(), p, 0, &msg), NSA_OK) << msg;
    }
    expect_same("out", oh, of);
  }
}
INSTANTIATE_TEST_SUITE_P(Compress, F16Compress, ::testing::ValuesIn(with_oracle(kOpCompress)),
                         backend_test_name);

class F16Bwd : public ::testing::TestWithParam<BackendUnderTest> {};

// The backward from the forward's selection: f16 inputs and d_o, f32 gradients.
TEST_P(F16Bwd, EqualsF32OfTheSameValues) {
  const Shape s{1, 90, 6, 2, 20, 12};
  const nsa_config cfg = config(16, 8, 16, 4, 1, 1, 24);
  Twins t = twins(s, cfg, true, false);
  std::string msg;
  ASSERT_EQ(run_on(oracle(), t.f.params(), 0, &msg), NSA_OK) << msg;
  std::mt19937_64 rng(4);
  Tensor doh(NSA_DTYPE_F16, {s.B, s.T, s.Hq, s.Dv}, true),
      dof(NSA_DTYPE_F32, {s.B, s.T, s.Hq, s.Dv});
  doh.fill_uniform(rng, -1.0, 1.0);
  copy_values(doh, dof);
  const int64_t Tc = t.f.k_cmp.desc().shape[1];
  struct Grads {
    Tensor dq, dk, dv, dk_cmp, dv_cmp, dg[3];
  } gf, gh;
  for (Grads* g : {&gf, &gh}) {
    g->dq = Tensor(NSA_DTYPE_F32, {s.B, s.T, s.Hq, s.Dk});
    g->dk = Tensor(NSA_DTYPE_F32, {s.B, s.T, s.Hkv, s.Dk});
    g->dv = Tensor(NSA_DTYPE_F32, {s.B, s.T, s.Hkv, s.Dv});
    g->dk_cmp = Tensor(NSA_DTYPE_F32, {s.B, Tc, s.Hkv, s.Dk});
    g->dv_cmp = Tensor(NSA_DTYPE_F32, {s.B, Tc, s.Hkv, s.Dv});
    for (Tensor& d : g->dg) d = Tensor(NSA_DTYPE_F32, {s.B, s.T, s.Hq});
  }
  for (auto [c, d_o, g] : {std::tuple{&t.f, &dof, &gf}, std::tuple{&t.h, &doh, &gh}}) {
    nsa_bwd_params p;
    nsa_bwd_params_init(&p);
    p.in = c->params().in;
    p.slc_indices = t.f.idx_out.desc();
    p.d_o = d_o->desc();
    p.dq = g->dq.desc(), p.dk = g->dk.desc(), p.dv = g->dv.desc();
    p.dk_cmp = g->dk_cmp.desc(), p.dv_cmp = g->dv_cmp.desc();
    p.dg_cmp = g->dg[0].desc(), p.dg_slc = g->dg[1].desc(), p.dg_win = g->dg[2].desc();
    ASSERT_EQ(run_on(GetParam(), p, 0, &msg), NSA_OK) << msg;
  }
  expect_same("dq", gh.dq, gf.dq);
  expect_same("dk", gh.dk, gf.dk);
  expect_same("dv", gh.dv, gf.dv);
  expect_same("dk_cmp", gh.dk_cmp, gf.dk_cmp);
  expect_same("dv_cmp", gh.dv_cmp, gf.dv_cmp);
  for (int i = 0; i < 3; ++i) expect_same("dg", gh.dg[i], gf.dg[i]);
}
INSTANTIATE_TEST_SUITE_P(Bwd, F16Bwd, ::testing::ValuesIn(with_oracle(kOpBwd)), backend_test_name);

class F16Decode : public ::testing::TestWithParam<BackendUnderTest> {};

// Decode with f16 queries and appended f16 keys and values, into an f32 cache (exact) and a bf16
// one (each value rounded once, as its f32 twin's): an append of 50 rows, then steps.
TEST_P(F16Decode, EqualsF32OfTheSameValues) {
  const BackendUnderTest& be = GetParam();
  if (be.cache_cmp == nullptr) GTEST_SKIP() << be.name << " has no KV cache";
  const Shape s{1, 120, 6, 2, 20, 12};
  const nsa_config cfg = config(16, 8, 16, 4, 1, 1, 24);
  for (nsa_dtype cache_dt : {NSA_DTYPE_F32, NSA_DTYPE_BF16}) {
    SCOPED_TRACE(nsa_dtype_name(cache_dt));
    Twins t = twins(s, cfg, true, false);
    FwdCase out_h = make_case(s, cfg, NSA_DTYPE_F32, 1),
            out_f = make_case(s, cfg, NSA_DTYPE_F32, 1);
    for (auto [c, out] : {std::pair{&t.f, &out_f}, std::pair{&t.h, &out_h}}) {
      Context cx(0, be.id);
      CachePtr cache =
          make_cache(cx.ctx, cfg, 1, s.T, s, cache_dt, NSA_CMP_MEAN, nullptr, nullptr, *be.buffers);
      ASSERT_TRUE(cache);
      Staging st(be);
      const DecodeTensors x = DecodeTensors::staged(st, *c, *out);
      nsa_tensor k = rows(x.k, 0, 50), v = rows(x.v, 0, 50);  // (a prefill takes the cache's dtype)
      ASSERT_EQ(nsa_kv_cache_append(cx.ctx, cache.get(), 0, &k, &v), NSA_OK) << cx.error();
      for (int64_t r = 50; r < s.T; ++r) {
        const nsa_decode_params p = decode_row(x, r, /*append=*/true);
        ASSERT_EQ(nsa_decode(cx.ctx, cache.get(), &p), NSA_OK) << cx.error();
      }
      st.download_outputs();
    }
    expect_same_outputs(out_h, out_f);
  }
}
INSTANTIATE_TEST_SUITE_P(Decode, F16Decode, ::testing::ValuesIn(with_oracle(kOpDecode)),
                         backend_test_name);

}  // namespace
