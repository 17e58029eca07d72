// Extreme but legal (or illegal) sizes at the C API's edges: the reproducers that the
// coverage-guided fuzzers (fuzz/) found, kept as regression tests. Each used to abort the process
// or run into undefined behaviour (signed overflow, caught by the sanitizer build); each must
// return its status with a message naming the argument.
#include <gtest/gtest.h>

#include <climits>
#include <cstdint>
#include <vector>

#include "decode_util.h"

namespace {
using namespace nsa_test;

const Shape kShape{1, 40, 4, 2, 16, 8};

nsa_kv_cache_params cache_params(const nsa_config& cfg, int64_t capacity) {
  nsa_kv_cache_params p;
  nsa_kv_cache_params_init(&p);
  p.cfg = cfg;
  p.num_seqs = 2;
  p.capacity = capacity;
  p.num_kv_heads = kShape.Hkv;
  p.head_dim_k = kShape.Dk;
  p.head_dim_v = kShape.Dv;
  return p;
}

// A compression block longer than any sequence is legal (no compressed token ever completes),
// so a cache with cmp_block = INT32_MAX or 1e9 is valid, and appending, prefilling and decoding
// on it must work. The append used to size a scratch vector by (cmp_block + 1) * D inside an
// OpenMP region: std::length_error / std::bad_alloc there terminated the process.
TEST(ApiLimits, CacheWithAHugeCompressionBlockAppendsPrefillsAndDecodes) {
  for (int32_t l : {INT32_MAX, 1000000000}) {
    SCOPED_TRACE(l);
    Context cx;
    nsa_config cfg = config(8, 4, 16, 3, 1, 1, 16);
    cfg.cmp_block = l;
    cfg.cmp_stride = 16;
    nsa_kv_cache* raw = nullptr;
    nsa_kv_cache_params p = cache_params(cfg, 64);
    ASSERT_EQ(nsa_kv_cache_create(cx.ctx, &p, &raw), NSA_OK) << cx.error();
    CachePtr cache(raw);
    FwdCase c = make_case(kShape, cfg, NSA_DTYPE_F32, 3);
    nsa_tensor k = rows(c.k, 0, 5), v = rows(c.v, 0, 5);
    ASSERT_EQ(nsa_kv_cache_append(cx.ctx, cache.get(), 1, &k, &v), NSA_OK) << cx.error();
    EXPECT_EQ(nsa_kv_cache_len(cache.get(), 1), 5);

    nsa_prefill_params pf;
    nsa_prefill_params_init(&pf);
    pf.q = rows(c.q, 0, 20);
    pf.k = rows(c.k, 0, 20);
    pf.v = rows(c.v, 0, 20);
    pf.g_cmp = rows(c.g_cmp, 0, 20);
    pf.g_slc = rows(c.g_slc, 0, 20);
    pf.g_win = rows(c.g_win, 0, 20);
    pf.o = rows(c.o, 0, 20);
    ASSERT_EQ(nsa_prefill(cx.ctx, cache.get(), &pf), NSA_OK) << cx.error();
    EXPECT_EQ(nsa_kv_cache_len(cache.get(), 0), 20);

    FwdCase out = make_case(kShape, cfg, NSA_DTYPE_F32, 4);
    nsa_decode_params d = decode_row(c, out, 20, /*append=*/true);
    ASSERT_EQ(nsa_decode(cx.ctx, cache.get(), &d), NSA_OK) << cx.error();
    EXPECT_EQ(nsa_kv_cache_len(cache.get(), 0), 21);
  }
}

// head_dim_k = INT64_MAX: the size check computed head_dim_k + head_dim_v + 32 and row * 8 in
// int64 (signed overflow) and accepted a cache that could not be used.
TEST(ApiLimits, CacheSizesThatOverflowAreRejected) {
  Context cx;
  const nsa_config cfg = config(8, 4, 16, 3, 1, 1, 16);
  nsa_kv_cache* c = nullptr;
  struct Case {
    int64_t Dk, Dv, heads, seqs, capacity;
    const char* needle;
  };
  for (const Case& k :
       {Case{INT64_MAX, 8, 2, 2, 64, "head_dim_k"}, Case{16, INT64_MAX, 2, 2, 64, "head_dim_v"},
        Case{INT64_MAX / 2, INT64_MAX / 2, 1, 1, 1, "head_dim"},
        Case{16, 8, INT64_MAX, 1, 64, "num_kv_heads"}, Case{16, 8, 2, INT64_MAX, 64, "num_seqs"},
        Case{16, 8, 2, 2, INT64_MAX, "capacity"},
        Case{int64_t{1} << 40, 8, 1, 1, 1, "head_dim_k"}}) {
    nsa_kv_cache_params p = cache_params(cfg, k.capacity);
    p.head_dim_k = k.Dk;
    p.head_dim_v = k.Dv;
    p.num_kv_heads = k.heads;
    p.num_seqs = k.seqs;
    const nsa_status s = nsa_kv_cache_create(cx.ctx, &p, &c);
    EXPECT_TRUE(s == NSA_ERR_INVALID_SHAPE) << nsa_status_name(s) << ": " << cx.error();
    EXPECT_NE(cx.error().find(k.needle), std::string::npos) << cx.error();
    EXPECT_EQ(c, nullptr);
  }
}

// A view whose last element sits at offset INT64_MAX: the span check computed last + 1 (signed
// overflow). Any tensor of any op goes through the same check; q of the forward and x of the
// compression stand for all.
TEST(ApiLimits, ViewEndingAtTheLastInt64OffsetIsRejected) {
  Context cx;
  float buf[4] = {};
  nsa_tensor t{};
  t.data = buf;
  t.dtype = NSA_DTYPE_F32;
  t.ndim = 4;
  const int64_t shape[4] = {1, 2, 1, 1}, stride[4] = {1, INT64_MAX, 1, 1};
  for (int i = 0; i < 4; ++i) t.shape[i] = shape[i], t.stride[i] = stride[i];
  nsa_fwd_params f;
  nsa_fwd_params_init(&f);
  f.in.q = t;
  EXPECT_EQ(nsa_fwd(cx.ctx, &f), NSA_ERR_INVALID_SHAPE) << cx.error();
  EXPECT_NE(cx.error().find("q:"), std::string::npos) << cx.error();
  nsa_compress_params cp;
  nsa_compress_params_init(&cp);
  cp.x = t;
  EXPECT_EQ(nsa_compress(cx.ctx, &cp), NSA_ERR_INVALID_SHAPE) << cx.error();
  EXPECT_NE(cx.error().find("x:"), std::string::npos) << cx.error();
}

// nsa_prefill batches its 3-D (and 2-D) arguments to the forward's 4-D (3-D) ones; it used to
// add 1 to the caller's ndim before checking it, so ndim = INT32_MAX overflowed and the message
// showed the wrapped rank.
TEST(ApiLimits, PrefillReportsTheCallersRank) {
  Context cx;
  const nsa_config cfg = config(8, 4, 16, 3, 1, 1, 16);
  nsa_kv_cache* raw = nullptr;
  nsa_kv_cache_params cp = cache_params(cfg, 64);
  ASSERT_EQ(nsa_kv_cache_create(cx.ctx, &cp, &raw), NSA_OK) << cx.error();
  CachePtr cache(raw);
  FwdCase c = make_case(kShape, cfg, NSA_DTYPE_F32, 3);
  nsa_prefill_params good;
  nsa_prefill_params_init(&good);
  good.q = rows(c.q, 0, 20);
  good.k = rows(c.k, 0, 20);
  good.v = rows(c.v, 0, 20);
  good.g_cmp = rows(c.g_cmp, 0, 20);
  good.g_slc = rows(c.g_slc, 0, 20);
  good.g_win = rows(c.g_win, 0, 20);
  good.o = rows(c.o, 0, 20);
  struct Arg {
    const char* name;
    nsa_tensor nsa_prefill_params::*field;
    int rank;
  };
  for (const Arg& a :
       {Arg{"o", &nsa_prefill_params::o, 3}, Arg{"g_cmp", &nsa_prefill_params::g_cmp, 2},
        Arg{"g_win", &nsa_prefill_params::g_win, 2}}) {
    for (int32_t bad : {INT32_MAX, INT32_MIN, -1, 0, 4, 5}) {
      nsa_prefill_params p = good;
      (p.*a.field).ndim = bad;
      EXPECT_EQ(nsa_prefill(cx.ctx, cache.get(), &p), NSA_ERR_INVALID_SHAPE) << cx.error();
      const std::string want = std::string(a.name) + ": expected " + std::to_string(a.rank) +
                               " dimensions, got " + std::to_string(bad);
      EXPECT_NE(cx.error().find(want), std::string::npos)
          << cx.error() << " (want: " << want << ")";
      EXPECT_EQ(nsa_kv_cache_len(cache.get(), 0), 0);
    }
  }
  ASSERT_EQ(nsa_prefill(cx.ctx, cache.get(), &good), NSA_OK) << cx.error();
}

}  // namespace
