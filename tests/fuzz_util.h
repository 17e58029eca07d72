// Building blocks of the API fuzzer (test_fuzz.cc): owned tensors with random layouts (padded,
// permuted, offset, broadcast inputs, huge strides on size-1 dimensions), byte snapshots that
// prove "nothing written" or "only the logical elements written", and random helpers.
// Every buffer is filled with a sentinel (NaN, or INT32_MIN for int32) before the logical
// elements get their values, so padding that a kernel writes, or an element it forgets, shows.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "fuzz_rng.h"
#include "test_util.h"

namespace nsa_fuzz {

inline int64_t uni(Rng& r, int64_t lo, int64_t hi) { return r.uniform(lo, hi); }  // inclusive

// How much work one generated call may do. The seeded ctest fuzzers keep the defaults; the
// libFuzzer targets (fuzz/) lower them for executions per second: their job is the checks that
// run before any work, under the sanitizers, while the numerics are compared with the reference
// by the ctest fuzzer and the numeric suites.
struct Budget {
  int64_t max_T = 200;         // tokens of a case
  int64_t max_B = 3;           // batch rows
  int64_t max_D = 40;          // head dims
  bool every_backend = true;   // an invalid call goes to every backend, else to one the input picks
  double compare_cost = 4e6;   // below this cost, a valid call runs on the CPU and the reference
                               // and the two are compared
  int64_t cache_ops = 40;      // operations on one KV cache
  int64_t max_capacity = 150;  // tokens per cache sequence
};
inline Budget& budget() {
  static Budget b;
  return b;
}
inline bool chance(Rng& r, double p) { return r.chance(p); }
template <typename T>
const T& pick(Rng& r, const std::vector<T>& v) {
  return v[static_cast<size_t>(uni(r, 0, static_cast<int64_t>(v.size()) - 1))];
}

// The dtype tag, read as the int a C caller may have stored (the enum may hold any int).
inline int dtype_int(const nsa_tensor& t) {
  int v;
  std::memcpy(&v, &t.dtype, sizeof v);
  return v;
}
inline void set_dtype_int(nsa_tensor& t, int v) { std::memcpy(&t.dtype, &v, sizeof v); }
inline size_t esize(nsa_dtype dt) { return dt == NSA_DTYPE_BF16 || dt == NSA_DTYPE_F16 ? 2 : 4; }

// The dtype tags an op accepts for a float data tensor (nsa.h: f32, bf16 or f16).
inline const std::vector<int>& float_tags() {
  static const std::vector<int> v = {NSA_DTYPE_F32, NSA_DTYPE_BF16, NSA_DTYPE_F16};
  return v;
}
inline bool is_float_tag(int tag) {
  return tag == NSA_DTYPE_F32 || tag == NSA_DTYPE_BF16 || tag == NSA_DTYPE_F16;
}
// A float dtype for generated data: f16 one time in five, else f32 or bf16 alike.
inline nsa_dtype pick_float(Rng& r) {
  return chance(r, 0.2) ? NSA_DTYPE_F16 : chance(r, 0.5) ? NSA_DTYPE_F32 : NSA_DTYPE_BF16;
}

// Dtype tags the fuzzer tries: every enum value and a few that are none.
inline const std::vector<int>& all_dtype_tags() {
  static const std::vector<int> v = {NSA_DTYPE_F32,
                                     NSA_DTYPE_BF16,
                                     NSA_DTYPE_F16,
                                     NSA_DTYPE_I32,
                                     -1,
                                     4,
                                     42,
                                     std::numeric_limits<int>::max(),
                                     std::numeric_limits<int>::min()};
  return v;
}

// How a tensor is laid out in its buffer. All are valid; `input` allows broadcast (stride 0).
struct LayoutOpts {
  bool input = true;
  bool plain = false;  // contiguous, no offset: for buffers the test itself reads back
};

// An owned tensor: a byte buffer, the descriptor of a view into it, and the element offsets of
// its logical elements (the rest of the buffer is padding).
class Buf {
 public:
  Buf() { std::memset(&d_, 0, sizeof d_); }
  Buf(nsa_dtype dt, const std::vector<int64_t>& shape, Rng& rng, LayoutOpts o = {}) : Buf() {
    const int nd = static_cast<int>(shape.size());
    d_.dtype = dt;
    d_.ndim = nd;
    for (int i = 0; i < nd; ++i) d_.shape[i] = shape[i];
    // Layout kinds: 0 contiguous; 1, 2 padded; 3 padded with the outer dimensions permuted in
    // memory; 4 padded, and for an input one outer dimension collapsed (stride 0 or another
    // dimension's stride); 5 padded, offset from the buffer start, and size-1 dimensions with a
    // stride of 2^40 (never stepped, so legal).
    const int kind = o.plain ? 0 : static_cast<int>(uni(rng, 0, 5));
    std::vector<int> order(nd - 1);  // memory order of the outer dimensions, outermost first
    std::iota(order.begin(), order.end(), 0);
    if (kind == 3) std::shuffle(order.begin(), order.end(), rng);
    const bool pad = kind >= 1;
    int64_t extent = 1;
    d_.stride[nd - 1] = 1;
    if (!o.plain && shape[nd - 1] == 1 && chance(rng, 0.3)) {
      d_.stride[nd - 1] = pick(rng, std::vector<int64_t>{0, 3, int64_t{1} << 40});  // unused
    }
    extent = std::max<int64_t>(shape[nd - 1], 1) + (pad ? uni(rng, 0, 3) : 0);
    for (int k = nd - 2; k >= 0; --k) {
      const int dim = order[k];
      d_.stride[dim] = extent;
      extent *= std::max<int64_t>(shape[dim], 1) + (pad ? uni(rng, 0, 1) : 0);
    }
    if (kind == 4 && o.input && nd > 1) {  // an input view may overlap itself: it is only read
      const int dim = static_cast<int>(uni(rng, 0, nd - 2));
      const int other = static_cast<int>(uni(rng, 0, nd - 1));
      // Stride 0 (broadcast), or another dimension's stride when that is smaller (elements
      // shared between the two); either way the footprint shrinks and stays in the buffer.
      d_.stride[dim] = d_.stride[other] < d_.stride[dim] && chance(rng, 0.5) ? d_.stride[other] : 0;
    }
    if (kind == 5) {
      for (int i = 0; i < nd - 1; ++i) {
        if (shape[i] == 1 && chance(rng, 0.5)) d_.stride[i] = int64_t{1} << 40;  // never stepped
      }
    }
    base_ = kind == 5 ? uni(rng, 1, 5) : 0;
    int64_t span = 0;
    bool empty = false;
    for (int i = 0; i < nd; ++i) {
      empty = empty || shape[i] == 0;
      if (shape[i] > 0) span += (shape[i] - 1) * d_.stride[i];
    }
    elems_ = base_ + (empty ? 0 : span + 1) + (o.plain ? 0 : 2);  // 2 trailing guard elements
    elems_ = std::max<int64_t>(elems_, 1);                        // never a NULL data pointer
    bytes_.assign(static_cast<size_t>(elems_) * esize(dt), 0);
    for (int64_t i = 0; i < elems_; ++i) set_abs(i, std::numeric_limits<double>::quiet_NaN());
    d_.data = bytes_.data() + base_ * esize(dt);
    for_each([&](int64_t, int64_t, int64_t, int64_t, int64_t o) { logical_.push_back(o); });
  }
  Buf(Buf&&) = default;  // the vector's heap block moves with it: d_.data stays valid
  Buf& operator=(Buf&&) = default;

