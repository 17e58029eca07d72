// The KV cache and decode entry points reject bad input with a status code and a message naming
// the argument, and leave the cache and the outputs as they were (SPEC.md section 8).
#include <gtest/gtest.h>

#include <algorithm>

#include "cpu/kv_cache.h"
#include "decode_util.h"

namespace {
using namespace nsa_test;

const Shape kShape{1, 40, 4, 2, 16, 8};

nsa_config small_cfg() { return config(8, 4, 16, 3, 1, 1, 16); }

nsa_kv_cache_params cache_params(int64_t capacity = 32) {
  nsa_kv_cache_params p;
  nsa_kv_cache_params_init(&p);
  p.cfg = small_cfg();
  p.num_seqs = 2;
  p.capacity = capacity;
  p.num_kv_heads = kShape.Hkv;
  p.head_dim_k = kShape.Dk;
  p.head_dim_v = kShape.Dv;
  return p;
}

void expect_error(nsa_status got, nsa_status want, const Context& cx, const std::string& needle) {
  EXPECT_EQ(got, want) << nsa_status_name(got) << ": " << cx.error();
  EXPECT_NE(cx.error().find(needle), std::string::npos)
      << "message \"" << cx.error() << "\" does not name \"" << needle << "\"";
}

TEST(DecodeApi, CacheCreationValidates) {
  Context cx;
  nsa_kv_cache* c = nullptr;
  nsa_kv_cache_params p = cache_params();
  expect_error(nsa_kv_cache_create(cx.ctx, nullptr, &c), NSA_ERR_NULL_POINTER, cx, "params");
  expect_error(nsa_kv_cache_create(cx.ctx, &p, nullptr), NSA_ERR_NULL_POINTER, cx, "out");
  p.capacity = 0;
  expect_error(nsa_kv_cache_create(cx.ctx, &p, &c), NSA_ERR_INVALID_SHAPE, cx, "capacity");
  p = cache_params();
  p.cfg.cmp_stride = p.cfg.cmp_block + 1;
  expect_error(nsa_kv_cache_create(cx.ctx, &p, &c), NSA_ERR_INVALID_CONFIG, cx, "cmp_stride");
  p = cache_params();
  p.dtype = NSA_DTYPE_I32;
  expect_error(nsa_kv_cache_create(cx.ctx, &p, &c), NSA_ERR_INVALID_DTYPE, cx, "dtype");
  p = cache_params();
  p.cmp_kind = static_cast<nsa_cmp_kind>(7);
  expect_error(nsa_kv_cache_create(cx.ctx, &p, &c), NSA_ERR_INVALID_ARGUMENT, cx, "cmp_kind");
  p = cache_params();
  p.cmp_kind = NSA_CMP_MLP;  // and no parameters: the first (keys', pos) is named
  expect_error(nsa_kv_cache_create(cx.ctx, &p, &c), NSA_ERR_NULL_POINTER, cx, "k_pos");
  p = cache_params();
  p.capacity = INT64_MAX / 4;
  expect_error(nsa_kv_cache_create(cx.ctx, &p, &c), NSA_ERR_INVALID_SHAPE, cx, "capacity");
  EXPECT_EQ(c, nullptr);
  // The reference backend has no cache: said so (naming the backend and the call), not faked.
  nsa_context_set_backend(cx.ctx, NSA_BACKEND_REF);
  p = cache_params();
  expect_error(nsa_kv_cache_create(cx.ctx, &p, &c), NSA_ERR_UNSUPPORTED, cx,
               "nsa_kv_cache_create: the ref backend");
  EXPECT_EQ(nsa_kv_cache_len(nullptr, 0), -1);
}

TEST(DecodeApi, AppendingPastCapacityIsAnErrorAndAppendsNothing) {
  Context cx;
  CachePtr cache = make_cache(cx.ctx, small_cfg(), 2, 10, kShape, NSA_DTYPE_F32, NSA_CMP_MEAN);
  FwdCase c = make_case(kShape, small_cfg(), NSA_DTYPE_F32, 3);
  nsa_tensor k = rows(c.k, 0, 8), v = rows(c.v, 0, 8);
  ASSERT_EQ(nsa_kv_cache_append(cx.ctx, cache.get(), 1, &k, &v), NSA_OK) << cx.error();
  k = rows(c.k, 8, 3);
  v = rows(c.v, 8, 3);
  expect_error(nsa_kv_cache_append(cx.ctx, cache.get(), 1, &k, &v), NSA_ERR_INVALID_SHAPE, cx,
               "capacity of 10");
  EXPECT_EQ(nsa_kv_cache_len(cache.get(), 1), 8);
  expect_error(nsa_kv_cache_append(cx.ctx, cache.get(), 2, &k, &v), NSA_ERR_INVALID_INDEX, cx,
               "seq");
  k = rows(c.k, 8, 2);
  expect_error(nsa_kv_cache_append(cx.ctx, cache.get(), 1, &k, &v), NSA_ERR_INVALID_SHAPE, cx, "v");
  v = rows(c.v, 8, 2);
  ASSERT_EQ(nsa_kv_cache_append(cx.ctx, cache.get(), 1, &k, &v), NSA_OK) << cx.error();
  EXPECT_EQ(nsa_kv_cache_len(cache.get(), 1), 10);

  // A decode step that appends to a full sequence: an error, output untouched.
  FwdCase out = make_case(kShape, small_cfg(), NSA_DTYPE_F32, 4);
  out.o.fill(7.0);
  nsa_decode_params p = decode_row(c, out, 10, /*append=*/true);
  const int32_t seq = 1;
  p.seq_ids = &seq;
  expect_error(nsa_decode(cx.ctx, cache.get(), &p), NSA_ERR_INVALID_SHAPE, cx, "full");
  EXPECT_EQ(nsa_kv_cache_len(cache.get(), 1), 10);
  EXPECT_EQ(out.o.at({0, 10, 0, 0}), 7.0);
  // Reset empties the sequence for reuse.
  ASSERT_EQ(nsa_kv_cache_reset(cx.ctx, cache.get(), 1), NSA_OK);
  EXPECT_EQ(nsa_kv_cache_len(cache.get(), 1), 0);
}

TEST(DecodeApi, DecodeValidatesEveryArgument) {
  Context cx;
  CachePtr cache = make_cache(cx.ctx, small_cfg(), 2, 32, kShape, NSA_DTYPE_F32, NSA_CMP_MEAN);
  FwdCase c = make_case(kShape, small_cfg(), NSA_DTYPE_F32, 5);
  FwdCase out = make_case(kShape, small_cfg(), NSA_DTYPE_F32, 6);
  out.o.fill(7.0);
  nsa_decode_params good = decode_row(c, out, 0, /*append=*/false);
  // Sequence 0 is empty and nothing is appended: the query has no position.
  expect_error(nsa_decode(cx.ctx, cache.get(), &good), NSA_ERR_INVALID_ARGUMENT, cx, "empty");
  good = decode_row(c, out, 0, /*append=*/true);
  nsa_decode_params p = good;
  p.v.data = nullptr;
  expect_error(nsa_decode(cx.ctx, cache.get(), &p), NSA_ERR_NULL_POINTER, cx, "k/v");
  p = good;
  p.q.shape[2] = kShape.Dk - 1;
  expect_error(nsa_decode(cx.ctx, cache.get(), &p), NSA_ERR_INVALID_SHAPE, cx, "q");
  p = good;
  p.q.shape[1] = 3;  // not a multiple of Hkv = 2
  expect_error(nsa_decode(cx.ctx, cache.get(), &p), NSA_ERR_INVALID_SHAPE, cx, "Hq");
  p = good;
  p.g_slc.data = nullptr;
  expect_error(nsa_decode(cx.ctx, cache.get(), &p), NSA_ERR_NULL_POINTER, cx, "g_slc");
  p = good;
  p.o.dtype = NSA_DTYPE_I32;
  expect_error(nsa_decode(cx.ctx, cache.get(), &p), NSA_ERR_INVALID_DTYPE, cx, "o");
  p = good;
  p.slc_indices_out.shape[2] = 2;
  expect_error(nsa_decode(cx.ctx, cache.get(), &p), NSA_ERR_INVALID_SHAPE, cx, "slc_indices_out");
  p = good;
  p.lse_win.dtype = NSA_DTYPE_BF16;
  expect_error(nsa_decode(cx.ctx, cache.get(), &p), NSA_ERR_INVALID_DTYPE, cx, "lse_win");
  const int32_t twice[2] = {1, 1}, outside[1] = {2};
  p = good;
  for (nsa_tensor* t : {&p.q, &p.k, &p.v, &p.g_cmp, &p.g_slc, &p.g_win, &p.o}) t->shape[0] = 2;
  p.lse_cmp = p.lse_slc = p.lse_win = p.slc_indices_out = nsa_tensor{};
  p.seq_ids = twice;
  expect_error(nsa_decode(cx.ctx, cache.get(), &p), NSA_ERR_INVALID_INDEX, cx, "seq_ids[1]");
  p = good;
  p.seq_ids = outside;
  expect_error(nsa_decode(cx.ctx, cache.get(), &p), NSA_ERR_INVALID_INDEX, cx, "seq_ids[0]");
  expect_error(nsa_decode(cx.ctx, nullptr, &good), NSA_ERR_NULL_POINTER, cx, "cache");
  expect_error(nsa_decode(cx.ctx, cache.get(), nullptr), NSA_ERR_NULL_POINTER, cx, "params");
  // Nothing was appended by the failed calls, and no output was written.
  EXPECT_EQ(nsa_kv_cache_len(cache.get(), 0), 0);
  EXPECT_EQ(out.o.at({0, 0, 0, 0}), 7.0);
  ASSERT_EQ(nsa_decode(cx.ctx, cache.get(), &good), NSA_OK) << cx.error();
  EXPECT_EQ(nsa_kv_cache_len(cache.get(), 0), 1);
  EXPECT_NE(out.o.at({0, 0, 0, 0}), 7.0);

  nsa_dense_decode_params d;
  nsa_dense_decode_params_init(&d);
  d.q = good.q;
  d.o = good.o;
  d.window = -1;
  expect_error(nsa_dense_decode(cx.ctx, cache.get(), &d), NSA_ERR_INVALID_ARGUMENT, cx, "window");
}

TEST(DecodeApi, PrefillValidates) {
  Context cx;
  CachePtr cache = make_cache(cx.ctx, small_cfg(), 2, 32, kShape, NSA_DTYPE_BF16, NSA_CMP_MEAN);
  FwdCase c = make_case(kShape, small_cfg(), NSA_DTYPE_BF16, 7);
  FwdCase f32 = make_case(kShape, small_cfg(), NSA_DTYPE_F32, 7);
  nsa_prefill_params good;
  nsa_prefill_params_init(&good);
  good.q = rows(c.q, 0, 20);
  good.k = rows(c.k, 0, 20);
  good.v = rows(c.v, 0, 20);
  good.g_cmp = rows(c.g_cmp, 0, 20);
  good.g_slc = rows(c.g_slc, 0, 20);
  good.g_win = rows(c.g_win, 0, 20);
  good.o = rows(c.o, 0, 20);
  nsa_prefill_params p = good;
  p.q = rows(f32.q, 0, 20);  // f32 queries for a bf16 cache
  expect_error(nsa_prefill(cx.ctx, cache.get(), &p), NSA_ERR_INVALID_DTYPE, cx, "q");
  p = good;
  p.o.shape[0] = 19;
  expect_error(nsa_prefill(cx.ctx, cache.get(), &p), NSA_ERR_INVALID_SHAPE, cx, "o");
  p = good;
  p.k = rows(c.k, 0, 33);
  p.q = rows(c.q, 0, 33);
  EXPECT_NE(nsa_prefill(cx.ctx, cache.get(), &p), NSA_OK);
  EXPECT_EQ(nsa_kv_cache_len(cache.get(), 0), 0);
  ASSERT_EQ(nsa_prefill(cx.ctx, cache.get(), &good), NSA_OK) << cx.error();
  EXPECT_EQ(nsa_kv_cache_len(cache.get(), 0), 20);
  expect_error(nsa_prefill(cx.ctx, cache.get(), &good), NSA_ERR_INVALID_ARGUMENT, cx, "not empty");
}

}  // namespace

