// Decode with a KV cache (SPEC.md section 7) of every backend under test (backend_harness.h)
// against the float64 reference forward: token by token after an optional prefill, the output at
// every position equals the forward's output for that position, with the same selected blocks.
// Shapes cross block boundaries, t = l - 1, the window edge, T shorter than a block, G in
// {1, 3, 16}, Dk != Dv, Dv not a whole vector, strided views, several sequences of one cache
// against the varlen forward, f32 and bf16 caches, mean and mlp compression. The CPU backend
// alone: batch and thread-count bitwise invariance, every Highway target.
#include <gtest/gtest.h>

#include <sstream>

#include "backend_harness.h"
#include "decode_util.h"

namespace {
using namespace nsa_test;

struct DecodeCase {
  const char* name;
  Shape shape;
  nsa_config cfg;
  nsa_dtype dtype;
  nsa_cmp_kind kind;
  int64_t prefill;      // tokens given to nsa_prefill before decoding the rest one by one
  bool padded = false;  // every tensor a strided view
};

std::vector<DecodeCase> cases() {
  nsa_config def;
  nsa_config_default(&def);
  Shape g16{1, 700, 16, 1, 64, 48};
  Shape g3{1, 300, 3, 1, 40, 24};
  Shape mha{1, 1000, 2, 2, 32, 33};
  Shape g3x2{1, 260, 6, 2, 16, 16};
  Shape tiny{1, 20, 4, 1, 16, 8};
  return {
      {"paper_config_G16_from_empty", g16, def, NSA_DTYPE_F32, NSA_CMP_MEAN, 0},
      {"small_blocks_G3_bf16_mlp", g3, config(16, 8, 32, 6, 1, 2, 48), NSA_DTYPE_BF16, NSA_CMP_MLP,
       100},
      {"top5_G1_odd_Dv", mha, config(32, 16, 64, 5, 1, 2, 512), NSA_DTYPE_F32, NSA_CMP_MEAN, 517},
      {"blocks_64_two_groups", g3x2, config(64, 64, 64, 4, 1, 2, 100), NSA_DTYPE_F32, NSA_CMP_MEAN,
       1},
      {"shorter_than_a_block", tiny, def, NSA_DTYPE_BF16, NSA_CMP_MEAN, 0},
      {"G16_bf16_mlp", Shape{1, 400, 16, 1, 32, 32}, config(32, 16, 64, 4, 1, 2, 128),
       NSA_DTYPE_BF16, NSA_CMP_MLP, 150},
      {"G3_strided_views", Shape{1, 150, 6, 2, 24, 20}, config(16, 8, 32, 4, 1, 2, 40),
       NSA_DTYPE_F32, NSA_CMP_MEAN, 40, true},
      // Past 1024 keys: on a GPU the last 200 steps take the split-key path (cuda/split.cuh).
      {"long_G4_bf16_split_keys", Shape{1, 1500, 8, 2, 32, 32}, def, NSA_DTYPE_BF16, NSA_CMP_MEAN,
       1300},
  };
}

void PrintTo(const DecodeCase& c, std::ostream* os) { *os << c.name; }

// A mean-compressed cache on backend `be`: `seqs` sequences of capacity s.T.
CachePtr mean_cache(const BackendUnderTest& be, const Context& cx, const nsa_config& cfg,
                    int64_t seqs, const Shape& s, nsa_dtype dt) {
  return make_cache(cx.ctx, cfg, seqs, s.T, s, dt, NSA_CMP_MEAN, nullptr, nullptr, *be.buffers);
}

// Decodes every position of `c` (batch row 0) on backend `be` into `got`, after a prefill of
// `prefill` tokens, then runs the oracle forward over the whole sequence, on the compressed
// tokens the cache holds, into c's outputs: the two are then compared row by row.
void decode_then_reference(const BackendUnderTest& be, FwdCase& c, FwdCase& got, nsa_cmp_kind kind,
                           MlpTensors* mlp, int64_t prefill,
                           nsa_bf16_math math = NSA_BF16_MATH_AUTO) {
  if (be.cache_cmp == nullptr) GTEST_SKIP() << be.name << " has no KV cache";
  const Shape& s = c.shape;
  Context cx(0, be.id, math);
  CachePtr cache = make_cache(cx.ctx, c.cfg, 1, s.T, s, c.dtype, kind, mlp, nullptr, *be.buffers);
  ASSERT_TRUE(cache);
  Staging st(be);
  const DecodeTensors x = DecodeTensors::staged(st, c, got);
  if (prefill > 0) {
    const nsa_prefill_params p = prefill_rows(x, prefill);
    ASSERT_EQ(nsa_prefill(cx.ctx, cache.get(), &p), NSA_OK) << cx.error();
    ASSERT_EQ(nsa_kv_cache_len(cache.get(), 0), prefill);
  }
  for (int64_t t = prefill; t < s.T; ++t) {
    const nsa_decode_params p = decode_row(x, t, /*append=*/true);
    ASSERT_EQ(nsa_decode(cx.ctx, cache.get(), &p), NSA_OK) << "t=" << t << ": " << cx.error();
  }
  ASSERT_EQ(nsa_kv_cache_len(cache.get(), 0), s.T);
  st.download_outputs();
  be.cache_cmp(*cache, 0, 0, 0, c.k_cmp, c.v_cmp);
  std::string msg;
  ASSERT_EQ(run_on(oracle(), c.params(), 0, &msg), NSA_OK) << msg;
}

// Selected blocks are integers: equal (random scores; a seed with a near-tie would be replaced,
// not tolerated).
void expect_same_selection(const FwdCase& got, const FwdCase& want) {
  int64_t diff = 0;
  got.idx_out.for_each([&](int64_t a, int64_t b, int64_t x, int64_t y) {
    diff += got.idx_out.at_i32({a, b, x, y}) != want.idx_out.at_i32({a, b, x, y});
  });
  EXPECT_EQ(diff, 0) << "selected blocks differ from the reference forward";
}

// bf16 arithmetic's share of o's tolerance: a bf16 cache with bf16 queries takes it under `math`
// (AUTO: where the CPU has it). Each softmax weight rounded to bf16 for P V moves a branch's
// output by at most 2^-8 max|v|, and o, three gated branches, by three times that
// (test_cpu_vs_ref.cc, CpuFwdBf16Math).
double bf16_math_tol(const FwdCase& c, nsa_bf16_math math = NSA_BF16_MATH_AUTO) {
  if (math == NSA_BF16_MATH_AUTO) math = nsa_bf16_math_auto();
  if (c.dtype != NSA_DTYPE_BF16 || math == NSA_BF16_MATH_F32) return 0.0;
  return 3.0 / 256 * std::max(max_abs(c.v), max_abs(c.v_cmp));
}

// Decode's outputs against the oracle's, for every position: `tol` as the caller derives it.
void expect_decode_matches(const FwdCase& got, const FwdCase& c, double tol,
                           nsa_bf16_math math = NSA_BF16_MATH_AUTO) {
  const int64_t T = c.shape.T;
  std::string first;
  EXPECT_EQ(count_off(got.o, c.o, 0, T, tol + bf16_math_tol(c, math), 0.0, &first), 0)
      << "o: " << first;
  for (auto [name, a, b] : {std::tuple{"lse_cmp", &got.lse_cmp, &c.lse_cmp},
                            std::tuple{"lse_slc", &got.lse_slc, &c.lse_slc},
                            std::tuple{"lse_win", &got.lse_win, &c.lse_win}}) {
    // lse = max s + log(sum): the sum's relative error on a value of size |lse|.
    EXPECT_EQ(count_off(*a, *b, 0, T, tol, tol, &first), 0) << name << ": " << first;
  }
  expect_same_selection(got, c);
}

// As compare_fwd (test_cpu_vs_ref.cc): K terms per f32 sum (a Dk dot, then up to
// max(n l', w) weighted values, or Tc compressed ones), 2^-24 each, x16 for |s| up to ~16.
double decode_tol(const Shape& s, const nsa_config& cfg) {
  const int64_t keys = std::min<int64_t>(
      s.T, std::max<int64_t>({int64_t{cfg.slc_count} * cfg.slc_block, cfg.window}));
  return 16.0 * static_cast<double>(s.Dk + keys) * kF32Eps;
}

// Decodes case dc position by position on `be` with bf16 arithmetic `math`, checks every output
// against the reference and returns decode's outputs.
FwdCase run_decode_case(const BackendUnderTest& be, const DecodeCase& dc,
                        nsa_bf16_math math = NSA_BF16_MATH_AUTO) {
  const Shape& s = dc.shape;
  FwdCase c = make_case(s, dc.cfg, dc.dtype, 1234 + s.T, dc.padded);
  FwdCase got = make_case(s, dc.cfg, dc.dtype, 1234 + s.T, dc.padded);  // output holder
  std::mt19937_64 rng(99);
  MlpTensors mlp;
  if (dc.kind == NSA_CMP_MLP) {
    make_mlps(&mlp, s, dc.cfg.cmp_block, 24, dc.dtype, rng);
  }
  decode_then_reference(be, c, got, dc.kind, &mlp, dc.prefill, math);
  if (::testing::Test::HasFatalFailure() || ::testing::Test::IsSkipped()) return got;
  expect_decode_matches(got, c, decode_tol(s, dc.cfg), math);
  return got;
}

class DecodeVsForward : public ::testing::TestWithParam<std::tuple<BackendUnderTest, DecodeCase>> {
};

TEST_P(DecodeVsForward, EveryPositionMatchesTheReference) {
  run_decode_case(std::get<0>(GetParam()), std::get<1>(GetParam()));
}

INSTANTIATE_TEST_SUITE_P(Shapes, DecodeVsForward,
                         ::testing::Combine(::testing::ValuesIn(backends_under_test(kOpDecode)),
                                            ::testing::ValuesIn(cases())),
                         [](const auto& info) {
                           return std::string(std::get<0>(info.param).name) + "_" +
                                  std::get<1>(info.param).name;
                         });

// bf16 arithmetic in decode (nsa_bf16_math; a bf16 cache and bf16 queries), CPU only: every
// variant this CPU runs against the reference (bf16_math_tol), the emulation equal to the
// instruction bit for bit, and the path taken (its bits differ from F32). G = 16 (one block of
// 16 rows), 12 (blocks of 8 and 4) and 3 (rows padded to 4); odd Dk, Dv off the vector, a
// prefill, mean and mlp compression.
TEST(CpuDecodeBf16Math, MatchesReferenceAndEmulation) {
  const std::vector<nsa_bf16_math> maths = runnable_bf16_maths();
  if (maths.empty()) GTEST_SKIP() << "no bf16 arithmetic variant runs on this CPU (no AVX-512)";
  const BackendUnderTest cpu = backend(NSA_BACKEND_CPU);
  const DecodeCase dcs[] = {{"G16_mean", Shape{1, 300, 16, 1, 24, 20},
                             config(16, 8, 32, 4, 1, 1, 40), NSA_DTYPE_BF16, NSA_CMP_MEAN, 100},
                            {"G12_mlp", Shape{1, 150, 24, 2, 17, 33},
                             config(16, 8, 16, 3, 1, 1, 24), NSA_DTYPE_BF16, NSA_CMP_MLP, 0},
                            {"G3_mean", Shape{1, 130, 3, 1, 40, 24}, config(16, 8, 16, 3, 1, 1, 24),
                             NSA_DTYPE_BF16, NSA_CMP_MEAN, 20}};
  for (const DecodeCase& dc : dcs) {
    SCOPED_TRACE(dc.name);
    const FwdCase f32 = run_decode_case(cpu, dc, NSA_BF16_MATH_F32);
    std::vector<FwdCase> got;
    for (nsa_bf16_math m : maths) {
      got.push_back(run_decode_case(cpu, dc, m));
      EXPECT_FALSE(got.back().o.storage() == f32.o.storage()) << "math " << m << " ran as F32";
    }
    if (got.size() == 2) {
      EXPECT_TRUE(got[0].o.storage() == got[1].o.storage()) << "NATIVE and EMULATED differ";
      EXPECT_TRUE(got[0].lse_cmp.storage() == got[1].lse_cmp.storage());
    }
  }
}

// Decode is a CPU kernel dispatched to the best Highway target; every target this machine runs
// must give the reference's outputs too: a short run per target (G = 3 bf16 mlp with a prefill,
// G = 16 from empty). CPU only: targets are a CPU notion.
TEST(CpuDecode, EveryTargetMatchesReference) {
  const BackendUnderTest cpu = backend(NSA_BACKEND_CPU);
  const DecodeCase short_cases[2] = {
      {"G3_bf16_mlp", Shape{1, 60, 3, 1, 40, 24}, config(16, 8, 16, 3, 1, 1, 24), NSA_DTYPE_BF16,
       NSA_CMP_MLP, 20},
      {"G16_f32_mean", Shape{1, 50, 16, 1, 24, 20}, config(8, 4, 16, 3, 1, 1, 20), NSA_DTYPE_F32,
       NSA_CMP_MEAN, 0, true}};
  for_each_hwy_target([&] {
    for (const DecodeCase& dc : short_cases) {
      SCOPED_TRACE(dc.name);
      run_decode_case(cpu, dc);
    }
  });
}

class DecodeOnBackend : public ::testing::TestWithParam<BackendUnderTest> {
 protected:
  void SetUp() override {
    if (GetParam().cache_cmp == nullptr) GTEST_SKIP() << GetParam().name << " has no KV cache";
  }
};
INSTANTIATE_TEST_SUITE_P(Backends, DecodeOnBackend,
                         ::testing::ValuesIn(backends_under_test(kOpDecode)), backend_test_name);

// Incremental compression computes each compressed token once, from the cached rows: it must
// equal the whole-sequence compression (nsa_compress, float64 reference).
TEST_P(DecodeOnBackend, IncrementalCompressionEqualsCompress) {
  const BackendUnderTest& be = GetParam();
  for (nsa_cmp_kind kind : {NSA_CMP_MEAN, NSA_CMP_MLP}) {
    SCOPED_TRACE(kind == NSA_CMP_MEAN ? "mean" : "mlp");
    const Shape s{1, 203, 2, 2, 24, 40};
    const nsa_config cfg = config(16, 8, 32, 4, 1, 2, 64);
    FwdCase c = make_case(s, cfg, NSA_DTYPE_F32, 77);
    std::mt19937_64 rng(5);
    MlpTensors mlp;
    make_mlps(&mlp, s, cfg.cmp_block, 16, NSA_DTYPE_F32, rng);
    Context cx(0, be.id);
    CachePtr cache =
        make_cache(cx.ctx, cfg, 1, s.T, s, NSA_DTYPE_F32, kind, &mlp, nullptr, *be.buffers);
    Staging st(be);
    const nsa_tensor dk = st.in(c.k.desc()), dv = st.in(c.v.desc());
    // Three appends of uneven size: compressed tokens complete inside and across them.
    for (auto [t0, n] : {std::pair{0, 7}, std::pair{7, 150}, std::pair{157, 46}}) {
      nsa_tensor k = rows(dk, t0, n), v = rows(dv, t0, n);
      ASSERT_EQ(nsa_kv_cache_append(cx.ctx, cache.get(), 0, &k, &v), NSA_OK) << cx.error();
    }
    be.cache_cmp(*cache, 0, 0, 0, c.k_cmp, c.v_cmp);
    const int64_t Tc = nsa_cmp_len(&cfg, s.T);
    ASSERT_EQ(cache->cmp_len(0), Tc);
    nsa_context* ref = nullptr;
    nsa_context_create(&ref);
    nsa_context_set_backend(ref, NSA_BACKEND_REF);
    for (int kv = 0; kv < 2; ++kv) {
      const int64_t D = kv == 0 ? s.Dk : s.Dv;
      Tensor want(NSA_DTYPE_F32, {1, Tc, s.Hkv, D});
      nsa_compress_params p;
      nsa_compress_params_init(&p);
      p.cfg = cfg;
      p.kind = kind;
      p.x = kv == 0 ? c.k.desc() : c.v.desc();
      Tensor* m = kv == 0 ? mlp.k : mlp.v;
      p.pos = m[0].desc();
      p.w1 = m[1].desc();
      p.b1 = m[2].desc();
      p.w2 = m[3].desc();
      p.b2 = m[4].desc();
      p.out = want.desc();
      ASSERT_EQ(nsa_compress(ref, &p), NSA_OK) << nsa_last_error(ref);
      // mean: l terms of O(1) summed in f32 (l 2^-24). mlp: l*D + Dh terms, outputs O(1).
      const double tol = (kind == NSA_CMP_MEAN ? 16.0 : 4.0 * (16 * D + 16)) * kF32Eps * 4;
      std::string first;
      EXPECT_EQ(count_off(kv == 0 ? c.k_cmp : c.v_cmp, want, 0, Tc, tol, tol, &first), 0)
          << (kv == 0 ? "k_cmp: " : "v_cmp: ") << first;
    }
    nsa_context_destroy(ref);
  }
}

// A batch of sequences at different lengths in one call gives, bit for bit, what each sequence
// gives alone (chunks, not the batch, fix the arithmetic), in any order of seq_ids. CPU only:
// bitwise batch invariance is a property of the CPU kernels, not a promise of nsa.h (every
// backend's batched decode is checked against the reference by SequencesMatchVarlenForward).
TEST(Decode, BatchedEqualsPerSequence) {
  const Shape s{1, 700, 8, 2, 32, 24};
  const nsa_config cfg = config(32, 16, 64, 4, 1, 2, 128);
  const int64_t lens[3] = {300, 1, 517};
  FwdCase c = make_case(s, cfg, NSA_DTYPE_BF16, 4321);
  Context cx;
  CachePtr batched = make_cache(cx.ctx, cfg, 3, 600, s, NSA_DTYPE_BF16, NSA_CMP_MEAN);
  CachePtr single = make_cache(cx.ctx, cfg, 3, 600, s, NSA_DTYPE_BF16, NSA_CMP_MEAN);
  for (int64_t q = 0; q < 3; ++q) {
    nsa_tensor k = rows(c.k, 0, lens[q]), v = rows(c.v, 0, lens[q]);
    for (nsa_kv_cache* cache : {batched.get(), single.get()}) {
      ASSERT_EQ(nsa_kv_cache_append(cx.ctx, cache, q, &k, &v), NSA_OK) << cx.error();
    }
  }
  // Batched: rows 0, 1, 2 of q/k/v/gates go to sequences 2, 0, 1.
  const int32_t ids[3] = {2, 0, 1};
  FwdCase out_b = make_case(s, cfg, NSA_DTYPE_BF16, 1),
          out_s = make_case(s, cfg, NSA_DTYPE_BF16, 1);
  nsa_decode_params p = decode_row(c, out_b, 600, /*append=*/true);
  for (nsa_tensor* t : {&p.q, &p.k, &p.v, &p.g_cmp, &p.g_slc, &p.g_win, &p.o, &p.lse_cmp,
                        &p.lse_slc, &p.lse_win, &p.slc_indices_out}) {
    t->shape[0] = 3;
  }
  p.seq_ids = ids;
  ASSERT_EQ(nsa_decode(cx.ctx, batched.get(), &p), NSA_OK) << cx.error();
  for (int64_t r = 0; r < 3; ++r) {
    nsa_decode_params one = decode_row(c, out_s, 600 + r, /*append=*/true);
    one.seq_ids = &ids[r];
    ASSERT_EQ(nsa_decode(cx.ctx, single.get(), &one), NSA_OK) << cx.error();
    EXPECT_EQ(nsa_kv_cache_len(single.get(), ids[r]), lens[ids[r]] + 1);
  }
  for (auto ab :
       {std::pair{&out_b.o, &out_s.o}, std::pair{&out_b.lse_cmp, &out_s.lse_cmp},
        std::pair{&out_b.lse_slc, &out_s.lse_slc}, std::pair{&out_b.lse_win, &out_s.lse_win}}) {
    Tensor *a = ab.first, *b = ab.second;  // not a binding: clang < 16 cannot capture one
    int64_t diff = 0;
    a->for_each([&](int64_t i0, int64_t i1, int64_t i2, int64_t i3) {
      if (i1 < 600 || i1 >= 603) return;
      const int64_t off = a->logical_offset(i0, i1, i2, i3);
      diff += a->get_raw(off) != b->get_raw(off);
    });
    EXPECT_EQ(diff, 0);
  }
  int64_t diff = 0;
  out_b.idx_out.for_each([&](int64_t a, int64_t b, int64_t x, int64_t y) {
    if (b >= 600 && b < 603)
      diff += out_b.idx_out.at_i32({a, b, x, y}) != out_s.idx_out.at_i32({a, b, x, y});
  });
  EXPECT_EQ(diff, 0);
}

// The keys are split into fixed chunks merged in a fixed order: 1, 2 and 3 threads give the same
// bits, for NSA and for the dense baseline. CPU only: the thread count is the CPU's notion.
TEST(Decode, ThreadCountDoesNotChangeBits) {
  const Shape s{1, 3000, 16, 1, 64, 64};
  nsa_config cfg;
  nsa_config_default(&cfg);
  FwdCase c = make_case(s, cfg, NSA_DTYPE_F32, 31);
  Context cx;
  CachePtr cache = make_cache(cx.ctx, cfg, 1, s.T, s, NSA_DTYPE_F32, NSA_CMP_MEAN);
  nsa_tensor k = rows(c.k, 0, s.T), v = rows(c.v, 0, s.T);
  ASSERT_EQ(nsa_kv_cache_append(cx.ctx, cache.get(), 0, &k, &v), NSA_OK) << cx.error();
  std::vector<std::vector<float>> outs;
  for (int threads : {1, 2, 3}) {
    Context ct(threads);
    FwdCase out = make_case(s, cfg, NSA_DTYPE_F32, 1);
    nsa_decode_params p = decode_row(c, out, s.T - 1, /*append=*/false);
    ASSERT_EQ(nsa_decode(ct.ctx, cache.get(), &p), NSA_OK) << ct.error();
    nsa_dense_decode_params d;
    nsa_dense_decode_params_init(&d);
    d.q = p.q;
    d.o = rows(out.o_cmp, s.T - 1, 1);
    ASSERT_EQ(nsa_dense_decode(ct.ctx, cache.get(), &d), NSA_OK) << ct.error();
    std::vector<float> bits;
    for (int64_t h = 0; h < s.Hq; ++h) {
      for (int64_t x = 0; x < s.Dv; ++x) {
        bits.push_back(static_cast<float>(out.o.at({0, s.T - 1, h, x})));
        bits.push_back(static_cast<float>(out.o_cmp.at({0, s.T - 1, h, x})));
      }
    }
    outs.push_back(bits);
  }
  EXPECT_EQ(outs[0], outs[1]);
  EXPECT_EQ(outs[0], outs[2]);
}

// The dense baseline over the cache equals the float64 dense forward at the last position, over
// every cached token and over a window.
TEST_P(DecodeOnBackend, DenseDecodeMatchesReferenceDenseForward) {
  const BackendUnderTest& be = GetParam();
  for (nsa_dtype dt : {NSA_DTYPE_F32, NSA_DTYPE_BF16}) {
    for (int32_t window : {0, 100}) {
      SCOPED_TRACE(std::string(nsa_dtype_name(dt)) + " window " + std::to_string(window));
      const Shape s{1, 1100, 6, 2, 40, 20};
      nsa_config cfg;
      nsa_config_default(&cfg);
      FwdCase c = make_case(s, cfg, dt, 8 + window);
      Context cx(0, be.id);
      CachePtr cache = mean_cache(be, cx, cfg, 1, s, dt);
      Staging st(be);
      const nsa_tensor q = st.in(c.q.desc()), kk = st.in(c.k.desc()), vv = st.in(c.v.desc());
      nsa_tensor k = rows(kk, 0, s.T - 1), v = rows(vv, 0, s.T - 1);
      ASSERT_EQ(nsa_kv_cache_append(cx.ctx, cache.get(), 0, &k, &v), NSA_OK) << cx.error();
      nsa_dense_decode_params d;
      nsa_dense_decode_params_init(&d);
      d.q = rows(q, s.T - 1, 1);
      d.k = rows(kk, s.T - 1, 1);  // the last token arrives with its query
      d.v = rows(vv, s.T - 1, 1);
      d.window = window;
      d.o = rows(st.out(c.o_cmp.desc()), s.T - 1, 1);
      d.lse = rows(st.out(c.lse_cmp.desc()), s.T - 1, 1);
      ASSERT_EQ(nsa_dense_decode(cx.ctx, cache.get(), &d), NSA_OK) << cx.error();
      st.download_outputs();

      nsa_dense_fwd_params r;
      nsa_dense_fwd_params_init(&r);
      r.q = c.q.desc();
      r.k = c.k.desc();
      r.v = c.v.desc();
      r.window = window;
      r.o = c.o.desc();
      r.lse = c.lse_slc.desc();
      std::string msg;
      ASSERT_EQ(run_on(oracle(), r, 0, &msg), NSA_OK) << msg;
      // Dk-term dots and up to T weighted values per f32 sum, x16 for |s| up to ~16.
      const double tol = 16.0 * double(s.Dk + s.T) * kF32Eps;
      std::string first;
      EXPECT_EQ(count_off(c.o_cmp, c.o, s.T - 1, s.T, tol, 0.0, &first), 0) << "o: " << first;
      EXPECT_EQ(count_off(c.lse_cmp, c.lse_slc, s.T - 1, s.T, tol, tol, &first), 0)
          << "lse: " << first;
    }
  }
}

}  // namespace

