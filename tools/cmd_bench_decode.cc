// `nsa bench decode`: per-token decode latency of NSA against the dense baseline over the same
// KV cache, on the paper's GQA group (Hq = 16, Hkv = 1, Dk = 192, Dv = 128), default config.
//
// Each sequence of the batch is filled with T random tokens (nsa_kv_cache_append, which also
// computes the compressed tokens), then one timed step is a real decode step: append the new
// token's K/V and attend with its query, for every sequence of the batch. A figure is the median
// over --repeats of the mean step time over --steps steps, after one warm-up step.
//
// KV bytes per token count what the step must read from the cache per sequence: for NSA the
// keys and values of every attended token of the three branches (compressed tokens, selected
// blocks, window), for dense every cached token. The bytes model of the speedup is their ratio.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "bench_common.h"
#include "cli_validators.h"
#include "commands.h"
#include "nsa/nsa.h"

namespace {

struct DecodeOptions {
  std::string lengths = "8192,16384,32768,65536", batches = "1,8", dtypes = "bf16,f32";
  std::string bf16_math = "auto";
  int32_t threads = 0, repeats = 5, steps = 8;
  bool json = false, no_dense = false;
  int64_t hq = 16, hkv = 1, dk = 192, dv = 128;
};

// Throws a CLI::ValidationError for a combination the run cannot take: Hq not a multiple of Hkv,
// or a cache far beyond the machine's memory. The estimate is the library's cache layout at the
// largest batch, length and dtype: (capacity + 64) rows of Dk + Dv + 32 elements per sequence and
// KV head, raw and compressed (1/d of the rows) tokens; the capacity is bench_one's.
void validate_decode(const DecodeOptions& opt) {
  cli::require_multiple(opt.hq, opt.hkv);
  nsa_config cfg;
  nsa_config_default(&cfg);
  int64_t B = 0, T = 0;
  for (const int64_t b : cli::integer_list(opt.batches)) B = std::max(B, b);
  for (const int64_t t : cli::integer_list(opt.lengths)) T = std::max(T, t);
  const double elem = opt.dtypes.find("f32") != std::string::npos ? 4.0 : 2.0;
  const double capacity = double(T) + 2.0 * opt.steps * (opt.repeats + 1.0);
  const double bytes = double(B) * double(opt.hkv) * (capacity + 64) *
                       double(opt.dk + opt.dv + 32) * elem * (1 + 1.0 / cfg.cmp_stride);
  cli::require_memory("--lengths " + std::to_string(T) + " with --batch " + std::to_string(B) +
                          " --hkv " + std::to_string(opt.hkv) + " --dk " + std::to_string(opt.dk) +
                          " --dv " + std::to_string(opt.dv),
                      bytes);
}

// An owned contiguous tensor of pseudo-random values in [lo, hi).
struct Filled {
  std::vector<uint16_t> bytes;
  nsa_tensor t{};
  Filled(nsa_dtype dt, std::vector<int64_t> shape, uint32_t seed, float lo, float hi) {
    int64_t n = 1;
    for (int64_t s : shape) n *= s;
    bytes.resize(static_cast<size_t>(n) * (dt == NSA_DTYPE_F32 ? 2 : 1) + 2);
    t = nsa_tensor_contiguous(bytes.data(), dt, int32_t(shape.size()), shape.data());
    uint32_t state = seed * 2654435761u + 1u;
    for (int64_t i = 0; i < n; ++i) {
      state = state * 1664525u + 1013904223u;
      const float f = lo + (hi - lo) * float(state >> 8) / 16777216.0f;
      if (dt == NSA_DTYPE_F32) {
        reinterpret_cast<float*>(bytes.data())[i] = f;
      } else {
        uint32_t b;
        std::memcpy(&b, &f, 4);
        bytes[i] = uint16_t((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
      }
    }
  }
};

struct Row {
  double ms = 0, dense_ms = 0, kv_bytes = 0, dense_kv_bytes = 0, flops = 0, dense_flops = 0;
};

// Fills every sequence with T tokens, then times NSA and dense steps on the same cache.
int bench_one(nsa_context* ctx, const DecodeOptions& opt, nsa_dtype dt, int64_t B, int64_t T,
              Row* row) {
  nsa_config cfg;
  nsa_config_default(&cfg);
  const int64_t per_measure = opt.steps * (opt.repeats + 1);
  nsa_kv_cache_params cp;
  nsa_kv_cache_params_init(&cp);
  cp.num_seqs = B;
  cp.capacity = T + 2 * per_measure;
  cp.num_kv_heads = opt.hkv;
  cp.head_dim_k = opt.dk;
  cp.head_dim_v = opt.dv;
  cp.dtype = dt;
  nsa_kv_cache* cache = nullptr;
  if (nsa_kv_cache_create(ctx, &cp, &cache) != NSA_OK) return 1;
  std::unique_ptr<nsa_kv_cache, void (*)(nsa_kv_cache*)> owner(cache, nsa_kv_cache_destroy);
  const int64_t chunk = std::min<int64_t>(T, 8192);
  for (int64_t s = 0; s < B; ++s) {
    for (int64_t t0 = 0; t0 < T; t0 += chunk) {
      const int64_t n = std::min(chunk, T - t0);
      Filled k(dt, {n, opt.hkv, opt.dk}, uint32_t(s * 7919 + t0 + 1), -1, 1);
      Filled v(dt, {n, opt.hkv, opt.dv}, uint32_t(s * 7919 + t0 + 2), -1, 1);
      if (nsa_kv_cache_append(ctx, cache, s, &k.t, &v.t) != NSA_OK) return 1;
    }
  }
  Filled q(dt, {B, opt.hq, opt.dk}, 11, -1, 1), k(dt, {B, opt.hkv, opt.dk}, 12, -1, 1),
      v(dt, {B, opt.hkv, opt.dv}, 13, -1, 1);
  Filled g_cmp(dt, {B, opt.hq}, 14, 0, 1), g_slc(dt, {B, opt.hq}, 15, 0, 1),
      g_win(dt, {B, opt.hq}, 16, 0, 1);
  Filled o(NSA_DTYPE_F32, {B, opt.hq, opt.dv}, 17, 0, 0);
  nsa_decode_params p;
  nsa_decode_params_init(&p);
  p.q = q.t;
  p.k = k.t;
  p.v = v.t;
  p.g_cmp = g_cmp.t;
  p.g_slc = g_slc.t;
  p.g_win = g_win.t;
  p.o = o.t;
  nsa_dense_decode_params dp;
  nsa_dense_decode_params_init(&dp);
  dp.q = q.t;
  dp.k = k.t;
  dp.v = v.t;
  dp.o = o.t;
  nsa_status st = NSA_OK;
  auto nsa_step = [&] { st = st != NSA_OK ? st : nsa_decode(ctx, cache, &p); };
  auto dense_step = [&] { st = st != NSA_OK ? st : nsa_dense_decode(ctx, cache, &dp); };
  // The steps run at lengths T .. T + per_measure; the bytes and FLOPs count at the mean length.
  const int64_t t_nsa = T + per_measure / 2;
  row->ms = median_of_means_ms(opt.repeats, opt.steps, nsa_step);
  row->dense_ms =
      opt.no_dense ? std::nan("") : median_of_means_ms(opt.repeats, opt.steps, dense_step);
  if (st != NSA_OK) return 1;
  const double elem = dt == NSA_DTYPE_F32 ? 4.0 : 2.0;
  const double token_bytes = double(opt.hkv) * double(opt.dk + opt.dv) * elem;
  const double per_key_flops = 2.0 * double(opt.dk + opt.dv) * double(opt.hq);
  row->kv_bytes = attended_keys(cfg, t_nsa) * token_bytes;
  row->dense_kv_bytes = double(t_nsa + 1) * token_bytes;
  row->flops = attended_keys(cfg, t_nsa) * per_key_flops;
  row->dense_flops = double(t_nsa + 1) * per_key_flops;
  return 0;
}

int run_bench_decode(const DecodeOptions& opt) {
  nsa_context* ctx = nullptr;
  nsa_context_create(&ctx);
  nsa_context_set_num_threads(ctx, opt.threads);
  if (!apply_bf16_math(ctx, opt.bf16_math, "nsa bench decode")) {
    nsa_context_destroy(ctx);
    return 2;
  }
  const char* math = bf16_math_label(nsa_context_bf16_math(ctx));
  nlohmann::json rows = nlohmann::json::array();
  if (!opt.json) {
    std::printf(
        "nsa bench decode: Hq=%lld Hkv=%lld Dk=%lld Dv=%lld, default config, threads=%d,"
        " median of %d x mean of %d steps, bf16 arithmetic %s; ms per step (one token per"
        " sequence)\n",
        (long long)opt.hq, (long long)opt.hkv, (long long)opt.dk, (long long)opt.dv, opt.threads,
        opt.repeats, opt.steps, math);
    std::printf("%5s %3s %7s %9s %9s %8s %8s %9s %9s %8s %8s %8s\n", "dtype", "B", "T", "ms",
                "dense_ms", "speedup", "model", "KB/tok", "dKB/tok", "GB/s", "dGB/s", "GF/s");
  }
  int rc = 0;
  for (const std::string& dts : cli::list_items(opt.dtypes)) {
    const nsa_dtype dt = dts == "bf16" ? NSA_DTYPE_BF16 : NSA_DTYPE_F32;
    for (const int64_t B : cli::integer_list(opt.batches)) {
      for (const int64_t T : cli::integer_list(opt.lengths)) {
        bench_progress("decode", T, B);
        Row r;
        if (bench_one(ctx, opt, dt, B, T, &r) != 0) {
          std::fprintf(stderr, "nsa bench decode: %s\n", nsa_last_error(ctx));
          rc = 1;
          break;
        }
        const double model = r.dense_kv_bytes / r.kv_bytes, speedup = r.dense_ms / r.ms;
        const double gbps = double(B) * r.kv_bytes / (r.ms * 1e6);
        const double dense_gbps = double(B) * r.dense_kv_bytes / (r.dense_ms * 1e6);
        const double gflops = double(B) * r.flops / (r.ms * 1e6);
        const double dense_gflops = double(B) * r.dense_flops / (r.dense_ms * 1e6);
        rows.push_back({{"pass", "decode"},
                        {"dtype", dts},
                        {"bf16_math", dt == NSA_DTYPE_BF16 ? math : "f32"},
                        {"T", T},
                        {"batch", B},
                        {"threads", opt.threads},
                        {"ms", r.ms},
                        {"dense_ms", r.dense_ms},
                        {"speedup", speedup},
                        {"model_ratio", model},
                        {"speedup_vs_model", speedup / model},
                        {"kv_bytes", r.kv_bytes},
                        {"dense_kv_bytes", r.dense_kv_bytes},
                        {"gbps", gbps},
                        {"dense_gbps", dense_gbps},
                        {"gflops", gflops},
                        {"dense_gflops", dense_gflops}});
        if (!opt.json) {
          std::printf("%5s %3lld %7lld %9.3f %9.3f %7.2fx %7.2fx %9.1f %9.1f %8.1f %8.1f %8.1f\n",
                      dts.c_str(), (long long)B, (long long)T, r.ms, r.dense_ms, speedup, model,
                      r.kv_bytes / 1024, r.dense_kv_bytes / 1024, gbps, dense_gbps, gflops);
          std::fflush(stdout);
        }
      }
    }
  }
  if (opt.json) std::printf("%s\n", rows.dump(2).c_str());
  nsa_context_destroy(ctx);
  return rc;
}

}  // namespace

Command add_bench_decode_command(CLI::App& bench) {
  auto* cmd = bench.add_subcommand("decode", "Time KV-cache decode steps, NSA against dense");
  auto opt = std::make_shared<DecodeOptions>();
  cmd->add_option("--lengths", opt->lengths, "comma-separated cache lengths, each 0 to 16777216")
      ->transform(cli::IntegerList(0, cli::kMaxTokens))
      ->type_name("LIST")
      ->capture_default_str();
  cmd->add_option("--batch", opt->batches, "comma-separated batch sizes, each 1 to 65536")
      ->transform(cli::IntegerList(1, cli::kMaxBatch))
      ->type_name("LIST")
      ->capture_default_str();
  cmd->add_option("--dtype", opt->dtypes, "comma-separated cache dtypes (bf16, f32)")
      ->check(cli::NameList({"bf16", "f32"}))
      ->type_name("LIST")
      ->capture_default_str();
  cmd->add_option("--bf16-math", opt->bf16_math,
                  "arithmetic for bf16 caches and queries (nsa_bf16_math)")
      ->check(CLI::IsMember({"auto", "f32", "native", "emulated"}))
      ->capture_default_str();
  cli::add_integer(cmd, "--threads", opt->threads, "threads (0: OpenMP's default)", 0,
                   cli::kMaxThreads);
  cli::add_integer(cmd, "--repeats", opt->repeats, "measurements per figure (median)", 1,
                   cli::kMaxRepeats);
  cli::add_integer(cmd, "--steps", opt->steps, "decode steps per measurement (mean)", 1,
                   cli::kMaxRepeats);
  cli::add_integer(cmd, "--hq", opt->hq, "query heads, a multiple of --hkv", 1, cli::kMaxHeads);
  cli::add_integer(cmd, "--hkv", opt->hkv, "key/value heads", 1, cli::kMaxHeads);
  cli::add_integer(cmd, "--dk", opt->dk, "query/key head dim", 1, cli::kMaxHeadDim);
  cli::add_integer(cmd, "--dv", opt->dv, "value head dim", 1, cli::kMaxHeadDim);
  cmd->add_flag("--json", opt->json, "print the rows as JSON");
  cmd->add_flag("--no-dense", opt->no_dense, "skip the dense baseline");
  cmd->callback([opt] { validate_decode(*opt); });
  return [opt] { return run_bench_decode(*opt); };
}
