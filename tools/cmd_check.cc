// `nsa check`: one random case of a chosen shape and config, run through every available backend
// and compared with the float64 reference: compression, the forward, and (unless --no-backward)
// the backward and the compression backward. Each stage is checked separately: every backend's
// forward gets the reference's compressed K/V, its backward the reference forward's selection and
// saved state, its compression backward the reference's dk_cmp / dv_cmp, so an error is located
// where it arises.
#include <chrono>
#include <cmath>
#include <cstring>
#include <memory>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "bench_common.h"
#include "cli_validators.h"
#include "commands.h"
#include "nsa/nsa.h"

namespace {

struct Options {
  int64_t batch = 1, tokens = 1000, hq = 16, hkv = 1, dk = 192, dv = 128, hidden = 64;
  std::string dtype = "f32", compress = "mean", seqlens, backend = "all";
  nsa_config cfg{};
  uint64_t seed = 1;
  int32_t threads = 0;
  double tolerance = 0.0;  // 0: the dtype's default
  std::string bf16_math = "auto";
  bool backward = true;
};

// A host buffer with its contiguous descriptor.
struct Buffer {
  std::vector<unsigned char> bytes;
  nsa_tensor desc{};
  Buffer() = default;
  // Copies and moves re-point the descriptor at their own bytes.
  Buffer(const Buffer& o) : bytes(o.bytes), desc(o.desc) { desc.data = bytes.data(); }
  Buffer(Buffer&& o) noexcept : bytes(std::move(o.bytes)), desc(o.desc) {
    desc.data = bytes.data();
  }
  Buffer& operator=(Buffer o) noexcept {
    bytes.swap(o.bytes);
    desc = o.desc;
    desc.data = bytes.data();
    return *this;
  }
  Buffer(nsa_dtype dtype, std::vector<int64_t> shape) {
    int64_t n = 1;
    for (int64_t s : shape) n *= s;
    bytes.assign(static_cast<size_t>(n) * nsa_dtype_size(dtype) + 1, 0);  // +1: never empty
    desc = nsa_tensor_contiguous(bytes.data(), dtype, static_cast<int32_t>(shape.size()),
                                 shape.data());
  }
  int64_t numel() const {
    int64_t n = 1;
    for (int i = 0; i < desc.ndim; ++i) n *= desc.shape[i];
    return n;
  }
  double get(int64_t i) const {
    if (desc.dtype == NSA_DTYPE_BF16) {
      uint32_t u = uint32_t(reinterpret_cast<const uint16_t*>(bytes.data())[i]) << 16;
      float f;
      std::memcpy(&f, &u, 4);
      return f;
    }
    if (desc.dtype == NSA_DTYPE_I32) return reinterpret_cast<const int32_t*>(bytes.data())[i];
    return reinterpret_cast<const float*>(bytes.data())[i];
  }
  void set(int64_t i, float v) {
    if (desc.dtype == NSA_DTYPE_BF16) {
      uint32_t u;
      std::memcpy(&u, &v, 4);
      reinterpret_cast<uint16_t*>(bytes.data())[i] =
          uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    } else {
      reinterpret_cast<float*>(bytes.data())[i] = v;
    }
  }
  void fill(std::mt19937_64& rng, double lo, double hi, bool normal) {
    std::normal_distribution<double> n01;
    std::uniform_real_distribution<double> uni(lo, hi);
    for (int64_t i = 0; i < numel(); ++i)
      set(i, static_cast<float>(normal ? n01(rng) * hi : uni(rng)));
  }
};

struct Outputs {
  Buffer o, lse_cmp, lse_slc, lse_win, o_cmp, o_slc, o_win, idx, k_cmp, v_cmp;
};

// The backward's outputs (f32) and the compression backward's (dx of k and v; mlp parameters).
struct Grads {
  Buffer dq, dk, dv, dk_cmp, dv_cmp, dg_cmp, dg_slc, dg_win, dxk, dxv;
  std::vector<Buffer> dparams_k, dparams_v;  // mlp: dpos, dw1, db1, dw2, db2
};

struct Error {
  double max_abs = 0.0, max_ref = 0.0;
  int64_t nonfinite_mismatch = 0;
  double rel() const { return max_ref > 0 ? max_abs / max_ref : max_abs; }
};

Error compare(const Buffer& got, const Buffer& ref) {
  Error e;
  for (int64_t i = 0; i < ref.numel(); ++i) {
    const double r = ref.get(i), g = got.get(i);
    if (!std::isfinite(r) || !std::isfinite(g)) {
      // -inf LSEs of empty branches must match exactly; anything else non-finite is an error.
      if (!(r == g)) ++e.nonfinite_mismatch;
      continue;
    }
    e.max_abs = std::max(e.max_abs, std::fabs(g - r));
    e.max_ref = std::max(e.max_ref, std::fabs(r));
  }
  return e;
}

int64_t index_rows_differing(const Buffer& got, const Buffer& ref, int64_t n) {
  int64_t rows = 0;
  for (int64_t r = 0; r < ref.numel() / n; ++r) {
    for (int64_t k = 0; k < n; ++k) {
      if (got.get(r * n + k) != ref.get(r * n + k)) {
        ++rows;
        break;
      }
    }
  }
  return rows;
}

// One case: its context, shapes and inputs, built once and run through every backend.
struct Case {
  const Options& opt;
  const nsa_config& c;
  nsa_context* ctx = nullptr;
  nsa_dtype dt = NSA_DTYPE_F32;
  bool mlp = false;
  std::vector<int32_t> cu;  // cumulative sequence lengths; empty: a fixed-length batch
  int64_t B = 0, T = 0, Tc = 0;
  Buffer q, k, v, g_cmp, g_slc, g_win, d_o;
  std::vector<Buffer> kp, vp;  // mlp: pos, w1, b1, w2, b2 for keys and for values

