// The nsa_compress_bwd side of the API fuzzer (fuzz_api.h): a valid compression case
// (make_cmp: mean or mlp, shapes, layouts, dtypes, config, cu_seqlens), a random dout and
// gradient outputs, called valid or broken in one chosen way.
#pragma once

#include <map>
#include <sstream>

#include "fuzz_bwd.h"

namespace nsa_fuzz {

struct CmpBwdCase {
  CmpCase c;  // the forward's inputs (c.out is not used)
  Buf dout, dx, dpos, dw1, db1, dw2, db2;
  bool junk_grads = false;  // mean with garbage mlp gradient descriptors, which it must ignore
  int32_t junk_out[4] = {11, 22, 33, 44};
  bool cheap = false;
  double ref_cost = 0;  // the reference's work, for valid_backend
  std::string text;

  bool mlp() const { return c.kind == NSA_CMP_MLP; }
  std::vector<std::pair<const char*, Buf*>> grads() {
    std::vector<std::pair<const char*, Buf*>> g = {{"dx", &dx}};
    if (mlp())
      g.insert(g.end(),
               {{"dpos", &dpos}, {"dw1", &dw1}, {"db1", &db1}, {"dw2", &dw2}, {"db2", &db2}});
    return g;
  }
  std::vector<Buf*> outs() {
    std::vector<Buf*> v;
    for (auto& g : grads()) v.push_back(g.second);
    return v;
  }
  std::vector<const Buf*> inputs() const {
    std::vector<const Buf*> v = c.inputs();
    v.push_back(&dout);
    return v;
  }

