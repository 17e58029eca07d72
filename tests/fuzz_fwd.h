// The nsa_fwd side of the API fuzzer: a random valid case (shapes, layouts, dtypes, config,
// cu_seqlens, per-branch K/V, caller indices, optional outputs), and mutations that each break it
// in one chosen way and say which status that must give (SPEC.md section 8, nsa.h).
#pragma once

#include <sstream>

#include "api_util.h"
#include "fuzz_mutate.h"

namespace nsa_fuzz {

// How a case's dimensions are wrong from the start (each is NSA_ERR_INVALID_SHAPE), or kNone.
enum class BadDims { kNone, kRatio, kHq0, kHkv0, kDk0, kDv0 };

// The dtype and dimensions of an attention call (nsa_fwd's and nsa_dense_fwd's cases): GQA group
// sizes {1, 2, 3, 4, 16}, T across block sizes, Dk != Dv, within budget(); with `bad`, one
// dimension problem.
template <typename Case>
inline void draw_dims(Rng& r, BadDims bad, Case* cp) {
  Case& c = *cp;
  c.dt = pick_float(r);
  c.B = chance(r, 0.05) ? 0 : uni(r, 1, 3);
  const int64_t tsize = uni(r, 0, 9);
  c.T = chance(r, 0.04) ? 0
        : tsize < 4     ? uni(r, 1, 20)
        : tsize < 7     ? uni(r, 21, 80)
                        : uni(r, 81, 200);
  c.T = std::min(c.T, budget().max_T);
  const int64_t G = pick(r, std::vector<int64_t>{1, 1, 2, 3, 4, 16});
  c.Hkv = G == 16 ? uni(r, 1, 2) : uni(r, 1, 4);
  c.Hq = G * c.Hkv;
  c.Dk = chance(r, 0.3) ? uni(r, 1, 8) : uni(r, 1, 40);
  c.Dv = chance(r, 0.3) ? uni(r, 1, 8) : uni(r, 1, 40);
  c.B = std::min(c.B, budget().max_B);
  c.Dk = std::min(c.Dk, budget().max_D);
  c.Dv = std::min(c.Dv, budget().max_D);
  switch (bad) {
    case BadDims::kRatio:
      c.Hkv = uni(r, 2, 4), c.Hq = c.Hkv * uni(r, 1, 3) + uni(r, 1, c.Hkv - 1);
      break;
    case BadDims::kHq0: c.Hq = 0; break;
    case BadDims::kHkv0: c.Hkv = 0; break;
    case BadDims::kDk0: c.Dk = 0; break;
    case BadDims::kDv0: c.Dv = 0; break;
    case BadDims::kNone: break;
  }
}

struct FwdCase {
  int64_t B = 0, T = 0, Hq = 0, Hkv = 0, Dk = 0, Dv = 0, Tc = 0;
  nsa_config cfg{};
  nsa_dtype dt = NSA_DTYPE_F32;
  std::vector<int32_t> cu;         // empty: fixed-length batch
  int slc_mode = 0, win_mode = 0;  // per-branch K/V: 0 absent, 1 aliasing k/v, 2 own buffers
  Buf q, k, v, k_slc, v_slc, k_win, v_win, k_cmp, v_cmp, g_cmp, g_slc, g_win, idx_in;
  Buf o, o_cmp, o_slc, o_win, lse_cmp, lse_slc, lse_win, idx_out;
  bool has_idx_in = false;
  bool present[8] = {};  // o, o_cmp, o_slc, o_win, lse_cmp, lse_slc, lse_win, idx_out
  std::string text;      // a description for failure messages

  std::vector<Buf*> outs() {
    return {&o, &o_cmp, &o_slc, &o_win, &lse_cmp, &lse_slc, &lse_win, &idx_out};
  }
  std::vector<const Buf*> all() const {
    return {&q,     &k,     &v,     &k_slc,   &v_slc,   &k_win,   &v_win,
            &k_cmp, &v_cmp, &g_cmp, &g_slc,   &g_win,   &idx_in,  &o,
            &o_cmp, &o_slc, &o_win, &lse_cmp, &lse_slc, &lse_win, &idx_out};
  }
  std::vector<const Buf*> inputs() const {
    std::vector<const Buf*> a = all();
    return {a.begin(), a.begin() + 13};
  }
  std::vector<const Buf*> outputs() const {
    std::vector<const Buf*> a = all();
    return {a.begin() + 13, a.end()};
  }
  bool valid_dims() const { return Hq >= 1 && Hkv >= 1 && Dk >= 1 && Dv >= 1 && Hq % Hkv == 0; }

