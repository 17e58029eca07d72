// nsa_bwd and nsa_compress_bwd through the C API: the reference backend's results equal the float64
// core rounded once to the output dtype, the K/V gradient routing of nsa.h, and argument validation
// (status, a message naming the argument, outputs untouched: SPEC.md section 8).
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "api_util.h"
#include "backward_util.h"
#include "nsa/nsa.hpp"

namespace nsa_test {
namespace {

// Owned inputs and outputs of one nsa_bwd call, all padded NaN-filled views.
struct BwdCall {
  Case64 c;
  ApiTensors in;
  Tensor dq, dk, dv, dk_slc, dv_slc, dk_win, dv_win, dk_cmp, dv_cmp, dg_cmp, dg_slc, dg_win, lse;

  explicit BwdCall(Case64 cs, nsa_dtype out_dtype = NSA_DTYPE_F32) : c(std::move(cs)), in(c, true) {
    const Shape& s = c.shape;
    const int64_t Tc = c.args.k_cmp.shape[1];
    dq = Tensor(out_dtype, {s.B, s.T, s.Hq, s.Dk}, true);
    for (Tensor* t : {&dk, &dk_slc, &dk_win}) *t = Tensor(out_dtype, {s.B, s.T, s.Hkv, s.Dk}, true);
    for (Tensor* t : {&dv, &dv_slc, &dv_win}) *t = Tensor(out_dtype, {s.B, s.T, s.Hkv, s.Dv}, true);
    dk_cmp = Tensor(out_dtype, {s.B, Tc, s.Hkv, s.Dk}, true);
    dv_cmp = Tensor(out_dtype, {s.B, Tc, s.Hkv, s.Dv}, true);
    for (Tensor* t : {&dg_cmp, &dg_slc, &dg_win}) *t = Tensor(out_dtype, {s.B, s.T, s.Hq}, true);
    lse = Tensor(NSA_DTYPE_F32, {s.B, s.T, s.Hq}, true);
    lse.fill(0.0);
  }

