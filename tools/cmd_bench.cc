// `nsa bench`: forward timing (`nsa bench decode`: decode, cmd_bench_decode.cc) of NSA (compression
// + attention) against the dense causal flash baseline on the same inputs, on the paper's GQA group
// (Hq = 16, Hkv = 1, Dk = 192, Dv = 128) and the default config. Each figure is the median of
// --repeats runs after one warm-up run.
//
// Effective GFLOP/s count only the keys each query attends: 2 * (Dk + Dv) FLOPs per attended
// (query, key) pair per head, for NSA the keys of all three branches. The ratio model is the
// paper's token budget: (T / 2) / (T / (2d) + n l' + w).
#include <algorithm>
#include <cmath>
#include <chrono>
#include <cstring>
#include <cstdio>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "bench_common.h"
#include "cli_validators.h"
#include "commands.h"
#include "nsa/nsa.h"

namespace {

// Throws a CLI::ValidationError for a combination the run cannot take: Hq not a multiple of Hkv,
// or buffers far beyond the machine's memory. The estimate is the backward's (cmd_bench_bwd.cc;
// the forward needs fewer) at the largest length: inputs in the dtype, compressed K/V at 1/d of
// the tokens, the saved state and the gradients in f32.
void validate_bench(const BenchOptions& opt) {
  cli::require_multiple(opt.hq, opt.hkv);
  nsa_config cfg;
  nsa_config_default(&cfg);
  int64_t T = 0;
  for (const int64_t t : cli::integer_list(opt.lengths)) T = std::max(T, t);
  const double hq = double(opt.hq), hkv = double(opt.hkv), dk = double(opt.dk), dv = double(opt.dv);
  const double cmp = 1.0 / cfg.cmp_stride, elem = opt.dtype == "bf16" ? 2.0 : 4.0;
  const double inputs = elem * (hq * (dk + dv + 3) + hkv * (dk + dv) * (1 + cmp));
  const double f32 = 4.0 * (hq * (dk + 5 * dv + 7) + hkv * ((2 + cmp) * (dk + dv) + cfg.slc_count));
  cli::require_memory("--lengths " + std::to_string(T) + " with --hq " + std::to_string(opt.hq) +
                          " --hkv " + std::to_string(opt.hkv) + " --dk " + std::to_string(opt.dk) +
                          " --dv " + std::to_string(opt.dv),
                      double(T) * (inputs + f32));
}

int run_bench(const BenchOptions& opt) {
  if (opt.pass != "fwd") return run_bench_bwd(opt);  // cmd_bench_bwd.cc
  nsa_context* ctx = nullptr;
  nsa_context_create(&ctx);
  nsa_context_set_num_threads(ctx, opt.threads);
  nsa_context_set_profiling(ctx, 1);
  if (!apply_bf16_math(ctx, opt.bf16_math, "nsa bench")) {
    nsa_context_destroy(ctx);
    return 2;
  }
  const char* math = bf16_math_label(nsa_context_bf16_math(ctx));
  const nsa_dtype dt = opt.dtype == "bf16" ? NSA_DTYPE_BF16 : NSA_DTYPE_F32;
  nsa_config cfg;
  nsa_config_default(&cfg);
  nlohmann::json rows = nlohmann::json::array();
  if (!opt.json) {
    std::printf(
        "nsa bench fwd: B=1 Hq=%lld Hkv=%lld Dk=%lld Dv=%lld %s (bf16 arithmetic of the dense "
        "baseline: %s), threads=%d, median of %d\n",
        (long long)opt.hq, (long long)opt.hkv, (long long)opt.dk, (long long)opt.dv,
        opt.dtype.c_str(), math, opt.threads, opt.repeats);
    std::printf("%7s %9s %9s %9s %8s %8s %9s %9s | %7s %7s %7s %7s %7s %7s %7s %7s\n", "T",
                "total_ms", "dense_ms", "speedup", "model", "GF/s", "dense_GF/s", "", "compr",
                "pack", "cmp", "scores", "top-n", "slc", "win", "combine");
  }
  int rc = 0;
  for (const int64_t T : cli::integer_list(opt.lengths)) {
    bench_progress("fwd", T);
    const int64_t Tc = nsa_cmp_len(&cfg, T);
    std::mt19937_64 rng(1);
    Buf q(dt, {1, T, opt.hq, opt.dk}, rng, -1, 1), k(dt, {1, T, opt.hkv, opt.dk}, rng, -1, 1);
    Buf v(dt, {1, T, opt.hkv, opt.dv}, rng, -1, 1);
    Buf g_cmp(dt, {1, T, opt.hq}, rng, 0, 1), g_slc(dt, {1, T, opt.hq}, rng, 0, 1),
        g_win(dt, {1, T, opt.hq}, rng, 0, 1);
    Buf k_cmp(dt, {1, Tc, opt.hkv, opt.dk}, rng, 0, 0),
        v_cmp(dt, {1, Tc, opt.hkv, opt.dv}, rng, 0, 0);
    Buf o(NSA_DTYPE_F32, {1, T, opt.hq, opt.dv}, rng, 0, 0);
    nsa_status st = NSA_OK;
    auto compress = [&] {
      nsa_compress_params cp;
      nsa_compress_params_init(&cp);
      cp.x = k.t;
      cp.out = k_cmp.t;
      st = st != NSA_OK ? st : nsa_compress(ctx, &cp);
      cp.x = v.t;
      cp.out = v_cmp.t;
      st = st != NSA_OK ? st : nsa_compress(ctx, &cp);
    };
    nsa_fwd_params p;
    nsa_fwd_params_init(&p);
    p.in.q = q.t;
    p.in.k = k.t;
    p.in.v = v.t;
    p.in.k_cmp = k_cmp.t;
    p.in.v_cmp = v_cmp.t;
    p.in.g_cmp = g_cmp.t;
    p.in.g_slc = g_slc.t;
    p.in.g_win = g_win.t;
    p.o = o.t;
    nsa_dense_fwd_params dp;
    nsa_dense_fwd_params_init(&dp);
    dp.q = q.t;
    dp.k = k.t;
    dp.v = v.t;
    dp.o = o.t;
    const double cmp_ms = median_ms(opt.repeats, compress);
    const double nsa_ms =
        median_ms(opt.repeats, [&] { st = st != NSA_OK ? st : nsa_fwd(ctx, &p); });
    // Stage split of the last timed run: thread-seconds per stage, scaled to its wall time.
    nsa_fwd_profile prof{};
    nsa_context_fwd_profile(ctx, &prof);
    const double stage_s[] = {prof.pack_s, prof.cmp_s, prof.scores_s, prof.topn_s,
                              prof.slc_s,  prof.win_s, prof.combine_s};
    double stage_sum = 0;
    for (double x : stage_s) stage_sum += x;
    double stage_ms[7];
    for (int i = 0; i < 7; ++i) {
      stage_ms[i] = stage_sum > 0 ? prof.wall_s * 1e3 * stage_s[i] / stage_sum : 0.0;
    }
    // --no-dense: NSA alone (long lengths, memory measurements); dense figures are then NaN.
    const double dense_ms = opt.no_dense ? std::nan("") : median_ms(opt.repeats, [&] {
      st = st != NSA_OK ? st : nsa_dense_fwd(ctx, &dp);
    });
    if (st != NSA_OK) {
      std::fprintf(stderr, "nsa bench: %s: %s\n", nsa_status_name(st), nsa_last_error(ctx));
      rc = 1;
      break;
    }
    double nsa_keys = 0;
    for (int64_t t = 0; t < T; ++t) nsa_keys += attended_keys(cfg, t);
    const double per_key = 2.0 * double(opt.dk + opt.dv) * double(opt.hq);
    const double dense_keys = double(T) * double(T + 1) / 2;
    const double total_ms = cmp_ms + nsa_ms;
    const double model = (T / 2.0) / (double(T) / (2.0 * cfg.cmp_stride) +
                                      double(cfg.slc_count) * cfg.slc_block + cfg.window);
    const double gflops = per_key * nsa_keys / (nsa_ms * 1e6);
    const double dense_gflops = per_key * dense_keys / (dense_ms * 1e6);
    rows.push_back({{"pass", "fwd"},
                    {"dtype", opt.dtype},
                    {"bf16_math", math},
                    {"T", T},
                    {"threads", opt.threads},
                    {"compress_ms", cmp_ms},
                    {"attn_ms", nsa_ms},
                    {"ms", total_ms},
                    {"dense_ms", dense_ms},
                    {"speedup", dense_ms / total_ms},
                    {"gflops", gflops},
                    {"dense_gflops", dense_gflops},
                    {"model_ratio", model},
                    {"stage_ms",
                     {{"pack", stage_ms[0]},
                      {"cmp", stage_ms[1]},
                      {"scores", stage_ms[2]},
                      {"topn", stage_ms[3]},
                      {"slc", stage_ms[4]},
                      {"win", stage_ms[5]},
                      {"combine", stage_ms[6]}}}});
    if (!opt.json) {
      std::printf(
          "%7lld %9.1f %9.1f %8.2fx %7.2fx %8.1f %9.1f %9s | %7.1f %7.1f %7.1f %7.1f %7.1f %7.1f "
          "%7.1f %7.1f\n",
          (long long)T, total_ms, dense_ms, dense_ms / total_ms, model, gflops, dense_gflops,
          "stage ms:", cmp_ms, stage_ms[0], stage_ms[1], stage_ms[2], stage_ms[3], stage_ms[4],
          stage_ms[5], stage_ms[6]);
      std::fflush(stdout);
    }
  }
  if (opt.json) std::printf("%s\n", rows.dump(2).c_str());
  nsa_context_destroy(ctx);
  return rc;
}

}  // namespace

