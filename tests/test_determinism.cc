// Determinism: the same inputs give bitwise-identical outputs (o, the per-branch outputs, the
// three LSEs, the selected indices; the compressed tokens of nsa_compress) across repeated runs
// and across 1, 2 and 3 threads, on the reference and the CPU backend, f32 and bf16, fixed-length
// and packed batches, GQA group sizes 1, 3 and 16. Every run gets a fresh copy of the case built
// from one seed, with padded NaN-filled views, so the whole buffers (padding included) must match.
#include <gtest/gtest.h>

#include <cmath>
#include <sstream>

#include "test_util.h"

namespace {
using namespace nsa_test;

constexpr int kThreads[] = {1, 1, 2, 3};  // 1 twice: a repeated run on one thread

std::vector<nsa_backend> backends() {
  std::vector<nsa_backend> b = {NSA_BACKEND_REF};
  if (nsa_backend_available(NSA_BACKEND_CPU)) b.push_back(NSA_BACKEND_CPU);
  return b;
}

nsa_context* make_ctx(nsa_backend backend, int threads) {
  nsa_context* ctx = nullptr;
  EXPECT_EQ(nsa_context_create(&ctx), NSA_OK);
  EXPECT_EQ(nsa_context_set_backend(ctx, backend), NSA_OK);
  EXPECT_EQ(nsa_context_set_num_threads(ctx, threads), NSA_OK);
  EXPECT_EQ(nsa_context_num_threads(ctx), threads);
  return ctx;
}

struct FwdSetup {
  Shape s;
  nsa_config cfg;
  std::vector<int32_t> cu;
  bool own_branch_kv = false;  // k_slc/v_slc and k_win/v_win as separate tensors
  nsa_dtype out_dt = NSA_DTYPE_F32;
};

// Runs one forward on a fresh case from `seed`; returns every output buffer, padding included.
std::vector<std::vector<unsigned char>> fwd_outputs(const FwdSetup& f, nsa_dtype dt, uint64_t seed,
                                                    nsa_backend backend, int threads) {
  FwdCase c = make_case(f.s, f.cfg, dt, seed, true, f.cu, f.out_dt);
  nsa_fwd_params p = c.params();
  std::mt19937_64 rng(seed + 1);
  Tensor ks(dt, {f.s.B, f.s.T, f.s.Hkv, f.s.Dk}, true),
      vs(dt, {f.s.B, f.s.T, f.s.Hkv, f.s.Dv}, true);
  Tensor kw(dt, {f.s.B, f.s.T, f.s.Hkv, f.s.Dk}, true),
      vw(dt, {f.s.B, f.s.T, f.s.Hkv, f.s.Dv}, true);
  if (f.own_branch_kv) {
    for (Tensor* t : {&ks, &kw}) t->fill_uniform(rng, -2.0, 2.0);
    for (Tensor* t : {&vs, &vw}) t->fill_uniform(rng, -1.0, 1.0);
    p.in.k_slc = ks.desc(), p.in.v_slc = vs.desc(), p.in.k_win = kw.desc(), p.in.v_win = vw.desc();
  }
  nsa_context* ctx = make_ctx(backend, threads);
  const nsa_status st = nsa_fwd(ctx, &p);
  EXPECT_EQ(st, NSA_OK) << nsa_last_error(ctx);
  nsa_context_destroy(ctx);
  std::vector<std::vector<unsigned char>> out;
  for (const Tensor* t :
       {&c.o, &c.o_cmp, &c.o_slc, &c.o_win, &c.lse_cmp, &c.lse_slc, &c.lse_win, &c.idx_out}) {
    out.push_back(t->storage());
  }
  // Not vacuous: o was written (its first element is no longer the NaN it was filled with).
  EXPECT_FALSE(std::isnan(c.o.at({0, 0, 0, 0}))) << "o[0, 0, 0, 0] not written";
  return out;
}

void expect_fwd_deterministic(const FwdSetup& f, uint64_t seed) {
  static const char* names[] = {"o",       "o_cmp",   "o_slc",   "o_win",
                                "lse_cmp", "lse_slc", "lse_win", "slc_indices_out"};
  for (nsa_backend backend : backends()) {
    for (nsa_dtype dt : {NSA_DTYPE_F32, NSA_DTYPE_BF16}) {
      std::ostringstream os;
      os << nsa_backend_name(backend) << " " << nsa_dtype_name(dt) << " B=" << f.s.B
         << " T=" << f.s.T << " Hq=" << f.s.Hq << " Hkv=" << f.s.Hkv
         << (f.cu.empty() ? "" : " varlen") << (f.own_branch_kv ? " own branch K/V" : "");
      SCOPED_TRACE(os.str());
      std::vector<std::vector<unsigned char>> first;
      for (int threads : kThreads) {
        const auto got = fwd_outputs(f, dt, seed, backend, threads);
        if (first.empty()) {
          first = got;
          continue;
        }
        for (size_t i = 0; i < got.size(); ++i) {
          EXPECT_TRUE(got[i] == first[i])
              << names[i] << " differs between 1 and " << threads << " threads";
        }
      }
    }
  }
}

// l = 16, d = 8, l' = 32, n = 4, w = 64: at T = 300 there are up to 10 blocks, so top-n binds
// (the score ranking is exercised), and every branch has work.
nsa_config small_cfg() { return config(16, 8, 32, 4, 1, 2, 64); }

Shape shape(int64_t B, int64_t T, int64_t Hq, int64_t Hkv) {
  Shape s;
  s.B = B, s.T = T, s.Hq = Hq, s.Hkv = Hkv, s.Dk = 24, s.Dv = 16;
  return s;
}

TEST(Determinism, FwdGroupSizes) {
  expect_fwd_deterministic({shape(2, 300, 2, 2), small_cfg(), {}}, 101);   // G = 1
  expect_fwd_deterministic({shape(2, 300, 6, 2), small_cfg(), {}}, 102);   // G = 3
  expect_fwd_deterministic({shape(1, 300, 16, 1), small_cfg(), {}}, 103);  // G = 16
}

TEST(Determinism, FwdVarlen) {
  // Lengths 7, 143, 0, 150: positions restart in every sequence; one sequence is empty.
  const std::vector<int32_t> cu = {0, 7, 150, 150, 300};
  expect_fwd_deterministic({shape(1, 300, 3, 1), small_cfg(), cu}, 104);
  expect_fwd_deterministic({shape(1, 300, 16, 1), small_cfg(), cu}, 105);
}

TEST(Determinism, FwdOwnBranchKvAndBf16Outputs) {
  expect_fwd_deterministic({shape(2, 200, 6, 2), small_cfg(), {}, true, NSA_DTYPE_BF16}, 106);
}

TEST(Determinism, FwdFewerItemsThanThreads) {
  // T = 2 with one KV head: fewer work items than threads.
  expect_fwd_deterministic({shape(1, 2, 3, 1), small_cfg(), {}}, 107);
}

TEST(Determinism, FwdPaperDefaults) {
  nsa_config def;
  nsa_config_default(&def);
  Shape s = shape(1, 1100, 2, 1);  // J = 17: the top 16 of 18 blocks
  s.Dk = s.Dv = 8;                 // small head dims keep the float64 reference quick
  expect_fwd_deterministic({s, def, {}}, 108);
}

// ---- nsa_compress ----

// One compression on a fresh case from `seed`; returns out's buffer, padding included.
std::vector<unsigned char> cmp_output(nsa_cmp_kind kind, nsa_dtype dt,
                                      const std::vector<int32_t>& cu, int64_t B, int64_t T,
                                      uint64_t seed, nsa_backend backend, int threads) {
  const int64_t H = 2, D = 12, Dh = 20;
  const nsa_config cfg = config(32, 16, 64, 4, 1, 2, 100);
  const int64_t l = cfg.cmp_block, Tc = cmp_rows(cfg, T, cu);
  std::mt19937_64 rng(seed);
  Tensor x(dt, {B, T, H, D}, true), pos(dt, {H, l, D}, true), w1(dt, {H, Dh, l * D}, true),
      b1(dt, {H, Dh}, true), w2(dt, {H, D, Dh}, true), b2(dt, {H, D}, true),
      out(NSA_DTYPE_F32, {B, Tc, H, D}, true);
  x.fill_uniform(rng, -1.0, 1.0);
  // Weights scaled by 1/sqrt(fan-in), so every layer stays O(1).
  const double a1 = 1.0 / std::sqrt(double(l * D)), a2 = 1.0 / std::sqrt(double(Dh));
  pos.fill_uniform(rng, -0.5, 0.5), w1.fill_uniform(rng, -a1, a1), b1.fill_uniform(rng, -0.5, 0.5);
  w2.fill_uniform(rng, -a2, a2), b2.fill_uniform(rng, -0.5, 0.5);
  nsa_compress_params p;
  nsa_compress_params_init(&p);
  p.cfg = cfg, p.kind = kind, p.x = x.desc(), p.out = out.desc();
  if (kind == NSA_CMP_MLP) {
    p.pos = pos.desc(), p.w1 = w1.desc(), p.b1 = b1.desc(), p.w2 = w2.desc(), p.b2 = b2.desc();
  }
  if (!cu.empty()) p.cu_seqlens = cu.data(), p.num_seqs = static_cast<int64_t>(cu.size()) - 1;
  nsa_context* ctx = make_ctx(backend, threads);
  EXPECT_EQ(nsa_compress(ctx, &p), NSA_OK) << nsa_last_error(ctx);
  nsa_context_destroy(ctx);
  EXPECT_FALSE(std::isnan(out.at({0, 0, 0, 0}))) << "out[0, 0, 0, 0] not written";
  return out.storage();
}

TEST(Determinism, Compress) {
  struct Batch {
    int64_t B, T;
    std::vector<int32_t> cu;
  };
  // Fixed-length B = 2; packed lengths 40, 0, 31 (Tc = 0), 629.
  for (const Batch& bt : {Batch{2, 500, {}}, Batch{1, 700, {0, 40, 40, 71, 700}}}) {
    for (nsa_cmp_kind kind : {NSA_CMP_MEAN, NSA_CMP_MLP}) {
      for (nsa_dtype dt : {NSA_DTYPE_F32, NSA_DTYPE_BF16}) {
        for (nsa_backend backend : backends()) {
          SCOPED_TRACE(std::string(nsa_backend_name(backend)) +
                       (kind == NSA_CMP_MLP ? " mlp " : " mean ") + nsa_dtype_name(dt) +
                       (bt.cu.empty() ? "" : " varlen"));
          const auto first = cmp_output(kind, dt, bt.cu, bt.B, bt.T, 201, backend, 1);
          for (int threads : {1, 2, 3}) {
            EXPECT_TRUE(cmp_output(kind, dt, bt.cu, bt.B, bt.T, 201, backend, threads) == first)
                << "out differs between 1 and " << threads << " threads";
          }
        }
      }
    }
  }
}

}  // namespace
