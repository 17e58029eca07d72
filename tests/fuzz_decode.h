// The KV cache and decode side of the API fuzzers: a random cache (config with extreme fields,
// dtype, mean or mlp compression, capacity, sequences) or a cache request broken in one way,
// then random operations on it (append, prefill, decode, dense decode, reset), each valid or
// broken in one chosen way. Shared by the seeded ctest fuzzer (test_fuzz_decode.cc) and the
// libFuzzer target fuzz_cache (fuzz/). Invariants:
//   - no crash (and, in the sanitizer builds, no out-of-bounds access or undefined behaviour);
//   - a failed call returns the expected status with a non-empty message, appends nothing and
//     writes no output byte; a failed creation returns no cache;
//   - a successful call has an empty message, advances exactly the sequences it should and
//     writes finite outputs for the rows it decodes (the inputs are finite) and no output row
//     past its view; other writes past the views are left to ASan (exact-size buffers).
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <climits>
#include <map>
#include <string>
#include <vector>

#include "decode_util.h"
#include "fuzz_util.h"

namespace nsa_fuzz {

struct Fuzz {
  Rng rng;
  explicit Fuzz(uint64_t seed) : rng(seed) {}
  Fuzz(const uint8_t* data, size_t size) : rng(data, size) {}
  int64_t pick(int64_t lo, int64_t hi) { return rng.uniform(lo, hi); }
  bool chance(int percent) { return rng.chance(percent / 100.0); }
};

// The ways a call is broken, and the status each must give.
enum class Break { kNone, kNullQ, kWrongDk, kWrongDtype, kSeqOutOfRange, kSeqTwice, kOverCapacity };

struct Outcome {
  nsa_status want = NSA_OK;
  Break how = Break::kNone;
};

// Outputs filled with a byte pattern, so an untouched output is recognisable.
inline void poison(nsa_test::Tensor& t) {
  auto& bytes = const_cast<std::vector<unsigned char>&>(t.storage());
  std::fill(bytes.begin(), bytes.end(), 0x7f);
}
inline bool untouched(const nsa_test::Tensor& t) {
  for (unsigned char b : t.storage()) {
    if (b != 0x7f) return false;
  }
  return true;
}

// A cache config: small blocks mostly, sometimes a field at an extreme that is still legal
// (a compression or selection block longer than any sequence, a huge window or count).
inline nsa_config cache_config(Fuzz& f) {
  const int32_t l = static_cast<int32_t>(f.pick(1, 24));
  nsa_config cfg = nsa_test::config(
      l, static_cast<int32_t>(f.pick(1, l)), static_cast<int32_t>(f.pick(1, 40)),
      static_cast<int32_t>(f.pick(3, 6)), 1, 2, static_cast<int32_t>(f.pick(1, 60)));
  const std::vector<int32_t> extreme = {INT32_MAX, INT32_MAX - 1, 1 << 30, 1000000000};
  if (f.chance(10)) cfg.cmp_block = extreme[static_cast<size_t>(f.pick(0, 3))];
  if (f.chance(5)) cfg.slc_block = extreme[static_cast<size_t>(f.pick(0, 3))];
  if (f.chance(5)) cfg.window = extreme[static_cast<size_t>(f.pick(0, 3))];
  if (f.chance(5)) cfg.slc_count = INT32_MAX;
  return cfg;
}

// A creation request broken in one way (or not): the field, and the status nsa.h gives.
struct CacheBreak {
  nsa_status want = NSA_OK;
  const char* field = "";
};

inline CacheBreak break_cache_params(Fuzz& f, nsa_kv_cache_params& p) {
  // Values outside the bounds nsa.h states: below 1, or past the head bound 2^20; num_seqs'
  // bound is INT32_MAX.
  const std::vector<int64_t> bad = {0,
                                    -1,
                                    INT64_MIN,
                                    (int64_t{1} << 20) + 1,
                                    INT32_MAX + int64_t{1},
                                    int64_t{1} << 40,
                                    INT64_MAX / 2,
                                    INT64_MAX};
  const int64_t v = bad[static_cast<size_t>(f.pick(0, static_cast<int64_t>(bad.size()) - 1))];
  const int64_t v_seqs = v == bad[3] ? bad[4] : v;
  switch (f.pick(0, 7)) {
    case 0: p.head_dim_k = v; return {NSA_ERR_INVALID_SHAPE, "head_dim_k"};
    case 1: p.head_dim_v = v; return {NSA_ERR_INVALID_SHAPE, "head_dim_v"};
    case 2: p.num_kv_heads = v; return {NSA_ERR_INVALID_SHAPE, "num_kv_heads"};
    case 3: p.num_seqs = v_seqs; return {NSA_ERR_INVALID_SHAPE, "num_seqs"};
    case 4:  // only a capacity the int32 block indices or 64-bit sizes cannot serve
      p.capacity = v <= 0 ? v : INT64_MAX - f.pick(0, 64);
      return {NSA_ERR_INVALID_SHAPE, "capacity"};
    case 5: {
      int bad = static_cast<int>(f.pick(3, 100));
      std::memcpy(&p.dtype, &bad, sizeof bad);
      return {NSA_ERR_INVALID_DTYPE, "dtype"};
    }
    case 6: {
      int bad = static_cast<int>(f.pick(2, 100));
      std::memcpy(&p.cmp_kind, &bad, sizeof bad);
      return {NSA_ERR_INVALID_ARGUMENT, "cmp_kind"};
    }
    default:
      p.cfg.cmp_stride = p.cfg.cmp_block == INT32_MAX ? 0 : p.cfg.cmp_block + 1;
      return {NSA_ERR_INVALID_CONFIG, "cmp_stride"};
  }
}

// One cache and up to `max_ops` operations on it; `done` counts the operations made.
inline void fuzz_cache_session(Fuzz& f, int64_t max_ops, std::map<std::string, int64_t>& counts,
                               int64_t* done) {
  const nsa_config cfg = cache_config(f);
  const int64_t Hkv = f.pick(1, 2), G = f.pick(1, 5), seqs = f.pick(1, 3),
                cap = f.pick(1, budget().max_capacity);
  const nsa_test::Shape s{
      1, cap + 4, Hkv * G, Hkv, f.pick(1, budget().max_D), f.pick(1, budget().max_D)};
  const nsa_dtype dt = f.chance(50) ? NSA_DTYPE_BF16 : NSA_DTYPE_F32;
  // mlp compression only where its parameters are small ([Hkv, Dh, l * D] for w1).
  const bool mlp = cfg.cmp_block <= 24 && f.chance(25);
  const uint64_t seed = static_cast<uint64_t>(f.pick(0, INT32_MAX));
  nsa_test::Context cx(static_cast<int>(f.pick(0, 3)));
  nsa_test::MlpTensors m;
  std::mt19937_64 mrng(seed);
  if (mlp) {
    const int64_t Dh = f.pick(1, 16);
    nsa_test::make_mlp(m.k, Hkv, cfg.cmp_block, s.Dk, Dh, dt, mrng);
    nsa_test::make_mlp(m.v, Hkv, cfg.cmp_block, s.Dv, Dh, dt, mrng);
  }
  if (f.chance(15)) {  // a creation that must fail, and return no cache
    nsa_kv_cache_params p;
    nsa_kv_cache_params_init(&p);
    p.cfg = cfg, p.num_seqs = seqs, p.capacity = cap, p.num_kv_heads = Hkv;
    p.head_dim_k = s.Dk, p.head_dim_v = s.Dv, p.dtype = dt;
    const CacheBreak b = break_cache_params(f, p);
    nsa_kv_cache* c = nullptr;
    const nsa_status got = nsa_kv_cache_create(cx.ctx, &p, &c);
    ++counts[nsa_status_name(got)];
    ++*done;
    EXPECT_EQ(got, b.want) << b.field << ": " << cx.error();
    EXPECT_NE(cx.error().find(b.field), std::string::npos) << cx.error();
    EXPECT_EQ(c, nullptr);
    nsa_kv_cache_destroy(c);
    return;
  }
  nsa_test::CachePtr cache =
      nsa_test::make_cache(cx.ctx, cfg, seqs, cap, s, dt, mlp ? NSA_CMP_MLP : NSA_CMP_MEAN, &m);
  ASSERT_TRUE(cache);
  // Inputs for up to cap + 4 tokens; row r of q/k/v/gates is row r of these.
  const nsa_test::Shape rows_shape{1, std::max<int64_t>(s.T, seqs), s.Hq, Hkv, s.Dk, s.Dv};
  nsa_config rows_cfg = cfg;  // index tensors hold n entries a row: at most 64 here
  rows_cfg.slc_count = std::min(cfg.slc_count, 64);
  nsa_test::FwdCase c = nsa_test::make_case(rows_shape, rows_cfg, dt, seed);
  std::vector<int64_t> len(static_cast<size_t>(seqs), 0);
  for (int op = 0; op < budget().cache_ops && *done < max_ops; ++op, ++*done) {
    SCOPED_TRACE("op " + std::to_string(*done));
    nsa_test::FwdCase out = nsa_test::make_case(rows_shape, rows_cfg, dt, 1);
    for (nsa_test::Tensor* t : {&out.o, &out.lse_cmp, &out.lse_slc, &out.lse_win, &out.idx_out})
      poison(*t);
    const int kind = static_cast<int>(f.pick(0, 4));
    Outcome e;
    const int64_t seq = f.pick(0, seqs - 1);
    nsa_status got = NSA_OK;
    std::vector<int64_t> want_len = len;
    if (kind == 0) {  // append n tokens
      int64_t n = f.pick(0, 20);
      if (f.chance(15))
        n = cap - len[seq] + f.pick(1, 3), e = {NSA_ERR_INVALID_SHAPE, Break::kOverCapacity};
      n = std::min<int64_t>(n, c.q.desc().shape[1]);
      if (n > cap - len[seq] && e.how == Break::kNone)
        e = {NSA_ERR_INVALID_SHAPE, Break::kOverCapacity};
      nsa_tensor k = nsa_test::rows(c.k, 0, n), v = nsa_test::rows(c.v, 0, n);
      if (f.chance(10)) k.shape[2] += 1, e = {NSA_ERR_INVALID_SHAPE, Break::kWrongDk};
      got = nsa_kv_cache_append(cx.ctx, cache.get(), seq, &k, &v);
      if (e.want == NSA_OK) want_len[seq] += n;
    } else if (kind == 1 || kind == 2) {  // decode (NSA or dense) for a subset of sequences
      const int64_t S = f.pick(1, seqs);
      std::vector<int32_t> ids;
      for (int64_t i = 0; i < seqs; ++i) ids.push_back(static_cast<int32_t>(i));
      std::shuffle(ids.begin(), ids.end(), f.rng);
      ids.resize(static_cast<size_t>(S));
      const bool append = f.chance(70);
      for (int32_t id : ids) {
        if (append && len[id] >= cap) e = {NSA_ERR_INVALID_SHAPE, Break::kOverCapacity};
        if (!append && len[id] == 0) e = {NSA_ERR_INVALID_ARGUMENT, Break::kOverCapacity};
      }
      nsa_decode_params p = nsa_test::decode_row(c, out, 0, append);
      for (nsa_tensor* t : {&p.q, &p.k, &p.v, &p.g_cmp, &p.g_slc, &p.g_win, &p.o, &p.lse_cmp,
                            &p.lse_slc, &p.lse_win, &p.slc_indices_out}) {
        if (t->data) t->shape[0] = S;
      }
      if (cfg.slc_count > 64) p.slc_indices_out = nsa_tensor{};  // n entries per row: too many
      p.seq_ids = ids.data();
      const int r = static_cast<int>(f.pick(0, 9));
      if (r == 0) p.q.data = nullptr, e = {NSA_ERR_NULL_POINTER, Break::kNullQ};
      if (r == 1) p.q.shape[2] += 1, e = {NSA_ERR_INVALID_SHAPE, Break::kWrongDk};
      // The output's dtype is checked after the sequences' lengths: an earlier break wins.
      if (r == 2 && e.how == Break::kNone) {
        p.o.dtype = NSA_DTYPE_I32, e = {NSA_ERR_INVALID_DTYPE, Break::kWrongDtype};
      }
      if (r == 3)
        ids[0] = static_cast<int32_t>(seqs + f.pick(0, 3)),
        e = {NSA_ERR_INVALID_INDEX, Break::kSeqOutOfRange};
      if (r == 4 && S >= 2) ids[1] = ids[0], e = {NSA_ERR_INVALID_INDEX, Break::kSeqTwice};
      // The rows past the S in the call's view keep the poison no call may overwrite.
      const double poisoned = out.o.at({0, 0, 0, 0});
      if (kind == 1) {
        got = nsa_decode(cx.ctx, cache.get(), &p);
      } else {
        nsa_dense_decode_params dp;
        nsa_dense_decode_params_init(&dp);
        dp.q = p.q;
        dp.k = p.k;
        dp.v = p.v;
        dp.seq_ids = p.seq_ids;
        dp.o = p.o;
        dp.lse = p.lse_win;
        dp.window = static_cast<int32_t>(f.pick(0, 30));
        got = nsa_dense_decode(cx.ctx, cache.get(), &dp);
      }
      if (e.want == NSA_OK && append) {
        for (int32_t id : ids) ++want_len[id];
      }
      int64_t bad = 0, outside = 0;
      out.o.for_each([&](int64_t a, int64_t b, int64_t x, int64_t y) {
        const double v = out.o.at({a, b, x, y});
        if (b < S) bad += got == NSA_OK && !std::isfinite(v);
        if (b >= S) outside += v != poisoned;
      });
      EXPECT_EQ(bad, 0) << "decode wrote non-finite outputs from finite inputs";
      EXPECT_EQ(outside, 0) << "decode wrote rows past its view";
    } else if (kind == 3) {  // prefill an empty sequence
      const int64_t T = std::min<int64_t>(f.pick(0, 40), cap);
      nsa_prefill_params p;
      nsa_prefill_params_init(&p);
      p.seq = seq;
      p.q = nsa_test::rows(c.q, 0, T);
      p.k = nsa_test::rows(c.k, 0, T);
      p.v = nsa_test::rows(c.v, 0, T);
      p.g_cmp = nsa_test::rows(c.g_cmp, 0, T);
      p.g_slc = nsa_test::rows(c.g_slc, 0, T);
      p.g_win = nsa_test::rows(c.g_win, 0, T);
      p.o = nsa_test::rows(out.o, 0, T);
      p.lse_slc = nsa_test::rows(out.lse_slc, 0, T);
      if (len[seq] != 0) e = {NSA_ERR_INVALID_ARGUMENT, Break::kSeqTwice};
      got = nsa_prefill(cx.ctx, cache.get(), &p);
      if (e.want == NSA_OK) want_len[seq] = T;
    } else {  // reset
      got = nsa_kv_cache_reset(cx.ctx, cache.get(), seq);
      want_len[seq] = 0;
    }
    ++counts[nsa_status_name(got)];
    EXPECT_EQ(got, e.want) << "op kind " << kind << ": " << cx.error();
    if (got != NSA_OK) {
      EXPECT_FALSE(cx.error().empty());
      for (nsa_test::Tensor* t : {&out.o, &out.lse_cmp, &out.lse_slc, &out.lse_win, &out.idx_out}) {
        EXPECT_TRUE(untouched(*t)) << "an output was written by a failed call";
      }
      want_len = len;
    } else {
      EXPECT_TRUE(cx.error().empty());
    }
    len = want_len;
    for (int64_t q = 0; q < seqs; ++q) {
      ASSERT_EQ(nsa_kv_cache_len(cache.get(), q), len[q]) << "sequence " << q;
    }
  }
}

// One cache session drawn from a libFuzzer input (the fuzz_cache target).
inline void fuzz_cache(const uint8_t* data, size_t size) {
  Fuzz f(data, size);
  std::map<std::string, int64_t> counts;
  int64_t done = 0;
  fuzz_cache_session(f, budget().cache_ops, counts, &done);
}

}  // namespace nsa_fuzz
