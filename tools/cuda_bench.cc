// nsa_cuda_bench: times the CUDA backend through the public C API (nsa.h, nsa_cuda.h) with CUDA
// events, on device buffers it allocates itself. One JSON object per line on stdout.
//   fwd: the NSA forward as a model runs it, compression included: nsa_compress of k and v
//        (mean), then nsa_fwd (cmp with in-kernel selection, slc, win, gates): "ms"; the
//        forward alone: "fwd_ms".
//   decode: one step (nsa_decode, and nsa_dense_decode on the same cache) for a batch of
//        sequences of T cached tokens each, bf16 cache; the cache is filled by one append per
//        sequence (the rows and their compressed tokens), not timed.
// The baselines (PyTorch SDPA with FlashAttention-2 and cuDNN) are timed by scripts/sdpa_bench.py
// on the same shapes; scripts/gpu-check.sh joins the two.
#include <cuda_runtime.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "nsa/nsa.h"
#include "nsa/nsa_cuda.h"

namespace {

#define CHECK_CUDA(x)                                               \
  do {                                                              \
    const cudaError_t e_ = (x);                                     \
    if (e_ != cudaSuccess) {                                        \
      std::fprintf(stderr, "%s: %s\n", #x, cudaGetErrorString(e_)); \
      std::exit(2);                                                 \
    }                                                               \
  } while (0)

void check(nsa_context* ctx, nsa_status s, const char* what) {
  if (s == NSA_OK) return;
  std::fprintf(stderr, "%s: %s: %s\n", what, nsa_status_name(s), nsa_last_error(ctx));
  std::exit(2);
}

// A device tensor of bf16 (or f32 for lse) values, contiguous, filled from a random pool.
struct DeviceTensor {
  void* data = nullptr;
  nsa_tensor desc{};
  DeviceTensor(nsa_dtype dt, std::vector<int64_t> shape, const std::vector<uint16_t>& pool) {
    int64_t n = 1;
    for (int64_t s : shape) n *= s;
    const size_t bytes = size_t(n) * nsa_dtype_size(dt);
    CHECK_CUDA(cudaMalloc(&data, bytes > 0 ? bytes : 1));
    // Tiles of the pool: random enough for the selection to vary, cheap to make at 64k tokens.
    const size_t chunk = pool.size() * sizeof(uint16_t);
    for (size_t off = 0; off < bytes; off += chunk) {
      CHECK_CUDA(cudaMemcpy(static_cast<char*>(data) + off, pool.data(),
                            std::min(chunk, bytes - off), cudaMemcpyHostToDevice));
    }
    desc = nsa_tensor_contiguous(data, dt, int32_t(shape.size()), shape.data());
  }
  ~DeviceTensor() { cudaFree(data); }
  DeviceTensor(const DeviceTensor&) = delete;
  DeviceTensor& operator=(const DeviceTensor&) = delete;
};

// bf16 bit patterns of U(lo, hi) values.
std::vector<uint16_t> random_pool(size_t n, float lo, float hi, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> u(lo, hi);
  std::vector<uint16_t> pool(n);
  for (uint16_t& h : pool) {
    const float f = u(rng);
    uint32_t bits;
    std::memcpy(&bits, &f, 4);
    h = uint16_t((bits + 0x7fff + ((bits >> 16) & 1)) >> 16);
  }
  return pool;
}

// Median over `repeats` of one call of `run`, in ms, timed by events on `stream`, after a
// warm-up call.
template <typename F>
double median_ms(cudaStream_t stream, int repeats, F&& run) {
  run();
  CHECK_CUDA(cudaStreamSynchronize(stream));
  std::vector<double> ms;
  cudaEvent_t a, b;
  CHECK_CUDA(cudaEventCreate(&a));
  CHECK_CUDA(cudaEventCreate(&b));
  for (int r = 0; r < repeats; ++r) {
    CHECK_CUDA(cudaEventRecord(a, stream));
    run();
    CHECK_CUDA(cudaEventRecord(b, stream));
    CHECK_CUDA(cudaEventSynchronize(b));
    float t = 0;
    CHECK_CUDA(cudaEventElapsedTime(&t, a, b));
    ms.push_back(t);
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

// The heads and timing options both commands take.
struct HeadOptions {
  int64_t hq = 64, hkv = 4, dk = 192, dv = 128;
  int repeats = 3;
};

void add_head_options(CLI::App* cmd, HeadOptions& o) {
  cmd->add_option("--hq", o.hq)->check(CLI::PositiveNumber);
  cmd->add_option("--hkv", o.hkv)->check(CLI::PositiveNumber);
  cmd->add_option("--dk", o.dk)->check(CLI::PositiveNumber);
  cmd->add_option("--dv", o.dv)->check(CLI::PositiveNumber);
  cmd->add_option("--repeats", o.repeats)->check(CLI::PositiveNumber);
}

struct FwdOptions : HeadOptions {
  std::string lengths = "8192,16384,32768,65536";
};

std::vector<int64_t> parse_lengths(const std::string& s) {
  std::vector<int64_t> v;
  std::stringstream ss(s);
  for (std::string item; std::getline(ss, item, ',');) v.push_back(std::stoll(item));
  return v;
}

// A CUDA context on its own stream, and the random pools the tensors are filled from.
struct Session {
  nsa_context* ctx = nullptr;
  cudaStream_t stream = nullptr;
  std::vector<uint16_t> qk = random_pool(1 << 20, -2.0f, 2.0f, 1);
  std::vector<uint16_t> vals = random_pool(1 << 20, -1.0f, 1.0f, 2);
  std::vector<uint16_t> gates = random_pool(1 << 20, 0.0f, 1.0f, 3);
  Session() {
    nsa_context_create(&ctx);
    check(ctx, nsa_context_set_backend(ctx, NSA_BACKEND_CUDA), "backend");
    CHECK_CUDA(cudaStreamCreate(&stream));
    check(ctx, nsa_context_set_cuda_stream(ctx, stream), "stream");
  }
  ~Session() {
    cudaStreamDestroy(stream);
    nsa_context_destroy(ctx);
  }
  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;
};

int run_fwd(const FwdOptions& o) {
  const Session ss;
  nsa_context* ctx = ss.ctx;
  const cudaStream_t stream = ss.stream;
  const std::vector<uint16_t>&qk = ss.qk, &vals = ss.vals, &gates = ss.gates;
  for (int64_t T : parse_lengths(o.lengths)) {
    nsa_fwd_params p;
    nsa_fwd_params_init(&p);
    const int64_t Tc = nsa_cmp_len(&p.in.cfg, T);
    DeviceTensor q(NSA_DTYPE_BF16, {1, T, o.hq, o.dk}, qk),
        k(NSA_DTYPE_BF16, {1, T, o.hkv, o.dk}, qk), v(NSA_DTYPE_BF16, {1, T, o.hkv, o.dv}, vals),
        kc(NSA_DTYPE_BF16, {1, Tc, o.hkv, o.dk}, qk),
        vc(NSA_DTYPE_BF16, {1, Tc, o.hkv, o.dv}, vals), gc(NSA_DTYPE_BF16, {1, T, o.hq}, gates),
        gs(NSA_DTYPE_BF16, {1, T, o.hq}, gates), gw(NSA_DTYPE_BF16, {1, T, o.hq}, gates),
        out(NSA_DTYPE_BF16, {1, T, o.hq, o.dv}, vals);
    p.in.q = q.desc, p.in.k = k.desc, p.in.v = v.desc, p.in.k_cmp = kc.desc, p.in.v_cmp = vc.desc;
    p.in.g_cmp = gc.desc, p.in.g_slc = gs.desc, p.in.g_win = gw.desc, p.o = out.desc;
    nsa_compress_params ck, cv;
    nsa_compress_params_init(&ck);
    ck.kind = NSA_CMP_MEAN;
    cv = ck;
    ck.x = k.desc, ck.out = kc.desc, cv.x = v.desc, cv.out = vc.desc;
    auto compress = [&] {
      check(ctx, nsa_compress(ctx, &ck), "nsa_compress k");
      check(ctx, nsa_compress(ctx, &cv), "nsa_compress v");
    };
    auto forward = [&] { check(ctx, nsa_fwd(ctx, &p), "nsa_fwd"); };
    std::fprintf(stderr, "nsa_cuda_bench fwd: T = %lld ...\n", (long long)T);
    const double fwd_ms = median_ms(stream, o.repeats, forward);
    const double ms = median_ms(stream, o.repeats, [&] {
      compress();
      forward();
    });
    std::printf(
        "{\"op\": \"nsa_fwd\", \"T\": %lld, \"Hq\": %lld, \"Hkv\": %lld, \"Dk\": %lld, \"Dv\": "
        "%lld, \"dtype\": \"bf16\", \"ms\": %.4f, \"fwd_ms\": %.4f}\n",
        (long long)T, (long long)o.hq, (long long)o.hkv, (long long)o.dk, (long long)o.dv, ms,
        fwd_ms);
    std::fflush(stdout);
  }
  return 0;
}

struct DecodeOptions : HeadOptions {
  DecodeOptions() { repeats = 20; }
  std::string lengths = "8192,16384,32768,65536", batches = "1,16";
};

void run_decode_shape(const Session& ss, const DecodeOptions& o, int64_t T, int64_t S) {
  nsa_context* ctx = ss.ctx;
  const cudaStream_t stream = ss.stream;
  const std::vector<uint16_t>&qk = ss.qk, &vals = ss.vals, &gates = ss.gates;
  nsa_kv_cache_params cp;
  nsa_kv_cache_params_init(&cp);
  cp.num_seqs = S, cp.capacity = T, cp.num_kv_heads = o.hkv;
  cp.head_dim_k = o.dk, cp.head_dim_v = o.dv, cp.dtype = NSA_DTYPE_BF16;
  nsa_kv_cache* cache = nullptr;
  check(ctx, nsa_kv_cache_create(ctx, &cp, &cache), "nsa_kv_cache_create");
  {
    DeviceTensor k(NSA_DTYPE_BF16, {T, o.hkv, o.dk}, qk), v(NSA_DTYPE_BF16, {T, o.hkv, o.dv}, vals);
    for (int64_t s = 0; s < S; ++s) {
      check(ctx, nsa_kv_cache_append(ctx, cache, s, &k.desc, &v.desc), "nsa_kv_cache_append");
    }
    CHECK_CUDA(cudaStreamSynchronize(stream));
  }
  DeviceTensor q(NSA_DTYPE_BF16, {S, o.hq, o.dk}, qk), out(NSA_DTYPE_BF16, {S, o.hq, o.dv}, vals);
  DeviceTensor gc(NSA_DTYPE_BF16, {S, o.hq}, gates), gs(NSA_DTYPE_BF16, {S, o.hq}, gates),
      gw(NSA_DTYPE_BF16, {S, o.hq}, gates);
  nsa_decode_params dp;
  nsa_decode_params_init(&dp);
  dp.q = q.desc, dp.o = out.desc, dp.g_cmp = gc.desc, dp.g_slc = gs.desc, dp.g_win = gw.desc;
  nsa_dense_decode_params dd;
  nsa_dense_decode_params_init(&dd);
  dd.q = q.desc, dd.o = out.desc;
  std::fprintf(stderr, "nsa_cuda_bench decode: T = %lld, batch %lld ...\n", (long long)T,
               (long long)S);
  const double ms =
      median_ms(stream, o.repeats, [&] { check(ctx, nsa_decode(ctx, cache, &dp), "nsa_decode"); });
  const double dense_ms = median_ms(stream, o.repeats, [&] {
    check(ctx, nsa_dense_decode(ctx, cache, &dd), "nsa_dense_decode");
  });
  std::printf(
      "{\"op\": \"nsa_decode\", \"T\": %lld, \"batch\": %lld, \"Hq\": %lld, \"Hkv\": %lld, "
      "\"Dk\": %lld, \"Dv\": %lld, \"dtype\": \"bf16\", \"ms\": %.4f, \"dense_ms\": %.4f, "
      "\"speedup\": %.3f}\n",
      (long long)T, (long long)S, (long long)o.hq, (long long)o.hkv, (long long)o.dk,
      (long long)o.dv, ms, dense_ms, dense_ms / ms);
  std::fflush(stdout);
  nsa_kv_cache_destroy(cache);
}

int run_decode(const DecodeOptions& o) {
  const Session ss;
  for (int64_t T : parse_lengths(o.lengths)) {
    for (int64_t S : parse_lengths(o.batches)) run_decode_shape(ss, o, T, S);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"nsa_cuda_bench: the CUDA backend's timings (JSON lines)"};
  app.require_subcommand(1);
  FwdOptions f;
  CLI::App* fwd = app.add_subcommand("fwd", "NSA forward with compression, bf16");
  fwd->add_option("--lengths", f.lengths, "comma-separated T");
  add_head_options(fwd, f);
  DecodeOptions d;
  CLI::App* dec = app.add_subcommand("decode", "one decode step, NSA and dense, bf16 cache");
  dec->add_option("--lengths", d.lengths, "comma-separated cached tokens T");
  dec->add_option("--batch", d.batches, "comma-separated batch sizes");
  add_head_options(dec, d);
  CLI11_PARSE(app, argc, argv);
  if (nsa_cuda_device_count() == 0) {
    std::fprintf(stderr, "nsa_cuda_bench: no CUDA device (nsa info says why)\n");
    return 2;
  }
  if (*fwd) return run_fwd(f);
  if (*dec) return run_decode(d);
  return 0;
}
