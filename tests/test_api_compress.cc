// API tests of nsa_compress's argument checks: unknown kind, missing or mis-shaped MLP
// parameters, a wrong out shape, bad strides, dtypes and cu_seqlens. Each failure returns the
// right code, names the argument, and leaves `out` untouched, padding included.
#include <gtest/gtest.h>

#include "api_util.h"

using namespace nsa_test;

namespace {

// B = 2, T = 70, Hkv = 2, D = 8, l = 16, d = 8: Tc = (70 - 16) / 8 + 1 = 7. MLP hidden width 5.
struct CompressFixture {
  static constexpr int64_t B = 2, T = 70, H = 2, D = 8, L = 16, Dh = 5, Tc = 7;
  nsa_config cfg = config(16, 8, 16, 4, 1, 1, 32);
  Tensor x{NSA_DTYPE_F32, {B, T, H, D}, true};
  Tensor pos{NSA_DTYPE_F32, {H, L, D}, true};
  Tensor w1{NSA_DTYPE_F32, {H, Dh, L* D}, true};
  Tensor b1{NSA_DTYPE_F32, {H, Dh}, true};
  Tensor w2{NSA_DTYPE_F32, {H, D, Dh}, true};
  Tensor b2{NSA_DTYPE_F32, {H, D}, true};
  Tensor out{NSA_DTYPE_F32, {B, Tc, H, D}, true};

  CompressFixture() {
    std::mt19937_64 rng(1234);
    for (Tensor* t : {&x, &pos, &w1, &b1, &w2, &b2}) t->fill_uniform(rng, -0.5, 0.5);
  }
  nsa_compress_params params(nsa_cmp_kind kind) {
    nsa_compress_params p;
    nsa_compress_params_init(&p);
    p.cfg = cfg;
    p.kind = kind;
    p.x = x.desc();
    p.out = out.desc();
    if (kind == NSA_CMP_MLP) {
      p.pos = pos.desc();
      p.w1 = w1.desc();
      p.b1 = b1.desc();
      p.w2 = w2.desc();
      p.b2 = b2.desc();
    }
    return p;
  }
};

void expect_compress_rejected(const char* what, const CompressFixture& f,
                              const nsa_compress_params& p, nsa_status code,
                              const std::vector<std::string>& needles,
                              const std::vector<const Tensor*>& extra = {}) {
  SCOPED_TRACE(what);
  std::vector<const Tensor*> outs = {&f.out};
  outs.insert(outs.end(), extra.begin(), extra.end());
  const OutputSnapshot snap(outs);
  for (nsa_backend b : test_backends()) {
    SCOPED_TRACE(nsa_backend_name(b));
    Ctx ctx(b);
    const nsa_status s = nsa_compress(ctx.get(), &p);
    EXPECT_EQ(s, code) << nsa_status_name(s) << ": " << ctx.error();
    expect_message(ctx.error(), needles);
    snap.expect_unchanged();
  }
}

using Member = nsa_tensor nsa_compress_params::*;
struct Param {
  const char* name;
  Member member;
};
const Param kMlpParams[] = {{"pos", &nsa_compress_params::pos},
                            {"w1", &nsa_compress_params::w1},
                            {"b1", &nsa_compress_params::b1},
                            {"w2", &nsa_compress_params::w2},
                            {"b2", &nsa_compress_params::b2}};

}  // namespace

TEST(ApiCompress, BaselineIsValid) {
  for (nsa_backend b : test_backends()) {
    for (nsa_cmp_kind kind : {NSA_CMP_MEAN, NSA_CMP_MLP}) {
      SCOPED_TRACE(std::string(nsa_backend_name(b)) + (kind == NSA_CMP_MLP ? " mlp" : " mean"));
      CompressFixture f;
      const nsa_compress_params p = f.params(kind);
      Ctx ctx(b);
      ASSERT_EQ(nsa_compress(ctx.get(), &p), NSA_OK) << ctx.error();
      EXPECT_EQ(ctx.error(), "");
      EXPECT_TRUE(std::isfinite(f.out.at({1, 6, 1, 7})));
    }
  }
}

TEST(ApiCompress, NullArguments) {
  CompressFixture f;
  nsa_compress_params p = f.params(NSA_CMP_MEAN);
  const OutputSnapshot snap({&f.out});
  EXPECT_EQ(nsa_compress(nullptr, &p), NSA_ERR_NULL_POINTER);
  snap.expect_unchanged();
  Ctx ctx;
  EXPECT_EQ(nsa_compress(ctx.get(), nullptr), NSA_ERR_NULL_POINTER);
  expect_message(ctx.error(), {"params"});
  p.x.data = nullptr;
  expect_compress_rejected("x", f, p, NSA_ERR_NULL_POINTER, {"x:"});
  p = f.params(NSA_CMP_MEAN);
  p.out.data = nullptr;
  expect_compress_rejected("out", f, p, NSA_ERR_NULL_POINTER, {"out:"});
}