  explicit Case(const Options& o) : opt(o), c(o.cfg) {
    nsa_context_create(&ctx);
    nsa_context_set_num_threads(ctx, opt.threads);
  }
  Case(const Case&) = delete;
  Case& operator=(const Case&) = delete;
  ~Case() { nsa_context_destroy(ctx); }

  int64_t num_seqs() const { return int64_t(cu.size()) - 1; }
};

// Shapes: fixed-length batch, or variable-length sequences packed along T with B = 1.
void set_shapes(Case& cs) {
  const Options& opt = cs.opt;
  cs.dt = opt.dtype == "bf16" ? NSA_DTYPE_BF16 : NSA_DTYPE_F32;
  cs.mlp = opt.compress == "mlp";
  cs.B = opt.batch;
  cs.T = opt.tokens;
  if (!opt.seqlens.empty()) {
    cs.cu.push_back(0);
    for (const int64_t len : cli::integer_list(opt.seqlens))
      cs.cu.push_back(cs.cu.back() + int32_t(len));
    cs.B = 1;
    cs.T = cs.cu.back();
    for (size_t s = 0; s + 1 < cs.cu.size(); ++s)
      cs.Tc += nsa_cmp_len(&cs.c, cs.cu[s + 1] - cs.cu[s]);
  } else {
    cs.Tc = nsa_cmp_len(&cs.c, cs.T);
  }
  std::printf("case: B=%lld T=%lld Hq=%lld Hkv=%lld Dk=%lld Dv=%lld dtype=%s compress=%s%s%s\n",
              (long long)cs.B, (long long)cs.T, (long long)opt.hq, (long long)opt.hkv,
              (long long)opt.dk, (long long)opt.dv, opt.dtype.c_str(), opt.compress.c_str(),
              cs.cu.empty() ? "" : " seqlens=", opt.seqlens.c_str());
  const nsa_config& c = cs.c;
  std::printf("config: l=%d d=%d l'=%d n=%d n_init=%d n_local=%d w=%d seed=%llu\n", c.cmp_block,
              c.cmp_stride, c.slc_block, c.slc_count, c.slc_init, c.slc_local, c.window,
              (unsigned long long)opt.seed);
}

// Inputs: q, k ~ N(0, 1) so that scaled scores are O(1); gates ~ U(0, 1); then the mlp
// parameters and d_o, in this order from one seeded stream.
void make_inputs(Case& cs) {
  const Options& opt = cs.opt;
  const nsa_dtype dt = cs.dt;
  const int64_t B = cs.B, T = cs.T;
  std::mt19937_64 rng(opt.seed);
  cs.q = Buffer(dt, {B, T, opt.hq, opt.dk});
  cs.k = Buffer(dt, {B, T, opt.hkv, opt.dk});
  cs.v = Buffer(dt, {B, T, opt.hkv, opt.dv});
  for (Buffer* g : {&cs.g_cmp, &cs.g_slc, &cs.g_win}) *g = Buffer(dt, {B, T, opt.hq});
  cs.q.fill(rng, 0, 1, true);
  cs.k.fill(rng, 0, 1, true);
  cs.v.fill(rng, 0, 1, true);
  for (Buffer* g : {&cs.g_cmp, &cs.g_slc, &cs.g_win}) g->fill(rng, 0, 1, false);
  const int64_t l = cs.c.cmp_block;
  // mlp parameters per KV head, one set for keys and one for values, scaled ~ 1/sqrt(fan-in).
  auto mlp_params = [&](int64_t D) {
    std::vector<Buffer> p = {Buffer(dt, {opt.hkv, l, D}), Buffer(dt, {opt.hkv, opt.hidden, l * D}),
                             Buffer(dt, {opt.hkv, opt.hidden}),
                             Buffer(dt, {opt.hkv, D, opt.hidden}), Buffer(dt, {opt.hkv, D})};
    p[0].fill(rng, 0, 0.1, true);
    p[1].fill(rng, 0, 1.0 / std::sqrt(double(l * D)), true);
    p[2].fill(rng, 0, 0.1, true);
    p[3].fill(rng, 0, 1.0 / std::sqrt(double(opt.hidden)), true);
    p[4].fill(rng, 0, 0.1, true);
    return p;
  };
  if (cs.mlp) {
    cs.kp = mlp_params(opt.dk);
    cs.vp = mlp_params(opt.dv);
  }
  cs.d_o = Buffer(dt, {B, T, opt.hq, opt.dv});
  cs.d_o.fill(rng, 0, 1, true);
}

// Compression then the forward on `backend`. The forward always reads the reference's
// compressed K/V (see the file comment): ref's, or out's own when ref is null.
bool run_backend(Case& cs, nsa_backend backend, const Outputs* ref, Outputs* out, double* ms) {
  const Options& opt = cs.opt;
  const nsa_config& c = cs.c;
  const int64_t B = cs.B, T = cs.T;
  if (nsa_context_set_backend(cs.ctx, backend) != NSA_OK) return false;
  out->k_cmp = Buffer(cs.dt, {B, cs.Tc, opt.hkv, opt.dk});
  out->v_cmp = Buffer(cs.dt, {B, cs.Tc, opt.hkv, opt.dv});
  for (int side = 0; side < 2; ++side) {
    nsa_compress_params cp;
    nsa_compress_params_init(&cp);
    cp.cfg = c;
    cp.kind = cs.mlp ? NSA_CMP_MLP : NSA_CMP_MEAN;
    cp.x = side == 0 ? cs.k.desc : cs.v.desc;
    cp.out = side == 0 ? out->k_cmp.desc : out->v_cmp.desc;
    if (!cs.cu.empty()) {
      cp.cu_seqlens = cs.cu.data();
      cp.num_seqs = cs.num_seqs();
    }
    if (cs.mlp) {
      const std::vector<Buffer>& w = side == 0 ? cs.kp : cs.vp;
      cp.pos = w[0].desc;
      cp.w1 = w[1].desc;
      cp.b1 = w[2].desc;
      cp.w2 = w[3].desc;
      cp.b2 = w[4].desc;
    }
    if (nsa_compress(cs.ctx, &cp) != NSA_OK) {
      std::printf("  %s compress failed: %s\n", nsa_backend_name(backend), nsa_last_error(cs.ctx));
      return false;
    }
  }
  const Outputs* cmp_src = ref ? ref : out;
  out->o = Buffer(NSA_DTYPE_F32, {B, T, opt.hq, opt.dv});
  for (Buffer* b : {&out->lse_cmp, &out->lse_slc, &out->lse_win})
    *b = Buffer(NSA_DTYPE_F32, {B, T, opt.hq});
  for (Buffer* b : {&out->o_cmp, &out->o_slc, &out->o_win})
    *b = Buffer(NSA_DTYPE_F32, {B, T, opt.hq, opt.dv});
  out->idx = Buffer(NSA_DTYPE_I32, {B, T, opt.hkv, c.slc_count});
  nsa_fwd_params p;
  nsa_fwd_params_init(&p);
  p.in.cfg = c;
  p.in.q = cs.q.desc;
  p.in.k = cs.k.desc;
  p.in.v = cs.v.desc;
  p.in.k_cmp = cmp_src->k_cmp.desc;
  p.in.v_cmp = cmp_src->v_cmp.desc;
  p.in.g_cmp = cs.g_cmp.desc;
  p.in.g_slc = cs.g_slc.desc;
  p.in.g_win = cs.g_win.desc;
  p.o = out->o.desc;
  p.lse_cmp = out->lse_cmp.desc;
  p.lse_slc = out->lse_slc.desc;
  p.lse_win = out->lse_win.desc;
  p.o_cmp = out->o_cmp.desc;
  p.o_slc = out->o_slc.desc;
  p.o_win = out->o_win.desc;
  p.slc_indices_out = out->idx.desc;
  if (!cs.cu.empty()) {
    p.in.cu_seqlens = cs.cu.data();
    p.in.num_seqs = cs.num_seqs();
  }
  const auto t0 = std::chrono::steady_clock::now();
  const nsa_status s = nsa_fwd(cs.ctx, &p);
  *ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  if (s != NSA_OK) {
    std::printf("  %s forward failed: %s: %s\n", nsa_backend_name(backend), nsa_status_name(s),
                nsa_last_error(cs.ctx));
    return false;
  }
  return true;
}

// The compression backward of dk_cmp / dv_cmp (src's: the reference's, or g's own) into g.
nsa_status run_compress_backward(Case& cs, const Grads& src, Grads* g) {
  const Options& opt = cs.opt;
  const nsa_dtype f32 = NSA_DTYPE_F32;
  nsa_status s = NSA_OK;
  for (int side = 0; side < 2 && s == NSA_OK; ++side) {
    const int64_t D = side == 0 ? opt.dk : opt.dv;
    Buffer& dx = side == 0 ? g->dxk : g->dxv;
    std::vector<Buffer>& dpar = side == 0 ? g->dparams_k : g->dparams_v;
    dx = Buffer(f32, {cs.B, cs.T, opt.hkv, D});
    nsa_compress_bwd_params cb;
    nsa_compress_bwd_params_init(&cb);
    cb.cfg = cs.c;
    cb.kind = cs.mlp ? NSA_CMP_MLP : NSA_CMP_MEAN;
    cb.x = side == 0 ? cs.k.desc : cs.v.desc;
    if (!cs.cu.empty()) {
      cb.cu_seqlens = cs.cu.data();
      cb.num_seqs = cs.num_seqs();
    }
    cb.dout = side == 0 ? src.dk_cmp.desc : src.dv_cmp.desc;
    cb.dx = dx.desc;
    if (cs.mlp) {
      const std::vector<Buffer>& w = side == 0 ? cs.kp : cs.vp;
      cb.pos = w[0].desc;
      cb.w1 = w[1].desc;
      cb.b1 = w[2].desc;
      cb.w2 = w[3].desc;
      cb.b2 = w[4].desc;
      dpar.clear();
      for (const Buffer& x : w) {
        std::vector<int64_t> shape(x.desc.shape, x.desc.shape + x.desc.ndim);
        dpar.emplace_back(f32, shape);
      }
      cb.dpos = dpar[0].desc;
      cb.dw1 = dpar[1].desc;
      cb.db1 = dpar[2].desc;
      cb.dw2 = dpar[3].desc;
      cb.db2 = dpar[4].desc;
    }
    s = nsa_compress_bwd(cs.ctx, &cb);
  }
  return s;
}

// The backward from the reference forward's selection and saved state (ref_fwd), then the
// compression backward of dk_cmp / dv_cmp (the reference's when ref_grads is given).
bool run_backward(Case& cs, nsa_backend backend, const Outputs& ref_fwd, const Grads* ref_grads,
                  Grads* g, double* ms) {
  const Options& opt = cs.opt;
  const int64_t B = cs.B, T = cs.T, Tc = cs.Tc;
  if (nsa_context_set_backend(cs.ctx, backend) != NSA_OK) return false;
  const nsa_dtype f32 = NSA_DTYPE_F32;
  g->dq = Buffer(f32, {B, T, opt.hq, opt.dk});
  g->dk = Buffer(f32, {B, T, opt.hkv, opt.dk});
  g->dv = Buffer(f32, {B, T, opt.hkv, opt.dv});
  g->dk_cmp = Buffer(f32, {B, Tc, opt.hkv, opt.dk});
  g->dv_cmp = Buffer(f32, {B, Tc, opt.hkv, opt.dv});
  for (Buffer* b : {&g->dg_cmp, &g->dg_slc, &g->dg_win}) *b = Buffer(f32, {B, T, opt.hq});
  nsa_bwd_params bp;
  nsa_bwd_params_init(&bp);
  bp.in.cfg = cs.c;
  bp.in.q = cs.q.desc;
  bp.in.k = cs.k.desc;
  bp.in.v = cs.v.desc;
  bp.in.k_cmp = ref_fwd.k_cmp.desc;
  bp.in.v_cmp = ref_fwd.v_cmp.desc;
  bp.in.g_cmp = cs.g_cmp.desc;
  bp.in.g_slc = cs.g_slc.desc;
  bp.in.g_win = cs.g_win.desc;
  if (!cs.cu.empty()) {
    bp.in.cu_seqlens = cs.cu.data();
    bp.in.num_seqs = cs.num_seqs();
  }
  bp.slc_indices = ref_fwd.idx.desc;
  bp.lse_cmp = ref_fwd.lse_cmp.desc;
  bp.lse_slc = ref_fwd.lse_slc.desc;
  bp.lse_win = ref_fwd.lse_win.desc;
  bp.o_cmp = ref_fwd.o_cmp.desc;
  bp.o_slc = ref_fwd.o_slc.desc;
  bp.o_win = ref_fwd.o_win.desc;
  bp.d_o = cs.d_o.desc;
  bp.dq = g->dq.desc;
  bp.dk = g->dk.desc;
  bp.dv = g->dv.desc;
  bp.dk_cmp = g->dk_cmp.desc;
  bp.dv_cmp = g->dv_cmp.desc;
  bp.dg_cmp = g->dg_cmp.desc;
  bp.dg_slc = g->dg_slc.desc;
  bp.dg_win = g->dg_win.desc;
  const auto t0 = std::chrono::steady_clock::now();
  nsa_status s = nsa_bwd(cs.ctx, &bp);
  *ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  if (s == NSA_OK) s = run_compress_backward(cs, ref_grads ? *ref_grads : *g, g);
  if (s != NSA_OK) {
    std::printf("  %s backward failed: %s: %s\n", nsa_backend_name(backend), nsa_status_name(s),
                nsa_last_error(cs.ctx));
    return false;
  }
  return true;
}

// The forward's table against the reference; returns whether every row passed.
bool report_forward(const Outputs& got, const Outputs& ref, nsa_dtype dt, int64_t n, double tol,
                    double tol_o) {
  bool pass = true;
  std::printf("  %-8s %12s %12s %10s\n", "output", "max abs err", "rel err", "verdict");
  struct Row {
    const char* name;
    const Buffer* got;
    const Buffer* want;
  };
  const Row rows[] = {{"k_cmp", &got.k_cmp, &ref.k_cmp},
                      {"v_cmp", &got.v_cmp, &ref.v_cmp},
                      {"o", &got.o, &ref.o},
                      {"lse_cmp", &got.lse_cmp, &ref.lse_cmp},
                      {"lse_slc", &got.lse_slc, &ref.lse_slc},
                      {"lse_win", &got.lse_win, &ref.lse_win}};
  // Compressed K/V are stored in the input dtype, so bf16 allows one bf16 rounding step.
  for (const Row& r : rows) {
    const Error e = compare(*r.got, *r.want);
    const bool is_cmp = r.name[1] == '_' && r.name[2] == 'c';
    const double row_tol = (is_cmp && dt == NSA_DTYPE_BF16) ? 1.0 / 128
                           : std::strcmp(r.name, "o") == 0  ? tol_o
                                                            : tol;
    const bool ok = e.rel() <= row_tol && e.nonfinite_mismatch == 0;
    pass = pass && ok;
    std::printf("  %-8s %12.3e %12.3e %10s\n", r.name, e.max_abs, e.rel(), ok ? "ok" : "FAIL");
  }
  const int64_t differing = index_rows_differing(got.idx, ref.idx, n);
  pass = pass && differing == 0;
  std::printf("  %-8s %lld of %lld (query, group) rows differ %s\n", "indices",
              (long long)differing, (long long)(got.idx.numel() / n),
              differing == 0 ? "ok" : "FAIL");
  return pass;
}

// The backward's table against the reference; returns whether every row passed.
bool report_backward(const Grads& gg, const Grads& ref_grads, double tol) {
  bool pass = true;
  // A gradient row may name the tensor whose magnitude its error is measured against: db2 is a
  // column sum of dk_cmp (dv_cmp), and sum_j dk_j cancels to ~0 (sum_j dS_j = 0 per query), so
  // its own largest value is rounding noise while its terms are O(dk_cmp).
  struct GradRow {
    const char* name;
    const Buffer* got;
    const Buffer* want;
    const Buffer* scale;
  };
  std::vector<GradRow> grad_rows = {{"dq", &gg.dq, &ref_grads.dq, nullptr},
                                    {"dk", &gg.dk, &ref_grads.dk, nullptr},
                                    {"dv", &gg.dv, &ref_grads.dv, nullptr},
                                    {"dk_cmp", &gg.dk_cmp, &ref_grads.dk_cmp, nullptr},
                                    {"dv_cmp", &gg.dv_cmp, &ref_grads.dv_cmp, nullptr},
                                    {"dg_cmp", &gg.dg_cmp, &ref_grads.dg_cmp, nullptr},
                                    {"dg_slc", &gg.dg_slc, &ref_grads.dg_slc, nullptr},
                                    {"dg_win", &gg.dg_win, &ref_grads.dg_win, nullptr},
                                    {"dx(k)", &gg.dxk, &ref_grads.dxk, nullptr},
                                    {"dx(v)", &gg.dxv, &ref_grads.dxv, nullptr}};
  const char* par_names[2][5] = {{"dpos(k)", "dw1(k)", "db1(k)", "dw2(k)", "db2(k)"},
                                 {"dpos(v)", "dw1(v)", "db1(v)", "dw2(v)", "db2(v)"}};
  for (size_t i = 0; i < gg.dparams_k.size(); ++i) {
    const bool db2 = i == 4;
    grad_rows.push_back({par_names[0][i], &gg.dparams_k[i], &ref_grads.dparams_k[i],
                         db2 ? &ref_grads.dk_cmp : nullptr});
    grad_rows.push_back({par_names[1][i], &gg.dparams_v[i], &ref_grads.dparams_v[i],
                         db2 ? &ref_grads.dv_cmp : nullptr});
  }
  for (const GradRow& r : grad_rows) {
    Error e = compare(*r.got, *r.want);
    if (r.scale) e.max_ref = std::max(e.max_ref, compare(*r.scale, *r.scale).max_ref);
    const bool ok = e.rel() <= tol && e.nonfinite_mismatch == 0;
    pass = pass && ok;
    std::printf("  %-8s %12.3e %12.3e %10s\n", r.name, e.max_abs, e.rel(), ok ? "ok" : "FAIL");
  }
  return pass;
}

// One backend against the reference's outputs: forward, then (unless --no-backward) backward.
bool check_backend(Case& cs, nsa_backend b, const Outputs& ref, const Grads& ref_grads,
                   double tol, double tol_o) {
  Outputs got;
  double ms = 0;
  if (!run_backend(cs, b, &ref, &got, &ms)) return false;
  std::printf("%s: forward %.1f ms (one run)\n", nsa_backend_name(b), ms);
  bool pass = report_forward(got, ref, cs.dt, cs.c.slc_count, tol, tol_o);
  if (!cs.opt.backward) return pass;
  Grads gg;
  if (!run_backward(cs, b, ref, &ref_grads, &gg, &ms)) return false;
  std::printf("%s: backward %.1f ms (one run)\n", nsa_backend_name(b), ms);
  return report_backward(gg, ref_grads, tol) && pass;
}

int run_check(const Options& opt) {
  Case cs(opt);
  if (!apply_bf16_math(cs.ctx, opt.bf16_math, "nsa check")) return 2;
  set_shapes(cs);
  make_inputs(cs);
  Outputs ref;
  double ref_ms = 0;
  if (!run_backend(cs, NSA_BACKEND_REF, nullptr, &ref, &ref_ms)) return 1;
  std::printf("ref: forward %.1f ms (one run, float64)\n", ref_ms);
  Grads ref_grads;
  if (opt.backward) {
    if (!run_backward(cs, NSA_BACKEND_REF, ref, nullptr, &ref_grads, &ref_ms)) return 1;
    std::printf("ref: backward %.1f ms (one run, float64)\n", ref_ms);
  }

  // Default tolerance, relative to the largest reference magnitude: float32 accumulation over up
  // to n*l' + w + T/d keys gives errors far below 1e-4; bf16 inputs are the same numbers in both.
  // bf16 arithmetic (bf16 inputs, --bf16-math not f32 on a CPU that runs it) rounds each softmax
  // weight to bf16 for P V: o moves by up to 2^-8 of the values' size, its default is 2^-8.
  const bool bf16_math = cs.dt == NSA_DTYPE_BF16 &&
                         std::strcmp(bf16_math_label(nsa_context_bf16_math(cs.ctx)), "f32") != 0;
  const double tol = opt.tolerance > 0 ? opt.tolerance : 1e-4;
  const double tol_o = opt.tolerance > 0 ? opt.tolerance : bf16_math ? 1.0 / 256 : 1e-4;
  bool pass = true, compared = false;
  for (nsa_backend b : {NSA_BACKEND_CPU, NSA_BACKEND_CUDA}) {
    if (!nsa_backend_available(b)) continue;
    if (opt.backend != "all" && opt.backend != nsa_backend_name(b)) continue;
    compared = true;
    pass = check_backend(cs, b, ref, ref_grads, tol, tol_o) && pass;
  }
  if (!compared) std::printf("no backend other than ref to compare in this build\n");
  std::printf("%s (tolerance %.1e relative to the largest reference value; o %.1e)\n",
              pass ? "PASS" : "FAIL", tol, tol_o);
  return pass ? 0 : 1;
}

// Throws a CLI::ValidationError naming the option of the first field nsa_config_validate
// rejects (its message names the field, "config.cmp_stride: ..."; the option is --cmp-stride).
void validate_config(const nsa_config& cfg) {
  nsa_context* ctx = nullptr;
  nsa_context_create(&ctx);
  const nsa_status s = nsa_config_validate(ctx, &cfg);
  const std::string message = s == NSA_OK ? "" : nsa_last_error(ctx);
  nsa_context_destroy(ctx);
  if (s == NSA_OK) return;
  std::string option = "config";
  if (message.rfind("config.", 0) == 0) {
    option = "--" + message.substr(7, message.find(':') - 7);
    for (char& c : option) c = c == '_' ? '-' : c;
  }
  throw CLI::ValidationError(option, message);
}

// Throws a CLI::ValidationError for a combination the run cannot take: a config the library
// rejects, Hq not a multiple of Hkv, packed lengths past kMaxTokens (cu_seqlens are int32), or
// buffers far beyond the machine's memory. The estimate counts the inputs and two sets of outputs
// and gradients (the reference's and a backend's) in f32, twice for the float64 reference's own
// copies, and the mlp parameters with their gradients.
void validate_check(const Options& opt) {
  validate_config(opt.cfg);
  cli::require_multiple(opt.hq, opt.hkv);
  int64_t tokens = opt.batch * opt.tokens;  // both bounded: no overflow
  std::string shape =
      "--batch " + std::to_string(opt.batch) + " --tokens " + std::to_string(opt.tokens);
  if (!opt.seqlens.empty()) {
    tokens = 0;
    for (const int64_t len : cli::integer_list(opt.seqlens)) tokens += len;
    if (tokens < 1 || tokens > cli::kMaxTokens) {
      throw CLI::ValidationError("--seqlens", "the lengths sum to " + std::to_string(tokens) +
                                                  ", not 1 to " + std::to_string(cli::kMaxTokens));
    }
    shape = "--seqlens (" + std::to_string(tokens) + " tokens)";
  }
  const double hq = double(opt.hq), hkv = double(opt.hkv), dk = double(opt.dk), dv = double(opt.dv);
  const double per_token = hq * (2 * dk + 5 * dv + 7) + hkv * (3 * (dk + dv) + opt.cfg.slc_count);
  double bytes = 8.0 * 2.0 * double(tokens) * per_token;
  if (opt.compress == "mlp") {
    const double l = opt.cfg.cmp_block, h = double(opt.hidden), d = std::max(dk, dv);
    bytes += 8.0 * 3.0 * 2.0 * hkv * (l * d + h * l * d + h + d * h + d);
    shape += " --compress mlp --cmp-block " + std::to_string(opt.cfg.cmp_block) + " --mlp-hidden " +
             std::to_string(opt.hidden);
  }
  cli::require_memory(shape + " --hq " + std::to_string(opt.hq) + " --hkv " +
                          std::to_string(opt.hkv) + " --dk " + std::to_string(opt.dk) + " --dv " +
                          std::to_string(opt.dv),
                      bytes);
}

}  // namespace

