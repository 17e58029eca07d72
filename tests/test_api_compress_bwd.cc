// nsa_compress_bwd through the C API: results equal the float64 core (rounded once to f32 on the
// reference; within f32 accumulation error on the CPU kernels), and
// argument validation (status, a message naming the argument, outputs untouched).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "api_util.h"
#include "backward_util.h"

namespace nsa_test {
namespace {

using nsa::ref::CompressArgs64;
using nsa::ref::CompressGrads64;

// One nsa_compress_bwd call, owned: random inputs (f32-exact) and padded NaN-filled outputs.
struct CompressBwdCall {
  CompressArgs64 a;
  std::vector<int32_t> cu;
  Tensor64 dout64;
  Tensor x, pos, w1, b1, w2, b2, dout, dx, dpos, dw1, db1, dw2, db2;

  CompressBwdCall(nsa_cmp_kind kind, int64_t B, int64_t T, int64_t H, int64_t D, int64_t Dh,
                  std::vector<int32_t> cu_seqlens, uint64_t seed)
      : cu(std::move(cu_seqlens)) {
    a.cfg = config(4, 3, 8, 3, 1, 1, 6);  // d < l: blocks overlap
    a.kind = kind;
    a.seqs = sequences_of(a.cfg, B, T, cu);
    std::mt19937_64 rng(seed);
    const int64_t l = a.cfg.cmp_block;
    a.x = Tensor64(B, T, H, D);
    a.pos = Tensor64(H, l, D);
    a.w1 = Tensor64(H, Dh, l * D);
    a.b1 = Tensor64(H, Dh);
    a.w2 = Tensor64(H, D, Dh);
    a.b2 = Tensor64(H, D);
    for (Tensor64* t : {&a.x, &a.pos, &a.w1, &a.b1, &a.w2, &a.b2})
      fill_f32_exact(*t, rng, -0.5, 0.5);
    dout64 = Tensor64(B, cmp_rows(a.cfg, T, cu), H, D);
    fill_f32_exact(dout64, rng, -1.0, 1.0);
    x = to_tensor(a.x, 4, true);
    dout = to_tensor(dout64, 4, true);
    dx = to_tensor(a.x, 4, true);
    pos = to_tensor(a.pos, 3, true);
    dpos = to_tensor(a.pos, 3, true);
    w1 = to_tensor(a.w1, 3, true);
    dw1 = to_tensor(a.w1, 3, true);
    b1 = to_tensor(a.b1, 2, true);
    db1 = to_tensor(a.b1, 2, true);
    w2 = to_tensor(a.w2, 3, true);
    dw2 = to_tensor(a.w2, 3, true);
    b2 = to_tensor(a.b2, 2, true);
    db2 = to_tensor(a.b2, 2, true);
  }