TEST(ApiCompress, UnknownKind) {
  for (int kind : {2, -1, 1000}) {
    CompressFixture f;
    const nsa_compress_params p = f.params(static_cast<nsa_cmp_kind>(kind));
    expect_compress_rejected("kind", f, p, NSA_ERR_INVALID_ARGUMENT,
                             {"kind", std::to_string(kind)});
  }
}

TEST(ApiCompress, MlpMissingParameter) {
  for (const Param& prm : kMlpParams) {
    CompressFixture f;
    nsa_compress_params p = f.params(NSA_CMP_MLP);
    (p.*prm.member).data = nullptr;
    expect_compress_rejected(prm.name, f, p, NSA_ERR_NULL_POINTER, {std::string(prm.name) + ":"});
  }
}

TEST(ApiCompress, MlpMisShapedParameter) {
  struct Case {
    const char* name;
    int dim;
    int64_t delta;
  };
  // pos must be [Hkv, l, D]; w1 [Hkv, Dh, l * D]; b1 [Hkv, Dh]; w2 [Hkv, D, Dh]; b2 [Hkv, D].
  const Case cases[] = {{"pos", 0, 1}, {"pos", 1, -1}, {"pos", 2, 1}, {"w1", 0, -1},
                        {"w1", 2, -1}, {"w1", 2, 8},   {"b1", 0, 1},  {"b1", 1, 1},
                        {"w2", 1, -1}, {"w2", 2, 1},   {"b2", 0, -1}, {"b2", 1, 1}};
  for (const Case& cs : cases) {
    CompressFixture f;
    nsa_compress_params p = f.params(NSA_CMP_MLP);
    nsa_tensor* t = nullptr;
    for (const Param& prm : kMlpParams)
      if (std::string(prm.name) == cs.name) t = &(p.*prm.member);
    ASSERT_NE(t, nullptr);
    Tensor repl = resized(*t, cs.dim, cs.delta);
    *t = repl.desc();
    const std::string what = std::string(cs.name) + " dim " + std::to_string(cs.dim);
    expect_compress_rejected(what.c_str(), f, p, NSA_ERR_INVALID_SHAPE,
                             {std::string(cs.name) + ":", "shape"});
  }
  // A zero hidden width has no meaning, even with b1 / w2 sized to match.
  CompressFixture f;
  nsa_compress_params p = f.params(NSA_CMP_MLP);
  Tensor w1(NSA_DTYPE_F32, {2, 0, 16 * 8}), b1(NSA_DTYPE_F32, {2, 0}), w2(NSA_DTYPE_F32, {2, 8, 0});
  p.w1 = w1.desc();
  p.b1 = b1.desc();
  p.w2 = w2.desc();
  expect_compress_rejected("Dh 0", f, p, NSA_ERR_INVALID_SHAPE, {"w1:", "Dh"});
  // A wrong rank.
  p = f.params(NSA_CMP_MLP);
  p.b2.ndim = 3;
  expect_compress_rejected("b2 ndim", f, p, NSA_ERR_INVALID_SHAPE, {"b2:", "dimensions"});
}

// MLP parameters follow x's dtype; x and out are f32, bf16 or f16.
TEST(ApiCompress, WrongDtypes) {
  CompressFixture f;
  nsa_compress_params p = f.params(NSA_CMP_MLP);
  Tensor w2(NSA_DTYPE_BF16, {2, 8, 5}, true);
  p.w2 = w2.desc();
  expect_compress_rejected("bf16 w2", f, p, NSA_ERR_INVALID_DTYPE, {"w2:", "bf16"});
  for (nsa_dtype dt : {NSA_DTYPE_I32}) {
    Tensor x(dt, {2, 70, 2, 8});  // unpadded and zero: only the dtype is under test
    p = f.params(NSA_CMP_MEAN);
    p.x = x.desc();
    expect_compress_rejected("x dtype", f, p, NSA_ERR_INVALID_DTYPE, {"x:", nsa_dtype_name(dt)});
    Tensor out(dt, {2, 7, 2, 8});
    p = f.params(NSA_CMP_MEAN);
    p.out = out.desc();
    expect_compress_rejected("out dtype", f, p, NSA_ERR_INVALID_DTYPE, {"out:", nsa_dtype_name(dt)},
                             {&out});
  }
}

TEST(ApiCompress, WrongOutShape) {
  struct Case {
    int dim;
    int64_t delta;
    const char* extra;  // Tc rows get Tc explained
  };
  for (Case cs : {Case{1, 1, "Tc = 7"},
                  {1, -1, "Tc = 7"},
                  {0, -1, "shape"},
                  {2, 1, "shape"},
                  {3, -1, "shape"}}) {
    CompressFixture f;
    nsa_compress_params p = f.params(NSA_CMP_MEAN);
    Tensor repl = resized(p.out, cs.dim, cs.delta);
    p.out = repl.desc();
    expect_compress_rejected(cs.extra, f, p, NSA_ERR_INVALID_SHAPE, {"out:", cs.extra}, {&repl});
  }
  CompressFixture f;
  nsa_compress_params p = f.params(NSA_CMP_MEAN);
  p.out.ndim = 3;
  expect_compress_rejected("out ndim", f, p, NSA_ERR_INVALID_SHAPE, {"out:", "dimensions"});
}

