// API tests of nsa_fwd's argument checks (SPEC.md section 8): every invalid call returns the
// right status, leaves a message naming the problem, and writes no output byte (padding included).
#include <gtest/gtest.h>

#include "api_util.h"

using namespace nsa_test;

// The fixture's calls are valid; every rejection below comes from the one thing each test breaks.
TEST(ApiFwd, BaselineIsValidAndClearsLastError) {
  for (nsa_backend b : test_backends()) {
    SCOPED_TRACE(nsa_backend_name(b));
    FwdFixture f;
    Ctx ctx(b);
    // A failure first, so the success below must actively clear the message.
    EXPECT_EQ(nsa_fwd(ctx.get(), nullptr), NSA_ERR_NULL_POINTER);
    EXPECT_NE(ctx.error(), "");
    const nsa_fwd_params p = f.full();
    ASSERT_EQ(nsa_fwd(ctx.get(), &p), NSA_OK) << ctx.error();
    EXPECT_EQ(ctx.error(), "");
    EXPECT_TRUE(std::isfinite(f.c.o.at({1, 63, 3, 7})));
  }
}

TEST(ApiFwd, NullContextAndParams) {
  FwdFixture f;
  const nsa_fwd_params p = f.full();
  const OutputSnapshot snap(f.outputs());
  EXPECT_EQ(nsa_fwd(nullptr, &p), NSA_ERR_NULL_POINTER);
  EXPECT_STREQ(nsa_last_error(nullptr), "");  // no context, nowhere to store a message
  snap.expect_unchanged();
  Ctx ctx;
  EXPECT_EQ(nsa_fwd(ctx.get(), nullptr), NSA_ERR_NULL_POINTER);
  expect_message(ctx.error(), {"params"});
}

TEST(ApiFwd, NullDataOfEachRequiredTensor) {
  for (const Field& fld : kRequired) {
    FwdFixture f;
    nsa_fwd_params p = f.full();
    at(p, fld.member).data = nullptr;
    expect_rejected(fld.name, f, p, NSA_ERR_NULL_POINTER, {named(fld.name), "NULL"});
  }
}

TEST(ApiFwd, EachInvalidConfigField) {
  FwdFixture f;
  for (const BadConfig& bad : bad_configs(base_cfg())) {
    nsa_fwd_params p = f.full();
    p.in.cfg = bad.cfg;
    expect_rejected(bad.what, f, p, NSA_ERR_INVALID_CONFIG, {bad.field});
  }
}

// The edges of the valid range are accepted: d == l, n == n_init + n_local, no forced blocks,
// an explicit scale.
TEST(ApiFwd, ConfigEdgesAccepted) {
  const nsa_config edges[] = {config(16, 16, 16, 2, 1, 1, 1), config(16, 8, 32, 3, 0, 0, 64),
                              config(8, 1, 8, 5, 2, 3, 2048)};
  for (nsa_config cfg : edges) {
    cfg.scale = 0.5f;
    FwdCase c = make_case(base_shape(), cfg, NSA_DTYPE_F32, 3, true);
    std::string msg;
    EXPECT_EQ(run_fwd(NSA_BACKEND_AUTO, c, &msg), NSA_OK) << msg;
    EXPECT_EQ(msg, "");
  }
}

TEST(ApiFwd, WrongNdim) {
  std::vector<Field> all(std::begin(kRequired), std::end(kRequired));
  all.insert(all.end(), std::begin(kOptional), std::end(kOptional));
  for (const Field& fld : all) {
    for (int32_t nd : {0, 3, 4, 5}) {
      FwdFixture f;
      nsa_fwd_params p = f.full();
      nsa_tensor& t = at(p, fld.member);
      if (t.ndim == nd) continue;
      t.ndim = nd;
      const std::string what = std::string(fld.name) + " ndim " + std::to_string(nd);
      expect_rejected(what.c_str(), f, p, NSA_ERR_INVALID_SHAPE, {named(fld.name), "dimensions"});
    }
  }
}

