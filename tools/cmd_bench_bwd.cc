// `nsa bench --pass bwd|fwdbwd`: the NSA backward (and forward + backward) against the dense
// flash backward on the same inputs, same group and config as the forward bench.
//
// NSA's forward is mean compression of K and V, then nsa_fwd saving the per-branch LSEs and the
// selected blocks; its backward is nsa_bwd (dq, dk, dv, dk_cmp, dv_cmp, the gate gradients)
// followed by the compression backward of dk_cmp and dv_cmp (nsa_compress_bwd, mean). The dense
// forward is nsa_dense_fwd saving its LSE; its backward is nsa_dense_bwd. `bwd` times the
// backward alone, after one forward produced what it needs; `fwdbwd` times both in sequence.
//
// FLOPs per attended (query, key) pair and head: forward 2 (Dk + Dv) (S = q k, o += p v);
// backward 2 (3 Dk + 2 Dv) (S recomputed, dP = dO v, dv += p dO, dq += dS k, dk += dS q), which
// is FlashAttention's 2.5x the forward when Dk = Dv.
//
// Per branch (profiling on; nsa_bwd_profile, nsa_fwd_profile of the last timed run): `bwd` shows
// the backward's cmp / slc / win stages; `fwdbwd` adds the forward's: cmp = cmp attention and the
// block scores, slc = top-n and selected attention, win = window attention. The rest of a run
// (packing, per-row work, reductions, compression) is in the total only.
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "bench_common.h"
#include "cli_validators.h"
#include "nsa/nsa.h"

namespace {

// An owned contiguous int32 or f32 tensor of zeros.
struct Zeros {
  std::vector<float> data;
  nsa_tensor t{};
  Zeros(nsa_dtype dt, std::vector<int64_t> shape) {
    int64_t n = 1;
    for (int64_t s : shape) n *= s;
    data.assign(static_cast<size_t>(n) + 1, 0.0f);
    t = nsa_tensor_contiguous(data.data(), dt, int32_t(shape.size()), shape.data());
  }
};

// One length's buffers and calls: NSA's forward (compression, then nsa_fwd saving its state), its
// backward (nsa_bwd, then the compression backward), and the dense pair, on the same inputs.
struct Case {
  nsa_context* ctx;
  nsa_status st = NSA_OK;
  Buf q, k, v, d_o, g_cmp, g_slc, g_win, k_cmp, v_cmp;
  Zeros o, lse_cmp, lse_slc, lse_win, idx, o_cmp, o_slc, o_win;
  Zeros dq, dk, dv, dk_cmp, dv_cmp, dg_cmp, dg_slc, dg_win, dxk, dxv, od, lse_d;
  nsa_compress_params cp;
  nsa_fwd_params fp;
  nsa_bwd_params bp;
  nsa_compress_bwd_params cb;
  nsa_dense_fwd_params df;
  nsa_dense_bwd_params db;