TEST(ApiCompress, BadStrides) {
  CompressFixture f;
  nsa_compress_params p = f.params(NSA_CMP_MEAN);
  p.out.stride[1] = 0;  // all Tc rows on one row: overlapping output
  expect_compress_rejected("out overlap", f, p, NSA_ERR_INVALID_STRIDE, {"out:", "overlap"});
  p = f.params(NSA_CMP_MEAN);
  p.out.stride[3] = 2;
  expect_compress_rejected("out inner", f, p, NSA_ERR_INVALID_STRIDE, {"out:", "stride"});
  p = f.params(NSA_CMP_MLP);
  p.w1.stride[1] = -p.w1.stride[1];
  expect_compress_rejected("w1 negative", f, p, NSA_ERR_INVALID_STRIDE, {"w1:", "negative"});
  p = f.params(NSA_CMP_MEAN);
  p.x.stride[3] = 0;
  expect_compress_rejected("x inner", f, p, NSA_ERR_INVALID_STRIDE, {"x:", "stride"});
}

TEST(ApiCompress, BadConfig) {
  CompressFixture f;
  nsa_compress_params p = f.params(NSA_CMP_MEAN);
  p.cfg.cmp_stride = p.cfg.cmp_block + 1;
  expect_compress_rejected("d > l", f, p, NSA_ERR_INVALID_CONFIG, {"config.cmp_stride"});
  p.cfg = f.cfg;
  p.cfg.cmp_block = 0;
  expect_compress_rejected("l = 0", f, p, NSA_ERR_INVALID_CONFIG, {"config.cmp_block"});
}

// Packed compression: sequences of 30 and 40 tokens have Tc 2 + 4 = 6 rows.
TEST(ApiCompress, CuSeqlens) {
  const int32_t cu[] = {0, 30, 70};
  Tensor x(NSA_DTYPE_F32, {1, 70, 2, 8}, true);
  std::mt19937_64 rng(5);
  x.fill_uniform(rng, -1, 1);
  CompressFixture f;
  f.out = Tensor(NSA_DTYPE_F32, {1, 6, 2, 8}, true);
  nsa_compress_params p = f.params(NSA_CMP_MEAN);
  p.x = x.desc();
  p.cu_seqlens = cu;
  p.num_seqs = 2;
  {
    Ctx ctx;
    ASSERT_EQ(nsa_compress(ctx.get(), &p), NSA_OK) << ctx.error();
  }
  Tensor unpacked(NSA_DTYPE_F32, {1, 7, 2, 8}, true);  // Tc of the whole T: wrong when packed
  p.out = unpacked.desc();
  expect_compress_rejected("unpacked out", f, p, NSA_ERR_INVALID_SHAPE, {"out:", "Tc = 6"},
                           {&unpacked});
  p = f.params(NSA_CMP_MEAN);
  p.x = x.desc();
  const int32_t bad[] = {0, 40, 30, 70};
  p.cu_seqlens = bad;
  p.num_seqs = 3;
  expect_compress_rejected("decreasing", f, p, NSA_ERR_INVALID_SEQLENS,
                           {"cu_seqlens", "decreases"});
  p.cu_seqlens = nullptr;
  expect_compress_rejected("NULL", f, p, NSA_ERR_NULL_POINTER, {"cu_seqlens", "num_seqs"});
  // B = 2 cannot be packed.
  CompressFixture g;
  p = g.params(NSA_CMP_MEAN);
  p.cu_seqlens = cu;
  p.num_seqs = 2;
  expect_compress_rejected("B = 2", g, p, NSA_ERR_INVALID_SHAPE, {"cu_seqlens", "B = 2"});
}

// No compressed token (T = 0, T < l, or B = 0) is a successful call that writes nothing.
TEST(ApiCompress, EmptyIsNoOp) {
  for (auto [b, t] : {std::pair<int64_t, int64_t>{2, 0}, {2, 15}, {0, 70}}) {
    SCOPED_TRACE("B " + std::to_string(b) + " T " + std::to_string(t));
    CompressFixture f;
    Tensor x(NSA_DTYPE_F32, {b, t, 2, 8}, true);
    f.out = Tensor(NSA_DTYPE_F32, {b, nsa_cmp_len(&f.cfg, t), 2, 8}, true);
    nsa_compress_params p = f.params(NSA_CMP_MLP);
    p.x = x.desc();
    const OutputSnapshot snap({&f.out});
    for (nsa_backend be : test_backends()) {
      Ctx ctx(be);
      EXPECT_EQ(nsa_compress(ctx.get(), &p), NSA_OK) << ctx.error();
    }
    snap.expect_unchanged();
  }
}
