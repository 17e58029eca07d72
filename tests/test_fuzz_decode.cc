// A seeded, randomized fuzzer of the KV cache and decode API: random caches (config, dtype,
// compression, capacity), then random sequences of append / prefill / decode / dense decode /
// reset, each either valid or broken in one chosen way. Invariants:
//   - no crash (and, in the sanitizer build, no out-of-bounds access or undefined behaviour);
//   - a failed call returns the expected status with a non-empty message, appends nothing and
//     writes no output byte;
//   - a successful call has an empty message, advances exactly the sequences it should, writes
//     finite outputs (the inputs are finite) and never writes past its output views.
// NSA_FUZZ_ITERS (operations; default ~2 s in Release) and NSA_FUZZ_SEED give longer runs.
#include <gtest/gtest.h>

#include <cstdlib>
#include <map>

#include "decode_util.h"

namespace {
using namespace nsa_test;

int64_t env_int(const char* name, int64_t fallback) {
  const char* s = std::getenv(name);
  return s != nullptr && *s != '\0' ? std::strtoll(s, nullptr, 10) : fallback;
}

struct Fuzz {
  std::mt19937_64 rng;
  explicit Fuzz(uint64_t seed) : rng(seed) {}
  int64_t pick(int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng); }
  bool chance(int percent) { return pick(0, 99) < percent; }
};

// The ways a call is broken, and the status each must give.
enum class Break { kNone, kNullQ, kWrongDk, kWrongDtype, kSeqOutOfRange, kSeqTwice, kOverCapacity };

struct Outcome {
  nsa_status want = NSA_OK;
  Break how = Break::kNone;
};

// Outputs filled with a byte pattern, so an untouched output is recognisable.
void poison(Tensor& t) {
  auto& bytes = const_cast<std::vector<unsigned char>&>(t.storage());
  std::fill(bytes.begin(), bytes.end(), 0x7f);
}
bool untouched(const Tensor& t) {
  for (unsigned char b : t.storage()) {
    if (b != 0x7f) return false;
  }
  return true;
}