Command add_check_command(CLI::App& app) {
  auto* cmd = app.add_subcommand("check",
                                 "Run a random case through the backends and compare "
                                 "with the float64 reference");
  auto opt = std::make_shared<Options>();
  nsa_config_default(&opt->cfg);
  const int64_t tokens = cli::kMaxTokens, heads = cli::kMaxHeads, dim = cli::kMaxHeadDim;
  cli::add_integer(cmd, "-b,--batch", opt->batch, "batch size B", 1, cli::kMaxBatch);
  cli::add_integer(cmd, "-t,--tokens", opt->tokens, "tokens per sequence T", 1, tokens);
  cli::add_integer(cmd, "--hq", opt->hq, "query heads, a multiple of --hkv", 1, heads);
  cli::add_integer(cmd, "--hkv", opt->hkv, "key/value heads", 1, heads);
  cli::add_integer(cmd, "--dk", opt->dk, "query/key head dim", 1, dim);
  cli::add_integer(cmd, "--dv", opt->dv, "value head dim", 1, dim);
  cmd->add_option("--dtype", opt->dtype, "input dtype")
      ->check(CLI::IsMember({"f32", "bf16"}))
      ->capture_default_str();
  cmd->add_option("--compress", opt->compress, "compression")
      ->check(CLI::IsMember({"mean", "mlp"}))
      ->capture_default_str();
  cli::add_integer(cmd, "--mlp-hidden", opt->hidden, "hidden width of the mlp compression", 1, dim);
  cmd->add_option("--seqlens", opt->seqlens,
                  "comma-separated lengths, variable-length packing "
                  "(overrides -b, -t): each 0 to 16777216, sum 1 to 16777216")
      ->transform(cli::IntegerList(0, tokens))
      ->type_name("LIST");
  // The config's own rules (stride <= block, n >= n_init + n_local) are nsa_config_validate's.
  cli::add_integer(cmd, "--cmp-block", opt->cfg.cmp_block, "l", 1, tokens);
  cli::add_integer(cmd, "--cmp-stride", opt->cfg.cmp_stride, "d", 1, tokens);
  cli::add_integer(cmd, "--slc-block", opt->cfg.slc_block, "l'", 1, tokens);
  cli::add_integer(cmd, "--slc-count", opt->cfg.slc_count, "n", 1, tokens);
  cli::add_integer(cmd, "--slc-init", opt->cfg.slc_init, "n_init", 0, tokens);
  cli::add_integer(cmd, "--slc-local", opt->cfg.slc_local, "n_local", 0, tokens);
  cli::add_integer(cmd, "--window", opt->cfg.window, "w", 1, tokens);
  cmd->add_option("--seed", opt->seed, "random seed (0 to 2^64 - 1)")
      ->transform(cli::Unsigned64())
      ->capture_default_str();
  cli::add_integer(cmd, "--threads", opt->threads, "threads (0: default)", 0, cli::kMaxThreads);
  cmd->add_option("--backend", opt->backend, "backend to check")
      ->check(CLI::IsMember({"all", "cpu", "cuda"}))
      ->capture_default_str();
  cmd->add_option("--tolerance", opt->tolerance,
                  "relative tolerance, 0 to 1 (0: default 1e-4; o with bf16 arithmetic 2^-8)")
      ->check(cli::Real(0, 1));
  cmd->add_option("--bf16-math", opt->bf16_math, "arithmetic for bf16 inputs (nsa_bf16_math)")
      ->check(CLI::IsMember({"auto", "f32", "native", "emulated"}))
      ->capture_default_str();
  cmd->add_flag("!--no-backward", opt->backward, "check the forward and compression only");
  cmd->callback([opt] { validate_check(*opt); });
  return [opt] { return run_check(*opt); };
}