  const nsa_tensor& desc() const { return d_; }
  nsa_dtype dtype() const { return d_.dtype; }
  const std::vector<unsigned char>& storage() const { return bytes_; }
  std::vector<unsigned char>& storage() { return bytes_; }
  int64_t numel() const { return static_cast<int64_t>(logical_.size()); }
  const std::vector<int64_t>& logical() const { return logical_; }  // with repeats if broadcast

  // f(i0, i1, i2, i3, offset) for every logical element, row-major (unused indices are 0).
  template <typename F>
  void for_each(F&& f) const {
    int64_t s[4] = {1, 1, 1, 1}, st[4] = {0, 0, 0, 0};
    for (int i = 0; i < d_.ndim; ++i) s[i] = d_.shape[i], st[i] = d_.stride[i];
    for (int64_t a = 0; a < s[0]; ++a)
      for (int64_t b = 0; b < s[1]; ++b)
        for (int64_t c = 0; c < s[2]; ++c)
          for (int64_t e = 0; e < s[3]; ++e)
            f(a, b, c, e, a * st[0] + b * st[1] + c * st[2] + e * st[3]);
  }
  int64_t off(int64_t a, int64_t b = 0, int64_t c = 0, int64_t e = 0) const {
    return a * d_.stride[0] + b * d_.stride[1] + c * d_.stride[2] + e * d_.stride[3];
  }
  double get(int64_t off) const { return get_in(bytes_, off); }
  // The element at `off` as stored in `bytes` (a snapshot of this buffer).
  double get_in(const std::vector<unsigned char>& bytes, int64_t off) const {
    const unsigned char* p = bytes.data() + (base_ + off) * esize(d_.dtype);
    if (d_.dtype == NSA_DTYPE_BF16 || d_.dtype == NSA_DTYPE_F16) {
      uint16_t h;
      std::memcpy(&h, p, 2);
      return d_.dtype == NSA_DTYPE_BF16 ? nsa_test::bf16_bits_to_float(h)
                                        : nsa_test::f16_bits_to_float(h);
    }
    if (d_.dtype == NSA_DTYPE_I32) {
      int32_t i;
      std::memcpy(&i, p, 4);
      return i;
    }
    float f;
    std::memcpy(&f, p, 4);
    return f;
  }
  void set(int64_t off, double v) { set_abs(base_ + off, v); }
  void fill_uniform(Rng& rng, double lo, double hi) {
    // 53 random bits scaled by hand: std::uniform_real_distribution computes a logarithm per
    // draw in libstdc++, which was the fuzz targets' largest cost.
    for (int64_t o : logical_)
      set(o, lo + (hi - lo) * static_cast<double>(rng.values()() >> 11) * 0x1.0p-53);
  }