  nsa_compress_bwd_params params() {
    nsa_compress_bwd_params p;
    nsa_compress_bwd_params_init(&p);
    p.cfg = a.cfg;
    p.kind = a.kind;
    p.x = x.desc();
    if (!cu.empty()) {
      p.cu_seqlens = cu.data();
      p.num_seqs = static_cast<int64_t>(cu.size()) - 1;
    }
    p.pos = pos.desc();
    p.w1 = w1.desc();
    p.b1 = b1.desc();
    p.w2 = w2.desc();
    p.b2 = b2.desc();
    p.dout = dout.desc();
    p.dx = dx.desc();
    p.dpos = dpos.desc();
    p.dw1 = dw1.desc();
    p.db1 = db1.desc();
    p.dw2 = dw2.desc();
    p.db2 = db2.desc();
    return p;
  }
  std::vector<const Tensor*> outputs() const { return {&dx, &dpos, &dw1, &db1, &dw2, &db2}; }
};

void expect_rounded(const char* name, const Tensor& t, const Tensor64& want) {
  const Tensor64 got = from_tensor(t);
  ASSERT_EQ(got.data.size(), want.data.size()) << name;
  for (size_t i = 0; i < got.data.size(); ++i) {
    ASSERT_EQ(got.data[i], static_cast<double>(static_cast<float>(want.data[i])))
        << name << "[" << i << "]";
  }
}

// Every element within tol * max(1, max|want|).
void expect_near(const char* name, const Tensor& t, const Tensor64& want, double tol) {
  const Tensor64 got = from_tensor(t);
  ASSERT_EQ(got.data.size(), want.data.size()) << name;
  double scale = 1.0;
  for (double w : want.data) scale = std::max(scale, std::fabs(w));
  for (size_t i = 0; i < got.data.size(); ++i) {
    ASSERT_NEAR(got.data[i], want.data[i], tol * scale) << name << "[" << i << "]";
  }
}

// REF is the float64 core rounded once. The CPU kernels accumulate in f32: mean's sums here have
// at most two terms (l = 4, d = 2) of exact quarters, so they are exact too; mlp's are f32 sums
// (test_cpu_compress_bwd.cc bounds them on larger shapes).
TEST(ApiCompressBwd, EqualsFloat64CoreOnEveryBackend) {
  for (nsa_cmp_kind kind : {NSA_CMP_MEAN, NSA_CMP_MLP}) {
    CompressBwdCall call(kind, 1, 19, 2, 3, 5, {0, 9, 11, 19}, 31);
    CompressGrads64 g;
    ASSERT_TRUE(nsa::ref::compress_backward64(call.a, call.dout64, 1, &g).is_ok());
    for (nsa_backend b : test_backends()) {
      SCOPED_TRACE(nsa_backend_name(b));
      Ctx ctx(b);
      nsa_compress_bwd_params p = call.params();
      ASSERT_EQ(nsa_compress_bwd(ctx.get(), &p), NSA_OK) << ctx.error();
      if (kind == NSA_CMP_MEAN || b == NSA_BACKEND_REF) {
        expect_rounded("dx", call.dx, g.dx);
        if (kind == NSA_CMP_MEAN) continue;
        expect_rounded("dpos", call.dpos, g.dpos);
        expect_rounded("dw1", call.dw1, g.dw1);
        expect_rounded("db1", call.db1, g.db1);
        expect_rounded("dw2", call.dw2, g.dw2);
        expect_rounded("db2", call.db2, g.db2);
        continue;
      }
      // The longest f32 sum here is under 64 terms: 64 * 2^-24 < 4e-6 of the largest value.
      const double tol = 4e-6;
      expect_near("dx", call.dx, g.dx, tol);
      expect_near("dpos", call.dpos, g.dpos, tol);
      expect_near("dw1", call.dw1, g.dw1, tol);
      expect_near("db1", call.db1, g.db1, tol);
      expect_near("dw2", call.dw2, g.dw2, tol);
      expect_near("db2", call.db2, g.db2, tol);
    }
  }
}

TEST(ApiCompressBwd, Compress64IsTheReferenceCompression) {
  // The finite differences differentiate compress64; it must be nsa_compress's function.
  CompressBwdCall call(NSA_CMP_MLP, 2, 13, 2, 3, 4, {}, 32);
  Tensor out = to_tensor(call.dout64, 4, true);
  nsa_compress_params p;
  nsa_compress_params_init(&p);
  p.cfg = call.a.cfg;
  p.kind = NSA_CMP_MLP;
  p.x = call.x.desc();
  p.pos = call.pos.desc();
  p.w1 = call.w1.desc();
  p.b1 = call.b1.desc();
  p.w2 = call.w2.desc();
  p.b2 = call.b2.desc();
  p.out = out.desc();
  Ctx ctx(NSA_BACKEND_REF);
  ASSERT_EQ(nsa_compress(ctx.get(), &p), NSA_OK) << ctx.error();
  Tensor64 want;
  ASSERT_TRUE(nsa::ref::compress64(call.a, 1, &want).is_ok());
  expect_rounded("out", out, want);
}

void expect_compress_bwd_rejected(const char* what, const CompressBwdCall& call,
                                  const nsa_compress_bwd_params& p, nsa_status code,
                                  const std::vector<std::string>& needles) {
  expect_rejected_by(what, call.outputs(), code, needles,
                     [&](nsa_context* ctx) { return nsa_compress_bwd(ctx, &p); });
}

TEST(ApiCompressBwdArgs, Rejections) {
  CompressBwdCall call(NSA_CMP_MLP, 2, 13, 2, 3, 4, {}, 33);
  EXPECT_EQ(nsa_compress_bwd(nullptr, nullptr), NSA_ERR_NULL_POINTER);
  struct Field {
    const char* name;
    nsa_tensor nsa_compress_bwd_params::*member;
  };
  for (const Field& f :
       {Field{"x", &nsa_compress_bwd_params::x}, Field{"w1", &nsa_compress_bwd_params::w1},
        Field{"dout", &nsa_compress_bwd_params::dout}, Field{"dx", &nsa_compress_bwd_params::dx},
        Field{"dpos", &nsa_compress_bwd_params::dpos},
        Field{"db2", &nsa_compress_bwd_params::db2}}) {
    nsa_compress_bwd_params p = call.params();
    (p.*f.member).data = nullptr;
    expect_compress_bwd_rejected(f.name, call, p, NSA_ERR_NULL_POINTER, {named(f.name)});
  }
  nsa_compress_bwd_params p = call.params();
  Tensor short_dout = resized(p.dout, 1, -1);
  p.dout = short_dout.desc();
  expect_compress_bwd_rejected("dout rows", call, p, NSA_ERR_INVALID_SHAPE, {"dout:", "Tc = "});
  p = call.params();
  p.dw2.dtype = NSA_DTYPE_I32;
  expect_compress_bwd_rejected("dw2 dtype", call, p, NSA_ERR_INVALID_DTYPE, {"dw2:"});
  p = call.params();
  p.dx = p.x;
  expect_compress_bwd_rejected("dx over x", call, p, NSA_ERR_INVALID_ARGUMENT, {"dx:", "x"});
  p = call.params();
  p.db1 = p.dw1;
  p.db1.ndim = 2;
  p.db1.shape[1] = call.a.b1.shape[1];
  p.db1.stride[0] = p.dw1.stride[0];
  p.db1.stride[1] = 1;
  expect_compress_bwd_rejected("db1 inside dw1", call, p, NSA_ERR_INVALID_ARGUMENT,
                               {"dw1:", "db1"});
  p = call.params();
  p.kind = static_cast<nsa_cmp_kind>(7);
  expect_compress_bwd_rejected("kind", call, p, NSA_ERR_INVALID_ARGUMENT, {"kind"});
  // Mean: the mlp gradients are ignored, absent or not.
  p = call.params();
  p.kind = NSA_CMP_MEAN;
  p.dw1.data = nullptr;
  Ctx ctx;
  EXPECT_EQ(nsa_compress_bwd(ctx.get(), &p), NSA_OK) << ctx.error();
}

}  // namespace
}  // namespace nsa_test
