// Microbenchmarks of the CPU kernels through the C API, on the paper's GQA group (Hq = 16,
// Hkv = 1, Dk = 192, Dv = 128) unless a benchmark says otherwise:
//   BM_Compress     the mean and mlp compressions of K (SPEC 5),
//   BM_NsaForward   the NSA forward, with the time of each stage (cmp, scores, top-n, slc, win,
//                   combine, K/V packing) as counters, from nsa_fwd_profile,
//   BM_NsaGivenIndices  the forward with caller-supplied blocks (no scoring or top-n),
//   BM_NsaSmallGroups  groups of G = 1 and 4 heads (Hq = 16), which fill part of a vector,
//   BM_Dense        the dense causal flash baseline,
//   BM_DenseBwd     its backward (Hq = 16, Hkv = 1, Dk = Dv = 128, f32).
//   BM_NsaBwd       the CPU backward (nsa_bwd) given the forward's selection, LSEs and branch
//                   outputs.
// Counters named *_ms are milliseconds per iteration; GFLOP/s counts attended (query, key)
// pairs only, 2 (Dk + Dv) FLOPs each per head, as `nsa bench` does.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "nsa/nsa.h"

namespace {

// A tensor with its own storage, filled with U(lo, hi).
struct Buf {
  std::vector<uint32_t> words;
  nsa_tensor t{};
  Buf(nsa_dtype dt, std::vector<int64_t> shape, uint64_t seed, float lo = -1, float hi = 1) {
    int64_t n = 1;
    for (int64_t s : shape) n *= s;
    words.resize(static_cast<size_t>(n));
    t = nsa_tensor_contiguous(words.data(), dt, int32_t(shape.size()), shape.data());
    std::mt19937_64 rng(seed);
    std::uniform_real_distribution<float> u(lo, hi);
    auto* bf = reinterpret_cast<uint16_t*>(words.data());
    for (int64_t i = 0; i < n; ++i) {
      const float f = u(rng);
      uint32_t b;
      std::memcpy(&b, &f, 4);
      if (dt == NSA_DTYPE_F32) {
        words[i] = b;
      } else {
        bf[i] = uint16_t((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
      }
    }
  }
};

struct Shape {
  int64_t T, Hq = 16, Hkv = 1, Dk = 192, Dv = 128;
};

// Inputs and outputs of one forward; k_cmp/v_cmp are random (the forward does not compress).
struct Fwd {
  Shape s;
  nsa_config cfg;
  Buf q, k, v, k_cmp, v_cmp, g, o;
  Buf idx;
  nsa_fwd_params p;
  Fwd(Shape sh, nsa_dtype dt)
      : s(sh),
        cfg(defaults()),
        q(dt, {1, s.T, s.Hq, s.Dk}, 1),
        k(dt, {1, s.T, s.Hkv, s.Dk}, 2),
        v(dt, {1, s.T, s.Hkv, s.Dv}, 3),
        k_cmp(dt, {1, nsa_cmp_len(&cfg, s.T), s.Hkv, s.Dk}, 4),
        v_cmp(dt, {1, nsa_cmp_len(&cfg, s.T), s.Hkv, s.Dv}, 5),
        g(dt, {1, s.T, s.Hq}, 6, 0, 1),
        o(NSA_DTYPE_F32, {1, s.T, s.Hq, s.Dv}, 7, 0, 0),
        idx(NSA_DTYPE_I32, {1, s.T, s.Hkv, cfg.slc_count}, 8, 0, 0) {
    nsa_fwd_params_init(&p);
    p.in.q = q.t, p.in.k = k.t, p.in.v = v.t, p.in.k_cmp = k_cmp.t, p.in.v_cmp = v_cmp.t;
    p.in.g_cmp = p.in.g_slc = p.in.g_win = g.t;
    p.o = o.t;
  }
  static nsa_config defaults() {
    nsa_config c;
    nsa_config_default(&c);
    return c;
  }
  // Keys attended by all queries, the three branches summed (SPEC 4).
  double attended() const {
    double keys = 0;
    for (int64_t t = 0; t < s.T; ++t) {
      const int64_t nc = t + 1 >= cfg.cmp_block ? (t + 1 - cfg.cmp_block) / cfg.cmp_stride + 1 : 0;
      const int64_t blocks = t / cfg.slc_block + 1;
      const int64_t slc = blocks <= cfg.slc_count ? t + 1
                                                  : (cfg.slc_count - 1) * int64_t{cfg.slc_block} +
                                                        t % cfg.slc_block + 1;
      keys += double(nc + slc + std::min<int64_t>(cfg.window, t + 1));
    }
    return keys;
  }
};

nsa_context* make_context(bool profile) {
  nsa_context* ctx = nullptr;
  nsa_context_create(&ctx);
  nsa_context_set_profiling(ctx, profile ? 1 : 0);
  return ctx;
}

void report_flops(benchmark::State& state, double flops_per_iter) {
  state.counters["GFLOP/s"] = benchmark::Counter(flops_per_iter * double(state.iterations()) / 1e9,
                                                 benchmark::Counter::kIsRate);
}

void BM_Compress(benchmark::State& state) {
  const int64_t T = state.range(0);
  const bool mlp = state.range(1) == 1;
  nsa_config cfg;
  nsa_config_default(&cfg);
  const int64_t Tc = nsa_cmp_len(&cfg, T), D = 192, H = 64;
  Buf x(NSA_DTYPE_F32, {1, T, 1, D}, 1), out(NSA_DTYPE_F32, {1, Tc, 1, D}, 2);
  Buf pos(NSA_DTYPE_F32, {1, cfg.cmp_block, D}, 3), w1(NSA_DTYPE_F32, {1, H, cfg.cmp_block * D}, 4);
  Buf b1(NSA_DTYPE_F32, {1, H}, 5), w2(NSA_DTYPE_F32, {1, D, H}, 6), b2(NSA_DTYPE_F32, {1, D}, 7);
  nsa_compress_params cp;
  nsa_compress_params_init(&cp);
  cp.x = x.t;
  cp.out = out.t;
  if (mlp) {
    cp.kind = NSA_CMP_MLP;
    cp.pos = pos.t, cp.w1 = w1.t, cp.b1 = b1.t, cp.w2 = w2.t, cp.b2 = b2.t;
  }
  nsa_context* ctx = make_context(false);
  for (auto _ : state) {
    if (nsa_compress(ctx, &cp) != NSA_OK) state.SkipWithError(nsa_last_error(ctx));
  }
  nsa_context_destroy(ctx);
  state.SetBytesProcessed(state.iterations() * T * D * 4);
}
BENCHMARK(BM_Compress)
    ->ArgsProduct({{8192, 32768}, {0, 1}})
    ->ArgNames({"T", "mlp"})
    ->Unit(benchmark::kMillisecond);

void run_forward(benchmark::State& state, Fwd& f, bool stages) {
  nsa_context* ctx = make_context(stages);
  double stage_s[7] = {};
  for (auto _ : state) {
    if (nsa_fwd(ctx, &f.p) != NSA_OK) state.SkipWithError(nsa_last_error(ctx));
    if (stages) {
      nsa_fwd_profile pr{};
      nsa_context_fwd_profile(ctx, &pr);
      const double st[7] = {pr.pack_s, pr.cmp_s, pr.scores_s, pr.topn_s,
                            pr.slc_s,  pr.win_s, pr.combine_s};
      double sum = 0;
      for (double x : st) sum += x;
      // Thread-seconds scaled to the call's wall time: each stage's share of the wall clock.
      for (int i = 0; i < 7; ++i) stage_s[i] += sum > 0 ? pr.wall_s * st[i] / sum : 0;
    }
  }
  nsa_context_destroy(ctx);
  if (stages) {
    const char* names[7] = {"pack_ms", "cmp_ms", "scores_ms", "topn_ms",
                            "slc_ms",  "win_ms", "combine_ms"};
    for (int i = 0; i < 7; ++i)
      state.counters[names[i]] = 1e3 * stage_s[i] / double(state.iterations());
  }
  report_flops(state, 2.0 * double(f.s.Dk + f.s.Dv) * double(f.s.Hq) * f.attended());
}

void BM_NsaForward(benchmark::State& state) {
  Fwd f({state.range(0)}, state.range(1) ? NSA_DTYPE_BF16 : NSA_DTYPE_F32);
  run_forward(state, f, true);
}
BENCHMARK(BM_NsaForward)
    ->ArgsProduct({{4096, 16384}, {0, 1}})
    ->ArgNames({"T", "bf16"})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

void BM_NsaGivenIndices(benchmark::State& state) {
  Fwd f({state.range(0)}, NSA_DTYPE_F32);
  // The selection of a first forward, handed back: the forward then skips scoring's top-n.
  f.p.slc_indices_out = f.idx.t;
  nsa_context* ctx = make_context(false);
  nsa_fwd(ctx, &f.p);
  nsa_context_destroy(ctx);
  f.p.slc_indices_out = nsa_tensor{};
  f.p.slc_indices_in = f.idx.t;
  run_forward(state, f, true);
}
BENCHMARK(BM_NsaGivenIndices)
    ->Arg(16384)
    ->ArgName("T")
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

void BM_NsaSmallGroups(benchmark::State& state) {
  Shape s{state.range(0)};
  s.Hkv = 16 / state.range(1);  // Hq = 16 as G heads per KV head
  Fwd f(s, NSA_DTYPE_F32);
  run_forward(state, f, true);
}
BENCHMARK(BM_NsaSmallGroups)
    ->ArgsProduct({{4096}, {1, 4}})
    ->ArgNames({"T", "G"})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

void BM_Dense(benchmark::State& state) {
  const int64_t T = state.range(0);
  const nsa_dtype dt = state.range(1) ? NSA_DTYPE_BF16 : NSA_DTYPE_F32;
  const int64_t D = 128, H = 16;
  Buf q(dt, {1, T, H, D}, 1), k(dt, {1, T, 1, D}, 2), v(dt, {1, T, 1, D}, 3);
  Buf o(NSA_DTYPE_F32, {1, T, H, D}, 4, 0, 0);
  nsa_dense_fwd_params dp;
  nsa_dense_fwd_params_init(&dp);
  dp.q = q.t, dp.k = k.t, dp.v = v.t, dp.o = o.t;
  nsa_context* ctx = make_context(false);
  for (auto _ : state) {
    if (nsa_dense_fwd(ctx, &dp) != NSA_OK) state.SkipWithError(nsa_last_error(ctx));
  }
  nsa_context_destroy(ctx);
  report_flops(state, 2.0 * 2 * D * H * double(T) * double(T + 1) / 2);
}
BENCHMARK(BM_Dense)
    ->ArgsProduct({{2048, 8192}, {0, 1}})
    ->ArgNames({"T", "bf16"})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

// The dense backward on FlashAttention's shape of the comparison (Dk = Dv = 128). GFLOP/s uses
// FlashAttention's convention for a causal backward: 2.5 times the forward's 4 * B * Hq * T^2 * D
// / 2 FLOPs, i.e. 5 * B * Hq * T^2 * D (five T x T x D matmuls over half the square); the masked
// half of the diagonal tiles and the exps are not counted.
void BM_DenseBwd(benchmark::State& state) {
  const int64_t T = state.range(0), D = 128, H = 16;
  const nsa_dtype dt = NSA_DTYPE_F32;
  Buf q(dt, {1, T, H, D}, 1), k(dt, {1, T, 1, D}, 2), v(dt, {1, T, 1, D}, 3);
  Buf o(dt, {1, T, H, D}, 4, 0, 0), lse(NSA_DTYPE_F32, {1, T, H}, 5, 0, 0);
  Buf d_o(dt, {1, T, H, D}, 6), dq(dt, {1, T, H, D}, 7, 0, 0);
  Buf dk(dt, {1, T, 1, D}, 8, 0, 0), dv(dt, {1, T, 1, D}, 9, 0, 0);
  nsa_context* ctx = make_context(false);
  nsa_dense_fwd_params fp;  // the forward's o and lse, as a training step saves them
  nsa_dense_fwd_params_init(&fp);
  fp.q = q.t, fp.k = k.t, fp.v = v.t, fp.o = o.t, fp.lse = lse.t;
  if (nsa_dense_fwd(ctx, &fp) != NSA_OK) state.SkipWithError(nsa_last_error(ctx));
  nsa_dense_bwd_params bp;
  nsa_dense_bwd_params_init(&bp);
  bp.q = q.t, bp.k = k.t, bp.v = v.t, bp.o = o.t, bp.lse = lse.t, bp.d_o = d_o.t;
  bp.dq = dq.t, bp.dk = dk.t, bp.dv = dv.t;
  for (auto _ : state) {
    if (nsa_dense_bwd(ctx, &bp) != NSA_OK) state.SkipWithError(nsa_last_error(ctx));
  }
  nsa_context_destroy(ctx);
  report_flops(state, 2.5 * 4.0 * double(H) * double(T) * double(T) * double(D) / 2);
}
BENCHMARK(BM_DenseBwd)
    ->Arg(4096)
    ->Arg(8192)
    ->ArgName("T")
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
// The backward of one forward: inputs, the forward's selection and LSEs, d_o and the gradients.
void BM_NsaBwd(benchmark::State& state) {
  Fwd f({state.range(0)}, NSA_DTYPE_F32);
  const Shape& s = f.s;
  const int64_t Tc = nsa_cmp_len(&f.cfg, s.T);
  Buf lse_c(NSA_DTYPE_F32, {1, s.T, s.Hq}, 9, 0, 0), lse_s(NSA_DTYPE_F32, {1, s.T, s.Hq}, 9, 0, 0),
      lse_w(NSA_DTYPE_F32, {1, s.T, s.Hq}, 9, 0, 0);
  Buf o_c(NSA_DTYPE_F32, {1, s.T, s.Hq, s.Dv}, 9, 0, 0),
      o_s(NSA_DTYPE_F32, {1, s.T, s.Hq, s.Dv}, 9, 0, 0),
      o_w(NSA_DTYPE_F32, {1, s.T, s.Hq, s.Dv}, 9, 0, 0);
  f.p.slc_indices_out = f.idx.t;
  f.p.lse_cmp = lse_c.t, f.p.lse_slc = lse_s.t, f.p.lse_win = lse_w.t;
  f.p.o_cmp = o_c.t, f.p.o_slc = o_s.t, f.p.o_win = o_w.t;
  nsa_context* ctx = make_context(false);
  if (nsa_fwd(ctx, &f.p) != NSA_OK) state.SkipWithError(nsa_last_error(ctx));
  Buf d_o(NSA_DTYPE_F32, {1, s.T, s.Hq, s.Dv}, 10);
  Buf dq(NSA_DTYPE_F32, {1, s.T, s.Hq, s.Dk}, 11, 0, 0),
      dk(NSA_DTYPE_F32, {1, s.T, s.Hkv, s.Dk}, 11, 0, 0),
      dv(NSA_DTYPE_F32, {1, s.T, s.Hkv, s.Dv}, 11, 0, 0),
      dkc(NSA_DTYPE_F32, {1, Tc, s.Hkv, s.Dk}, 11, 0, 0),
      dvc(NSA_DTYPE_F32, {1, Tc, s.Hkv, s.Dv}, 11, 0, 0),
      dg1(NSA_DTYPE_F32, {1, s.T, s.Hq}, 11, 0, 0), dg2(NSA_DTYPE_F32, {1, s.T, s.Hq}, 11, 0, 0),
      dg3(NSA_DTYPE_F32, {1, s.T, s.Hq}, 11, 0, 0);
  nsa_bwd_params b;
  nsa_bwd_params_init(&b);
  b.in.q = f.p.in.q, b.in.k = f.p.in.k, b.in.v = f.p.in.v, b.in.k_cmp = f.p.in.k_cmp,
  b.in.v_cmp = f.p.in.v_cmp;
  b.in.g_cmp = b.in.g_slc = b.in.g_win = f.p.in.g_cmp;
  b.slc_indices = f.idx.t, b.lse_cmp = lse_c.t, b.lse_slc = lse_s.t, b.lse_win = lse_w.t;
  b.o_cmp = o_c.t, b.o_slc = o_s.t, b.o_win = o_w.t;
  b.d_o = d_o.t, b.dq = dq.t, b.dk = dk.t, b.dv = dv.t, b.dk_cmp = dkc.t, b.dv_cmp = dvc.t;
  b.dg_cmp = dg1.t, b.dg_slc = dg2.t, b.dg_win = dg3.t;
  for (auto _ : state) {
    if (nsa_bwd(ctx, &b) != NSA_OK) state.SkipWithError(nsa_last_error(ctx));
  }
  nsa_context_destroy(ctx);
  // FlashAttention's count for a backward: attended pairs x 2 (3 Dk + 2 Dv) per head.
  report_flops(state, 2.0 * double(3 * s.Dk + 2 * s.Dv) * double(s.Hq) * f.attended());
}
BENCHMARK(BM_NsaBwd)
    ->Arg(4096)
    ->Arg(8192)
    ->ArgName("T")
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->Iterations(1);

// A few-millisecond case of each, for the test suite's smoke run (the benchmarks must not rot).
void BM_Smoke(benchmark::State& state) {
  Fwd f({300}, NSA_DTYPE_BF16);
  run_forward(state, f, true);
}
BENCHMARK(BM_Smoke)->Unit(benchmark::kMillisecond)->UseRealTime();

}  // namespace

BENCHMARK_MAIN();
