// The nsa_bwd side of the API fuzzer (fuzz_api.h), plus what the backward fuzzers share
// (fuzz_compress_bwd.h, fuzz_dense.h): an output pointed into another argument's memory, and the
// element checks of a valid result. A case is a valid forward case (make_fwd); a valid call first
// runs the forward for the selection and the saved state, a broken one gets random valid indices
// instead (validation never reads the other values) and one chosen defect.
#pragma once

#include <sstream>

#include "fuzz_api.h"

namespace nsa_fuzz {

// ---- shared by the backward fuzzers ------------------------------------------------------------

// A tensor argument and the buffer behind it, for the aliasing mutation.
struct Backed {
  const char* name;
  nsa_tensor* t;
  const Buf* buf;
  bool output;
};

// Bytes from the first to the last element of a view (0 when it has none).
inline int64_t span_bytes(const nsa_tensor& t) {
  int64_t last = 0;
  for (int i = 0; i < t.ndim; ++i) {
    if (t.shape[i] == 0) return 0;
    last += (t.shape[i] - 1) * t.stride[i];
  }
  return (last + 1) * static_cast<int64_t>(esize(t.dtype));
}

// Points a present output into the memory of another argument (an input, or another output):
// NSA_ERR_INVALID_ARGUMENT (nsa.h: no output may share memory with an input or another output).
// Its start lands inside the other's span and its whole view inside that buffer's allocation, so
// a validator that missed the clash would still not write out of bounds.
inline bool alias_output(Rng& r, const std::vector<Backed>& args, Expect* e) {
  std::vector<std::pair<const Backed*, const Backed*>> pairs;
  for (const Backed& o : args) {
    for (const Backed& x : args) {
      const bool fits = o.buf != x.buf && o.t->data != nullptr && x.t->data != nullptr &&
                        span_bytes(*o.t) > 0 && span_bytes(*x.t) > 0;
      if (o.output && fits) pairs.emplace_back(&o, &x);
    }
  }
  while (!pairs.empty()) {
    const size_t i = static_cast<size_t>(uni(r, 0, static_cast<int64_t>(pairs.size()) - 1));
    const Backed& o = *pairs[i].first;
    const Backed& x = *pairs[i].second;
    const unsigned char* lo = x.buf->storage().data();
    const int64_t first = static_cast<const unsigned char*>(x.t->data) - lo;
    const int64_t es = static_cast<int64_t>(esize(o.t->dtype)),
                  room = static_cast<int64_t>(x.buf->storage().size());
    int64_t at = first + uni(r, 0, span_bytes(*x.t) - 1);
    at = (at + es - 1) / es * es;  // aligned for o's elements
    if (at >= first + span_bytes(*x.t) || at + span_bytes(*o.t) > room)
      at = (first + es - 1) / es * es;
    if (at < first + span_bytes(*x.t) && at + span_bytes(*o.t) <= room) {
      o.t->data = const_cast<unsigned char*>(lo) + at;
      *e = {NSA_ERR_INVALID_ARGUMENT, std::string(o.name) + " inside " + x.name, o.name};
      return true;
    }
    pairs.erase(pairs.begin() + static_cast<std::ptrdiff_t>(i));
  }
  return false;
}

// Logical elements of b whose value fails `ok` (an unwritten one keeps its NaN sentinel).
template <typename Pred>
inline int64_t count_failing(const Buf& b, Pred&& ok) {
  int64_t n = 0;
  b.for_each([&](int64_t, int64_t, int64_t, int64_t, int64_t off) { n += !ok(b.get(off)); });
  return n;
}
inline int64_t count_nonfinite(const Buf& b) {
  return count_failing(b, [](double x) { return std::isfinite(x); });
}

// b (now the CPU result) against the reference's bytes: |cpu - ref| <= abs * max(max|ref|, floor)
// + rel |ref| for every element, reported with the first few offenders.
inline void expect_close_to_ref(const char* name, const Buf& b,
                                const std::vector<unsigned char>& ref, double abs, double floor,
                                double rel) {
  double m = floor;
  b.for_each([&](int64_t, int64_t, int64_t, int64_t, int64_t off) {
    m = std::max(m, std::fabs(b.get_in(ref, off)));
  });
  int64_t bad = 0;
  b.for_each([&](int64_t i0, int64_t i1, int64_t i2, int64_t i3, int64_t off) {
    const double x = b.get(off), y = b.get_in(ref, off);
    if (!(std::fabs(x - y) <= abs * m + rel * std::fabs(y)) && bad++ < 3) {
      ADD_FAILURE() << name << "[" << i0 << ", " << i1 << ", " << i2 << ", " << i3 << "] cpu " << x
                    << " ref " << y << " (tol " << abs << " * " << m << " + " << rel << " |ref|)";
    }
  });
  EXPECT_EQ(bad, 0) << name << ": cpu vs ref mismatches";
}

// Random valid selection entries: -1 (about 30%) or a block the query sees ([0, t / l'], nsa.h).
// Contents, so from the value stream.
inline void fill_indices(Rng& r, Buf& idx, const FwdCase& f) {
  std::mt19937_64& g = r.values();
  idx.for_each([&](int64_t, int64_t tok, int64_t, int64_t, int64_t off) {
    const uint64_t last = static_cast<uint64_t>(f.pos_in_seq(tok) / f.cfg.slc_block);
    idx.set(off, g() % 10 < 3 ? -1.0 : static_cast<double>(g() % (last + 1)));
  });
}

// ---- nsa_bwd -----------------------------------------------------------------------------------

struct BwdCase {
  FwdCase f;                // the forward's inputs; its outputs are the saved state
  bool use_idx_in = false;  // slc_indices: the caller's set given to the forward, else its output
  bool saved[6] = {};       // lse_cmp, lse_slc, lse_win, o_cmp, o_slc, o_win passed to the backward
  bool dkv = true;          // dk/dv given (required unless both branches have their own K/V)
  bool cheap = false;       // small enough for the float64 reference
  double ref_cost = 0;      // the reference's work, for valid_backend
  Buf d_o, dq, dk, dv, dk_slc, dv_slc, dk_win, dv_win, dk_cmp, dv_cmp, dg_cmp, dg_slc, dg_win;
  Buf extra;  // a gradient the call must not take, for one mutation
  std::string text;