  nsa_fwd_params params() const {
    nsa_fwd_params p;
    nsa_fwd_params_init(&p);
    p.in.cfg = cfg;
    p.in.q = q.desc(), p.in.k = k.desc(), p.in.v = v.desc(), p.in.k_cmp = k_cmp.desc(),
    p.in.v_cmp = v_cmp.desc();
    p.in.g_cmp = g_cmp.desc(), p.in.g_slc = g_slc.desc(), p.in.g_win = g_win.desc();
    if (slc_mode) p.in.k_slc = slc_mode == 1 ? k.desc() : k_slc.desc();
    if (slc_mode) p.in.v_slc = slc_mode == 1 ? v.desc() : v_slc.desc();
    if (win_mode) p.in.k_win = win_mode == 1 ? k.desc() : k_win.desc();
    if (win_mode) p.in.v_win = win_mode == 1 ? v.desc() : v_win.desc();
    if (has_idx_in) p.slc_indices_in = idx_in.desc();
    nsa_tensor* outp[8] = {&p.o,       &p.o_cmp,   &p.o_slc,   &p.o_win,
                           &p.lse_cmp, &p.lse_slc, &p.lse_win, &p.slc_indices_out};
    const Buf* outb[8] = {&o, &o_cmp, &o_slc, &o_win, &lse_cmp, &lse_slc, &lse_win, &idx_out};
    for (int i = 0; i < 8; ++i) {
      if (present[i]) *outp[i] = outb[i]->desc();
    }
    if (!cu.empty())
      p.in.cu_seqlens = cu.data(), p.in.num_seqs = static_cast<int64_t>(cu.size()) - 1;
    return p;
  }