// Every size that must agree with another tensor's: the later tensor is the one named.
TEST(ApiFwd, MismatchedSizes) {
  struct Case {
    const char* name;
    int dim;
    int64_t delta;
  };
  const Case cases[] = {{"k", 0, -1},
                        {"k", 1, 1},
                        {"k", 3, 1},
                        {"v", 0, 1},
                        {"v", 1, -1},
                        {"v", 2, 1},
                        {"k_cmp", 0, -1},
                        {"k_cmp", 2, 1},
                        {"k_cmp", 3, -1},
                        {"v_cmp", 0, 1},
                        {"v_cmp", 2, -1},
                        {"v_cmp", 3, 1},
                        {"g_cmp", 2, 1},
                        {"g_slc", 1, -1},
                        {"g_win", 0, 1},
                        {"o", 0, -1},
                        {"o", 1, 1},
                        {"o", 2, -1},
                        {"o", 3, 1},
                        {"o_cmp", 3, -1},
                        {"o_slc", 2, 1},
                        {"o_win", 1, 1},
                        {"lse_cmp", 2, 1},
                        {"lse_slc", 1, -1},
                        {"lse_win", 0, 1},
                        {"k_slc", 1, 1},
                        {"v_slc", 3, 1},
                        {"k_win", 2, -1},
                        {"v_win", 0, -1},
                        {"slc_indices_in", 3, 1},
                        {"slc_indices_in", 2, 1},
                        {"slc_indices_out", 3, -1},
                        {"slc_indices_out", 1, 1}};
  for (const Case& cs : cases) {
    FwdFixture f;
    nsa_fwd_params p = f.full();
    nsa_tensor& t = at(p, member(cs.name));
    Tensor repl = resized(t, cs.dim, cs.delta);
    if (t.dtype == NSA_DTYPE_I32) repl.fill(-1);  // valid index values: only the shape is wrong
    t = repl.desc();
    const std::string what = std::string(cs.name) + " dim " + std::to_string(cs.dim);
    expect_rejected(what.c_str(), f, p, NSA_ERR_INVALID_SHAPE, {named(cs.name), "shape"}, {&repl});
  }
}

// Hq % Hkv != 0 must be an error: integer division would silently drop query heads.
TEST(ApiFwd, HeadsNotAMultipleOfKvHeads) {
  for (auto [hq, hkv] : {std::pair{3, 2}, {2, 4}, {6, 4}, {5, 3}}) {
    Shape s = base_shape();
    s.Hq = hq;
    s.Hkv = hkv;
    FwdFixture f;
    f.c = make_case(s, base_cfg(), NSA_DTYPE_F32, 11, true);
    nsa_fwd_params p = f.c.params();
    const std::string what = "Hq " + std::to_string(hq) + " Hkv " + std::to_string(hkv);
    expect_rejected(what.c_str(), f, p, NSA_ERR_INVALID_SHAPE,
                    {"Hq = " + std::to_string(hq), "Hkv = " + std::to_string(hkv)});
  }
  // MHA (G = 1) and MQA (Hkv = 1) are the legal extremes.
  for (auto [hq, hkv] : {std::pair{4, 4}, {4, 1}}) {
    Shape s = base_shape();
    s.Hq = hq;
    s.Hkv = hkv;
    FwdCase c = make_case(s, base_cfg(), NSA_DTYPE_F32, 12, true);
    std::string msg;
    EXPECT_EQ(run_fwd(NSA_BACKEND_AUTO, c, &msg), NSA_OK) << msg;
  }
}