  // Whether element i of the buffer (absolute) holds a logical element.
  std::vector<bool> logical_mask() const {
    std::vector<bool> m(static_cast<size_t>(elems_), false);
    for (int64_t o : logical_) m[static_cast<size_t>(base_ + o)] = true;
    return m;
  }

 private:
  void set_abs(int64_t i, double v) {
    unsigned char* p = bytes_.data() + i * esize(d_.dtype);
    if (d_.dtype == NSA_DTYPE_BF16 || d_.dtype == NSA_DTYPE_F16) {
      const uint16_t h = d_.dtype == NSA_DTYPE_BF16
                             ? nsa_test::float_to_bf16_bits(static_cast<float>(v))
                             : nsa_test::float_to_f16_bits(static_cast<float>(v));
      std::memcpy(p, &h, 2);
    } else if (d_.dtype == NSA_DTYPE_I32) {
      const int32_t x =
          std::isnan(v) ? std::numeric_limits<int32_t>::min() : static_cast<int32_t>(v);
      std::memcpy(p, &x, 4);
    } else {
      const float f = static_cast<float>(v);
      std::memcpy(p, &f, 4);
    }
  }
  nsa_tensor d_;
  std::vector<unsigned char> bytes_;
  std::vector<int64_t> logical_;
  int64_t base_ = 0, elems_ = 0;
};

// Byte snapshots of a set of buffers, taken before a call.
class Snapshot {
 public:
  explicit Snapshot(std::vector<const Buf*> bufs) : bufs_(std::move(bufs)) {
    for (const Buf* b : bufs_) bytes_.push_back(b->storage());
  }
  // Every byte of every buffer unchanged; returns false (and reports) otherwise.
  bool expect_unchanged(const char* what) const {
    bool ok = true;
    for (size_t i = 0; i < bufs_.size(); ++i) {
      if (bufs_[i]->storage() != bytes_[i]) {
        ADD_FAILURE() << what << ": buffer #" << i << " changed";
        ok = false;
      }
    }
    return ok;
  }
  // Bytes outside the logical elements unchanged (the padding and guard of an output view).
  void expect_padding_unchanged(const char* what) const {
    for (size_t i = 0; i < bufs_.size(); ++i) {
      const Buf& b = *bufs_[i];
      const std::vector<bool> m = b.logical_mask();
      const size_t es = esize(b.dtype());
      int64_t bad = 0;
      for (size_t e = 0; e < m.size(); ++e) {
        if (!m[e] && std::memcmp(&b.storage()[e * es], &bytes_[i][e * es], es) != 0) ++bad;
      }
      EXPECT_EQ(bad, 0) << what << ": buffer #" << i << " has padding elements written";
    }
  }
  void restore(std::vector<Buf*> bufs) const {
    for (size_t i = 0; i < bufs.size(); ++i) bufs[i]->storage() = bytes_[i];
  }
  const std::vector<unsigned char>& bytes(size_t i) const { return bytes_[i]; }