  nsa_compress_bwd_params params() {
    const nsa_compress_params f = c.params();
    nsa_compress_bwd_params p;
    nsa_compress_bwd_params_init(&p);
    p.cfg = f.cfg, p.kind = f.kind, p.x = f.x, p.cu_seqlens = f.cu_seqlens, p.num_seqs = f.num_seqs;
    p.pos = f.pos, p.w1 = f.w1, p.b1 = f.b1, p.w2 = f.w2, p.b2 = f.b2;  // junk for a junk mean
    p.dout = dout.desc();
    p.dx = dx.desc();
    if (mlp()) {
      p.dpos = dpos.desc(), p.dw1 = dw1.desc(), p.db1 = db1.desc(), p.dw2 = dw2.desc(),
      p.db2 = db2.desc();
    } else if (junk_grads) {
      for (nsa_tensor* t : {&p.dpos, &p.dw1, &p.db1, &p.dw2, &p.db2}) {
        t->data = junk_out;
        set_dtype_int(*t, 77);
        t->ndim = 9;
        t->shape[0] = -5;
        t->stride[0] = -1;
      }
    }
    return p;
  }
};

inline CmpBwdCase make_cmp_bwd(Rng& r) {
  CmpBwdCase b;
  b.c = make_cmp(r);
  const CmpCase& c = b.c;
  auto dt = [&] { return pick_float(r); };
  const LayoutOpts out{false, false};
  b.dout = Buf(dt(), {c.B, c.Tc, c.H, c.D}, r);
  b.dout.fill_uniform(r, -1.0, 1.0);
  b.dx = Buf(dt(), {c.B, c.T, c.H, c.D}, r, out);
  if (b.mlp()) {
    const int64_t l = c.cfg.cmp_block;
    b.dpos = Buf(dt(), {c.H, l, c.D}, r, out);
    b.dw1 = Buf(dt(), {c.H, c.Dh, l * c.D}, r, out);
    b.db1 = Buf(dt(), {c.H, c.Dh}, r, out);
    b.dw2 = Buf(dt(), {c.H, c.D, c.Dh}, r, out);
    b.db2 = Buf(dt(), {c.H, c.D}, r, out);
  } else {
    b.junk_grads = chance(r, 0.3);
  }
  // The reference's work, as fuzz_compress estimates it; its backward does about twice that.
  const double per_token =
      b.mlp() ? double(c.Dh) * c.cfg.cmp_block * c.D : double(c.cfg.cmp_block) * c.D;
  b.ref_cost = 2.0 * c.B * c.Tc * c.H * per_token;
  b.cheap = b.ref_cost <= budget().compare_cost && nsa_backend_available(NSA_BACKEND_CPU);
  std::ostringstream s;
  s << c.text << " | dout=" << nsa_dtype_name(b.dout.dtype()) << " junk_grads=" << b.junk_grads
    << " cheap=" << b.cheap;
  b.text = s.str();
  return b;
}

struct CmpBwdCall {
  nsa_compress_bwd_params p;
  bool null_ctx = false, null_params = false;
  Expect e;
  std::vector<int32_t> cu;  // a mutated copy of cu_seqlens, owned here
};

inline std::vector<TArg> cmp_bwd_args(nsa_compress_bwd_params& p, bool mlp) {
  const std::vector<int> fl = float_tags();
  std::vector<TArg> a = {{"dout", &p.dout, fl, true}, {"dx", &p.dx, fl, true, true}};
  if (p.cu_seqlens != nullptr) a[0].content_sized = 1 << 1;  // dout's rows: packed Tc
  if (mlp) {
    a.insert(a.end(), {{"dpos", &p.dpos, fl, true, true},
                       {"dw1", &p.dw1, fl, true, true},
                       {"db1", &p.db1, fl, true, true},
                       {"dw2", &p.dw2, fl, true, true},
                       {"db2", &p.db2, fl, true, true}});
  }
  return a;
}

inline std::vector<Backed> cmp_bwd_backed(nsa_compress_bwd_params& p, CmpBwdCase& b) {
  std::vector<Backed> v = {
      {"x", &p.x, &b.c.x, false}, {"dout", &p.dout, &b.dout, false}, {"dx", &p.dx, &b.dx, true}};
  if (b.mlp()) {
    v.insert(v.end(), {{"pos", &p.pos, &b.c.pos, false},
                       {"w1", &p.w1, &b.c.w1, false},
                       {"b1", &p.b1, &b.c.b1, false},
                       {"w2", &p.w2, &b.c.w2, false},
                       {"b2", &p.b2, &b.c.b2, false},
                       {"dpos", &p.dpos, &b.dpos, true},
                       {"dw1", &p.dw1, &b.dw1, true},
                       {"db1", &p.db1, &b.db1, true},
                       {"dw2", &p.dw2, &b.dw2, true},
                       {"db2", &p.db2, &b.db2, true}});
  }
  return v;
}

// cu_seqlens made invalid, or NULL with num_seqs != 0, or given with B != 1; false if none fits.
inline bool break_cmp_seqs(Rng& r, const CmpCase& c, CmpBwdCall& call) {
  Expect& e = call.e;
  const int k = static_cast<int>(uni(r, 0, 2));
  if (k == 0 && !c.cu.empty()) {
    call.cu = c.cu;
    int64_t num = call.p.num_seqs;
    e.what = break_cu(r, call.cu, num);
    call.p.cu_seqlens = call.cu.data(), call.p.num_seqs = num;
    e.want = NSA_ERR_INVALID_SEQLENS;
    e.needle = e.what.rfind("num_seqs", 0) == 0 ? "num_seqs" : "cu_seqlens";
    return true;
  }
  if (k == 1) {
    call.p.cu_seqlens = nullptr;
    call.p.num_seqs = pick(r, std::vector<int64_t>{1, 3, -2});
    e = {NSA_ERR_NULL_POINTER, "cu_seqlens NULL, num_seqs != 0", "cu_seqlens"};
    return true;
  }
  if (k == 2 && c.cu.empty() && c.B != 1) {
    call.cu = random_cu(r, c.T);
    call.p.cu_seqlens = call.cu.data();
    call.p.num_seqs = static_cast<int64_t>(call.cu.size()) - 1;
    e = {NSA_ERR_INVALID_SHAPE, "cu_seqlens with B != 1", "cu_seqlens"};
    return true;
  }
  return false;
}

inline CmpBwdCall make_cmp_bwd_call(Rng& r, CmpBwdCase& b) {
  CmpBwdCall call;
  call.p = b.params();
  Expect& e = call.e;
  const int32_t big = std::numeric_limits<int32_t>::max();
  for (;;) {
    const int64_t m = uni(r, 0, 99);
    if (m < 35) {
      e.what = "valid";
      return call;
    }
    if (m < 62) {
      std::vector<TArg> args = cmp_bwd_args(call.p, b.mlp());
      if (mutate_tensor(r, args, random_tmut(r), &e)) return call;
    } else if (m < 72) {
      if (alias_output(r, cmp_bwd_backed(call.p, b), &e)) return call;
    } else if (m < 78 && b.c.cfg.cmp_block < big) {
      const nsa_test::BadConfig bc = pick(r, nsa_test::bad_configs(b.c.cfg));
      call.p.cfg = bc.cfg;
      e = {NSA_ERR_INVALID_CONFIG, std::string("config: ") + bc.what, bc.field};
      return call;
    } else if (m < 82) {
      const int k = pick(r, std::vector<int>{2, 3, -1, 42, big});
      std::memcpy(&call.p.kind, &k, sizeof k);
      e = {NSA_ERR_INVALID_ARGUMENT, "kind " + std::to_string(k), "kind"};
      return call;
    } else if (m < 85 && !b.mlp() && !b.c.junk_params) {
      call.p.kind = NSA_CMP_MLP;  // mlp without its parameters
      e = {NSA_ERR_NULL_POINTER, "mlp without parameters", "pos:"};
      return call;
    } else if (m < 95) {
      if (break_cmp_seqs(r, b.c, call)) return call;
    } else {
      call.null_params = chance(r, 0.5);
      call.null_ctx = !call.null_params;
      e = {NSA_ERR_NULL_POINTER, call.null_ctx ? "NULL context" : "NULL params",
           call.null_ctx ? "" : "params"};
      return call;
    }
  }
}

// Whether token p of a sequence of len tokens lies in a complete block: i d <= p <= i d + l - 1
// for some block i < Tc(len).
inline bool in_a_block(const nsa_config& cfg, int64_t p, int64_t len) {
  const int64_t l = cfg.cmp_block, d = cfg.cmp_stride, tc = nsa_cmp_len(&cfg, len);
  const int64_t first = p >= l ? (p - l) / d + 1 : 0, last = std::min(tc - 1, p / d);
  return first <= last;
}

// Every present gradient written and finite; dx exactly 0 at tokens in no complete block, and
// everything 0 when there is no compressed token (nsa.h: outputs are overwritten).
inline void expect_cmp_grads_written(CmpBwdCase& b) {
  const CmpCase& c = b.c;
  for (auto& g : b.grads()) {
    EXPECT_EQ(count_nonfinite(*g.second), 0) << g.first << ": elements unwritten or not finite";
    if (c.B * c.Tc == 0) {
      EXPECT_EQ(count_failing(*g.second, [](double x) { return x == 0.0; }), 0)
          << g.first << ": not 0 without blocks";
    }
  }
  int64_t bad = 0;
  b.dx.for_each([&](int64_t, int64_t tok, int64_t, int64_t, int64_t off) {
    int64_t start = 0, len = c.T;
    for (size_t s = 0; s + 1 < c.cu.size(); ++s) {
      if (tok >= c.cu[s] && tok < c.cu[s + 1]) start = c.cu[s], len = c.cu[s + 1] - c.cu[s];
    }
    bad += !in_a_block(c.cfg, tok - start, len) && b.dx.get(off) != 0.0;
  });
  EXPECT_EQ(bad, 0) << "dx: nonzero at tokens in no complete block";
}

inline void cmp_bwd_compare(CmpBwdCase& b, const std::vector<std::vector<unsigned char>>& ref) {
  ++compare_count();
  const CmpCase& c = b.c;
  // As test_cpu_compress_bwd.cc: per output, the f32 sums on its longest chain (n terms, each
  // erring by about n 2^-24 of the tensor's largest |ref|), x4 for the O(1) biases. mean dx:
  // ceil(l/d) covering blocks and the 1/l scaling; mlp: the l*D, Dh and D-term dots, plus the
  // sum over every block for the parameters. A bf16 store adds one bf16 ulp (2^-7 |ref|).
  const int64_t l = c.cfg.cmp_block, d = c.cfg.cmp_stride, blocks = c.B * c.Tc,
                cover = (l + d - 1) / d;
  const std::map<std::string, int64_t> chain = {{"dx", b.mlp() ? c.D + c.Dh + cover : cover + 1},
                                                {"dpos", c.D + c.Dh + blocks},
                                                {"dw1", c.D + blocks},
                                                {"db1", c.D + blocks},
                                                {"dw2", l * c.D + blocks},
                                                {"db2", blocks}};
  const std::vector<std::pair<const char*, Buf*>> g = b.grads();
  for (size_t i = 0; i < g.size(); ++i) {
    const double rel = out_rel(g[i].second->dtype());
    expect_close_to_ref(g[i].first, *g[i].second, ref[i], 4.0 * double(chain.at(g[i].first)) * kEps,
                        0.0, rel);
  }
}

inline void fuzz_compress_bwd(Rng& r) {
  CmpBwdCase b = make_cmp_bwd(r);
  CmpBwdCall call = make_cmp_bwd_call(r, b);
  SCOPED_TRACE("compress_bwd " + b.text + " | " + call.e.what);
  const std::vector<int32_t> junk_before(b.junk_out, b.junk_out + 4);
  auto run = [&](nsa_backend be, std::string* msg) {
    return on_backend(r, be, msg, [&](nsa_context* ctx) {
      return nsa_compress_bwd(call.null_ctx ? nullptr : ctx, call.null_params ? nullptr : &call.p);
    });
  };
  std::string msg;
  const std::vector<Buf*> outv = b.outs();
  if (call.e.want != NSA_OK) {
    std::vector<const Buf*> all = b.inputs();
    all.insert(all.end(), outv.begin(), outv.end());
    const Snapshot snap(all);
    for (nsa_backend be : backends(r)) {
      expect_rejected(call.e, run(be, &msg), msg, call.null_ctx);
      snap.expect_unchanged("invalid call");
    }
    EXPECT_EQ(std::vector<int32_t>(b.junk_out, b.junk_out + 4), junk_before)
        << "junk gradient written";
    return;
  }
  const Snapshot ins(b.inputs()), outs(std::vector<const Buf*>(outv.begin(), outv.end()));
  auto written = [&] {
    expect_cmp_grads_written(b);
    EXPECT_EQ(std::vector<int32_t>(b.junk_out, b.junk_out + 4), junk_before)
        << "junk gradient written";
  };
  // Never "no work": the mlp's parameter gradients exist without tokens, and are overwritten.
  const nsa_backend fast = chance(r, 0.5) ? NSA_BACKEND_CPU : NSA_BACKEND_AUTO;
  if (!b.cheap) {
    expect_valid_result(run(valid_backend(r, b.ref_cost), &msg), msg, ins, outs, false, written);
    return;
  }
  expect_valid_result(run(NSA_BACKEND_REF, &msg), msg, ins, outs, false, written);
  const std::vector<std::vector<unsigned char>> ref = bytes_of(outv);
  outs.restore(outv);
  expect_valid_result(run(fast, &msg), msg, ins, outs, false, written);
  cmp_bwd_compare(b, ref);
}

}  // namespace nsa_fuzz