namespace {

// Non-finite inputs (README "Non-finite inputs"): decode puts NaN exactly where the forward puts
// it (the same rule: a NaN key poisons the branches that attend it, a NaN value the channels, a
// NaN query its row), and agrees elsewhere, on each backend against its own forward.
TEST_P(DecodeOnBackend, NonFiniteInputsFollowTheForward) {
  const BackendUnderTest& be = GetParam();
  const Shape s{1, 260, 6, 2, 24, 20};
  const nsa_config cfg = config(16, 8, 32, 4, 1, 2, 64);
  FwdCase c = make_case(s, cfg, NSA_DTYPE_F32, 555);
  FwdCase got = make_case(s, cfg, NSA_DTYPE_F32, 555);
  const double nan = std::numeric_limits<double>::quiet_NaN();
  c.k.set({0, 50, 0, 3}, nan);   // raw key: slc/win of group 0 near it, and its cmp tokens
  c.v.set({0, 120, 1, 7}, nan);  // raw value: channel 7 of group 1's branches holding it
  c.q.set({0, 150, 4, 0}, nan);  // one query row
  c.k.set({0, 200, 1, 2}, -std::numeric_limits<double>::infinity());
  Context cx(0, be.id);
  CachePtr cache = mean_cache(be, cx, cfg, 1, s, NSA_DTYPE_F32);
  Staging st(be);
  const DecodeTensors x = DecodeTensors::staged(st, c, got);
  for (int64_t t = 0; t < s.T; ++t) {
    const nsa_decode_params p = decode_row(x, t, /*append=*/true);
    ASSERT_EQ(nsa_decode(cx.ctx, cache.get(), &p), NSA_OK) << "t=" << t << ": " << cx.error();
  }
  st.download_outputs();
  be.cache_cmp(*cache, 0, 0, 0, c.k_cmp, c.v_cmp);
  std::string msg;
  ASSERT_EQ(run_on(be, c.params(), 0, &msg), NSA_OK) << msg;
  int64_t nan_mismatch = 0, nans = 0;
  for (auto ab : {std::pair{&got.o, &c.o}, std::pair{&got.lse_cmp, &c.lse_cmp},
                  std::pair{&got.lse_slc, &c.lse_slc}, std::pair{&got.lse_win, &c.lse_win}}) {
    Tensor *a = ab.first, *b = ab.second;  // not a binding: clang < 16 cannot capture one
    a->for_each([&](int64_t i0, int64_t i1, int64_t i2, int64_t i3) {
      const int64_t off = a->logical_offset(i0, i1, i2, i3);
      const bool x = std::isnan(a->get_raw(off)), y = std::isnan(b->get_raw(off));
      nan_mismatch += x != y;
      nans += y;
    });
  }
  EXPECT_EQ(nan_mismatch, 0);
  EXPECT_GT(nans, 0);  // the case does produce NaN, so the comparison means something
  // Elsewhere the two agree as f32 kernels of the same sums (the tolerance of the shape tests).
  const double tol = 16.0 * double(s.Dk + 4 * 32 + 64) * kF32Eps;
  int64_t off_by_more = 0;
  got.o.for_each([&](int64_t i0, int64_t i1, int64_t i2, int64_t i3) {
    const int64_t off = got.o.logical_offset(i0, i1, i2, i3);
    const double x = got.o.get_raw(off), y = c.o.get_raw(off);
    if (!std::isnan(y)) off_by_more += std::fabs(x - y) > tol;
  });
  EXPECT_EQ(off_by_more, 0);
  int64_t diff = 0;
  got.idx_out.for_each([&](int64_t a, int64_t b, int64_t x, int64_t y) {
    if (got.idx_out.at_i32({a, b, x, y}) != c.idx_out.at_i32({a, b, x, y}) && diff++ == 0) {
      std::printf("first selection difference: t=%lld hk=%lld k=%lld decode %d forward %d\n",
                  (long long)b, (long long)x, (long long)y, got.idx_out.at_i32({a, b, x, y}),
                  c.idx_out.at_i32({a, b, x, y}));
    }
  });
  EXPECT_EQ(diff, 0);
}

}  // namespace