TEST(FuzzDecode, RandomOperationsKeepTheInvariants) {
  const int64_t ops = env_int("NSA_FUZZ_ITERS", 1500);
  const uint64_t seed = static_cast<uint64_t>(env_int("NSA_FUZZ_SEED", 777));
  Fuzz f(seed);
  std::map<std::string, int64_t> counts;
  int64_t done = 0;
  while (done < ops) {
    // A cache.
    const int32_t l = static_cast<int32_t>(f.pick(1, 24));
    const nsa_config cfg = config(l, static_cast<int32_t>(f.pick(1, l)), static_cast<int32_t>(f.pick(1, 40)),
                                  static_cast<int32_t>(f.pick(3, 6)), 1, 2, static_cast<int32_t>(f.pick(1, 60)));
    const int64_t Hkv = f.pick(1, 2), G = f.pick(1, 5), seqs = f.pick(1, 3), cap = f.pick(1, 150);
    const Shape s{1, cap + 4, Hkv * G, Hkv, f.pick(1, 40), f.pick(1, 40)};
    const nsa_dtype dt = f.chance(50) ? NSA_DTYPE_BF16 : NSA_DTYPE_F32;
    Context cx(static_cast<int>(f.pick(0, 3)));
    CachePtr cache = make_cache(cx.ctx, cfg, seqs, cap, s, dt, NSA_CMP_MEAN);
    ASSERT_TRUE(cache);
    // Inputs for up to cap + 4 tokens; row r of q/k/v/gates is row r of these.
    FwdCase c = make_case(Shape{1, std::max<int64_t>(s.T, seqs), s.Hq, Hkv, s.Dk, s.Dv}, cfg, dt,
                          seed + done);
    std::vector<int64_t> len(static_cast<size_t>(seqs), 0);
    for (int op = 0; op < 40 && done < ops; ++op, ++done) {
      SCOPED_TRACE("seed " + std::to_string(seed) + " op " + std::to_string(done));
      FwdCase out = make_case(Shape{1, std::max<int64_t>(s.T, seqs), s.Hq, Hkv, s.Dk, s.Dv}, cfg,
                              dt, 1);
      for (Tensor* t : {&out.o, &out.lse_cmp, &out.lse_slc, &out.lse_win, &out.idx_out}) poison(*t);
      const int kind = static_cast<int>(f.pick(0, 4));
      Outcome e;
      const int64_t seq = f.pick(0, seqs - 1);
      nsa_status got = NSA_OK;
      std::vector<int64_t> want_len = len;
      if (kind == 0) {  // append n tokens
        int64_t n = f.pick(0, 20);
        if (f.chance(15)) n = cap - len[seq] + f.pick(1, 3), e = {NSA_ERR_INVALID_SHAPE, Break::kOverCapacity};
        n = std::min<int64_t>(n, c.q.desc().shape[1]);
        if (n > cap - len[seq] && e.how == Break::kNone) e = {NSA_ERR_INVALID_SHAPE, Break::kOverCapacity};
        nsa_tensor k = rows(c.k, 0, n), v = rows(c.v, 0, n);
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
        nsa_decode_params p = decode_row(c, out, 0, append);
        for (nsa_tensor* t : {&p.q, &p.k, &p.v, &p.g_cmp, &p.g_slc, &p.g_win, &p.o, &p.lse_cmp,
                              &p.lse_slc, &p.lse_win, &p.slc_indices_out}) {
          if (t->data) t->shape[0] = S;
        }
        p.seq_ids = ids.data();
        const int r = static_cast<int>(f.pick(0, 9));
        if (r == 0) p.q.data = nullptr, e = {NSA_ERR_NULL_POINTER, Break::kNullQ};
        if (r == 1) p.q.shape[2] += 1, e = {NSA_ERR_INVALID_SHAPE, Break::kWrongDk};
        // The output's dtype is checked after the sequences' lengths: an earlier break wins.
        if (r == 2 && e.how == Break::kNone) {
          p.o.dtype = NSA_DTYPE_I32, e = {NSA_ERR_INVALID_DTYPE, Break::kWrongDtype};
        }
        if (r == 3) ids[0] = static_cast<int32_t>(seqs + f.pick(0, 3)), e = {NSA_ERR_INVALID_INDEX, Break::kSeqOutOfRange};
        if (r == 4 && S >= 2) ids[1] = ids[0], e = {NSA_ERR_INVALID_INDEX, Break::kSeqTwice};
        if (kind == 1) {
          got = nsa_decode(cx.ctx, cache.get(), &p);
        } else {
          nsa_dense_decode_params dp;
          nsa_dense_decode_params_init(&dp);
          dp.q = p.q; dp.k = p.k; dp.v = p.v; dp.seq_ids = p.seq_ids; dp.o = p.o;
          dp.lse = p.lse_win;
          dp.window = static_cast<int32_t>(f.pick(0, 30));
          got = nsa_dense_decode(cx.ctx, cache.get(), &dp);
        }
        if (e.want == NSA_OK && append) {
          for (int32_t id : ids) ++want_len[id];
        }
        if (got == NSA_OK) {
          int64_t bad = 0;
          out.o.for_each([&](int64_t a, int64_t b, int64_t x, int64_t y) {
            if (b < S) bad += !std::isfinite(out.o.at({a, b, x, y}));
          });
          EXPECT_EQ(bad, 0) << "decode wrote non-finite outputs from finite inputs";
        }
      } else if (kind == 3) {  // prefill an empty sequence
        const int64_t T = std::min<int64_t>(f.pick(0, 40), cap);
        nsa_prefill_params p;
        nsa_prefill_params_init(&p);
        p.seq = seq;
        p.q = rows(c.q, 0, T); p.k = rows(c.k, 0, T); p.v = rows(c.v, 0, T);
        p.g_cmp = rows(c.g_cmp, 0, T); p.g_slc = rows(c.g_slc, 0, T); p.g_win = rows(c.g_win, 0, T);
        p.o = rows(out.o, 0, T); p.lse_slc = rows(out.lse_slc, 0, T);
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
        for (Tensor* t : {&out.o, &out.lse_cmp, &out.lse_slc, &out.lse_win, &out.idx_out}) {
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
  for (const auto& [name, n] : counts) std::printf("%s: %lld\n", name.c_str(), (long long)n);
  EXPECT_GT(counts["NSA_OK"], ops / 4);  // the fuzzer exercises success, not only errors
}

}  // namespace