 private:
  std::vector<const Buf*> bufs_;
  std::vector<std::vector<unsigned char>> bytes_;
};

// A random valid config with sizes small enough for T <= 200, or (rarely) with extreme values
// (INT32_MAX blocks, window, count) that no buffer has to match: indices must then be absent.
inline nsa_config random_config(Rng& r, bool extreme) {
  nsa_config c;
  nsa_config_default(&c);
  if (chance(r, 0.1)) return c;  // the paper's defaults
  const int32_t big = std::numeric_limits<int32_t>::max();
  auto field = [&](int32_t lo, int32_t hi) {
    if (extreme && chance(r, 0.3)) return pick(r, std::vector<int32_t>{big, big - 1, 1 << 30});
    return static_cast<int32_t>(uni(r, lo, hi));
  };
  c.cmp_block = field(1, 40);
  c.cmp_stride = chance(r, 0.5) ? static_cast<int32_t>(uni(r, 1, std::min(c.cmp_block, 40)))
                                : c.cmp_block / (chance(r, 0.5) ? 2 : 1) + (c.cmp_block == 1);
  c.cmp_stride = std::max(1, std::min(c.cmp_stride, c.cmp_block));
  c.slc_block = field(1, 64);
  c.slc_init = static_cast<int32_t>(uni(r, 0, 2));
  c.slc_local = static_cast<int32_t>(uni(r, 0, 3));
  c.slc_count = static_cast<int32_t>(c.slc_init + c.slc_local + uni(r, 0, 6));
  if (c.slc_count == 0) c.slc_count = 1;
  // A count far above any block count, with no index tensor to match it: per-query storage must
  // be sized by the blocks that exist, not by n (an earlier version allocated gigabytes here).
  const int32_t many = big;
  if (extreme && chance(r, 0.3)) c.slc_count = many;
  if (extreme && c.slc_count == many && chance(r, 0.5))
    c.slc_init = many / 2, c.slc_local = many / 2;
  c.window = field(1, 250);
  c.scale = chance(r, 0.5) ? 0.0f : static_cast<float>(uni(r, 5, 15) / 10.0 / std::sqrt(32.0));
  return c;
}

// Random cu_seqlens over T tokens: S sequences, some empty.
inline std::vector<int32_t> random_cu(Rng& r, int64_t T) {
  const int64_t S = uni(r, 1, 5);
  std::vector<int32_t> cu = {0};
  for (int64_t s = 1; s < S; ++s) cu.push_back(static_cast<int32_t>(uni(r, 0, T)));
  cu.push_back(static_cast<int32_t>(T));
  std::sort(cu.begin(), cu.end());
  return cu;
}

// Mutations of cu_seqlens that make it invalid (NSA_ERR_INVALID_SEQLENS). `num_seqs` may change.
inline std::string break_cu(Rng& r, std::vector<int32_t>& cu, int64_t& num_seqs) {
  const int64_t S = static_cast<int64_t>(cu.size()) - 1;
  switch (uni(r, 0, 3)) {
    case 0:
      cu[0] = pick(r, std::vector<int32_t>{1, -1, 7, std::numeric_limits<int32_t>::min()});
      return "cu_seqlens[0] != 0";
    case 1:
      if (S >= 2) {
        const int64_t i = uni(r, 1, S - 1);
        cu[i] = cu[i + 1] + static_cast<int32_t>(uni(r, 1, 5));
        return "cu_seqlens decreasing";
      }
      cu[1] = -static_cast<int32_t>(uni(r, 1, 5));
      return "cu_seqlens[1] < 0";
    case 2:
      cu[S] +=
          chance(r, 0.5) ? static_cast<int32_t>(uni(r, 1, 9)) : -static_cast<int32_t>(uni(r, 1, 9));
      if (S >= 2 && cu[S] < cu[S - 1]) return "cu_seqlens decreasing at the end";
      return "cu_seqlens does not end at T";
    default:
      num_seqs = pick(r, std::vector<int64_t>{0, -1, std::numeric_limits<int64_t>::min()});
      return "num_seqs < 1";
  }
}

// Counters for the report at the end: API calls made, CPU-vs-reference comparisons, and query
// rows whose selections differed by a verified near-tie.
inline int64_t& exec_count() {
  static int64_t n = 0;
  return n;
}
inline int64_t& compare_count() {
  static int64_t n = 0;
  return n;
}
inline int64_t& tie_count() {
  static int64_t n = 0;
  return n;
}

}  // namespace nsa_fuzz