namespace {
using namespace nsa_test;

// New tokens given to a decode step follow nsa_kv_cache_append's rule: f32 or bf16 whatever q's
// dtype, rounded to the cache's dtype when stored. f32 keys and values into a bf16 cache then
// decode exactly as the same values given already rounded to bf16.
TEST(DecodeApi, NewTokensMayBeF32OrBf16LikeAppend) {
  Context cx;
  CachePtr a = make_cache(cx.ctx, small_cfg(), 1, 32, kShape, NSA_DTYPE_BF16, NSA_CMP_MEAN);
  CachePtr b = make_cache(cx.ctx, small_cfg(), 1, 32, kShape, NSA_DTYPE_BF16, NSA_CMP_MEAN);
  FwdCase bf = make_case(kShape, small_cfg(), NSA_DTYPE_BF16, 11);
  FwdCase f32 = make_case(kShape, small_cfg(), NSA_DTYPE_F32, 11);  // the same draws, unrounded
  FwdCase out_a = make_case(kShape, small_cfg(), NSA_DTYPE_F32, 12);
  FwdCase out_b = make_case(kShape, small_cfg(), NSA_DTYPE_F32, 12);
  for (int64_t t = 0; t < 24; ++t) {
    nsa_decode_params pa = decode_row(bf, out_a, t, /*append=*/true);
    pa.k = rows(f32.k, t, 1);
    pa.v = rows(f32.v, t, 1);
    ASSERT_EQ(nsa_decode(cx.ctx, a.get(), &pa), NSA_OK) << cx.error();
    nsa_decode_params pb = decode_row(bf, out_b, t, /*append=*/true);
    ASSERT_EQ(nsa_decode(cx.ctx, b.get(), &pb), NSA_OK) << cx.error();
  }
  EXPECT_EQ(out_a.o.storage(), out_b.o.storage());
  EXPECT_EQ(out_a.lse_slc.storage(), out_b.lse_slc.storage());
  // Integers are still no keys.
  nsa_decode_params p = decode_row(bf, out_a, 24, /*append=*/true);
  p.k.dtype = NSA_DTYPE_I32;
  expect_error(nsa_decode(cx.ctx, a.get(), &p), NSA_ERR_INVALID_DTYPE, cx, "k:");
  EXPECT_EQ(nsa_kv_cache_len(a.get(), 0), 24);
}

}  // namespace