namespace {

// Random shapes and configs (seeded): block sizes that do and do not divide each other, l > l',
// w = 1, n = n_init + n_local, Dk or Dv of 1, odd G, both dtypes and compressions, a prefill of
// random length. Each decoded position against the float64 forward.
TEST_P(DecodeOnBackend, RandomConfigsMatchTheReference) {
  std::mt19937_64 rng(20261127);
  auto pick = [&](int64_t lo, int64_t hi) {
    return std::uniform_int_distribution<int64_t>(lo, hi)(rng);
  };
  int ran = 0;
  for (int round = 0; round < 24; ++round) {
    const int32_t l = static_cast<int32_t>(pick(1, 40));
    const int32_t d = static_cast<int32_t>(pick(1, l));
    const int32_t lp = static_cast<int32_t>(pick(1, 70));
    const int32_t n_init = static_cast<int32_t>(pick(0, 2)),
                  n_local = static_cast<int32_t>(pick(0, 2));
    const int32_t n = static_cast<int32_t>(pick(std::max(1, n_init + n_local), 6));
    const int32_t w = static_cast<int32_t>(pick(1, 90));
    const nsa_config cfg = config(l, d, lp, n, n_init, n_local, w);
    const int64_t Hkv = pick(1, 2), G = pick(1, 17);
    const Shape s{1, pick(1, 260), Hkv * G, Hkv, pick(1, 70), pick(1, 70)};
    const nsa_dtype dt = pick(0, 1) ? NSA_DTYPE_BF16 : NSA_DTYPE_F32;
    const nsa_cmp_kind kind = pick(0, 3) == 0 ? NSA_CMP_MLP : NSA_CMP_MEAN;
    const int64_t prefill = pick(0, 1) ? pick(0, s.T) : 0;
    std::ostringstream what;
    what << "round " << round << ": T=" << s.T << " Hq=" << s.Hq << " Hkv=" << Hkv << " Dk=" << s.Dk
         << " Dv=" << s.Dv << " l=" << l << " d=" << d << " l'=" << lp << " n=" << n
         << " init=" << n_init << " local=" << n_local << " w=" << w << " " << nsa_dtype_name(dt)
         << (kind == NSA_CMP_MLP ? " mlp" : " mean") << " prefill=" << prefill;
    SCOPED_TRACE(what.str());
    Context cx;
    nsa_config check = cfg;
    if (nsa_config_validate(cx.ctx, &check) != NSA_OK) continue;  // drawn invalid: skip
    ++ran;
    FwdCase c = make_case(s, cfg, dt, 7000 + round);
    FwdCase got = make_case(s, cfg, dt, 7000 + round);
    MlpTensors mlp;
    if (kind == NSA_CMP_MLP) {
      make_mlp(mlp.k, Hkv, l, s.Dk, 8, dt, rng);
      make_mlp(mlp.v, Hkv, l, s.Dv, 8, dt, rng);
    }
    ASSERT_NO_FATAL_FAILURE(decode_then_reference(GetParam(), c, got, kind, &mlp, prefill));
    // As the shape tests: a Dk dot, then at most T weighted values per f32 sum, x16 for |s|.
    const double tol = 16.0 * static_cast<double>(s.Dk + s.T) * kF32Eps;
    std::string first;
    EXPECT_EQ(count_off(got.o, c.o, 0, s.T, tol + bf16_math_tol(c), 0.0, &first), 0)
        << "o: " << first;
    EXPECT_EQ(count_off(got.lse_slc, c.lse_slc, 0, s.T, tol, tol, &first), 0)
        << "lse_slc: " << first;
    expect_same_selection(got, c);
  }
  EXPECT_GE(ran, 20);  // the draws are mostly valid configs, so this tests what it says
}

}  // namespace

