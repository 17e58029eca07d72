// The nsa_compress side of the API fuzzer: a random valid case (mean or mlp, shapes, layouts,
// dtypes, config, cu_seqlens) and the mutations that each break it in one chosen way.
#pragma once

#include <sstream>

#include "api_util.h"
#include "fuzz_mutate.h"

namespace nsa_fuzz {

enum class CmpBad { kNone, kH0, kD0, kDh0 };

struct CmpCase {
  int64_t B = 0, T = 0, H = 0, D = 0, Dh = 0, Tc = 0;
  nsa_config cfg{};
  nsa_cmp_kind kind = NSA_CMP_MEAN;
  nsa_dtype dt = NSA_DTYPE_F32;
  std::vector<int32_t> cu;
  Buf x, pos, w1, b1, w2, b2, out;
  bool junk_params = false;  // mean with garbage MLP descriptors, which it must ignore
  int32_t junk_word[4] = {0, 0, 0, 0};
  std::string text;

  std::vector<const Buf*> inputs() const { return {&x, &pos, &w1, &b1, &w2, &b2}; }
  std::vector<Buf*> outs() { return {&out}; }
  std::vector<const Buf*> outputs() const { return {&out}; }

  nsa_compress_params params() const {
    nsa_compress_params p;
    nsa_compress_params_init(&p);
    p.cfg = cfg;
    p.kind = kind;
    p.x = x.desc();
    p.out = out.desc();
    if (kind == NSA_CMP_MLP) {
      p.pos = pos.desc(), p.w1 = w1.desc(), p.b1 = b1.desc(), p.w2 = w2.desc(), p.b2 = b2.desc();
    } else if (junk_params) {
      for (nsa_tensor* t : {&p.pos, &p.w1, &p.b1, &p.w2, &p.b2}) {
        t->data = const_cast<int32_t*>(junk_word);
        set_dtype_int(*t, 77);
        t->ndim = 9;
        t->shape[0] = -5;
        t->stride[0] = -1;
      }
    }
    if (!cu.empty()) p.cu_seqlens = cu.data(), p.num_seqs = static_cast<int64_t>(cu.size()) - 1;
    return p;
  }
};

inline CmpCase make_cmp(Rng& r, CmpBad bad = CmpBad::kNone) {
  CmpCase c;
  c.kind = chance(r, 0.5) || bad == CmpBad::kDh0 ? NSA_CMP_MLP : NSA_CMP_MEAN;
  c.dt = pick_float(r);
  c.B = chance(r, 0.05) ? 0 : uni(r, 1, 3);
  const int64_t tsize = uni(r, 0, 9);
  c.T = chance(r, 0.04) ? 0
        : tsize < 4     ? uni(r, 1, 40)
        : tsize < 7     ? uni(r, 41, 100)
                        : uni(r, 101, 200);
  c.T = std::min(c.T, budget().max_T);
  c.H = uni(r, 1, 4);
  c.D = chance(r, 0.3) ? uni(r, 1, 8) : uni(r, 1, 40);
  c.B = std::min(c.B, budget().max_B);
  c.D = std::min(c.D, budget().max_D);
  c.Dh = c.kind == NSA_CMP_MLP ? uni(r, 1, 16) : 0;
  if (bad == CmpBad::kH0) c.H = 0;
  if (bad == CmpBad::kD0) c.D = 0;
  if (bad == CmpBad::kDh0) c.Dh = 0;
  do {  // mlp weights hold l * D columns: no extreme cmp_block there
    c.cfg = random_config(r, c.kind == NSA_CMP_MEAN && chance(r, 0.05));
  } while (c.kind == NSA_CMP_MLP && c.cfg.cmp_block > 40);
  if (chance(r, 0.3)) c.B = 1, c.cu = random_cu(r, c.T);
  c.Tc = nsa_test::cmp_rows(c.cfg, c.T, c.cu);
  c.x = Buf(c.dt, {c.B, c.T, c.H, c.D}, r);
  c.x.fill_uniform(r, -1.0, 1.0);
  if (c.kind == NSA_CMP_MLP) {
    const int64_t l = c.cfg.cmp_block, L = l * c.D;
    c.pos = Buf(c.dt, {c.H, l, c.D}, r);
    c.w1 = Buf(c.dt, {c.H, c.Dh, L}, r);
    c.b1 = Buf(c.dt, {c.H, c.Dh}, r);
    c.w2 = Buf(c.dt, {c.H, c.D, c.Dh}, r);
    c.b2 = Buf(c.dt, {c.H, c.D}, r);
    // Weights scaled by 1/sqrt(fan-in): every layer stays O(1).
    const double a1 = 1.0 / std::sqrt(double(std::max<int64_t>(L, 1)));
    const double a2 = 1.0 / std::sqrt(double(std::max<int64_t>(c.Dh, 1)));
    c.pos.fill_uniform(r, -0.5, 0.5), c.w1.fill_uniform(r, -a1, a1);
    c.b1.fill_uniform(r, -0.5, 0.5), c.w2.fill_uniform(r, -a2, a2), c.b2.fill_uniform(r, -0.5, 0.5);
  } else {
    c.junk_params = chance(r, 0.2);
  }
  const nsa_dtype odt = pick_float(r);
  c.out = Buf(odt, {c.B, c.Tc, c.H, c.D}, r, LayoutOpts{false, false});
  std::ostringstream os;
  os << (c.kind == NSA_CMP_MLP ? "mlp" : "mean") << (c.junk_params ? "+junk" : "") << " B=" << c.B
     << " T=" << c.T << " H=" << c.H << " D=" << c.D << " Dh=" << c.Dh << " Tc=" << c.Tc << " "
     << nsa_dtype_name(c.dt) << "->" << nsa_dtype_name(odt) << " l=" << c.cfg.cmp_block
     << " d=" << c.cfg.cmp_stride << " seqs=" << (c.cu.empty() ? 0 : c.cu.size() - 1);
  c.text = os.str();
  return c;
}

struct CmpCall {
  nsa_compress_params p;
  bool null_ctx = false, null_params = false;
  Expect e;
  std::vector<int32_t> cu;
};

inline std::vector<TArg> cmp_args(nsa_compress_params& p, const CmpCase& c) {
  const std::vector<int> floats = float_tags(), same = {c.dt};
  const bool mlp = c.kind == NSA_CMP_MLP;
  // x sets B, T, H, D. A new T may leave Tc (and so `out`) unchanged: valid, never mutated.
  // With mlp, a float x of the other dtype is reported at pos.
  std::vector<TArg> a = {{"x", &p.x, mlp ? same : floats, true, false, 0xF, mlp, 1 << 1},
                         {"out", &p.out, floats, true, true}};
  if (p.cu_seqlens != nullptr) a[1].content_sized = 1 << 1;  // out's rows: packed Tc
  if (mlp) {
    for (TArg t : {TArg{"pos", &p.pos, same, true}, TArg{"w1", &p.w1, same, true, false, 1 << 1},
                   TArg{"b1", &p.b1, same, true}, TArg{"w2", &p.w2, same, true},
                   TArg{"b2", &p.b2, same, true}}) {
      a.push_back(t);
    }
  }
  return a;
}

inline CmpCall make_cmp_call(Rng& r, CmpCase& c, CmpBad bad) {
  CmpCall call;
  call.p = c.params();
  Expect& e = call.e;
  if (bad != CmpBad::kNone) {
    e = {NSA_ERR_INVALID_SHAPE, "zero heads, D or Dh", bad == CmpBad::kDh0 ? "w1:" : "x:"};
    return call;
  }
  const int32_t big = std::numeric_limits<int32_t>::max();
  for (;;) {
    const int64_t m = uni(r, 0, 99);
    if (m < 35) {
      e.what = "valid";
      return call;
    }
    if (m < 70) {
      std::vector<TArg> args = cmp_args(call.p, c);
      if (mutate_tensor(r, args, random_tmut(r), &e)) return call;
    } else if (m < 76 && c.cfg.cmp_block < big) {
      const nsa_test::BadConfig bc = pick(r, nsa_test::bad_configs(c.cfg));
      call.p.cfg = bc.cfg;
      e = {NSA_ERR_INVALID_CONFIG, std::string("config: ") + bc.what, bc.field};
      return call;
    } else if (m < 81) {
      const int k = pick(r, std::vector<int>{2, 3, -1, 42, big});
      std::memcpy(&call.p.kind, &k, sizeof k);
      e = {NSA_ERR_INVALID_ARGUMENT, "kind " + std::to_string(k), "kind"};
      return call;
    } else if (m < 84 && c.kind == NSA_CMP_MEAN && !c.junk_params) {
      call.p.kind = NSA_CMP_MLP;  // mlp without its parameters
      e = {NSA_ERR_NULL_POINTER, "mlp without parameters", "pos:"};
      return call;
    } else if (m < 86) {
      call.null_params = chance(r, 0.5);
      call.null_ctx = !call.null_params;
      e = {NSA_ERR_NULL_POINTER, call.null_ctx ? "NULL context" : "NULL params",
           call.null_ctx ? "" : "params"};
      return call;
    } else if (m < 93 && !c.cu.empty()) {
      call.cu = c.cu;
      int64_t num = call.p.num_seqs;
      e.what = break_cu(r, call.cu, num);
      call.p.cu_seqlens = call.cu.data(), call.p.num_seqs = num;
      e.want = NSA_ERR_INVALID_SEQLENS;
      e.needle = e.what.rfind("num_seqs", 0) == 0 ? "num_seqs" : "cu_seqlens";
      return call;
    } else if (m < 96) {
      call.p.cu_seqlens = nullptr;
      call.p.num_seqs = pick(r, std::vector<int64_t>{1, 3, -2});
      e = {NSA_ERR_NULL_POINTER, "cu_seqlens NULL, num_seqs != 0", "cu_seqlens"};
      return call;
    } else if (m >= 96 && c.cu.empty() && c.B != 1) {
      call.cu = random_cu(r, c.T);
      call.p.cu_seqlens = call.cu.data();
      call.p.num_seqs = static_cast<int64_t>(call.cu.size()) - 1;
      e = {NSA_ERR_INVALID_SHAPE, "cu_seqlens with B != 1", "cu_seqlens"};
      return call;
    }
  }
}

}  // namespace nsa_fuzz