  bool both_own() const { return f.slc_mode != 0 && f.win_mode != 0; }
  Buf& idx() { return use_idx_in ? f.idx_in : f.idx_out; }
  const Buf& idx() const { return use_idx_in ? f.idx_in : f.idx_out; }
  // The present gradient outputs, named.
  std::vector<std::pair<const char*, Buf*>> grads() {
    std::vector<std::pair<const char*, Buf*>> g = {{"dq", &dq}};
    if (dkv) g.insert(g.end(), {{"dk", &dk}, {"dv", &dv}});
    if (f.slc_mode) g.insert(g.end(), {{"dk_slc", &dk_slc}, {"dv_slc", &dv_slc}});
    if (f.win_mode) g.insert(g.end(), {{"dk_win", &dk_win}, {"dv_win", &dv_win}});
    g.insert(g.end(), {{"dk_cmp", &dk_cmp},
                       {"dv_cmp", &dv_cmp},
                       {"dg_cmp", &dg_cmp},
                       {"dg_slc", &dg_slc},
                       {"dg_win", &dg_win}});
    return g;
  }
  std::vector<Buf*> outs() {
    std::vector<Buf*> v;
    for (auto& g : grads()) v.push_back(g.second);
    return v;
  }
  std::vector<const Buf*> inputs() const {  // the forward's buffers, all read by the backward
    std::vector<const Buf*> v = f.all();
    v.push_back(&d_o);
    return v;
  }