  // Position of token `tok` inside its sequence.
  int64_t pos_in_seq(int64_t tok) const {
    for (size_t s = 0; s + 1 < cu.size(); ++s) {
      if (tok >= cu[s] && tok < cu[s + 1]) return tok - cu[s];
    }
    return tok;
  }
  int64_t n() const { return cfg.slc_count; }
};

// A random case: valid when `bad` is kNone, else with that one dimension problem.
inline FwdCase make_fwd(Rng& r, BadDims bad = BadDims::kNone) {
  FwdCase c;
  draw_dims(r, bad, &c);
  c.cfg = random_config(r, chance(r, 0.05));
  if (c.cfg.scale != 0.0f && c.Dk > 0) {  // keep scores O(1): scale in [0.5, 1.5] / sqrt(Dk)
    c.cfg.scale = static_cast<float>(uni(r, 5, 15) / 10.0 / std::sqrt(double(c.Dk)));
  }
  if (chance(r, 0.3)) c.B = 1, c.cu = random_cu(r, c.T);
  c.Tc = nsa_test::cmp_rows(c.cfg, c.T, c.cu);
  const bool idx_ok = c.cfg.slc_count <= 64;  // an index tensor has n entries per row
  c.has_idx_in = idx_ok && chance(r, 0.25);
  c.slc_mode = static_cast<int>(uni(r, 0, 2));
  c.win_mode = static_cast<int>(uni(r, 0, 2));

  const std::vector<int64_t> qs = {c.B, c.T, c.Hq, c.Dk}, ks = {c.B, c.T, c.Hkv, c.Dk},
                             vs = {c.B, c.T, c.Hkv, c.Dv}, kcs = {c.B, c.Tc, c.Hkv, c.Dk},
                             vcs = {c.B, c.Tc, c.Hkv, c.Dv}, gs = {c.B, c.T, c.Hq},
                             os = {c.B, c.T, c.Hq, c.Dv}, is = {c.B, c.T, c.Hkv, c.n()};
  c.q = Buf(c.dt, qs, r), c.k = Buf(c.dt, ks, r), c.v = Buf(c.dt, vs, r);
  c.k_cmp = Buf(c.dt, kcs, r), c.v_cmp = Buf(c.dt, vcs, r);
  if (c.slc_mode == 2) c.k_slc = Buf(c.dt, ks, r), c.v_slc = Buf(c.dt, vs, r);
  if (c.win_mode == 2) c.k_win = Buf(c.dt, ks, r), c.v_win = Buf(c.dt, vs, r);
  for (Buf* b : {&c.q, &c.k, &c.k_cmp, &c.k_slc, &c.k_win}) b->fill_uniform(r, -2.0, 2.0);
  for (Buf* b : {&c.v, &c.v_cmp, &c.v_slc, &c.v_win}) b->fill_uniform(r, -1.0, 1.0);
  for (Buf* g : {&c.g_cmp, &c.g_slc, &c.g_win}) {
    const bool f32 = c.dt == NSA_DTYPE_F32 || chance(r, 0.5);  // 16-bit inputs take f32 gates too
    *g = Buf(f32 ? NSA_DTYPE_F32 : c.dt, gs, r);
    g->fill_uniform(r, 0.0, 1.0);
  }
  if (c.has_idx_in) {
    // No broadcast layout: a shared element would have to be valid at every position it serves.
    c.idx_in = Buf(NSA_DTYPE_I32, is, r, LayoutOpts{false, false});
    const int64_t lp = c.cfg.slc_block;
    c.idx_in.for_each([&](int64_t, int64_t tok, int64_t, int64_t, int64_t off) {
      const int64_t last = c.pos_in_seq(tok) / lp;
      c.idx_in.set(off, chance(r, 0.3) ? -1.0 : static_cast<double>(uni(r, 0, last)));
    });
  }
  const LayoutOpts out{false, false};
  c.present[0] = true;
  for (int i = 0; i < 8; ++i) {
    const bool want = i == 0 || chance(r, 0.6);
    if (i == 7 && !idx_ok) continue;
    c.present[i] = want;
    const nsa_dtype odt = pick_float(r);
    if (i < 4) *c.outs()[i] = Buf(odt, os, r, out);
    else if (i < 7) *c.outs()[i] = Buf(NSA_DTYPE_F32, gs, r, out);
    else c.idx_out = Buf(NSA_DTYPE_I32, is, r, out);
  }
  std::ostringstream os_;
  os_ << "B=" << c.B << " T=" << c.T << " Hq=" << c.Hq << " Hkv=" << c.Hkv << " Dk=" << c.Dk
      << " Dv=" << c.Dv << " Tc=" << c.Tc << " " << nsa_dtype_name(c.dt) << " l=" << c.cfg.cmp_block
      << " d=" << c.cfg.cmp_stride << " l'=" << c.cfg.slc_block << " n=" << c.cfg.slc_count
      << " init=" << c.cfg.slc_init << " local=" << c.cfg.slc_local << " w=" << c.cfg.window
      << " scale=" << c.cfg.scale << " seqs=" << (c.cu.empty() ? 0 : c.cu.size() - 1)
      << " slc_kv=" << c.slc_mode << " win_kv=" << c.win_mode << " idx_in=" << c.has_idx_in
      << " outs=";
  for (bool b : c.present) os_ << b;
  c.text = os_.str();
  return c;
}

// One call to make: the params, and what it must return.
struct FwdCall {
  nsa_fwd_params p;
  bool null_ctx = false, null_params = false;
  Expect e;
  std::vector<int32_t> cu;   // a mutated copy of cu_seqlens, owned here
  int64_t restore_off = -1;  // an idx_in element changed in place, restored after the call
  double restore_val = 0;
};

// The present tensor arguments of `p`, with the dtypes each accepts (given q's dtype `dt`).
inline std::vector<TArg> fwd_args(nsa_fwd_params& p, nsa_dtype dt) {
  const std::vector<int> same = {dt}, out = float_tags(), f32 = {NSA_DTYPE_F32},
                         i32 = {NSA_DTYPE_I32};
  // 16-bit inputs take f32 gates or their own dtype's.
  const std::vector<int> gate = dt == NSA_DTYPE_F32 ? f32 : std::vector<int>{NSA_DTYPE_F32, dt};
  // q alone would take f32 or bf16, but k must match it: a float q is reported at k.
  std::vector<TArg> a = {{"q", &p.in.q, same, true, false, 0xF, true},
                         {"k", &p.in.k, same, true, false, 1 << 2},
                         {"v", &p.in.v, same, true, false, 1 << 3},
                         {"k_cmp", &p.in.k_cmp, same, true, false},
                         {"v_cmp", &p.in.v_cmp, same, true, false},
                         {"g_cmp", &p.in.g_cmp, gate, true, false},
                         {"g_slc", &p.in.g_slc, gate, true, false},
                         {"g_win", &p.in.g_win, gate, true, false},
                         {"o", &p.o, out, true, true},
                         {"k_slc", &p.in.k_slc, same, false, false},
                         {"v_slc", &p.in.v_slc, same, false, false},
                         {"k_win", &p.in.k_win, same, false, false},
                         {"v_win", &p.in.v_win, same, false, false},
                         {"o_cmp", &p.o_cmp, out, false, true},
                         {"o_slc", &p.o_slc, out, false, true},
                         {"o_win", &p.o_win, out, false, true},
                         {"lse_cmp", &p.lse_cmp, f32, false, true},
                         {"lse_slc", &p.lse_slc, f32, false, true},
                         {"lse_win", &p.lse_win, f32, false, true},
                         {"slc_indices_in", &p.slc_indices_in, i32, false, false},
                         {"slc_indices_out", &p.slc_indices_out, i32, false, true}};
  if (p.in.cu_seqlens != nullptr) a[3].content_sized = a[4].content_sized = 1 << 1;  // k/v_cmp
  std::vector<TArg> present;
  for (const TArg& x : a) {
    if (x.t->data != nullptr) present.push_back(x);
  }
  return present;
}

// A call on case `c`: valid (about a third), or broken in one chosen way.
inline FwdCall make_fwd_call(Rng& r, FwdCase& c, BadDims bad) {
  FwdCall call;
  call.p = c.params();
  Expect& e = call.e;
  if (bad != BadDims::kNone) {
    e.want = NSA_ERR_INVALID_SHAPE;
    e.what = "impossible head counts or head dims";
    e.needle = bad == BadDims::kRatio                           ? "q/k:"
               : (bad == BadDims::kHq0 || bad == BadDims::kDk0) ? "q:"
                                                                : "k/v:";
    return call;
  }
  const int32_t big = std::numeric_limits<int32_t>::max();
  for (;;) {
    const int64_t m = uni(r, 0, 99);
    if (m < 35) {
      e.what = "valid";
      return call;
    }
    if (m < 68) {
      std::vector<TArg> args = fwd_args(call.p, c.dt);
      if (mutate_tensor(r, args, random_tmut(r), &e)) return call;
    } else if (m < 74 && c.cfg.cmp_block < big) {  // bad_configs adds 1 to cmp_block
      const nsa_test::BadConfig bc = pick(r, nsa_test::bad_configs(c.cfg));
      call.p.in.cfg = bc.cfg;
      e = {NSA_ERR_INVALID_CONFIG, std::string("config: ") + bc.what, bc.field};
      return call;
    } else if (m < 79) {  // one of a branch's own K/V without the other
      const bool slc = chance(r, 0.5);
      nsa_tensor& kt = slc ? call.p.in.k_slc : call.p.in.k_win;
      nsa_tensor& vt = slc ? call.p.in.v_slc : call.p.in.v_win;
      const bool drop_k = chance(r, 0.5);
      if ((slc ? c.slc_mode : c.win_mode) != 0) {
        std::memset(drop_k ? &kt : &vt, 0, sizeof(nsa_tensor));
      } else if (drop_k) {
        vt = c.v.desc();
      } else {
        kt = c.k.desc();
      }
      e = {NSA_ERR_NULL_POINTER, "half a K/V pair", slc ? "k_slc" : "k_win"};
      return call;
    } else if (m < 81) {
      call.null_params = chance(r, 0.5);
      call.null_ctx = !call.null_params;
      e = {NSA_ERR_NULL_POINTER, call.null_ctx ? "NULL context" : "NULL params",
           call.null_ctx ? "" : "params"};
      return call;
    } else if (m < 87 && !c.cu.empty()) {
      call.cu = c.cu;
      int64_t num = call.p.in.num_seqs;
      e.what = break_cu(r, call.cu, num);
      call.p.in.cu_seqlens = call.cu.data(), call.p.in.num_seqs = num;
      e.want = NSA_ERR_INVALID_SEQLENS;
      e.needle = e.what.rfind("num_seqs", 0) == 0 ? "num_seqs" : "cu_seqlens";
      return call;
    } else if (m < 89) {
      call.p.in.cu_seqlens = nullptr;
      call.p.in.num_seqs = pick(r, std::vector<int64_t>{1, 2, 5, -1});
      e = {NSA_ERR_NULL_POINTER, "cu_seqlens NULL, num_seqs != 0", "cu_seqlens"};
      return call;
    } else if (m < 92 && c.cu.empty() && c.B != 1) {
      call.cu = random_cu(r, c.T);
      call.p.in.cu_seqlens = call.cu.data();
      call.p.in.num_seqs = static_cast<int64_t>(call.cu.size()) - 1;
      e = {NSA_ERR_INVALID_SHAPE, "cu_seqlens with B != 1", "cu_seqlens"};
      return call;
    } else if (m >= 92 && c.has_idx_in && c.idx_in.numel() > 0) {
      const int64_t which = uni(r, 0, c.idx_in.numel() - 1);
      int64_t i = 0;
      c.idx_in.for_each([&](int64_t, int64_t tok, int64_t, int64_t, int64_t off) {
        if (i++ != which) return;
        const int64_t last = c.pos_in_seq(tok) / c.cfg.slc_block;
        const int32_t v =
            chance(r, 0.6)
                ? static_cast<int32_t>(last + uni(r, 1, 3))
                : pick(r, std::vector<int32_t>{-2, -7, std::numeric_limits<int32_t>::min()});
        call.restore_off = off, call.restore_val = c.idx_in.get(off);
        c.idx_in.set(off, v);
        e = {NSA_ERR_INVALID_INDEX,
             "index " + std::to_string(v) + " at token " + std::to_string(tok), "slc_indices_in"};
      });
      return call;
    }
  }
}

}  // namespace nsa_fuzz
