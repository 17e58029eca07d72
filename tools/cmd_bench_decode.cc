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
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "bench_common.h"
#include "commands.h"
#include "nsa/nsa.h"

namespace {

struct DecodeOptions {
  std::string lengths = "8192,16384,32768,65536", batches = "1,8", dtypes = "bf16,f32";
  int32_t threads = 0, repeats = 5, steps = 8;
  bool json = false, no_dense = false;
  int64_t hq = 16, hkv = 1, dk = 192, dv = 128;
};

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) out.push_back(item);
  return out;
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
  p.q = q.t; p.k = k.t; p.v = v.t;
  p.g_cmp = g_cmp.t; p.g_slc = g_slc.t; p.g_win = g_win.t; p.o = o.t;
  nsa_dense_decode_params dp;
  nsa_dense_decode_params_init(&dp);
  dp.q = q.t; dp.k = k.t; dp.v = v.t; dp.o = o.t;
  nsa_status st = NSA_OK;
  auto nsa_step = [&] { st = st != NSA_OK ? st : nsa_decode(ctx, cache, &p); };
  auto dense_step = [&] { st = st != NSA_OK ? st : nsa_dense_decode(ctx, cache, &dp); };
  // The steps run at lengths T .. T + per_measure; the bytes and FLOPs count at the mean length.
  const int64_t t_nsa = T + per_measure / 2;
  row->ms = median_of_means_ms(opt.repeats, opt.steps, nsa_step);
  row->dense_ms = opt.no_dense ? std::nan("") : median_of_means_ms(opt.repeats, opt.steps, dense_step);
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
  nlohmann::json rows = nlohmann::json::array();
  if (!opt.json) {
    std::printf("nsa bench decode: Hq=%lld Hkv=%lld Dk=%lld Dv=%lld, default config, threads=%d,"
                " median of %d x mean of %d steps; ms per step (one token per sequence)\n",
                (long long)opt.hq, (long long)opt.hkv, (long long)opt.dk, (long long)opt.dv,
                opt.threads, opt.repeats, opt.steps);
    std::printf("%5s %3s %7s %9s %9s %8s %8s %9s %9s %8s %8s %8s\n", "dtype", "B", "T", "ms",
                "dense_ms", "speedup", "model", "KB/tok", "dKB/tok", "GB/s", "dGB/s", "GF/s");
  }
  int rc = 0;
  for (const std::string& dts : split(opt.dtypes)) {
    const nsa_dtype dt = dts == "bf16" ? NSA_DTYPE_BF16 : NSA_DTYPE_F32;
    for (const std::string& bs : split(opt.batches)) {
      const int64_t B = std::stoll(bs);
      for (const std::string& ls : split(opt.lengths)) {
        const int64_t T = std::stoll(ls);
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
        rows.push_back({{"pass", "decode"}, {"dtype", dts}, {"T", T}, {"batch", B},
                        {"threads", opt.threads}, {"ms", r.ms}, {"dense_ms", r.dense_ms},
                        {"speedup", speedup}, {"model_ratio", model},
                        {"speedup_vs_model", speedup / model}, {"kv_bytes", r.kv_bytes},
                        {"dense_kv_bytes", r.dense_kv_bytes}, {"gbps", gbps},
                        {"dense_gbps", dense_gbps}, {"gflops", gflops},
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
  cmd->add_option("--lengths", opt->lengths, "comma-separated cache lengths")->capture_default_str();
  cmd->add_option("--batch", opt->batches, "comma-separated batch sizes")->capture_default_str();
  cmd->add_option("--dtype", opt->dtypes, "comma-separated cache dtypes (bf16, f32)")->capture_default_str();
  cmd->add_option("--threads", opt->threads, "threads (0: OpenMP's default)")->capture_default_str();
  cmd->add_option("--repeats", opt->repeats, "measurements per figure (median)")->check(CLI::PositiveNumber)->capture_default_str();
  cmd->add_option("--steps", opt->steps, "decode steps per measurement (mean)")->check(CLI::PositiveNumber)->capture_default_str();
  cmd->add_option("--hq", opt->hq, "query heads")->capture_default_str();
  cmd->add_option("--hkv", opt->hkv, "key/value heads")->capture_default_str();
  cmd->add_option("--dk", opt->dk, "query/key head dim")->capture_default_str();
  cmd->add_option("--dv", opt->dv, "value head dim")->capture_default_str();
  cmd->add_flag("--json", opt->json, "print the rows as JSON");
  cmd->add_flag("--no-dense", opt->no_dense, "skip the dense baseline");
  return [opt] { return run_bench_decode(*opt); };
}