  nsa_bwd_params params() {
    const nsa_fwd_params fp = f.params();
    nsa_bwd_params p;
    nsa_bwd_params_init(&p);
    p.in.cfg = fp.in.cfg;
    p.in.q = fp.in.q, p.in.k = fp.in.k, p.in.v = fp.in.v, p.in.k_slc = fp.in.k_slc,
    p.in.v_slc = fp.in.v_slc;
    p.in.k_win = fp.in.k_win, p.in.v_win = fp.in.v_win, p.in.k_cmp = fp.in.k_cmp,
    p.in.v_cmp = fp.in.v_cmp;
    p.in.g_cmp = fp.in.g_cmp, p.in.g_slc = fp.in.g_slc, p.in.g_win = fp.in.g_win;
    p.in.cu_seqlens = fp.in.cu_seqlens, p.in.num_seqs = fp.in.num_seqs;
    p.slc_indices = idx().desc();
    nsa_tensor* st[6] = {&p.lse_cmp, &p.lse_slc, &p.lse_win, &p.o_cmp, &p.o_slc, &p.o_win};
    const Buf* sb[6] = {&f.lse_cmp, &f.lse_slc, &f.lse_win, &f.o_cmp, &f.o_slc, &f.o_win};
    for (int i = 0; i < 6; ++i) *st[i] = saved[i] ? sb[i]->desc() : nsa_tensor{};
    p.d_o = d_o.desc();
    p.dq = dq.desc();
    if (dkv) p.dk = dk.desc(), p.dv = dv.desc();
    if (f.slc_mode) p.dk_slc = dk_slc.desc(), p.dv_slc = dv_slc.desc();
    if (f.win_mode) p.dk_win = dk_win.desc(), p.dv_win = dv_win.desc();
    p.dk_cmp = dk_cmp.desc(), p.dv_cmp = dv_cmp.desc();
    p.dg_cmp = dg_cmp.desc(), p.dg_slc = dg_slc.desc(), p.dg_win = dg_win.desc();
    return p;
  }
};

// A valid case; `cheap` ones keep f32 saved outputs (a bf16 o_c would put its rounding into
// D = sum_c g_c d_o . o_c and dg_c, far beyond the comparison's f32 bound).
inline BwdCase make_bwd(Rng& r) {
  BwdCase c;
  do {  // an index tensor holds n entries per row: no extreme slc_count here
    c.f = make_fwd(r);
  } while (c.f.n() > 64);
  FwdCase& f = c.f;
  f.present[7] = true;
  c.use_idx_in = f.has_idx_in && chance(r, 0.5);
  const double cost = double(f.B) * f.T * f.Hq * (f.Dk + f.Dv) * std::min<double>(f.T, 3.0 * 64);
  c.ref_cost = 4 * cost;
  c.cheap = cost <= budget().compare_cost / 4 && nsa_backend_available(NSA_BACKEND_CPU);
  const LayoutOpts out{false, false};
  const std::vector<int64_t> os = {f.B, f.T, f.Hq, f.Dv};
  Buf* ob[3] = {&f.o_cmp, &f.o_slc, &f.o_win};
  for (int i = 0; i < 3; ++i) {
    if (c.cheap && ob[i]->dtype() != NSA_DTYPE_F32) *ob[i] = Buf(NSA_DTYPE_F32, os, r, out);
  }
  for (int i = 0; i < 6; ++i) c.saved[i] = f.present[i < 3 ? 4 + i : i - 2];
  c.dkv = !c.both_own() || chance(r, 0.5);
  auto dt = [&] { return pick_float(r); };
  c.d_o = Buf(dt(), os, r);
  c.d_o.fill_uniform(r, -1.0, 1.0);
  const std::vector<int64_t> ks = {f.B, f.T, f.Hkv, f.Dk}, vs = {f.B, f.T, f.Hkv, f.Dv},
                             gs = {f.B, f.T, f.Hq};
  c.dq = Buf(dt(), {f.B, f.T, f.Hq, f.Dk}, r, out);
  c.dk = Buf(dt(), ks, r, out), c.dv = Buf(dt(), vs, r, out);
  c.dk_slc = Buf(dt(), ks, r, out), c.dv_slc = Buf(dt(), vs, r, out);
  c.dk_win = Buf(dt(), ks, r, out), c.dv_win = Buf(dt(), vs, r, out);
  c.dk_cmp = Buf(dt(), {f.B, f.Tc, f.Hkv, f.Dk}, r, out);
  c.dv_cmp = Buf(dt(), {f.B, f.Tc, f.Hkv, f.Dv}, r, out);
  c.dg_cmp = Buf(dt(), gs, r, out), c.dg_slc = Buf(dt(), gs, r, out),
  c.dg_win = Buf(dt(), gs, r, out);
  std::ostringstream s;
  s << f.text << " | idx_in_as_slc=" << c.use_idx_in << " saved=";
  for (bool b : c.saved) s << b;
  s << " dkv=" << c.dkv << " d_o=" << nsa_dtype_name(c.d_o.dtype()) << " cheap=" << c.cheap;
  c.text = s.str();
  return c;
}

struct BwdCall {
  nsa_bwd_params p;
  bool null_ctx = false, null_params = false;
  Expect e;
  int64_t restore_off = -1;  // an index changed in place, restored after the call
  double restore_val = 0;
};

inline std::vector<TArg> bwd_args(nsa_bwd_params& p, bool both_own) {
  const std::vector<int> fl = float_tags(), f32 = {NSA_DTYPE_F32}, i32 = {NSA_DTYPE_I32};
  const std::vector<TArg> a = {{"slc_indices", &p.slc_indices, i32, true},
                               {"d_o", &p.d_o, fl, true},
                               {"lse_cmp", &p.lse_cmp, f32},
                               {"lse_slc", &p.lse_slc, f32},
                               {"lse_win", &p.lse_win, f32},
                               {"o_cmp", &p.o_cmp, fl},
                               {"o_slc", &p.o_slc, fl},
                               {"o_win", &p.o_win, fl},
                               {"dq", &p.dq, fl, true, true},
                               {"dk", &p.dk, fl, !both_own, true},
                               {"dv", &p.dv, fl, !both_own, true},
                               {"dk_slc", &p.dk_slc, fl, true, true},
                               {"dv_slc", &p.dv_slc, fl, true, true},
                               {"dk_win", &p.dk_win, fl, true, true},
                               {"dv_win", &p.dv_win, fl, true, true},
                               {"dk_cmp", &p.dk_cmp, fl, true, true},
                               {"dv_cmp", &p.dv_cmp, fl, true, true},
                               {"dg_cmp", &p.dg_cmp, fl, true, true},
                               {"dg_slc", &p.dg_slc, fl, true, true},
                               {"dg_win", &p.dg_win, fl, true, true}};
  std::vector<TArg> present;
  std::copy_if(a.begin(), a.end(), std::back_inserter(present),
               [](const TArg& x) { return x.t->data != nullptr; });
  return present;
}

// Every argument of p with its buffer, for alias_output.
inline std::vector<Backed> bwd_backed(nsa_bwd_params& p, BwdCase& c) {
  FwdCase& f = c.f;
  const Buf* ks = f.slc_mode == 2 ? &f.k_slc : &f.k;
  const Buf* vs = f.slc_mode == 2 ? &f.v_slc : &f.v;
  const Buf* kw = f.win_mode == 2 ? &f.k_win : &f.k;
  const Buf* vw = f.win_mode == 2 ? &f.v_win : &f.v;
  return {{"q", &p.in.q, &f.q, false},
          {"k", &p.in.k, &f.k, false},
          {"v", &p.in.v, &f.v, false},
          {"k_slc", &p.in.k_slc, ks, false},
          {"v_slc", &p.in.v_slc, vs, false},
          {"k_win", &p.in.k_win, kw, false},
          {"v_win", &p.in.v_win, vw, false},
          {"k_cmp", &p.in.k_cmp, &f.k_cmp, false},
          {"v_cmp", &p.in.v_cmp, &f.v_cmp, false},
          {"g_cmp", &p.in.g_cmp, &f.g_cmp, false},
          {"g_slc", &p.in.g_slc, &f.g_slc, false},
          {"g_win", &p.in.g_win, &f.g_win, false},
          {"slc_indices", &p.slc_indices, &c.idx(), false},
          {"lse_cmp", &p.lse_cmp, &f.lse_cmp, false},
          {"lse_slc", &p.lse_slc, &f.lse_slc, false},
          {"lse_win", &p.lse_win, &f.lse_win, false},
          {"o_cmp", &p.o_cmp, &f.o_cmp, false},
          {"o_slc", &p.o_slc, &f.o_slc, false},
          {"o_win", &p.o_win, &f.o_win, false},
          {"d_o", &p.d_o, &c.d_o, false},
          {"dq", &p.dq, &c.dq, true},
          {"dk", &p.dk, &c.dk, true},
          {"dv", &p.dv, &c.dv, true},
          {"dk_slc", &p.dk_slc, &c.dk_slc, true},
          {"dv_slc", &p.dv_slc, &c.dv_slc, true},
          {"dk_win", &p.dk_win, &c.dk_win, true},
          {"dv_win", &p.dv_win, &c.dv_win, true},
          {"dk_cmp", &p.dk_cmp, &c.dk_cmp, true},
          {"dv_cmp", &p.dv_cmp, &c.dv_cmp, true},
          {"dg_cmp", &p.dg_cmp, &c.dg_cmp, true},
          {"dg_slc", &p.dg_slc, &c.dg_slc, true},
          {"dg_win", &p.dg_win, &c.dg_win, true}};
}

// One out-of-range entry of slc_indices (changed in place; the caller restores it).
inline bool break_index(Rng& r, BwdCase& c, BwdCall& call) {
  Buf& idx = c.idx();
  if (idx.numel() == 0) return false;
  const int64_t which = uni(r, 0, idx.numel() - 1);
  int64_t i = 0, tok = 0, off = 0;
  idx.for_each([&](int64_t, int64_t t, int64_t, int64_t, int64_t o) {
    if (i++ == which) tok = t, off = o;
  });
  const int64_t last = c.f.pos_in_seq(tok) / c.f.cfg.slc_block;
  const int32_t v =
      chance(r, 0.6) ? static_cast<int32_t>(last + uni(r, 1, 3))
                     : pick(r, std::vector<int32_t>{-2, -7, std::numeric_limits<int32_t>::min()});
  call.restore_off = off, call.restore_val = idx.get(off);
  idx.set(off, v);
  call.e = {NSA_ERR_INVALID_INDEX,
            "index " + std::to_string(v) + " at token " + std::to_string(tok), "slc_indices"};
  return true;
}

// A branch gradient given although the forward read k/v for that branch (nsa.h: must be absent).
inline bool unwanted_grad(Rng& r, BwdCase& c, BwdCall& call) {
  std::vector<int> options;  // 0 dk_slc, 1 dv_slc, 2 dk_win, 3 dv_win
  if (!c.f.slc_mode) options.insert(options.end(), {0, 1});
  if (!c.f.win_mode) options.insert(options.end(), {2, 3});
  if (options.empty()) return false;
  const int o = pick(r, options);
  const FwdCase& f = c.f;
  c.extra = Buf(pick_float(r), {f.B, f.T, f.Hkv, o % 2 ? f.Dv : f.Dk}, r, LayoutOpts{false, false});
  nsa_tensor* t[4] = {&call.p.dk_slc, &call.p.dv_slc, &call.p.dk_win, &call.p.dv_win};
  const char* names[4] = {"dk_slc", "dv_slc", "dk_win", "dv_win"};
  *t[o] = c.extra.desc();
  call.e = {NSA_ERR_INVALID_ARGUMENT, std::string(names[o]) + " without its branch's own K/V",
            names[o]};
  return true;
}

// A call on c, broken in one chosen way.
inline BwdCall make_bwd_call(Rng& r, BwdCase& c) {
  BwdCall call;
  call.p = c.params();
  Expect& e = call.e;
  for (;;) {
    const int64_t m = uni(r, 0, 99);
    if (m < 45) {
      std::vector<TArg> args = bwd_args(call.p, c.both_own());
      if (mutate_tensor(r, args, random_tmut(r), &e)) return call;
    } else if (m < 58) {
      if (alias_output(r, bwd_backed(call.p, c), &e)) return call;
    } else if (m < 65) {
      if (unwanted_grad(r, c, call)) return call;
    } else if (m < 70 && !c.both_own()) {
      const bool k = chance(r, 0.5);
      std::memset(k ? &call.p.dk : &call.p.dv, 0, sizeof(nsa_tensor));
      e = {NSA_ERR_NULL_POINTER, k ? "dk missing" : "dv missing", k ? "dk:" : "dv:"};
      return call;
    } else if (m < 80) {
      if (break_index(r, c, call)) return call;
    } else if (m < 92 && c.f.cfg.cmp_block < std::numeric_limits<int32_t>::max()) {
      const nsa_test::BadConfig bc = pick(r, nsa_test::bad_configs(c.f.cfg));
      call.p.in.cfg = bc.cfg;
      e = {NSA_ERR_INVALID_CONFIG, std::string("config: ") + bc.what, bc.field};
      return call;
    } else if (m >= 92) {
      call.null_params = chance(r, 0.5);
      call.null_ctx = !call.null_params;
      e = {NSA_ERR_NULL_POINTER, call.null_ctx ? "NULL context" : "NULL params",
           call.null_ctx ? "" : "params"};
      return call;
    }
  }
}

// Every present gradient written and finite (the inputs are); dk/dv, when given although both
// branches have their own K/V, zero-filled (nsa.h).
inline void expect_grads_written(BwdCase& c) {
  for (auto& g : c.grads()) {
    EXPECT_EQ(count_nonfinite(*g.second), 0) << g.first << ": elements unwritten or not finite";
    if (c.both_own() && (g.second == &c.dk || g.second == &c.dv)) {
      EXPECT_EQ(count_failing(*g.second, [](double x) { return x == 0.0; }), 0)
          << g.first << ": not zero-filled";
    }
  }
}

inline void fuzz_bwd_invalid(Rng& r, BwdCase& c) {
  if (!c.use_idx_in) fill_indices(r, c.f.idx_out, c.f);
  BwdCall call = make_bwd_call(r, c);
  SCOPED_TRACE("bwd " + c.text + " | " + call.e.what);
  std::vector<const Buf*> all = c.inputs();
  for (Buf* b : c.outs()) all.push_back(b);
  all.push_back(&c.extra);
  const Snapshot snap(all);
  std::string msg;
  for (nsa_backend be : backends(r)) {
    const nsa_status s = on_backend(r, be, &msg, [&](nsa_context* ctx) {
      return nsa_bwd(call.null_ctx ? nullptr : ctx, call.null_params ? nullptr : &call.p);
    });
    expect_rejected(call.e, s, msg, call.null_ctx);
    snap.expect_unchanged("invalid call");
  }
  if (call.restore_off >= 0) c.idx().set(call.restore_off, call.restore_val);
}

inline void fuzz_bwd_valid(Rng& r, BwdCase& c) {
  SCOPED_TRACE("bwd " + c.text + " | valid");
  std::string msg;
  const nsa_fwd_params fp = c.f.params();
  const nsa_backend fwd_be = c.cheap          ? NSA_BACKEND_REF
                             : chance(r, 0.5) ? NSA_BACKEND_CPU
                                              : NSA_BACKEND_AUTO;
  const nsa_status fs =
      on_backend(r, fwd_be, &msg, [&](nsa_context* ctx) { return nsa_fwd(ctx, &fp); });
  ASSERT_EQ(fs, NSA_OK) << "the forward: " << msg;
  const nsa_bwd_params p = c.params();
  auto run = [&](nsa_backend be) {
    return on_backend(r, be, &msg, [&](nsa_context* ctx) { return nsa_bwd(ctx, &p); });
  };
  const std::vector<Buf*> outv = c.outs();
  const Snapshot ins(c.inputs()), outs(std::vector<const Buf*>(outv.begin(), outv.end()));
  const bool no_work = c.f.B == 0 || c.f.T == 0;
  auto written = [&] { expect_grads_written(c); };
  const nsa_backend fast = chance(r, 0.5) ? NSA_BACKEND_CPU : NSA_BACKEND_AUTO;
  if (!c.cheap) {
    expect_valid_result(run(valid_backend(r, c.ref_cost)), msg, ins, outs, no_work, written);
    return;
  }
  expect_valid_result(run(NSA_BACKEND_REF), msg, ins, outs, no_work, written);
  const std::vector<std::vector<unsigned char>> ref = bytes_of(outv);
  outs.restore(outv);
  expect_valid_result(run(fast), msg, ins, outs, no_work, written);
  if (no_work) return;
  ++compare_count();
  // As test_backward_cpu.cc: K = Dk + Dv + 3T + G T roundings of 2^-24 (score and dP dots, the
  // row's keys, the G heads sharing a key) on the longest chain, x16 for exp's amplification of
  // score errors, relative to max(max|ref|, 1); a bf16 store adds one bf16 ulp (2^-7 |ref|).
  const FwdCase& f = c.f;
  const double K = double(f.Dk + f.Dv + 3 * f.T + f.Hq / f.Hkv * f.T);
  const std::vector<std::pair<const char*, Buf*>> g = c.grads();
  for (size_t i = 0; i < g.size(); ++i) {
    Buf& b = *g[i].second;
    const std::vector<unsigned char>& want = ref[i];
    expect_close_to_ref(g[i].first, b, want, 16.0 * K * kEps, 1.0, out_rel(b.dtype()));
  }
}

// One nsa_bwd call: valid (about a third; then checked as nsa.h promises and, when small, against
// the reference) or broken in one chosen way.
inline void fuzz_bwd(Rng& r) {
  BwdCase c = make_bwd(r);
  if (chance(r, 0.35)) fuzz_bwd_valid(r, c);
  else fuzz_bwd_invalid(r, c);
}

}  // namespace nsa_fuzz
