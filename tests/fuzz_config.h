// The configuration and descriptor helpers of the C API under the fuzzer (fuzz_api.h):
// nsa_config_validate, nsa_cmp_len and nsa_tensor_contiguous on extreme values (0, +-1,
// INT32_MIN/MAX, NaN/inf/negative scales, cmp_stride > cmp_block, slc_init + slc_local >
// slc_count, shapes whose element count passes INT64_MAX, ranks outside 1..4). The expected
// verdicts are computed here from the rules nsa.h and SPEC.md section 2 state, not from src/.
#pragma once

#include <algorithm>
#include <cmath>
#include <sstream>
#include <string>
#include <vector>

#include "fuzz_api.h"

namespace nsa_fuzz {

// The fields of c that break a stated rule (empty: c is valid), from nsa.h's field comments and
// SPEC.md 2: l, d, l', n and w are sizes (zero sizes are invalid, so each is >= 1); n_init and
// n_local count blocks (>= 0); d <= l; n counts the forced blocks too, so n >= n_init + n_local
// (in 64 bits: the sum of two int32 may not fit one); the scale is a softmax scale, 0 selecting
// 1/sqrt(Dk), so a finite number >= 0. A rule between two fields names both: the message may
// name either.
inline std::vector<std::string> config_faults(const nsa_config& c) {
  std::vector<std::string> f;
  const std::pair<const char*, int32_t> sizes[] = {{"cmp_block", c.cmp_block},
                                                   {"cmp_stride", c.cmp_stride},
                                                   {"slc_block", c.slc_block},
                                                   {"slc_count", c.slc_count},
                                                   {"window", c.window}};
  for (const auto& s : sizes) {
    if (s.second < 1) f.push_back(s.first);
  }
  if (c.slc_init < 0) f.push_back("slc_init");
  if (c.slc_local < 0) f.push_back("slc_local");
  if (c.cmp_stride > c.cmp_block) f.insert(f.end(), {"cmp_stride", "cmp_block"});
  if (int64_t{c.slc_init} + int64_t{c.slc_local} > int64_t{c.slc_count}) {
    f.insert(f.end(), {"slc_count", "slc_init", "slc_local"});
  }
  if (!std::isfinite(c.scale) || c.scale < 0.0f) f.push_back("scale");
  return f;
}

inline int32_t extreme_int(Rng& r) {
  const int32_t big = std::numeric_limits<int32_t>::max(),
                small = std::numeric_limits<int32_t>::min();
  if (chance(r, 0.3)) return static_cast<int32_t>(uni(r, -3, 70));
  return pick(r, std::vector<int32_t>{0, 1, -1, 2, 16, 64, big, big - 1, small, small + 1, 1 << 30,
                                      -(1 << 30)});
}

inline float extreme_scale(Rng& r) {
  using L = std::numeric_limits<float>;
  return pick(r, std::vector<float>{0.0f, -0.0f, 0.125f, 1.0f, 1e30f, L::min(), L::denorm_min(),
                                    L::max(), -L::min(), -L::denorm_min(), -0.125f, L::quiet_NaN(),
                                    -L::quiet_NaN(), L::infinity(), -L::infinity()});
}

// A valid config with one to four fields replaced by extremes, or by values just across a rule
// between two fields (cmp_stride vs cmp_block, slc_count vs slc_init + slc_local).
inline nsa_config extreme_config(Rng& r) {
  nsa_config c = random_config(r, chance(r, 0.3));
  int32_t* fields[7] = {&c.cmp_block, &c.cmp_stride, &c.slc_block, &c.slc_count,
                        &c.slc_init,  &c.slc_local,  &c.window};
  const int64_t changes = chance(r, 0.15) ? 0 : uni(r, 1, 4);
  for (int64_t i = 0; i < changes; ++i) {
    switch (uni(r, 0, 3)) {
      case 0: *fields[uni(r, 0, 6)] = extreme_int(r); break;
      case 1: {
        const int64_t d = int64_t{c.cmp_block} + uni(r, -1, 1);
        c.cmp_stride = static_cast<int32_t>(std::clamp<int64_t>(d, INT32_MIN, INT32_MAX));
        break;
      }
      case 2: {
        const int64_t n = int64_t{c.slc_init} + c.slc_local + uni(r, -1, 1);
        c.slc_count = static_cast<int32_t>(std::clamp<int64_t>(n, INT32_MIN, INT32_MAX));
        break;
      }
      default: c.scale = extreme_scale(r); break;
    }
  }
  return c;
}

// nsa.h: Tc = t >= l ? (t - l) / d + 1 : 0. With l < 1 or d < 1 there is no block (and the
// quotient is undefined for d = 0): 0.
inline int64_t expected_cmp_len(const nsa_config& c, int64_t t) {
  if (c.cmp_block < 1 || c.cmp_stride < 1 || t < c.cmp_block) return 0;
  return (t - c.cmp_block) / c.cmp_stride + 1;
}

inline void check_validate(Rng& r, const nsa_config& c) {
  const std::vector<std::string> faults = config_faults(c);
  std::string want = "valid";
  for (const std::string& f : faults) want += (want == "valid" ? ": " : ", ") + f;
  SCOPED_TRACE("nsa_config_validate l=" + std::to_string(c.cmp_block) +
               " d=" + std::to_string(c.cmp_stride) + " l'=" + std::to_string(c.slc_block) +
               " n=" + std::to_string(c.slc_count) + " init=" + std::to_string(c.slc_init) +
               " local=" + std::to_string(c.slc_local) + " w=" + std::to_string(c.window) +
               " scale=" + std::to_string(c.scale) + " | " + want);
  nsa_context* ctx = nullptr;
  if (chance(r, 0.8)) {
    ASSERT_EQ(nsa_context_create(&ctx), NSA_OK);
  }
  if (ctx != nullptr && chance(r, 0.5)) nsa_context_set_num_threads(ctx, -1);  // a stale message
  const bool null_cfg = chance(r, 0.03);
  const nsa_status s = nsa_config_validate(ctx, null_cfg ? nullptr : &c);
  const std::string msg = nsa_last_error(ctx);
  ++exec_count();
  ++status_counts()[nsa_status_name(s)];
  if (null_cfg) {
    EXPECT_EQ(s, NSA_ERR_NULL_POINTER) << msg;
    if (ctx != nullptr) {
      EXPECT_NE(msg.find("cfg"), std::string::npos) << msg;
    }
  } else if (faults.empty()) {
    EXPECT_EQ(s, NSA_OK) << msg;
    EXPECT_EQ(msg, "");
  } else {
    EXPECT_EQ(s, NSA_ERR_INVALID_CONFIG) << msg;
    bool named = false;
    for (const std::string& f : faults) named = named || msg.find(f) != std::string::npos;
    if (ctx != nullptr) {
      EXPECT_TRUE(named) << "message \"" << msg << "\" names no faulty field";
    }
  }
  nsa_context_destroy(ctx);
}

inline void check_cmp_len(Rng& r, const nsa_config& c) {
  const int64_t l = c.cmp_block, d = c.cmp_stride, big = std::numeric_limits<int64_t>::max();
  const std::vector<int64_t> ts = {0,
                                   1,
                                   -1,
                                   l - 1,
                                   l,
                                   l + 1,
                                   l + d,
                                   uni(r, 0, 1000),
                                   uni(r, -1000, 1000),
                                   big,
                                   std::numeric_limits<int64_t>::min(),
                                   int64_t{INT32_MAX} + uni(r, 0, 9)};
  for (int64_t t : ts) {
    EXPECT_EQ(nsa_cmp_len(&c, t), expected_cmp_len(c, t))
        << "nsa_cmp_len l=" << l << " d=" << d << " t=" << t;
  }
}

// nsa_tensor_contiguous: the fields copied, row-major strides where they fit int64; and what no
// buffer can back (an element count whose bytes pass INT64_MAX, a negative size, a rank outside
// 1..4) is a shape error when an op is given it (x of nsa_compress, validated before any read).
inline void check_contiguous(Rng& r) {
  const int64_t big = std::numeric_limits<int64_t>::max();
  const int32_t ndim =
      chance(r, 0.8)
          ? static_cast<int32_t>(uni(r, 1, 4))
          : pick(r, std::vector<int32_t>{0, -1, 5, 8, std::numeric_limits<int32_t>::min()});
  int64_t shape[8];
  for (int64_t& s : shape) {
    s = chance(r, 0.5) ? uni(r, 0, 9)
                       : pick(r, std::vector<int64_t>{1 << 20, int64_t{1} << 31,
                                                      (int64_t{1} << 32) + 1, int64_t{1} << 40, big,
                                                      -1, std::numeric_limits<int64_t>::min()});
  }
  const bool null_shape = chance(r, 0.05);
  const nsa_dtype dt =
      pick(r, std::vector<nsa_dtype>{NSA_DTYPE_F32, NSA_DTYPE_BF16, NSA_DTYPE_F16, NSA_DTYPE_I32});
  float cell[4] = {0, 0, 0, 0};
  const nsa_tensor t = nsa_tensor_contiguous(cell, dt, ndim, null_shape ? nullptr : shape);
  std::ostringstream os;
  os << "nsa_tensor_contiguous ndim=" << ndim << (null_shape ? " shape=NULL" : " shape=");
  for (int i = 0; !null_shape && i < std::min(ndim, 8); ++i) os << shape[i] << " ";
  SCOPED_TRACE(os.str() + nsa_dtype_name(dt));
  EXPECT_EQ(t.data, static_cast<void*>(cell));
  EXPECT_EQ(dtype_int(t), static_cast<int>(dt));
  const bool rank_ok = ndim >= 1 && ndim <= NSA_MAX_DIMS && !null_shape;
  __int128 count = 1;  // the element count, exactly
  bool negative = false, empty = false;
  if (rank_ok) {
    EXPECT_EQ(t.ndim, ndim);
    EXPECT_EQ(t.stride[ndim - 1], 1);
    __int128 inner = 1;  // elements in the dimensions after i
    for (int i = ndim - 1; i >= 0; --i) {
      EXPECT_EQ(t.shape[i], shape[i]) << "dimension " << i;
      if (i < ndim - 1 && inner <= big) {
        EXPECT_EQ(t.stride[i], static_cast<int64_t>(inner)) << "dimension " << i;
      }
      if (shape[i] < 1 || inner > big)
        inner = big + static_cast<__int128>(1);  // no stride to check
      else inner *= shape[i];
      negative = negative || shape[i] < 0;
      empty = empty || shape[i] == 0;
      if (shape[i] > 0)
        count = std::min<__int128>(count * shape[i], big + static_cast<__int128>(1));
    }
  }
  const bool f = dt == NSA_DTYPE_F32 || dt == NSA_DTYPE_BF16 || dt == NSA_DTYPE_F16;
  const bool too_big = !empty && count * static_cast<__int128>(esize(dt)) > big;
  if (!f || (rank_ok && ndim == 4 && !negative && !too_big)) return;  // an op would accept it
  nsa_compress_params p;
  nsa_compress_params_init(&p);
  p.x = t;
  p.out = t;  // never reached: x is rejected first
  std::string msg;
  const nsa_status s =
      on_backend(r, NSA_BACKEND_REF, &msg, [&](nsa_context* ctx) { return nsa_compress(ctx, &p); });
  EXPECT_EQ(s, NSA_ERR_INVALID_SHAPE) << msg;
  EXPECT_NE(msg.find("x:"), std::string::npos) << msg;
}

// One round: a config through nsa_config_validate and nsa_cmp_len, and one descriptor.
inline void fuzz_config(Rng& r) {
  const nsa_config c = extreme_config(r);
  check_validate(r, c);
  check_cmp_len(r, c);
  check_contiguous(r);
}

}  // namespace nsa_fuzz