  Case(nsa_context* c, nsa_dtype dt, const nsa_config& cfg, int64_t T, int64_t Hq, int64_t Hkv,
       int64_t Dk, int64_t Dv, std::mt19937_64&& rng)
      : ctx(c),
        q(dt, {1, T, Hq, Dk}, rng, -1, 1),
        k(dt, {1, T, Hkv, Dk}, rng, -1, 1),
        v(dt, {1, T, Hkv, Dv}, rng, -1, 1),
        d_o(dt, {1, T, Hq, Dv}, rng, -1, 1),
        g_cmp(dt, {1, T, Hq}, rng, 0, 1),
        g_slc(dt, {1, T, Hq}, rng, 0, 1),
        g_win(dt, {1, T, Hq}, rng, 0, 1),
        k_cmp(dt, {1, nsa_cmp_len(&cfg, T), Hkv, Dk}, rng, 0, 0),
        v_cmp(dt, {1, nsa_cmp_len(&cfg, T), Hkv, Dv}, rng, 0, 0),
        o(NSA_DTYPE_F32, {1, T, Hq, Dv}),
        lse_cmp(NSA_DTYPE_F32, {1, T, Hq}),
        lse_slc(NSA_DTYPE_F32, {1, T, Hq}),
        lse_win(NSA_DTYPE_F32, {1, T, Hq}),
        idx(NSA_DTYPE_I32, {1, T, Hkv, cfg.slc_count}),
        o_cmp(NSA_DTYPE_F32, {1, T, Hq, Dv}),
        o_slc(NSA_DTYPE_F32, {1, T, Hq, Dv}),
        o_win(NSA_DTYPE_F32, {1, T, Hq, Dv}),
        dq(NSA_DTYPE_F32, {1, T, Hq, Dk}),
        dk(NSA_DTYPE_F32, {1, T, Hkv, Dk}),
        dv(NSA_DTYPE_F32, {1, T, Hkv, Dv}),
        dk_cmp(NSA_DTYPE_F32, {1, nsa_cmp_len(&cfg, T), Hkv, Dk}),
        dv_cmp(NSA_DTYPE_F32, {1, nsa_cmp_len(&cfg, T), Hkv, Dv}),
        dg_cmp(NSA_DTYPE_F32, {1, T, Hq}),
        dg_slc(NSA_DTYPE_F32, {1, T, Hq}),
        dg_win(NSA_DTYPE_F32, {1, T, Hq}),
        dxk(NSA_DTYPE_F32, {1, T, Hkv, Dk}),
        dxv(NSA_DTYPE_F32, {1, T, Hkv, Dv}),
        od(NSA_DTYPE_F32, {1, T, Hq, Dv}),
        lse_d(NSA_DTYPE_F32, {1, T, Hq}) {
    nsa_compress_params_init(&cp);
    nsa_fwd_params_init(&fp);
    fp.in.q = q.t;
    fp.in.k = k.t;
    fp.in.v = v.t;
    fp.in.k_cmp = k_cmp.t;
    fp.in.v_cmp = v_cmp.t;
    fp.in.g_cmp = g_cmp.t;
    fp.in.g_slc = g_slc.t;
    fp.in.g_win = g_win.t;
    fp.o = o.t;
    fp.lse_cmp = lse_cmp.t;
    fp.lse_slc = lse_slc.t;
    fp.lse_win = lse_win.t;
    fp.o_cmp = o_cmp.t;
    fp.o_slc = o_slc.t;
    fp.o_win = o_win.t;
    fp.slc_indices_out = idx.t;
    nsa_bwd_params_init(&bp);
    bp.in = fp.in;  // the backward takes the forward's inputs again
    bp.slc_indices = idx.t;
    bp.lse_cmp = lse_cmp.t;
    bp.lse_slc = lse_slc.t;
    bp.lse_win = lse_win.t;
    bp.o_cmp = o_cmp.t;
    bp.o_slc = o_slc.t;
    bp.o_win = o_win.t;
    bp.d_o = d_o.t;
    bp.dq = dq.t;
    bp.dk = dk.t;
    bp.dv = dv.t;
    bp.dk_cmp = dk_cmp.t;
    bp.dv_cmp = dv_cmp.t;
    bp.dg_cmp = dg_cmp.t;
    bp.dg_slc = dg_slc.t;
    bp.dg_win = dg_win.t;
    nsa_compress_bwd_params_init(&cb);
    nsa_dense_fwd_params_init(&df);
    df.q = q.t;
    df.k = k.t;
    df.v = v.t;
    df.o = od.t;
    df.lse = lse_d.t;
    nsa_dense_bwd_params_init(&db);
    db.q = q.t;
    db.k = k.t;
    db.v = v.t;
    db.o = od.t;
    db.lse = lse_d.t;
    db.d_o = d_o.t;
    db.dq = dq.t;
    db.dk = dk.t;
    db.dv = dv.t;
  }
  void ok(nsa_status s) { st = st != NSA_OK ? st : s; }
  void nsa_forward() {
    cp.x = k.t;
    cp.out = k_cmp.t;
    ok(nsa_compress(ctx, &cp));
    cp.x = v.t;
    cp.out = v_cmp.t;
    ok(nsa_compress(ctx, &cp));
    ok(nsa_fwd(ctx, &fp));
  }
  void compress_backward() {
    cb.x = k.t;
    cb.dout = dk_cmp.t;
    cb.dx = dxk.t;
    ok(nsa_compress_bwd(ctx, &cb));
    cb.x = v.t;
    cb.dout = dv_cmp.t;
    cb.dx = dxv.t;
    ok(nsa_compress_bwd(ctx, &cb));
  }
  void nsa_backward() {
    ok(nsa_bwd(ctx, &bp));
    compress_backward();
  }
  void dense_forward() { ok(nsa_dense_fwd(ctx, &df)); }
  void dense_backward() { ok(nsa_dense_bwd(ctx, &db)); }
};

// The cmp / slc / win split of the last timed NSA run (nsa_bwd_profile, plus nsa_fwd_profile's
// stages with the forward): the forward's stages are thread-seconds, scaled to its wall time as
// `nsa bench` does.
void branch_split(nsa_context* ctx, bool with_fwd, double branch_ms[3], double* recompute_ms) {
  nsa_fwd_profile fprof{};
  nsa_bwd_profile bprof{};
  nsa_context_fwd_profile(ctx, &fprof);
  nsa_context_bwd_profile(ctx, &bprof);
  const double fwd_sum = fprof.pack_s + fprof.cmp_s + fprof.scores_s + fprof.topn_s + fprof.slc_s +
                         fprof.win_s + fprof.combine_s;
  const double f = with_fwd && fwd_sum > 0 ? fprof.wall_s / fwd_sum : 0.0;
  branch_ms[0] = 1e3 * (bprof.cmp_s + f * (fprof.cmp_s + fprof.scores_s));
  branch_ms[1] = 1e3 * (bprof.slc_s + f * (fprof.topn_s + fprof.slc_s));
  branch_ms[2] = 1e3 * (bprof.win_s + f * fprof.win_s);
  *recompute_ms = 1e3 * bprof.forward_s;
}

void print_header(const BenchOptions& opt) {
  std::printf("nsa bench %s: B=1 Hq=%lld Hkv=%lld Dk=%lld Dv=%lld %s, threads=%d, median of %d\n",
              opt.pass.c_str(), (long long)opt.hq, (long long)opt.hkv, (long long)opt.dk,
              (long long)opt.dv, opt.dtype.c_str(), opt.threads, opt.repeats);
  std::printf("%7s %10s %10s %9s %8s %8s %10s %12s %8s %8s %8s\n", "T", "nsa_ms", "dense_ms",
              "speedup", "model", "GF/s", "dense_GF/s", "cmp_bwd_ms", "cmp_ms", "slc_ms", "win_ms");
}

// One length: times, FLOP rates against the attended pairs, and the printed row.
bool bench_length(const BenchOptions& opt, nsa_context* ctx, const nsa_config& cfg, int64_t T,
                  nlohmann::json* rows) {
  const nsa_dtype dt = opt.dtype == "bf16" ? NSA_DTYPE_BF16 : NSA_DTYPE_F32;
  const bool with_fwd = opt.pass == "fwdbwd";
  Case c(ctx, dt, cfg, T, opt.hq, opt.hkv, opt.dk, opt.dv, std::mt19937_64(1));
  c.nsa_forward();  // the saved values the backward reads
  const double nsa_ms = with_fwd ? median_ms(opt.repeats,
                                             [&] {
                                               c.nsa_forward();
                                               c.nsa_backward();
                                             })
                                 : median_ms(opt.repeats, [&] { c.nsa_backward(); });
  double branch_ms[3], recompute_ms = 0;
  branch_split(ctx, with_fwd, branch_ms, &recompute_ms);
  const double cmp_bwd_ms = median_ms(opt.repeats, [&] { c.compress_backward(); });
  double dense_ms = std::nan("");
  if (!opt.no_dense) {
    c.dense_forward();
    dense_ms = with_fwd ? median_ms(opt.repeats,
                                    [&] {
                                      c.dense_forward();
                                      c.dense_backward();
                                    })
                        : median_ms(opt.repeats, [&] { c.dense_backward(); });
  }
  if (c.st != NSA_OK) {
    std::fprintf(stderr, "nsa bench: %s: %s\n", nsa_status_name(c.st), nsa_last_error(ctx));
    return false;
  }
  double nsa_keys = 0;
  for (int64_t t = 0; t < T; ++t) nsa_keys += attended_keys(cfg, t);
  const double dense_keys = double(T) * double(T + 1) / 2;
  const double per_key = double(opt.hq) * (2.0 * double(3 * opt.dk + 2 * opt.dv) +
                                           (with_fwd ? 2.0 * double(opt.dk + opt.dv) : 0.0));
  const double model = (T / 2.0) / (double(T) / (2.0 * cfg.cmp_stride) +
                                    double(cfg.slc_count) * cfg.slc_block + cfg.window);
  const double gflops = per_key * nsa_keys / (nsa_ms * 1e6);
  const double dense_gflops = per_key * dense_keys / (dense_ms * 1e6);
  rows->push_back({{"pass", opt.pass},
                   {"dtype", opt.dtype},
                   {"T", T},
                   {"threads", opt.threads},
                   {"ms", nsa_ms},
                   {"dense_ms", dense_ms},
                   {"speedup", dense_ms / nsa_ms},
                   {"gflops", gflops},
                   {"dense_gflops", dense_gflops},
                   {"model_ratio", model},
                   {"compress_bwd_ms", cmp_bwd_ms},
                   {"cmp_ms", branch_ms[0]},
                   {"slc_ms", branch_ms[1]},
                   {"win_ms", branch_ms[2]},
                   {"saved_state_recompute_ms", recompute_ms}});
  if (!opt.json) {
    std::printf("%7lld %10.1f %10.1f %8.2fx %7.2fx %8.1f %10.1f %12.1f %8.1f %8.1f %8.1f\n",
                (long long)T, nsa_ms, dense_ms, dense_ms / nsa_ms, model, gflops, dense_gflops,
                cmp_bwd_ms, branch_ms[0], branch_ms[1], branch_ms[2]);
    std::fflush(stdout);
  }
  return true;
}

}  // namespace

int run_bench_bwd(const BenchOptions& opt) {
  nsa_context* ctx = nullptr;
  nsa_context_create(&ctx);
  nsa_context_set_num_threads(ctx, opt.threads);
  nsa_context_set_profiling(ctx, 1);
  // The forward of --pass fwdbwd takes it (the backward computes in f32 whatever the setting).
  if (!apply_bf16_math(ctx, opt.bf16_math, "nsa bench")) {
    nsa_context_destroy(ctx);
    return 2;
  }
  nsa_config cfg;
  nsa_config_default(&cfg);
  nlohmann::json rows = nlohmann::json::array();
  if (!opt.json) print_header(opt);
  int rc = 0;
  for (const int64_t T : cli::integer_list(opt.lengths)) {
    bench_progress(opt.pass.c_str(), T);
    if (!bench_length(opt, ctx, cfg, T, &rows)) {
      rc = 1;
      break;
    }
  }
  if (opt.json) std::printf("%s\n", rows.dump(2).c_str());
  nsa_context_destroy(ctx);
  return rc;
}
