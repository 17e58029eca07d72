// A decode step's appends (nsa_decode with k and v: on CUDA every sequence's rows in a few
// launches, Backend::cache_append_rows; elsewhere row by row) against appending each row alone,
// on every backend with a KV cache.
#include <gtest/gtest.h>

#include <random>
#include <vector>

#include "backend_harness.h"
#include "decode_util.h"

namespace {
using namespace nsa_test;

class StepAppends : public ::testing::TestWithParam<BackendUnderTest> {
 protected:
  void SetUp() override {
    if (GetParam().cache_cmp == nullptr) GTEST_SKIP() << GetParam().name << " has no KV cache";
  }
};
INSTANTIATE_TEST_SUITE_P(Backends, StepAppends, ::testing::ValuesIn(backends_under_test(kOpDecode)),
                         backend_test_name);

// A decode step's appends (its k and v, several sequences at once: on CUDA one launch for all of
// them, Backend::cache_append_rows) leave the cache as appending each row alone does, raw rows
// (seen through the step's outputs) and compressed tokens bit for bit, for mean and mlp
// compression: three sequences from lengths 5, 0 and 11, each step's rows going to sequences
// 2, 0, 1, so that compressed tokens complete in different sequences at different steps.
TEST_P(StepAppends, StepAppendsEqualAppends) {
  const BackendUnderTest& be = GetParam();
  ASSERT_NE(be.cache_cmp, nullptr);
  for (nsa_cmp_kind kind : {NSA_CMP_MEAN, NSA_CMP_MLP}) {
    SCOPED_TRACE(kind == NSA_CMP_MEAN ? "mean" : "mlp");
    const Shape s{1, 90, 6, 2, 24, 40};
    const nsa_config cfg = config(16, 8, 32, 4, 1, 2, 64);
    FwdCase c = make_case(s, cfg, NSA_DTYPE_F32, 31), out = make_case(s, cfg, NSA_DTYPE_F32, 1);
    std::mt19937_64 rng(6);
    MlpTensors mlp;
    make_mlps(&mlp, s, cfg.cmp_block, 16, NSA_DTYPE_F32, rng);
    Context cx(0, be.id);
    CachePtr rowwise =
        make_cache(cx.ctx, cfg, 3, 40, s, NSA_DTYPE_F32, kind, &mlp, nullptr, *be.buffers);
    CachePtr stepped =
        make_cache(cx.ctx, cfg, 3, 40, s, NSA_DTYPE_F32, kind, &mlp, nullptr, *be.buffers);
    Staging st(be);
    const DecodeTensors x = DecodeTensors::staged(st, c, out);
    const auto append = [&](nsa_kv_cache* cache, int64_t seq, int64_t t0, int64_t n) {
      nsa_tensor k = rows(x.k, t0, n), v = rows(x.v, t0, n);
      ASSERT_EQ(nsa_kv_cache_append(cx.ctx, cache, seq, &k, &v), NSA_OK) << cx.error();
    };
    for (nsa_kv_cache* cache : {rowwise.get(), stepped.get()}) {
      append(cache, 0, 0, 5);
      append(cache, 2, 5, 11);
    }
    const int32_t order[3] = {2, 0, 1};
    for (int64_t j = 0; j < 20; ++j) {
      const int64_t t0 = 16 + 3 * j;  // rows 16 .. 75
      for (int64_t i = 0; i < 3; ++i) append(rowwise.get(), order[i], t0 + i, 1);
      nsa_decode_params p = decode_row(x, t0, /*append=*/true);
      for (nsa_tensor* t : {&p.q, &p.k, &p.v, &p.g_cmp, &p.g_slc, &p.g_win, &p.o, &p.lse_cmp,
                            &p.lse_slc, &p.lse_win, &p.slc_indices_out}) {
        t->shape[0] = 3;
      }
      p.seq_ids = order;
      ASSERT_EQ(nsa_decode(cx.ctx, stepped.get(), &p), NSA_OK) << j << ": " << cx.error();
    }
    const int64_t lens[3] = {25, 20, 31}, Tc = nsa_cmp_len(&cfg, 40);
    Tensor k_row(NSA_DTYPE_F32, {3, Tc, s.Hkv, s.Dk}), v_row(NSA_DTYPE_F32, {3, Tc, s.Hkv, s.Dv});
    Tensor k_step(NSA_DTYPE_F32, {3, Tc, s.Hkv, s.Dk}), v_step(NSA_DTYPE_F32, {3, Tc, s.Hkv, s.Dv});
    for (int64_t q = 0; q < 3; ++q) {
      ASSERT_EQ(nsa_kv_cache_len(rowwise.get(), q), lens[q]);
      ASSERT_EQ(nsa_kv_cache_len(stepped.get(), q), lens[q]);
      be.cache_cmp(*rowwise, q, q, 0, k_row, v_row);
      be.cache_cmp(*stepped, q, q, 0, k_step, v_step);
    }
    EXPECT_TRUE(k_step.storage() == k_row.storage()) << "compressed keys differ";
    EXPECT_TRUE(v_step.storage() == v_row.storage()) << "compressed values differ";
    // The same compressed tokens, not both untouched: each sequence's last one (2, 1 and 2 of
    // them) is not zeros.
    for (int64_t q = 0; q < 3; ++q) {
      EXPECT_NE(k_step.at({q, nsa_cmp_len(&cfg, lens[q]) - 1, 1, 0}), 0.0) << q;
    }
    // The raw rows: the last step's outputs equal a step over the row-by-row cache (no append).
    FwdCase again = make_case(s, cfg, NSA_DTYPE_F32, 1);
    Staging st2(be);
    const DecodeTensors y = DecodeTensors::staged(st2, c, again);
    nsa_decode_params p = decode_row(y, 16 + 3 * 19, /*append=*/false);
    for (nsa_tensor* t : {&p.q, &p.g_cmp, &p.g_slc, &p.g_win, &p.o, &p.lse_cmp, &p.lse_slc,
                          &p.lse_win, &p.slc_indices_out}) {
      t->shape[0] = 3;
    }
    p.seq_ids = order;
    ASSERT_EQ(nsa_decode(cx.ctx, rowwise.get(), &p), NSA_OK) << cx.error();
    st.download_outputs();
    st2.download_outputs();
    int64_t diff = 0;
    out.o.for_each([&](int64_t b, int64_t t, int64_t h, int64_t d) {
      if (t >= 73 && t < 76) diff += out.o.at({b, t, h, d}) != again.o.at({b, t, h, d});
    });
    EXPECT_EQ(diff, 0) << "outputs of the last step differ";
  }
}

// More sequences in one step than one launch takes (256 on CUDA): 300 sequences of 15 tokens,
// a step (ids in reverse) completing each one's first compressed token, equal to appending
// each row alone.
TEST_P(StepAppends, StepAppendsOfManySequences) {
  const BackendUnderTest& be = GetParam();
  ASSERT_NE(be.cache_cmp, nullptr);
  constexpr int32_t kSeqs = 300;
  const Shape s{1, 15 + kSeqs, 2, 1, 16, 8};
  const nsa_config cfg = config(16, 8, 32, 4, 1, 2, 64);
  FwdCase c = make_case(s, cfg, NSA_DTYPE_BF16, 12), out = make_case(s, cfg, NSA_DTYPE_BF16, 1);
  Context cx(0, be.id);
  CachePtr rowwise = make_cache(cx.ctx, cfg, kSeqs, 16, s, NSA_DTYPE_BF16, NSA_CMP_MEAN, nullptr,
                                nullptr, *be.buffers);
  CachePtr stepped = make_cache(cx.ctx, cfg, kSeqs, 16, s, NSA_DTYPE_BF16, NSA_CMP_MEAN, nullptr,
                                nullptr, *be.buffers);
  Staging st(be);
  const DecodeTensors x = DecodeTensors::staged(st, c, out);
  std::vector<int32_t> ids(kSeqs);
  for (int32_t q = 0; q < kSeqs; ++q) {
    ids[size_t(q)] = kSeqs - 1 - q;
    nsa_tensor k = rows(x.k, 0, 15), v = rows(x.v, 0, 15);
    for (nsa_kv_cache* cache : {rowwise.get(), stepped.get()}) {
      ASSERT_EQ(nsa_kv_cache_append(cx.ctx, cache, q, &k, &v), NSA_OK) << cx.error();
    }
  }
  for (int32_t r = 0; r < kSeqs; ++r) {
    nsa_tensor k = rows(x.k, 15 + r, 1), v = rows(x.v, 15 + r, 1);
    ASSERT_EQ(nsa_kv_cache_append(cx.ctx, rowwise.get(), ids[size_t(r)], &k, &v), NSA_OK);
  }
  nsa_decode_params p = decode_row(x, 15, /*append=*/true);
  for (nsa_tensor* t : {&p.q, &p.k, &p.v, &p.g_cmp, &p.g_slc, &p.g_win, &p.o, &p.lse_cmp,
                        &p.lse_slc, &p.lse_win, &p.slc_indices_out}) {
    t->shape[0] = kSeqs;
  }
  p.seq_ids = ids.data();
  ASSERT_EQ(nsa_decode(cx.ctx, stepped.get(), &p), NSA_OK) << cx.error();
  Tensor k_row(NSA_DTYPE_F32, {kSeqs, 1, s.Hkv, s.Dk}),
      v_row(NSA_DTYPE_F32, {kSeqs, 1, s.Hkv, s.Dv});
  Tensor k_step(NSA_DTYPE_F32, {kSeqs, 1, s.Hkv, s.Dk}),
      v_step(NSA_DTYPE_F32, {kSeqs, 1, s.Hkv, s.Dv});
  for (int32_t q = 0; q < kSeqs; ++q) {
    ASSERT_EQ(nsa_kv_cache_len(stepped.get(), q), 16);
    be.cache_cmp(*rowwise, q, q, 0, k_row, v_row);
    be.cache_cmp(*stepped, q, q, 0, k_step, v_step);
  }
  EXPECT_TRUE(k_step.storage() == k_row.storage()) << "compressed keys differ";
  EXPECT_TRUE(v_step.storage() == v_row.storage()) << "compressed values differ";
  // Sequence 0's token averages rows 0..14 and its own last row (step row 299): not zeros, and
  // not sequence 299's (step row 0).
  EXPECT_NE(k_step.at({0, 0, 0, 0}), k_step.at({kSeqs - 1, 0, 0, 0}));
}

}  // namespace
