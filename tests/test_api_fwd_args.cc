// API tests of nsa_fwd, continued: dtypes, per-branch K/V pairs, cu_seqlens, caller-supplied
// indices and empty problems. Same rule as test_api_fwd.cc: right code, a message naming the
// problem, and no output byte written on failure.
#include <gtest/gtest.h>

#include "api_util.h"

using namespace nsa_test;

namespace {

// Replaces tensor `name` of `p` by a same-shaped one of `dtype`. f16 (no fill support in the
// fixture) and i32 buffers stay unpadded and zero: only the dtype is under test.
Tensor retyped(nsa_fwd_params& p, const char* name, nsa_dtype dtype) {
  nsa_tensor& t = at(p, member(name));
  const bool padded = dtype == NSA_DTYPE_F32 || dtype == NSA_DTYPE_BF16;
  Tensor r(dtype, std::vector<int64_t>(t.shape, t.shape + t.ndim), padded);
  t = r.desc();
  return r;
}

}  // namespace

TEST(ApiFwdArgs, WrongDtypes) {
  struct Case {
    const char* name;
    nsa_dtype dtype;
    const char* says;  // the rejected dtype, as the message prints it
  };
  // i32 is for indices only; lse is f32 only; k, v, k_cmp and gates must follow q (f32 here);
  // indices are i32 only.
  const Case cases[] = {{"q", NSA_DTYPE_I32, "i32"},
                        {"k", NSA_DTYPE_BF16, "bf16"},
                        {"v", NSA_DTYPE_F16, "f16"},
                        {"k_cmp", NSA_DTYPE_BF16, "bf16"},
                        {"v_cmp", NSA_DTYPE_I32, "i32"},
                        {"g_cmp", NSA_DTYPE_BF16, "bf16"},
                        {"g_win", NSA_DTYPE_I32, "i32"},
                        {"k_slc", NSA_DTYPE_BF16, "bf16"},
                        {"g_slc", NSA_DTYPE_F16, "f16"},
                        {"o", NSA_DTYPE_I32, "i32"},
                        {"o_win", NSA_DTYPE_I32, "i32"},
                        {"lse_cmp", NSA_DTYPE_BF16, "bf16"},
                        {"lse_slc", NSA_DTYPE_I32, "i32"},
                        {"slc_indices_in", NSA_DTYPE_F32, "f32"},
                        {"slc_indices_out", NSA_DTYPE_F32, "f32"}};
  for (const Case& cs : cases) {
    FwdFixture f;
    nsa_fwd_params p = f.full();
    Tensor r = retyped(p, cs.name, cs.dtype);
    const std::string what = std::string(cs.name) + " " + cs.says;
    expect_rejected(what.c_str(), f, p, NSA_ERR_INVALID_DTYPE, {named(cs.name), cs.says}, {&r});
  }
  // A value outside the enum (the buffer stays the f32 one: only the tag is wrong).
  FwdFixture f;
  nsa_fwd_params p = f.full();
  p.in.g_slc.dtype = static_cast<nsa_dtype>(42);
  expect_rejected("g_slc dtype 42", f, p, NSA_ERR_INVALID_DTYPE, {named("g_slc"), "unknown"});
  // With bf16 q, k and v must be bf16 too: f32 k is a mix.
  f.c = make_case(base_shape(), base_cfg(), NSA_DTYPE_BF16, 9, true);
  p = f.c.params();
  Tensor r = retyped(p, "k", NSA_DTYPE_F32);
  expect_rejected("bf16 q, f32 k", f, p, NSA_ERR_INVALID_DTYPE, {named("k"), "f32"}, {&r});
}

// The mixes the header allows: bf16 inputs with f32 gates, f32 inputs with bf16 outputs.
TEST(ApiFwdArgs, AllowedDtypeMixes) {
  FwdCase c = make_case(base_shape(), base_cfg(), NSA_DTYPE_BF16, 21, true);
  nsa_fwd_params p = c.params();
  Tensor g(NSA_DTYPE_F32, {2, 64, 4}, true);
  g.fill(0.5);
  p.in.g_slc = g.desc();
  std::string msg;
  EXPECT_EQ(run_fwd(NSA_BACKEND_AUTO, c, &msg, &p), NSA_OK) << msg;
  FwdCase c2 = make_case(base_shape(), base_cfg(), NSA_DTYPE_F32, 22, true, {}, NSA_DTYPE_BF16);
  EXPECT_EQ(run_fwd(NSA_BACKEND_AUTO, c2, &msg), NSA_OK) << msg;
}