Command add_bench_command(CLI::App& app) {
  auto* cmd = app.add_subcommand("bench", "Time the NSA forward against the dense baseline");
  auto opt = std::make_shared<BenchOptions>();
  cmd->add_option("--pass", opt->pass,
                  "fwd, bwd (backward alone) or fwdbwd (forward then backward)")
      ->check(CLI::IsMember({"fwd", "bwd", "fwdbwd"}))
      ->capture_default_str();
  cmd->add_option("--lengths", opt->lengths, "comma-separated sequence lengths, each 1 to 16777216")
      ->transform(cli::IntegerList(1, cli::kMaxTokens))
      ->type_name("LIST")
      ->capture_default_str();
  cmd->add_option("--dtype", opt->dtype, "input dtype")
      ->check(CLI::IsMember({"f32", "bf16"}))
      ->capture_default_str();
  cmd->add_option("--bf16-math", opt->bf16_math,
                  "arithmetic for bf16 inputs (nsa_bf16_math; the forwards, not the backward)")
      ->check(CLI::IsMember({"auto", "f32", "native", "emulated"}))
      ->capture_default_str();
  cli::add_integer(cmd, "--threads", opt->threads, "threads (0: OpenMP's default)", 0,
                   cli::kMaxThreads);
  cli::add_integer(cmd, "--repeats", opt->repeats, "timed runs per figure (median)", 1,
                   cli::kMaxRepeats);
  cli::add_integer(cmd, "--hq", opt->hq, "query heads, a multiple of --hkv", 1, cli::kMaxHeads);
  cli::add_integer(cmd, "--hkv", opt->hkv, "key/value heads", 1, cli::kMaxHeads);
  cli::add_integer(cmd, "--dk", opt->dk, "query/key head dim", 1, cli::kMaxHeadDim);
  cli::add_integer(cmd, "--dv", opt->dv, "value head dim", 1, cli::kMaxHeadDim);
  cmd->add_flag("--json", opt->json, "print the rows as JSON");
  cmd->add_flag("--no-dense", opt->no_dense, "skip the dense baseline (its figures print as nan)");
  // `nsa bench decode ...`: its own options (cmd_bench_decode.cc).
  Command decode = add_bench_decode_command(*cmd);
  auto* decode_cmd = cmd->get_subcommand("decode");
  // The rules across options, at the end of the parse (bench's own options are unused by decode).
  cmd->callback([opt, decode_cmd] {
    if (!decode_cmd->parsed()) validate_bench(*opt);
  });
  return [opt, decode, decode_cmd] { return decode_cmd->parsed() ? decode() : run_bench(*opt); };
}
