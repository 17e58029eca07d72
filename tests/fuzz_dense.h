// The dense baseline's side of the API fuzzer (fuzz_api.h): nsa_dense_fwd and nsa_dense_bwd on a
// random case (shapes as make_fwd draws them, GQA, f32/bf16, random layouts, cu_seqlens, window
// 0 / small / huge, scale 0 or explicit), each called valid or broken in one chosen way. A valid
// backward first runs the forward for its o and lse; a broken one needs no values.
#pragma once

#include <sstream>

#include "fuzz_bwd.h"

namespace nsa_fuzz {

struct DenseCase {
  int64_t B = 0, T = 0, Hq = 0, Hkv = 0, Dk = 0, Dv = 0;
  nsa_dtype dt = NSA_DTYPE_F32;
  std::vector<int32_t> cu;
  float scale = 0.0f;
  int32_t window = 0;
  Buf q, k, v, o, lse;  // o, lse: the forward's outputs, the backward's inputs
  bool has_lse = true;
  std::string text;

  bool valid_dims() const { return Hq >= 1 && Hkv >= 1 && Dk >= 1 && Dv >= 1 && Hq % Hkv == 0; }
  // Keys a query sees at most, and the reference's work (queries x keys x head dims).
  double keys() const { return window > 0 ? std::min<double>(window, T) : double(T); }
  double cost() const { return double(B) * T * Hq * (Dk + Dv) * keys(); }
  nsa_dense_fwd_params fwd_params() const {
    nsa_dense_fwd_params p;
    nsa_dense_fwd_params_init(&p);
    p.q = q.desc(), p.k = k.desc(), p.v = v.desc(), p.o = o.desc();
    if (has_lse) p.lse = lse.desc();
    if (!cu.empty()) p.cu_seqlens = cu.data(), p.num_seqs = static_cast<int64_t>(cu.size()) - 1;
    p.scale = scale, p.window = window;
    return p;
  }
};

inline DenseCase make_dense(Rng& r, BadDims bad, bool need_lse) {
  DenseCase c;
  draw_dims(r, bad, &c);
  const int64_t wk = uni(r, 0, 9);  // every earlier key, a window, or one wider than any sequence
  c.window = wk < 3   ? 0
             : wk < 9 ? static_cast<int32_t>(uni(r, 1, 250))
                      : pick(r, std::vector<int32_t>{INT32_MAX, 1 << 30});
  // Scores O(1), as in make_fwd: scale in [0.5, 1.5] / sqrt(Dk), or 0 for 1/sqrt(Dk).
  if (chance(r, 0.5) && c.Dk > 0)
    c.scale = static_cast<float>(uni(r, 5, 15) / 10.0 / std::sqrt(double(c.Dk)));
  if (chance(r, 0.3)) c.B = 1, c.cu = random_cu(r, c.T);
  c.q = Buf(c.dt, {c.B, c.T, c.Hq, c.Dk}, r);
  c.k = Buf(c.dt, {c.B, c.T, c.Hkv, c.Dk}, r);
  c.v = Buf(c.dt, {c.B, c.T, c.Hkv, c.Dv}, r);
  c.q.fill_uniform(r, -2.0, 2.0), c.k.fill_uniform(r, -2.0, 2.0), c.v.fill_uniform(r, -1.0, 1.0);
  const LayoutOpts out{false, false};
  c.o = Buf(pick_float(r), {c.B, c.T, c.Hq, c.Dv}, r, out);
  c.has_lse = need_lse || chance(r, 0.6);
  c.lse = Buf(NSA_DTYPE_F32, {c.B, c.T, c.Hq}, r, out);
  std::ostringstream s;
  s << "B=" << c.B << " T=" << c.T << " Hq=" << c.Hq << " Hkv=" << c.Hkv << " Dk=" << c.Dk
    << " Dv=" << c.Dv << " " << nsa_dtype_name(c.dt) << " lse=" << c.has_lse << " w=" << c.window
    << " scale=" << c.scale << " seqs=" << (c.cu.empty() ? 0 : c.cu.size() - 1);
  c.text = s.str();
  return c;
}

// A broken window, scale or cu_seqlens (the checks the forward and the backward share), or a NULL
// context or params; false when the drawn one does not apply. `*cu` owns a mutated cu_seqlens.
template <typename Params>
inline bool break_dense_common(Rng& r, const DenseCase& c, Params& p, std::vector<int32_t>* cu,
                               Expect* e, bool* null_ctx, bool* null_params) {
  const float inf = std::numeric_limits<float>::infinity();
  switch (uni(r, 0, 5)) {
    case 0:
      p.window = pick(r, std::vector<int32_t>{-1, -7, std::numeric_limits<int32_t>::min()});
      *e = {NSA_ERR_INVALID_ARGUMENT, "window " + std::to_string(p.window), "window"};
      return true;
    case 1:
      p.scale =
          pick(r, std::vector<float>{-0.125f, -inf, inf, std::numeric_limits<float>::quiet_NaN()});
      *e = {NSA_ERR_INVALID_ARGUMENT, "scale " + std::to_string(p.scale), "scale"};
      return true;
    case 2: {
      if (c.cu.empty()) return false;
      *cu = c.cu;
      int64_t num = p.num_seqs;
      e->what = break_cu(r, *cu, num);
      p.cu_seqlens = cu->data(), p.num_seqs = num;
      e->want = NSA_ERR_INVALID_SEQLENS;
      e->needle = e->what.rfind("num_seqs", 0) == 0 ? "num_seqs" : "cu_seqlens";
      return true;
    }
    case 3:
      p.cu_seqlens = nullptr;
      p.num_seqs = pick(r, std::vector<int64_t>{1, 2, -1});
      *e = {NSA_ERR_NULL_POINTER, "cu_seqlens NULL, num_seqs != 0", "cu_seqlens"};
      return true;
    case 4:
      if (!c.cu.empty() || c.B == 1) return false;
      *cu = random_cu(r, c.T);
      p.cu_seqlens = cu->data(), p.num_seqs = static_cast<int64_t>(cu->size()) - 1;
      *e = {NSA_ERR_INVALID_SHAPE, "cu_seqlens with B != 1", "cu_seqlens"};
      return true;
    default:
      *null_params = chance(r, 0.5);
      *null_ctx = !*null_params;
      *e = {NSA_ERR_NULL_POINTER, *null_ctx ? "NULL context" : "NULL params",
            *null_ctx ? "" : "params"};
      return true;
  }
}

// q, k, v as nsa_dense_fwd checks them: k and v take q's dtype (a float q of the other dtype is
// reported at k), q sets B, T, Hq, Dk, k sets Hkv and v sets Dv, each then checked elsewhere.
inline std::vector<TArg> dense_input_args(nsa_tensor* q, nsa_tensor* k, nsa_tensor* v,
                                          nsa_dtype dt) {
  const std::vector<int> same = {dt};
  return {{"q", q, same, true, false, 0xF, true},
          {"k", k, same, true, false, 1 << 2},
          {"v", v, same, true, false, 1 << 3}};
}

struct DenseCall {
  bool null_ctx = false, null_params = false;
  Expect e;
  std::vector<int32_t> cu;
};

// The argument the validator names for impossible sizes (validate.cc, check_qkv, shared with
// nsa_fwd): q's heads or Dk first, then k/v's, then the group ratio.
inline Expect bad_dims_expect(const DenseCase& d) {
  const char* needle = d.Hq < 1 || d.Dk < 1 ? "q:" : d.Hkv < 1 || d.Dv < 1 ? "k/v:" : "q/k:";
  return {NSA_ERR_INVALID_SHAPE, "impossible head counts or head dims", needle};
}

// ---- nsa_dense_fwd -----------------------------------------------------------------------------

inline DenseCall make_dense_fwd_call(Rng& r, const DenseCase& c, nsa_dense_fwd_params& p) {
  DenseCall call;
  if (!c.valid_dims()) {
    call.e = bad_dims_expect(c);
    return call;
  }
  const std::vector<int> fl = float_tags();
  for (;;) {
    const int64_t m = uni(r, 0, 99);
    if (m < 35) {
      call.e.what = "valid";
      return call;
    }
    if (m < 70) {
      std::vector<TArg> args = dense_input_args(&p.q, &p.k, &p.v, c.dt);
      args.push_back({"o", &p.o, fl, true, true});
      if (c.has_lse) args.push_back({"lse", &p.lse, {NSA_DTYPE_F32}, false, true});
      if (mutate_tensor(r, args, random_tmut(r), &call.e)) return call;
    } else if (break_dense_common(r, c, p, &call.cu, &call.e, &call.null_ctx, &call.null_params)) {
      return call;
    }
  }
}

inline void fuzz_dense(Rng& r) {
  const BadDims bad = chance(r, 0.05) ? static_cast<BadDims>(uni(r, 1, 5)) : BadDims::kNone;
  DenseCase c = make_dense(r, bad, false);
  nsa_dense_fwd_params p = c.fwd_params();
  const DenseCall call = make_dense_fwd_call(r, c, p);
  SCOPED_TRACE("dense " + c.text + " o=" + nsa_dtype_name(c.o.dtype()) + " | " + call.e.what);
  auto run = [&](nsa_backend be, std::string* msg) {
    return on_backend(r, be, msg, [&](nsa_context* ctx) {
      return nsa_dense_fwd(call.null_ctx ? nullptr : ctx, call.null_params ? nullptr : &p);
    });
  };
  std::string msg;
  if (call.e.want != NSA_OK) {
    const Snapshot snap({&c.q, &c.k, &c.v, &c.o, &c.lse});
    for (nsa_backend be : backends(r)) {
      expect_rejected(call.e, run(be, &msg), msg, call.null_ctx);
      snap.expect_unchanged("invalid call");
    }
    return;
  }
  std::vector<Buf*> outv = {&c.o};
  if (c.has_lse) outv.push_back(&c.lse);
  const Snapshot ins({&c.q, &c.k, &c.v}), outs(std::vector<const Buf*>(outv.begin(), outv.end()));
  const bool no_work = c.B == 0 || c.T == 0;
  auto written = [&] {  // every query sees its own key: o and lse finite
    for (const Buf* b : outv)
      EXPECT_EQ(count_nonfinite(*b), 0) << "o/lse: elements unwritten or not finite";
  };
  const nsa_backend fast = chance(r, 0.5) ? NSA_BACKEND_CPU : NSA_BACKEND_AUTO;
  if (c.cost() > budget().compare_cost || !nsa_backend_available(NSA_BACKEND_CPU)) {
    expect_valid_result(run(valid_backend(r, c.cost()), &msg), msg, ins, outs, no_work, written);
    return;
  }
  expect_valid_result(run(NSA_BACKEND_REF, &msg), msg, ins, outs, no_work, written);
  const std::vector<std::vector<unsigned char>> ref = bytes_of(outv);
  outs.restore(outv);
  expect_valid_result(run(fast, &msg), msg, ins, outs, no_work, written);
  if (no_work) return;
  ++compare_count();
  // As test_dense.cc: a Dk-term score dot of terms up to 4 and a softmax-weighted sum of up to
  // `keys` values of size <= 1, each rounding 2^-24, margin 16; lse relative to its size; a bf16
  // o adds one bf16 ulp (2^-7 |ref|). bf16 inputs on a CPU whose AUTO bf16 arithmetic is NATIVE
  // round each softmax weight to bf16 for P V: up to 2^-8 max|v| more (test_dense_bf16.cc).
  const double tol = 16.0 * (4.0 * c.Dk + c.keys()) * kEps;
  const bool bf16_math = c.dt == NSA_DTYPE_BF16 && nsa_bf16_math_auto() != NSA_BF16_MATH_F32;
  expect_close_to_ref("o", c.o, ref[0], tol + (bf16_math ? 1.0 / 256 : 0.0), 1.0,
                      out_rel(c.o.dtype()));
  if (c.has_lse) expect_close_to_ref("lse", c.lse, ref[1], tol, 1.0, 0.0);
}

// ---- nsa_dense_bwd -----------------------------------------------------------------------------

struct DenseBwdCase {
  DenseCase d;
  Buf d_o, dq, dk, dv;
  bool cheap = false;  // small enough for the float64 reference
  nsa_dense_bwd_params params() const {
    nsa_dense_bwd_params p;
    nsa_dense_bwd_params_init(&p);
    p.q = d.q.desc(), p.k = d.k.desc(), p.v = d.v.desc(), p.o = d.o.desc(), p.lse = d.lse.desc();
    p.d_o = d_o.desc(), p.dq = dq.desc(), p.dk = dk.desc(), p.dv = dv.desc();
    if (!d.cu.empty())
      p.cu_seqlens = d.cu.data(), p.num_seqs = static_cast<int64_t>(d.cu.size()) - 1;
    p.scale = d.scale, p.window = d.window;
    return p;
  }
  std::vector<const Buf*> inputs() const { return {&d.q, &d.k, &d.v, &d.o, &d.lse, &d_o}; }
  std::vector<Buf*> outs() { return {&dq, &dk, &dv}; }
};

inline DenseBwdCase make_dense_bwd(Rng& r, BadDims bad) {
  DenseBwdCase c;
  c.d = make_dense(r, bad, true);
  DenseCase& d = c.d;
  // The reference recomputes o in float64 (the caller's o only enters D = rowsum(d_o * o) on the
  // CPU), so a compared case keeps o in f32: a bf16 o's rounding would reach every gradient.
  c.cheap = 3.0 * d.cost() <= budget().compare_cost && nsa_backend_available(NSA_BACKEND_CPU);
  if (c.cheap && d.o.dtype() != NSA_DTYPE_F32)
    d.o = Buf(NSA_DTYPE_F32, {d.B, d.T, d.Hq, d.Dv}, r, LayoutOpts{false, false});
  auto dt = [&] { return pick_float(r); };
  c.d_o =
      Buf(chance(r, 0.5) ? NSA_DTYPE_F32 : d.dt, {d.B, d.T, d.Hq, d.Dv}, r);  // f32 or q's dtype
  c.d_o.fill_uniform(r, -1.0, 1.0);
  const LayoutOpts out{false, false};
  c.dq = Buf(dt(), {d.B, d.T, d.Hq, d.Dk}, r, out);
  c.dk = Buf(dt(), {d.B, d.T, d.Hkv, d.Dk}, r, out);
  c.dv = Buf(dt(), {d.B, d.T, d.Hkv, d.Dv}, r, out);
  return c;
}

inline DenseCall make_dense_bwd_call(Rng& r, DenseBwdCase& c, nsa_dense_bwd_params& p) {
  DenseCall call;
  if (!c.d.valid_dims()) {
    call.e = bad_dims_expect(c.d);
    return call;
  }
  const std::vector<int> fl = float_tags();
  for (;;) {
    const int64_t m = uni(r, 0, 99);
    if (m < 35) {
      call.e.what = "valid";
      return call;
    }
    if (m < 65) {
      std::vector<TArg> args = {{"o", &p.o, fl, true},
                                {"lse", &p.lse, {NSA_DTYPE_F32}, true},
                                {"d_o", &p.d_o, {NSA_DTYPE_F32, c.d.dt}, true},
                                {"dq", &p.dq, fl, true, true},
                                {"dk", &p.dk, fl, true, true},
                                {"dv", &p.dv, fl, true, true}};
      if (mutate_tensor(r, args, random_tmut(r), &call.e)) return call;
    } else if (m < 75) {
      const std::vector<Backed> b = {
          {"q", &p.q, &c.d.q, false},       {"k", &p.k, &c.d.k, false},
          {"v", &p.v, &c.d.v, false},       {"o", &p.o, &c.d.o, false},
          {"lse", &p.lse, &c.d.lse, false}, {"d_o", &p.d_o, &c.d_o, false},
          {"dq", &p.dq, &c.dq, true},       {"dk", &p.dk, &c.dk, true},
          {"dv", &p.dv, &c.dv, true}};
      if (alias_output(r, b, &call.e)) return call;
    } else if (m < 80) {  // the forward may omit lse; the backward needs it (nsa.h)
      std::memset(&p.lse, 0, sizeof p.lse);
      call.e = {NSA_ERR_NULL_POINTER, "lse absent", "lse:"};
      return call;
    } else if (break_dense_common(r, c.d, p, &call.cu, &call.e, &call.null_ctx,
                                  &call.null_params)) {
      return call;
    }
  }
}

// The forward on c's inputs, writing the o and lse the backward reads.
inline bool dense_forward_state(Rng& r, DenseBwdCase& c, bool cheap) {
  const nsa_dense_fwd_params fp = c.d.fwd_params();
  std::string msg;
  const nsa_backend be = cheap            ? NSA_BACKEND_REF
                         : chance(r, 0.5) ? NSA_BACKEND_CPU
                                          : NSA_BACKEND_AUTO;
  const nsa_status s =
      on_backend(r, be, &msg, [&](nsa_context* ctx) { return nsa_dense_fwd(ctx, &fp); });
  EXPECT_EQ(s, NSA_OK) << "the forward: " << msg;
  return s == NSA_OK;
}

inline void fuzz_dense_bwd(Rng& r) {
  const BadDims bad = chance(r, 0.05) ? static_cast<BadDims>(uni(r, 1, 5)) : BadDims::kNone;
  DenseBwdCase c = make_dense_bwd(r, bad);
  nsa_dense_bwd_params p = c.params();
  const DenseCall call = make_dense_bwd_call(r, c, p);
  SCOPED_TRACE("dense_bwd " + c.d.text + " d_o=" + nsa_dtype_name(c.d_o.dtype()) +
               " o=" + nsa_dtype_name(c.d.o.dtype()) + " | " + call.e.what);
  auto run = [&](nsa_backend be, std::string* msg) {
    return on_backend(r, be, msg, [&](nsa_context* ctx) {
      return nsa_dense_bwd(call.null_ctx ? nullptr : ctx, call.null_params ? nullptr : &p);
    });
  };
  std::string msg;
  const std::vector<Buf*> outv = c.outs();
  if (call.e.want != NSA_OK) {
    std::vector<const Buf*> all = c.inputs();
    all.insert(all.end(), outv.begin(), outv.end());
    const Snapshot snap(all);
    for (nsa_backend be : backends(r)) {
      expect_rejected(call.e, run(be, &msg), msg, call.null_ctx);
      snap.expect_unchanged("invalid call");
    }
    return;
  }
  const bool cheap = c.cheap;
  if (!dense_forward_state(r, c, cheap)) return;
  const Snapshot ins(c.inputs()), outs(std::vector<const Buf*>(outv.begin(), outv.end()));
  const bool no_work = c.d.B == 0 || c.d.T == 0;
  auto written = [&] {
    for (const Buf* b : outv)
      EXPECT_EQ(count_nonfinite(*b), 0) << "dq/dk/dv: elements unwritten or not finite";
  };
  const nsa_backend fast = chance(r, 0.5) ? NSA_BACKEND_CPU : NSA_BACKEND_AUTO;
  if (!cheap) {
    expect_valid_result(run(valid_backend(r, 3.0 * c.d.cost()), &msg), msg, ins, outs, no_work,
                        written);
    return;
  }
  expect_valid_result(run(NSA_BACKEND_REF, &msg), msg, ins, outs, no_work, written);
  const std::vector<std::vector<unsigned char>> ref = bytes_of(outv);
  outs.restore(outv);
  expect_valid_result(run(fast, &msg), msg, ins, outs, no_work, written);
  if (no_work) return;
  ++compare_count();
  // As test_dense_bwd.cc: n = 4 Dk + Dv + G keys roundings of 2^-24 reach an entry; with random
  // signs they grow as sqrt(n), margin 16, relative to max(max|ref|, 1). Both results stored in
  // bf16 may straddle a rounding boundary: one bf16 ulp, 2^-7 |ref|.
  const DenseCase& d = c.d;
  const double n = 4.0 * d.Dk + d.Dv + double(d.Hq / d.Hkv) * d.keys();
  const char* names[3] = {"dq", "dk", "dv"};
  for (int i = 0; i < 3; ++i) {
    const double rel = out_rel(outv[i]->dtype());
    expect_close_to_ref(names[i], *outv[i], ref[static_cast<size_t>(i)], 16.0 * std::sqrt(n) * kEps,
                        1.0, rel);
  }
}

}  // namespace nsa_fuzz