namespace {

// n and w may be as large as the config allows (INT32_MAX): decode sizes its work by the
// blocks and keys that exist, so the call is cheap and equals the forward (here: every block
// selected and the whole prefix in the window).
TEST_P(DecodeOnBackend, HugeSlcCountAndWindow) {
  const BackendUnderTest& be = GetParam();
  const Shape s{1, 150, 4, 1, 16, 12};
  const nsa_config small = config(16, 8, 32, 4, 1, 2, 40);  // sizes the case's buffers only
  nsa_config huge = small;
  huge.slc_count = INT32_MAX;
  huge.window = INT32_MAX;
  FwdCase c = make_case(s, small, NSA_DTYPE_F32, 91);
  FwdCase got = make_case(s, small, NSA_DTYPE_F32, 91);
  Context cx(0, be.id);
  CachePtr cache = mean_cache(be, cx, huge, 1, s, NSA_DTYPE_F32);
  ASSERT_TRUE(cache);
  Staging st(be);
  const DecodeTensors x = DecodeTensors::staged(st, c, got);
  for (int64_t t = 0; t < s.T; ++t) {
    nsa_decode_params p = decode_row(x, t, /*append=*/true);
    p.slc_indices_out = nsa_tensor{};  // [.., n] would not fit in memory
    ASSERT_EQ(nsa_decode(cx.ctx, cache.get(), &p), NSA_OK) << "t=" << t << ": " << cx.error();
  }
  st.download_outputs();
  be.cache_cmp(*cache, 0, 0, 0, c.k_cmp, c.v_cmp);
  c.cfg = huge;
  nsa_fwd_params f = c.params();
  f.slc_indices_out = nsa_tensor{};
  std::string msg;
  ASSERT_EQ(run_on(oracle(), f, 0, &msg), NSA_OK) << msg;
  const double tol = 16.0 * double(s.Dk + s.T) * kF32Eps;  // as the shape tests
  std::string first;
  EXPECT_EQ(count_off(got.o, c.o, 0, s.T, tol, 0.0, &first), 0) << "o: " << first;
  EXPECT_EQ(count_off(got.lse_win, c.lse_win, 0, s.T, tol, tol, &first), 0) << first;
}

}  // namespace