// k_cmp / v_cmp must hold exactly Tc rows; the message says what Tc is.
TEST(ApiFwd, WrongCompressedLength) {
  for (const char* name : {"k_cmp", "v_cmp"}) {
    for (int64_t delta : {-1, 1}) {
      FwdFixture f;
      nsa_fwd_params p = f.full();
      nsa_tensor& t = at(p, member(name));
      Tensor repl = resized(t, 1, delta);
      t = repl.desc();
      expect_rejected(name, f, p, NSA_ERR_INVALID_SHAPE, {named(name), "Tc = 7"}, {&repl});
    }
  }
  // T < l: Tc = 0, so even one compressed row is wrong.
  Shape s = base_shape();
  s.T = 15;
  FwdFixture f;
  f.c = make_case(s, base_cfg(), NSA_DTYPE_F32, 5, true);
  nsa_fwd_params p = f.c.params();
  Tensor repl = resized(p.in.k_cmp, 1, 1);
  p.in.k_cmp = repl.desc();
  expect_rejected("T < l", f, p, NSA_ERR_INVALID_SHAPE, {named("k_cmp"), "Tc = 0"}, {&repl});
}

TEST(ApiFwd, InnerStrideNotOne) {
  for (const char* name : {"q", "v_cmp", "g_slc", "o", "lse_cmp", "slc_indices_out"}) {
    FwdFixture f;
    nsa_fwd_params p = f.full();
    at(p, member(name)).stride[at(p, member(name)).ndim - 1] = 2;
    expect_rejected(name, f, p, NSA_ERR_INVALID_STRIDE, {named(name), "stride"});
  }
}

TEST(ApiFwd, NegativeStride) {
  struct Case {
    const char* name;
    int dim;
  };
  for (Case cs : {Case{"k", 1}, {"g_win", 0}, {"k_slc", 2}, {"o", 2}, {"lse_slc", 1}}) {
    FwdFixture f;
    nsa_fwd_params p = f.full();
    nsa_tensor& t = at(p, member(cs.name));
    t.stride[cs.dim] = -t.stride[cs.dim];
    expect_rejected(cs.name, f, p, NSA_ERR_INVALID_STRIDE, {named(cs.name), "negative"});
  }
}

// An output whose strides let two elements share memory would make the result depend on the
// write order; it is rejected.
TEST(ApiFwd, OverlappingOutputView) {
  struct Case {
    const char* name;
    int dim;
    int64_t stride;
  };
  // o: rows of T collapse (0), or heads of Dv = 8 start every 4 elements; lse_win: T and Hq
  // both step by 1; indices: the two batches share one buffer.
  for (Case cs : {Case{"o", 1, 0},
                  {"o", 2, 4},
                  {"o_slc", 0, 1},
                  {"lse_win", 1, 1},
                  {"slc_indices_out", 0, 0}}) {
    FwdFixture f;
    nsa_fwd_params p = f.full();
    at(p, member(cs.name)).stride[cs.dim] = cs.stride;
    expect_rejected(cs.name, f, p, NSA_ERR_INVALID_STRIDE, {named(cs.name), "overlap"});
  }
}

// Inputs may overlap: broadcasting every input over the batch (stride 0) is legal, and then both
// batch rows compute the same output.
TEST(ApiFwd, BroadcastInputsAccepted) {
  FwdFixture f;
  nsa_fwd_params p = f.c.params();
  for (nsa_tensor* t : {&p.in.q, &p.in.k, &p.in.v, &p.in.k_cmp, &p.in.v_cmp, &p.in.g_cmp,
                        &p.in.g_slc, &p.in.g_win}) {
    t->stride[0] = 0;
  }
  Ctx ctx;
  ASSERT_EQ(nsa_fwd(ctx.get(), &p), NSA_OK) << ctx.error();
  f.c.o.for_each([&](int64_t, int64_t t, int64_t h, int64_t d) {
    EXPECT_EQ(f.c.o.at({0, t, h, d}), f.c.o.at({1, t, h, d})) << t << " " << h << " " << d;
  });
}

// Strides so large that an element's offset would overflow int64 are rejected up front, so no
// kernel ever computes a wrapped-around address.
TEST(ApiFwd, OffsetOverflowRejected) {
  for (const char* name : {"q", "o", "lse_win"}) {
    FwdFixture f;
    nsa_fwd_params p = f.full();
    at(p, member(name)).stride[0] = std::numeric_limits<int64_t>::max() / 2 + 1;
    expect_rejected(name, f, p, NSA_ERR_INVALID_SHAPE, {named(name), "64-bit"});
  }
}