// A branch's own K/V come as a pair; one without the other is an error naming both.
TEST(ApiFwdArgs, BranchKvPairIncomplete) {
  for (const char* name : {"k_slc", "v_slc", "k_win", "v_win"}) {
    FwdFixture f;
    nsa_fwd_params p = f.c.params();
    at(p, member(name)) = f.c.k.desc();
    const std::string branch = std::string(name).substr(2);
    expect_rejected(name, f, p, NSA_ERR_NULL_POINTER, {"k_" + branch, "v_" + branch});
  }
}

namespace {

// A packed case: B = 1, T = 100, sequences of 37 and 63 tokens, Tc = 3 + 6.
FwdFixture varlen_fixture() {
  FwdFixture f;
  Shape s = base_shape();
  s.B = 1;
  s.T = 100;
  f.c = make_case(s, base_cfg(), NSA_DTYPE_F32, 31, true, {0, 37, 100});
  f.idx_in = Tensor(NSA_DTYPE_I32, {1, 100, s.Hkv, base_cfg().slc_count}, true);
  f.idx_in.fill(-1);
  return f;
}

}  // namespace

TEST(ApiFwdArgs, VarlenBaselineIsValid) {
  FwdFixture f = varlen_fixture();
  const nsa_fwd_params p = f.full();
  Ctx ctx;
  EXPECT_EQ(nsa_fwd(ctx.get(), &p), NSA_OK) << ctx.error();
}

TEST(ApiFwdArgs, BadCuSeqlens) {
  struct Case {
    const char* what;
    std::vector<int32_t> cu;  // empty: NULL
    int64_t num_seqs;
    nsa_status code;
    std::vector<std::string> needles;
  };
  const Case cases[] = {
      {"not starting at 0", {5, 37, 100}, 2, NSA_ERR_INVALID_SEQLENS, {"cu_seqlens[0]", "5"}},
      {"negative start", {-1, 37, 100}, 2, NSA_ERR_INVALID_SEQLENS, {"cu_seqlens[0]"}},
      {"decreasing", {0, 60, 37, 100}, 3, NSA_ERR_INVALID_SEQLENS, {"cu_seqlens", "decreases"}},
      {"ends before T", {0, 37, 99}, 2, NSA_ERR_INVALID_SEQLENS, {"cu_seqlens[2]", "T = 100"}},
      {"ends after T", {0, 37, 101}, 2, NSA_ERR_INVALID_SEQLENS, {"cu_seqlens[2]", "T = 100"}},
      {"num_seqs 0", {0, 37, 100}, 0, NSA_ERR_INVALID_SEQLENS, {"num_seqs"}},
      {"num_seqs < 0", {0, 37, 100}, -2, NSA_ERR_INVALID_SEQLENS, {"num_seqs"}},
      {"NULL with num_seqs 2", {}, 2, NSA_ERR_NULL_POINTER, {"cu_seqlens", "num_seqs"}}};
  for (const Case& cs : cases) {
    FwdFixture f = varlen_fixture();
    nsa_fwd_params p = f.full();
    p.in.cu_seqlens = cs.cu.empty() ? nullptr : cs.cu.data();
    p.in.num_seqs = cs.num_seqs;
    expect_rejected(cs.what, f, p, cs.code, cs.needles);
  }
}

// Packing needs B = 1: with B = 2 there is no single token axis to cut.
TEST(ApiFwdArgs, CuSeqlensNeedsBatchOne) {
  FwdFixture f;
  f.c = make_case(base_shape(), base_cfg(), NSA_DTYPE_F32, 32, true, {0, 20, 64});
  const nsa_fwd_params p = f.c.params();
  expect_rejected("B = 2", f, p, NSA_ERR_INVALID_SHAPE, {"cu_seqlens", "B = 2"});
}