namespace {

// Several sequences of one cache, each at its own length (37, 1 and 112 tokens), decoded one
// step at a time in turns (seq_ids), against the float64 forward over the same tokens packed
// with cu_seqlens (SPEC 3: positions restart in every sequence): the varlen case of decode.
TEST_P(DecodeOnBackend, SequencesMatchVarlenForward) {
  const BackendUnderTest& be = GetParam();
  const std::vector<int32_t> cu = {0, 37, 38, 150};
  const Shape s{1, 150, 6, 2, 24, 20};
  const nsa_config cfg = config(16, 8, 32, 4, 1, 2, 40);
  FwdCase c = make_case(s, cfg, NSA_DTYPE_F32, 2024, true, cu);
  FwdCase got = make_case(s, cfg, NSA_DTYPE_F32, 2024, true, cu);
  Context cx(0, be.id);
  CachePtr cache = mean_cache(be, cx, cfg, 3, s, NSA_DTYPE_F32);
  ASSERT_TRUE(cache);
  Staging st(be);
  const DecodeTensors x = DecodeTensors::staged(st, c, got);
  for (int32_t i = 0; i < 112; ++i) {
    for (int32_t q = 0; q < 3; ++q) {
      if (cu[q] + i >= cu[q + 1]) continue;
      nsa_decode_params p = decode_row(x, cu[q] + i, /*append=*/true);
      p.seq_ids = &q;
      ASSERT_EQ(nsa_decode(cx.ctx, cache.get(), &p), NSA_OK) << q << " " << i << cx.error();
    }
  }
  st.download_outputs();
  int64_t row0 = 0;
  for (int32_t q = 0; q < 3; ++q) {
    ASSERT_EQ(nsa_kv_cache_len(cache.get(), q), cu[q + 1] - cu[q]);
    be.cache_cmp(*cache, q, 0, row0, c.k_cmp, c.v_cmp);
    row0 += nsa_cmp_len(&cfg, cu[q + 1] - cu[q]);
  }
  ASSERT_EQ(row0, c.k_cmp.desc().shape[1]);
  std::string msg;
  ASSERT_EQ(run_on(oracle(), c.params(), 0, &msg), NSA_OK) << msg;
  expect_decode_matches(got, c, decode_tol(s, cfg));
}

}  // namespace