// The decode steps' threading on shared cores (cpu/kv_cache.h): a lone stall changes nothing;
// two within the window send the next steps to one thread, for a period that doubles up to its
// cap; a long run of clean steps resets it.
TEST(StepThreading, PairsOfStallsSendStepsSoloForADoublingPeriod) {
  using nsa::cpu::StepThreading;
  StepThreading t;
  for (int i = 0; i < StepThreading::kWarmup; ++i) t.judge(true);  // start-up: not judged
  EXPECT_EQ(t.solo_steps, 0);
  t.judge(true);  // a lone stall
  for (int i = 0; i < StepThreading::kWindow; ++i) t.judge(false);
  t.judge(true);  // the next one, out of the window: still lone
  EXPECT_EQ(t.solo_steps, 0);
  int32_t expect = StepThreading::kMinPeriod;
  for (int pair = 0; pair < 10; ++pair) {
    t.judge(false);
    t.judge(true);  // within the window of the previous stall
    EXPECT_EQ(t.solo_steps, expect) << "pair " << pair;
    expect = std::min(2 * expect, StepThreading::kMaxPeriod);
    t.solo_steps = 0;  // the solo steps ran (decode.cc counts them down)
  }
  EXPECT_EQ(t.period, StepThreading::kMaxPeriod);
  for (int i = 0; i < StepThreading::kCleanSteps - 1; ++i) t.judge(false);
  EXPECT_EQ(t.period, StepThreading::kMaxPeriod);
  t.judge(false);
  EXPECT_EQ(t.period, StepThreading::kMinPeriod);
  EXPECT_EQ(t.solo_steps, 0);
}