// Packed k_cmp holds the sum of per-sequence Tc (3 + 6), not Tc of the whole T (11).
TEST(ApiFwdArgs, VarlenCompressedLength) {
  FwdFixture f = varlen_fixture();
  nsa_fwd_params p = f.full();
  Tensor k_cmp(NSA_DTYPE_F32, {1, nsa_cmp_len(&f.c.cfg, 100), 2, 16}, true);
  p.in.k_cmp = k_cmp.desc();
  expect_rejected("unpacked Tc", f, p, NSA_ERR_INVALID_SHAPE, {named("k_cmp"), "Tc = 9"});
}

// A caller-supplied index must be -1 or a block the query can see, [0, t / l'], with t counted
// inside its sequence; the message names the position.
TEST(ApiFwdArgs, SelectionIndexOutOfRange) {
  const int64_t lp = base_cfg().slc_block;
  struct Case {
    int64_t b, t, h, k;
    int32_t value;
    const char* where;
  };
  for (Case cs : {Case{1, 37, 1, 2, int32_t(37 / lp + 1), "slc_indices_in[1, 37, 1, 2]"},
                  {0, 0, 0, 3, 1, "slc_indices_in[0, 0, 0, 3]"},
                  {0, 5, 0, 0, -2, "slc_indices_in[0, 5, 0, 0]"},
                  {1, 63, 0, 1, 1 << 30, "slc_indices_in[1, 63, 0, 1]"}}) {
    FwdFixture f;
    f.idx_in.set({cs.b, cs.t, cs.h, cs.k}, cs.value);
    const nsa_fwd_params p = f.full();
    expect_rejected(cs.where, f, p, NSA_ERR_INVALID_INDEX, {cs.where});
  }
  // Packed: position 40 is token 3 of the second sequence, so block 40 / l' = 2 is in its future.
  FwdFixture f = varlen_fixture();
  f.idx_in.set({0, 40, 0, 0}, 40 / lp);
  const nsa_fwd_params p = f.full();
  expect_rejected("varlen", f, p, NSA_ERR_INVALID_INDEX, {"slc_indices_in[0, 40, 0, 0]"});
}

// The largest legal index, t / l', at every position, plus -1 and duplicates, is accepted.
TEST(ApiFwdArgs, SelectionIndexBoundsAccepted) {
  FwdFixture f;
  const int64_t lp = base_cfg().slc_block;
  f.idx_in.for_each([&](int64_t b, int64_t t, int64_t h, int64_t k) {
    f.idx_in.set({b, t, h, k}, k == 0 ? -1 : static_cast<double>(t / lp));
  });
  const nsa_fwd_params p = f.full();
  Ctx ctx;
  EXPECT_EQ(nsa_fwd(ctx.get(), &p), NSA_OK) << ctx.error();
}

// Nothing to compute is not an error: T = 0, B = 0 and all-empty packed sequences succeed and
// write nothing (there is no element to write; the padding must stay NaN).
TEST(ApiFwdArgs, EmptyProblemsAreNoOps) {
  struct Case {
    const char* what;
    int64_t B, T;
    std::vector<int32_t> cu;
  };
  for (const Case& cs : {Case{"T = 0", 2, 0, {}}, Case{"B = 0", 0, 64, {}},
                         Case{"B = T = 0", 0, 0, {}}, Case{"varlen empty", 1, 0, {0, 0, 0}}}) {
    SCOPED_TRACE(cs.what);
    Shape s = base_shape();
    s.B = cs.B;
    s.T = cs.T;
    FwdFixture f;
    f.c = make_case(s, base_cfg(), NSA_DTYPE_F32, 41, true, cs.cu);
    const nsa_fwd_params p = f.c.params();
    const OutputSnapshot snap(f.outputs());
    for (nsa_backend b : test_backends()) {
      Ctx ctx(b);
      EXPECT_EQ(nsa_fwd(ctx.get(), &p), NSA_OK) << nsa_backend_name(b) << ": " << ctx.error();
      EXPECT_EQ(ctx.error(), "");
    }
    snap.expect_unchanged();
  }
}
