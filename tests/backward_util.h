// Shared by the backward tests: random float64 cases for the reference's float64 core (whose
// values float32 holds exactly, so the C API sees the same inputs), the selection taken from the
// reference forward, and central finite differences of L = sum(d_o * o).
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "api_util.h"
#include "ref/ref.h"
#include "test_util.h"

namespace nsa_test {

using nsa::ref::Tensor64;

// Uniform values, rounded to float32 so that the C API's f32 tensors hold them exactly.
inline void fill_f32_exact(Tensor64& t, std::mt19937_64& rng, double lo, double hi) {
  std::uniform_real_distribution<double> u(lo, hi);
  for (double& x : t.data) x = static_cast<float>(u(rng));
}

// The sequences of a case (as the C API builds them): one per batch row, or from cu_seqlens.
inline std::vector<nsa::Sequence> sequences_of(const nsa_config& cfg, int64_t B, int64_t T,
                                               const std::vector<int32_t>& cu) {
  std::vector<nsa::Sequence> seqs;
  if (cu.empty()) {
    for (int64_t b = 0; b < B; ++b) seqs.push_back({b, 0, T, 0, nsa_cmp_len(&cfg, T)});
    return seqs;
  }
  int64_t cmp_start = 0;
  for (size_t s = 0; s + 1 < cu.size(); ++s) {
    const int64_t len = cu[s + 1] - cu[s];
    seqs.push_back({0, cu[s], len, cmp_start, nsa_cmp_len(&cfg, len)});
    cmp_start += nsa_cmp_len(&cfg, len);
  }
  return seqs;
}

// An f32 test tensor holding `x` (rank `ndim`), optionally a padded strided view.
inline Tensor to_tensor(const Tensor64& x, int ndim, bool padded = false,
                        nsa_dtype dtype = NSA_DTYPE_F32) {
  Tensor t(dtype, std::vector<int64_t>(x.shape, x.shape + ndim), padded);
  t.for_each([&](int64_t a, int64_t b, int64_t c, int64_t d) {
    t.set_raw(t.logical_offset(a, b, c, d), x.at(a, b, c, d));
  });
  return t;
}

inline Tensor64 from_tensor(const Tensor& t) {
  const nsa_tensor& d = t.desc();
  int64_t n[4] = {1, 1, 1, 1};
  for (int i = 0; i < d.ndim; ++i) n[i] = d.shape[i];
  Tensor64 x(n[0], n[1], n[2], n[3]);
  t.for_each([&](int64_t a, int64_t b, int64_t c, int64_t e) {
    x.at(a, b, c, e) = t.get_raw(t.logical_offset(a, b, c, e));
  });
  return x;
}

// One backward case on the float64 core.
struct Case64 {
  Shape shape;
  std::vector<int32_t> cu;
  nsa::ref::NsaArgs64 args;
  Tensor64 d_o;
  bool own_branch_kv = false;  // k_slc/v_slc and k_win/v_win differ (else they are equal)
};

// The f32 tensors of a case for nsa_fwd / nsa_bwd: k/v are the slc branch's, and the win
// branch's are passed separately when the case has its own.
struct ApiTensors {
  Tensor q, k, v, k_win, v_win, k_cmp, v_cmp, g_cmp, g_slc, g_win, d_o, idx;
  explicit ApiTensors(const Case64& c, bool padded = false) {
    const nsa::ref::NsaArgs64& a = c.args;
    q = to_tensor(a.q, 4, padded);
    k = to_tensor(a.k_slc, 4, padded);
    v = to_tensor(a.v_slc, 4, padded);
    k_win = to_tensor(a.k_win, 4, padded);
    v_win = to_tensor(a.v_win, 4, padded);
    k_cmp = to_tensor(a.k_cmp, 4, padded);
    v_cmp = to_tensor(a.v_cmp, 4, padded);
    g_cmp = to_tensor(a.g_cmp, 3, padded);
    g_slc = to_tensor(a.g_slc, 3, padded);
    g_win = to_tensor(a.g_win, 3, padded);
    d_o = to_tensor(c.d_o, 4, padded);
    const Shape& s = c.shape;
    idx = Tensor(NSA_DTYPE_I32, {s.B, s.T, s.Hkv, a.cfg.slc_count}, padded);
    int64_t i = 0;
    idx.for_each([&](int64_t b, int64_t t, int64_t h, int64_t k) {
      idx.set_raw(idx.logical_offset(b, t, h, k), a.slc_indices[i++]);
    });
  }
};

// The reference forward's outputs on a case, through the C API (backend REF).
struct FwdResult {
  Tensor o, o_cmp, o_slc, o_win, idx;
};

inline FwdResult reference_forward(const Case64& c, bool use_case_indices) {
  const Shape& s = c.shape;
  ApiTensors in(c);
  FwdResult r;
  for (Tensor* t : {&r.o, &r.o_cmp, &r.o_slc, &r.o_win}) {
    *t = Tensor(NSA_DTYPE_F32, {s.B, s.T, s.Hq, s.Dv});
  }
  r.idx = Tensor(NSA_DTYPE_I32, {s.B, s.T, s.Hkv, c.args.cfg.slc_count});
  nsa_fwd_params p;
  nsa_fwd_params_init(&p);
  p.in.cfg = c.args.cfg;
  p.in.q = in.q.desc();
  p.in.k = in.k.desc();
  p.in.v = in.v.desc();
  if (c.own_branch_kv) {
    p.in.k_win = in.k_win.desc();
    p.in.v_win = in.v_win.desc();
  }
  p.in.k_cmp = in.k_cmp.desc();
  p.in.v_cmp = in.v_cmp.desc();
  p.in.g_cmp = in.g_cmp.desc();
  p.in.g_slc = in.g_slc.desc();
  p.in.g_win = in.g_win.desc();
  if (!c.cu.empty()) {
    p.in.cu_seqlens = c.cu.data();
    p.in.num_seqs = static_cast<int64_t>(c.cu.size()) - 1;
  }
  if (use_case_indices) p.slc_indices_in = in.idx.desc();
  p.o = r.o.desc();
  p.o_cmp = r.o_cmp.desc();
  p.o_slc = r.o_slc.desc();
  p.o_win = r.o_win.desc();
  p.slc_indices_out = r.idx.desc();
  nsa_context* ctx = nullptr;
  nsa_context_create(&ctx);
  nsa_context_set_backend(ctx, NSA_BACKEND_REF);
  EXPECT_EQ(nsa_fwd(ctx, &p), NSA_OK) << nsa_last_error(ctx);
  nsa_context_destroy(ctx);
  return r;
}

// A random case: inputs as make_case draws them (scores O(1), gates in (0, 1)), d_o in (-1, 1),
// and the selection the reference forward computes on these inputs (held fixed from then on).
inline Case64 make_case64(const Shape& s, nsa_config cfg, uint64_t seed,
                          std::vector<int32_t> cu = {}, bool own_branch_kv = false) {
  Case64 c;
  c.shape = s;
  c.cu = std::move(cu);
  c.own_branch_kv = own_branch_kv;
  if (cfg.scale == 0.0f) cfg.scale = static_cast<float>(1.0 / std::sqrt(double(s.Dk)));
  nsa::ref::NsaArgs64& a = c.args;
  a.cfg = cfg;
  a.seqs = sequences_of(cfg, s.B, s.T, c.cu);
  const int64_t Tc = cmp_rows(cfg, s.T, c.cu);
  std::mt19937_64 rng(seed);
  a.q = Tensor64(s.B, s.T, s.Hq, s.Dk);
  a.k_slc = Tensor64(s.B, s.T, s.Hkv, s.Dk);
  a.v_slc = Tensor64(s.B, s.T, s.Hkv, s.Dv);
  a.k_cmp = Tensor64(s.B, Tc, s.Hkv, s.Dk);
  a.v_cmp = Tensor64(s.B, Tc, s.Hkv, s.Dv);
  for (Tensor64* t : {&a.q, &a.k_slc, &a.k_cmp}) fill_f32_exact(*t, rng, -2.0, 2.0);
  for (Tensor64* t : {&a.v_slc, &a.v_cmp}) fill_f32_exact(*t, rng, -1.0, 1.0);
  a.k_win = a.k_slc;
  a.v_win = a.v_slc;
  if (own_branch_kv) {
    fill_f32_exact(a.k_win, rng, -2.0, 2.0);
    fill_f32_exact(a.v_win, rng, -1.0, 1.0);
  }
  for (Tensor64* g : {&a.g_cmp, &a.g_slc, &a.g_win}) {
    *g = Tensor64(s.B, s.T, s.Hq);
    fill_f32_exact(*g, rng, 0.0, 1.0);
  }
  c.d_o = Tensor64(s.B, s.T, s.Hq, s.Dv);
  fill_f32_exact(c.d_o, rng, -1.0, 1.0);
  a.slc_indices.assign(static_cast<size_t>(s.B * s.T * s.Hkv * cfg.slc_count), -1);
  const Tensor idx = reference_forward(c, false).idx;
  int64_t i = 0;
  idx.for_each([&](int64_t b, int64_t t, int64_t h, int64_t k) {
    a.slc_indices[i++] = static_cast<int32_t>(idx.get_raw(idx.logical_offset(b, t, h, k)));
  });
  return c;
}

// L = sum(d_o * o) through the float64 forward with the case's fixed selection.
inline double loss64(const Case64& c) {
  nsa::ref::NsaOutputs64 out;
  EXPECT_TRUE(nsa::ref::forward_fixed64(c.args, 1, &out).is_ok());
  double l = 0.0;
  for (size_t i = 0; i < out.o.data.size(); ++i) l += c.d_o.data[i] * out.o.data[i];
  return l;
}

inline nsa::ref::NsaGrads64 grads64(const Case64& c) {
  nsa::ref::NsaGrads64 g;
  EXPECT_TRUE(nsa::ref::backward64(c.args, c.d_o, 2, &g).is_ok());
  return g;
}

// Step of the central differences: the inputs are O(1) and the loss is smooth in them (the
// selection is fixed), so the truncation error is O(h^2) ~ 1e-10 and the rounding error
// O(1e-16 |L| / h) ~ 1e-10.
constexpr double kFdStep = 1e-5;
// Both errors above are far below 1e-6 (relative, floor 1): a wrong term in a gradient is
// O(1e-2) or larger on these inputs, so the check stays sharp.
constexpr double kFdTol = 1e-6;

// Checks grad against central differences of `loss` for every element of *x (or every
// `step`-th one), perturbing *x in place and restoring it.
template <typename Loss>
void expect_matches_fd(const char* name, Tensor64* x, const Tensor64& grad, Loss&& loss,
                       size_t step = 1) {
  ASSERT_EQ(x->data.size(), grad.data.size()) << name;
  int failures = 0;
  for (size_t i = 0; i < x->data.size(); i += step) {
    const double saved = x->data[i];
    x->data[i] = saved + kFdStep;
    const double up = loss();
    x->data[i] = saved - kFdStep;
    const double down = loss();
    x->data[i] = saved;
    const double fd = (up - down) / (2 * kFdStep);
    if (std::abs(fd - grad.data[i]) > kFdTol * (1.0 + std::abs(fd)) && failures++ < 5) {
      ADD_FAILURE() << name << "[" << i << "]: backward " << grad.data[i] << ", finite difference "
                    << fd;
    }
  }
  EXPECT_EQ(failures, 0) << name << ": elements that disagree with finite differences";
}

// Every gradient of the case against finite differences.
inline void expect_all_grads_match_fd(Case64 c) {
  const nsa::ref::NsaGrads64 g = grads64(c);
  nsa::ref::NsaArgs64& a = c.args;
  auto loss = [&] { return loss64(c); };
  expect_matches_fd("dq", &a.q, g.dq, loss);
  expect_matches_fd("dk_slc", &a.k_slc, g.dk_slc, loss);
  expect_matches_fd("dv_slc", &a.v_slc, g.dv_slc, loss);
  expect_matches_fd("dk_win", &a.k_win, g.dk_win, loss);
  expect_matches_fd("dv_win", &a.v_win, g.dv_win, loss);
  expect_matches_fd("dk_cmp", &a.k_cmp, g.dk_cmp, loss);
  expect_matches_fd("dv_cmp", &a.v_cmp, g.dv_cmp, loss);
  expect_matches_fd("dg_cmp", &a.g_cmp, g.dg_cmp, loss);
  expect_matches_fd("dg_slc", &a.g_slc, g.dg_slc, loss);
  expect_matches_fd("dg_win", &a.g_win, g.dg_win, loss);
}

// Runs call(ctx) on every backend and checks: status `code`, a message containing `needles`, and
// no byte of `outputs` changed (SPEC 8).
template <typename Call>
void expect_rejected_by(const char* what, const std::vector<const Tensor*>& outputs,
                        nsa_status code, const std::vector<std::string>& needles, Call&& call) {
  SCOPED_TRACE(what);
  const OutputSnapshot snap(outputs);
  for (nsa_backend b : test_backends()) {
    SCOPED_TRACE(nsa_backend_name(b));
    Ctx ctx(b);
    const nsa_status s = call(ctx.get());
    EXPECT_EQ(s, code) << nsa_status_name(s) << ": " << ctx.error();
    expect_message(ctx.error(), needles);
    snap.expect_unchanged();
  }
}

}  // namespace nsa_test