  // Shared K/V (the default API): k/v feed both branches, dk/dv receive both.
  nsa_bwd_params params() {
    nsa_bwd_params p;
    nsa_bwd_params_init(&p);
    p.in.cfg = c.args.cfg;
    p.in.q = in.q.desc();
    p.in.k = in.k.desc();
    p.in.v = in.v.desc();
    p.in.k_cmp = in.k_cmp.desc();
    p.in.v_cmp = in.v_cmp.desc();
    p.in.g_cmp = in.g_cmp.desc();
    p.in.g_slc = in.g_slc.desc();
    p.in.g_win = in.g_win.desc();
    if (!c.cu.empty()) {
      p.in.cu_seqlens = c.cu.data();
      p.in.num_seqs = static_cast<int64_t>(c.cu.size()) - 1;
    }
    p.slc_indices = in.idx.desc();
    p.d_o = in.d_o.desc();
    p.dq = dq.desc();
    p.dk = dk.desc();
    p.dv = dv.desc();
    p.dk_cmp = dk_cmp.desc();
    p.dv_cmp = dv_cmp.desc();
    p.dg_cmp = dg_cmp.desc();
    p.dg_slc = dg_slc.desc();
    p.dg_win = dg_win.desc();
    return p;
  }
  std::vector<const Tensor*> outputs() const {
    return {&dq,     &dk,     &dv,     &dk_slc, &dv_slc, &dk_win,
            &dv_win, &dk_cmp, &dv_cmp, &dg_cmp, &dg_slc, &dg_win};
  }
};

// Every element of `t` is the float64 value rounded once to t's dtype.
void expect_rounded(const char* name, const Tensor& t, const Tensor64& want) {
  Tensor expect = to_tensor(want, t.desc().ndim, false, t.desc().dtype);
  int bad = 0;
  t.for_each([&](int64_t a, int64_t b, int64_t c, int64_t d) {
    const double got = t.get_raw(t.logical_offset(a, b, c, d));
    const double ref = expect.get_raw(expect.logical_offset(a, b, c, d));
    if (got != ref && bad++ < 3)
      ADD_FAILURE() << name << " at " << a << "," << b << "," << c << "," << d << ": " << got
                    << " vs " << ref;
  });
  EXPECT_EQ(bad, 0) << name;
}

Tensor64 sum(const Tensor64& a, const Tensor64& b) {
  Tensor64 s = a;
  for (size_t i = 0; i < s.data.size(); ++i) s.data[i] += b.data[i];
  return s;
}

nsa_config small_cfg() { return config(4, 2, 8, 3, 1, 1, 6); }

Shape shape(int64_t B, int64_t T, int64_t Hq, int64_t Hkv, int64_t Dk, int64_t Dv) {
  Shape s;
  s.B = B;
  s.T = T;
  s.Hq = Hq;
  s.Hkv = Hkv;
  s.Dk = Dk;
  s.Dv = Dv;
  return s;
}

// The reference only: the CPU backward accumulates in f32 and reads the saved LSEs (zeros here),
// it is compared with the reference within f32 bounds in test_backward_cpu.cc.
TEST(ApiBwd, SharedKvEqualsFloat64CoreOnTheReference) {
  BwdCall call(make_case64(shape(1, 40, 4, 2, 4, 3), small_cfg(), 21, {0, 15, 16, 40}));
  const nsa::ref::NsaGrads64 g = grads64(call.c);
  for (nsa_backend b : {NSA_BACKEND_REF}) {
    SCOPED_TRACE(nsa_backend_name(b));
    Ctx ctx(b);
    nsa_bwd_params p = call.params();
    p.lse_cmp = p.lse_slc = p.lse_win = call.lse.desc();  // accepted, not read by the reference
    ASSERT_EQ(nsa_bwd(ctx.get(), &p), NSA_OK) << ctx.error();
    expect_rounded("dq", call.dq, g.dq);
    expect_rounded("dk", call.dk, sum(g.dk_slc, g.dk_win));
    expect_rounded("dv", call.dv, sum(g.dv_slc, g.dv_win));
    expect_rounded("dk_cmp", call.dk_cmp, g.dk_cmp);
    expect_rounded("dv_cmp", call.dv_cmp, g.dv_cmp);
    expect_rounded("dg_cmp", call.dg_cmp, g.dg_cmp);
    expect_rounded("dg_slc", call.dg_slc, g.dg_slc);
    expect_rounded("dg_win", call.dg_win, g.dg_win);
  }
}

TEST(ApiBwd, OwnBranchKvRoutesToTheirOutputs) {
  BwdCall call(make_case64(shape(2, 21, 3, 1, 3, 2), small_cfg(), 22, {}, true));
  const nsa::ref::NsaGrads64 g = grads64(call.c);
  Ctx ctx(NSA_BACKEND_REF);
  // Only the win branch has its own K/V: dk/dv are the slc branch's alone.
  nsa_bwd_params p = call.params();
  p.in.k_win = call.in.k_win.desc();
  p.in.v_win = call.in.v_win.desc();
  p.dk_win = call.dk_win.desc();
  p.dv_win = call.dv_win.desc();
  ASSERT_EQ(nsa_bwd(ctx.get(), &p), NSA_OK) << ctx.error();
  expect_rounded("dk", call.dk, g.dk_slc);
  expect_rounded("dv", call.dv, g.dv_slc);
  expect_rounded("dk_win", call.dk_win, g.dk_win);
  expect_rounded("dv_win", call.dv_win, g.dv_win);
  // Both branches own K/V: dk/dv may be absent; given, they are zero-filled.
  p.in.k_slc = call.in.k.desc();
  p.in.v_slc = call.in.v.desc();
  p.dk_slc = call.dk_slc.desc();
  p.dv_slc = call.dv_slc.desc();
  ASSERT_EQ(nsa_bwd(ctx.get(), &p), NSA_OK) << ctx.error();
  expect_rounded("dk_slc", call.dk_slc, g.dk_slc);
  expect_rounded("dk", call.dk, Tensor64(2, 21, 1, 3));
  p.dk = p.dv = nsa_tensor{};
  EXPECT_EQ(nsa_bwd(ctx.get(), &p), NSA_OK) << ctx.error();
}

TEST(ApiBwd, Bf16OutputsAndCppLayer) {
  BwdCall call(make_case64(shape(1, 20, 2, 1, 4, 4), small_cfg(), 23), NSA_DTYPE_BF16);
  const nsa::ref::NsaGrads64 g = grads64(call.c);
  nsa::Context ctx(NSA_BACKEND_REF);
  ctx.bwd(call.params());
  expect_rounded("dq (bf16)", call.dq, g.dq);
  expect_rounded("dg_win (bf16)", call.dg_win, g.dg_win);
  nsa_bwd_params bad = call.params();
  bad.d_o.data = nullptr;
  try {
    ctx.bwd(bad);
    ADD_FAILURE() << "no exception";
  } catch (const nsa::Error& e) {
    EXPECT_EQ(e.status(), NSA_ERR_NULL_POINTER);
    EXPECT_NE(std::string(e.what()).find("d_o"), std::string::npos) << e.what();
  }
}

TEST(ApiBwd, NoTokenIsANoOp) {
  BwdCall call(make_case64(shape(1, 0, 2, 1, 4, 4), small_cfg(), 24));
  Ctx ctx;
  nsa_bwd_params p = call.params();
  EXPECT_EQ(nsa_bwd(ctx.get(), &p), NSA_OK) << ctx.error();
}

// ---- Validation ----

void expect_bwd_rejected(const char* what, const BwdCall& call, const nsa_bwd_params& p,
                         nsa_status code, const std::vector<std::string>& needles) {
  expect_rejected_by(what, call.outputs(), code, needles,
                     [&](nsa_context* ctx) { return nsa_bwd(ctx, &p); });
}

struct BwdField {
  const char* name;
  Member<nsa_bwd_params> member;
};
const BwdField kRequiredBwd[] = {{"q", &nsa_fwd_inputs::q},
                                 {"k", &nsa_fwd_inputs::k},
                                 {"v", &nsa_fwd_inputs::v},
                                 {"k_cmp", &nsa_fwd_inputs::k_cmp},
                                 {"v_cmp", &nsa_fwd_inputs::v_cmp},
                                 {"g_cmp", &nsa_fwd_inputs::g_cmp},
                                 {"g_slc", &nsa_fwd_inputs::g_slc},
                                 {"g_win", &nsa_fwd_inputs::g_win},
                                 {"slc_indices", &nsa_bwd_params::slc_indices},
                                 {"d_o", &nsa_bwd_params::d_o},
                                 {"dq", &nsa_bwd_params::dq},
                                 {"dk", &nsa_bwd_params::dk},
                                 {"dv", &nsa_bwd_params::dv},
                                 {"dk_cmp", &nsa_bwd_params::dk_cmp},
                                 {"dv_cmp", &nsa_bwd_params::dv_cmp},
                                 {"dg_cmp", &nsa_bwd_params::dg_cmp},
                                 {"dg_slc", &nsa_bwd_params::dg_slc},
                                 {"dg_win", &nsa_bwd_params::dg_win}};

BwdCall validation_call() {
  return BwdCall(make_case64(shape(2, 24, 4, 2, 4, 3), small_cfg(), 25));
}

TEST(ApiBwdArgs, NullContextAndParams) {
  BwdCall call = validation_call();
  nsa_bwd_params p = call.params();
  EXPECT_EQ(nsa_bwd(nullptr, &p), NSA_ERR_NULL_POINTER);
  Ctx ctx;
  EXPECT_EQ(nsa_bwd(ctx.get(), nullptr), NSA_ERR_NULL_POINTER);
  expect_message(ctx.error(), {"params"});
}

TEST(ApiBwdArgs, EveryRequiredTensorMissing) {
  BwdCall call = validation_call();
  for (const BwdField& f : kRequiredBwd) {
    nsa_bwd_params p = call.params();
    at(p, f.member).data = nullptr;
    expect_bwd_rejected(f.name, call, p, NSA_ERR_NULL_POINTER, {named(f.name)});
  }
}

TEST(ApiBwdArgs, EveryTensorWithAWrongSize) {
  BwdCall call = validation_call();
  for (const BwdField& f : kRequiredBwd) {
    nsa_bwd_params p = call.params();
    const int last = at(p, f.member).ndim - 1;
    Tensor wrong = resized(at(p, f.member), last, 1);
    at(p, f.member) = wrong.desc();
    // A wrong Dk/Dv in q, k or v moves the others' expected shapes; the first to differ is named.
    const bool defines_sizes = f.member == &nsa_fwd_inputs::q || f.member == &nsa_fwd_inputs::k ||
                               f.member == &nsa_fwd_inputs::v;
    expect_bwd_rejected(f.name, call, p, NSA_ERR_INVALID_SHAPE,
                        defines_sizes ? std::vector<std::string>{} : std::vector{named(f.name)});
  }
}

TEST(ApiBwdArgs, WrongDtypes) {
  BwdCall call = validation_call();
  struct Case {
    const char* name;
    Member<nsa_bwd_params> member;
    nsa_dtype dtype;
  };
  for (const Case& k : {Case{"d_o", &nsa_bwd_params::d_o, NSA_DTYPE_I32},
                        Case{"dq", &nsa_bwd_params::dq, NSA_DTYPE_I32},
                        Case{"dk_cmp", &nsa_bwd_params::dk_cmp, NSA_DTYPE_I32},
                        Case{"slc_indices", &nsa_bwd_params::slc_indices, NSA_DTYPE_F32},
                        Case{"lse_cmp", &nsa_bwd_params::lse_cmp, NSA_DTYPE_BF16}}) {
    nsa_bwd_params p = call.params();
    p.lse_cmp = call.lse.desc();
    at(p, k.member).dtype = k.dtype;
    expect_bwd_rejected(k.name, call, p, NSA_ERR_INVALID_DTYPE, {named(k.name)});
  }
}

TEST(ApiBwdArgs, BranchGradientRouting) {
  BwdCall call = validation_call();
  nsa_bwd_params p = call.params();
  p.dk_slc = call.dk_slc.desc();  // k_slc absent: the slc gradient belongs in dk
  expect_bwd_rejected("dk_slc without k_slc", call, p, NSA_ERR_INVALID_ARGUMENT,
                      {"dk_slc:", "dk/dv"});
  p = call.params();
  p.in.k_win = call.in.k_win.desc();
  p.in.v_win = call.in.v_win.desc();
  p.dk_win = call.dk_win.desc();  // dv_win missing
  expect_bwd_rejected("v_win without dv_win", call, p, NSA_ERR_NULL_POINTER,
                      {"dv_win:", "required"});
}

TEST(ApiBwdArgs, OutputsMustNotShareMemory) {
  BwdCall call = validation_call();
  nsa_bwd_params p = call.params();
  p.dg_slc = p.dg_cmp;
  expect_bwd_rejected("dg_slc = dg_cmp", call, p, NSA_ERR_INVALID_ARGUMENT, {"dg_cmp:", "dg_slc"});
  p = call.params();
  p.dg_win = p.in.g_win;  // writing the gradient over the gate
  p.dg_win.data = call.in.g_win.desc().data;
  expect_bwd_rejected("dg_win over g_win", call, p, NSA_ERR_INVALID_ARGUMENT, {"dg_win:", "g_win"});
  p = call.params();
  p.dq.stride[2] = 1;  // heads on top of each other
  expect_bwd_rejected("dq overlapping itself", call, p, NSA_ERR_INVALID_STRIDE, {"dq:"});
}

TEST(ApiBwdArgs, BadIndicesAndConfig) {
  BwdCall call = validation_call();
  Tensor& idx = call.in.idx;
  const double saved = idx.at({1, 9, 1, 0});
  idx.set({1, 9, 1, 0}, 2);  // t = 9 sees blocks 0 .. 1 only
  expect_bwd_rejected("index past t / l'", call, call.params(), NSA_ERR_INVALID_INDEX,
                      {"slc_indices[1, 9, 1, 0]"});
  idx.set({1, 9, 1, 0}, -2);
  expect_bwd_rejected("index -2", call, call.params(), NSA_ERR_INVALID_INDEX, {"slc_indices["});
  idx.set({1, 9, 1, 0}, saved);
  nsa_bwd_params p = call.params();
  p.in.cfg.cmp_stride = p.in.cfg.cmp_block + 1;
  expect_bwd_rejected("bad config", call, p, NSA_ERR_INVALID_CONFIG, {"config.cmp_stride"});
  p = call.params();
  p.in.num_seqs = 1;  // cu_seqlens NULL
  expect_bwd_rejected("num_seqs without cu_seqlens", call, p, NSA_ERR_NULL_POINTER, {"cu_seqlens"});
}

}  // namespace
}  // namespace nsa_test
