// example_cpp.cc: Native Sparse Attention from C++ (nsa.hpp). A small random case: compress keys
// and values with the mean compressor, run the forward pass, print a few outputs. Errors arrive
// as nsa::Error; the program exits nonzero on any failure.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "nsa/nsa.hpp"

int main() {
  // Batch, tokens, query heads, KV heads (one GQA group of 4), key and value head dims.
  constexpr int64_t B = 1, T = 256, Hq = 4, Hkv = 1, Dk = 64, Dv = 32;
  try {
    nsa::Context ctx;                              // backend AUTO: the fastest available
    const nsa_config cfg = nsa::default_config();  // the paper's l=32, d=16, l'=64, n=16, w=512
    const int64_t Tc = nsa_cmp_len(&cfg, T);       // compressed tokens: 15

    std::mt19937 rng(42);  // fixed seed: every run prints the same numbers
    auto random = [&](int64_t n, float lo, float hi) {
      std::uniform_real_distribution<float> dist(lo, hi);
      std::vector<float> x(static_cast<size_t>(n));
      for (float& e : x) e = dist(rng);
      return x;
    };
    std::vector<float> q = random(B * T * Hq * Dk, -1, 1), k = random(B * T * Hkv * Dk, -1, 1),
                       v = random(B * T * Hkv * Dv, -1, 1);
    std::vector<float> g_cmp = random(B * T * Hq, 0, 1), g_slc = random(B * T * Hq, 0, 1),
                       g_win = random(B * T * Hq, 0, 1);  // gate values, as a sigmoid would give
    std::vector<float> k_cmp(B * Tc * Hkv * Dk), v_cmp(B * Tc * Hkv * Dv), o(B * T * Hq * Dv);

    // Compressed keys, then values: the mean of each block of l tokens, one block every d.
    nsa_compress_params cp;
    nsa_compress_params_init(&cp);
    cp.cfg = cfg;
    cp.kind = NSA_CMP_MEAN;
    cp.x = nsa::tensor(k.data(), {B, T, Hkv, Dk});
    cp.out = nsa::tensor(k_cmp.data(), {B, Tc, Hkv, Dk});
    ctx.compress(cp);
    cp.x = nsa::tensor(v.data(), {B, T, Hkv, Dv});
    cp.out = nsa::tensor(v_cmp.data(), {B, Tc, Hkv, Dv});
    ctx.compress(cp);

    nsa_fwd_params p;
    nsa_fwd_params_init(&p);  // default config, every optional tensor absent
    p.in.q = nsa::tensor(q.data(), {B, T, Hq, Dk});
    p.in.k = nsa::tensor(k.data(), {B, T, Hkv, Dk});
    p.in.v = nsa::tensor(v.data(), {B, T, Hkv, Dv});
    p.in.k_cmp = nsa::tensor(k_cmp.data(), {B, Tc, Hkv, Dk});
    p.in.v_cmp = nsa::tensor(v_cmp.data(), {B, Tc, Hkv, Dv});
    p.in.g_cmp = nsa::tensor(g_cmp.data(), {B, T, Hq});
    p.in.g_slc = nsa::tensor(g_slc.data(), {B, T, Hq});
    p.in.g_win = nsa::tensor(g_win.data(), {B, T, Hq});
    p.o = nsa::tensor(o.data(), {B, T, Hq, Dv});
    ctx.fwd(p);

    for (float x : o) {
      if (!std::isfinite(x)) {
        std::fprintf(stderr, "non-finite output\n");
        return 1;
      }
    }
    const float* last = o.data() + (T - 1) * Hq * Dv;  // o[0, T-1, 0, :]
    std::printf("nsa %s (C++): o[0, %lld, 0, 0:4] = %.5f %.5f %.5f %.5f\n", nsa_version(),
                static_cast<long long>(T - 1), last[0], last[1], last[2], last[3]);
    return 0;
  } catch (const nsa::Error& e) {
    std::fprintf(stderr, "nsa failed: %s\n", e.what());
    return 1;
  }
}
