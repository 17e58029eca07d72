// Mutations of one tensor argument, shared by the nsa_fwd and nsa_compress fuzzers. Each breaks a
// valid descriptor in one way whose status nsa.h fixes (NULL data, a dtype the argument does not
// accept, a wrong rank or size, a negative or non-unit inner stride, an output that overlaps
// itself, a span past 64-bit offsets) and names the argument the message must mention.
// Descriptors only change: the buffers stay as they were, and a rejected call may not touch them.
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "fuzz_util.h"

namespace nsa_fuzz {

// One tensor argument of a call, as the mutations see it.
struct TArg {
  const char* name;
  nsa_tensor* t;
  std::vector<int> dtypes;  // the dtype tags it accepts in this call
  bool required = false;
  bool output = false;
  unsigned defining = 0;         // bit i: dimension i sets a size others are checked against,
                                 // so a wrong size there is reported at another argument
  bool float_elsewhere = false;  // a float dtype here is reported at another argument
  unsigned no_size = 0;          // bit i: a changed size in dimension i may still be valid
  // bit i: dimension i is compared with cu_seqlens's contents (a packed call's compressed rows),
  // which nsa.h checks after every descriptor rule ("Where memory lives"); a grown size may first
  // break one of those: the view overlapping itself, or another argument's bytes (the backward
  // calls' aliasing rule). Either is then an equally valid report of the one mutation.
  unsigned content_sized = 0;
};

enum class TMut { kNull, kDtype, kNdim, kSize, kNegStride, kInnerStride, kOverlap, kSpan };

struct Expect {
  Expect(nsa_status w = NSA_OK, std::string wh = {}, std::string n = {})
      : want(w), what(std::move(wh)), needle(std::move(n)) {}
  nsa_status want = NSA_OK;
  std::string what;              // the mutation, for failure messages
  std::string needle;            // a substring the error message must contain ("" if ambiguous)
  std::vector<nsa_status> also;  // other statuses the same mutation may validly report first
};

inline bool nonempty(const nsa_tensor& t) {
  for (int i = 0; i < t.ndim; ++i) {
    if (t.shape[i] == 0) return false;
  }
  return true;
}

// Applies mutation `m` to a random argument it applies to; false when none qualifies.
inline bool mutate_tensor(Rng& r, const std::vector<TArg>& args, TMut m, Expect* e) {
  std::vector<const TArg*> ok;
  for (const TArg& a : args) {
    const nsa_tensor& t = *a.t;
    const int nd = t.ndim;
    bool fits = true;
    switch (m) {
      case TMut::kNull: fits = a.required; break;
      case TMut::kInnerStride: fits = t.shape[nd - 1] > 1; break;
      case TMut::kOverlap: {
        int big = 0;
        for (int i = 0; i < nd; ++i) big += t.shape[i] > 1;
        fits = a.output && nonempty(t) && big >= 1 &&
               (big >= 2 || t.shape[nd - 1] <= 1);  // an outer dimension of size > 1 to collapse
        break;
      }
      case TMut::kSpan: {
        bool two = false;
        for (int i = 0; i < nd; ++i) two = two || t.shape[i] >= 2;
        fits = nonempty(t) && two;
        break;
      }
      default: break;
    }
    if (fits) ok.push_back(&a);
  }
  if (ok.empty()) return false;
  const TArg& a = *pick(r, ok);
  nsa_tensor& t = *a.t;
  const int nd = t.ndim;
  e->needle = std::string(a.name) + ":";
  e->what = std::string(a.name) + ": ";
  switch (m) {
    case TMut::kNull:
      t.data = nullptr;
      e->want = NSA_ERR_NULL_POINTER, e->what += "data NULL";
      return true;
    case TMut::kDtype: {
      std::vector<int> bad;
      for (int tag : all_dtype_tags()) {
        if (std::find(a.dtypes.begin(), a.dtypes.end(), tag) == a.dtypes.end()) bad.push_back(tag);
      }
      const int tag = pick(r, bad);
      set_dtype_int(t, tag);
      if (a.float_elsewhere && is_float_tag(tag)) e->needle.clear();
      e->want = NSA_ERR_INVALID_DTYPE, e->what += "dtype tag " + std::to_string(tag);
      return true;
    }
    case TMut::kNdim: {
      int v = nd;
      while (v == nd) v = pick(r, std::vector<int>{-1, 0, 1, 2, 3, 4, 5, 100});
      t.ndim = v;
      e->want = NSA_ERR_INVALID_SHAPE, e->what += "ndim " + std::to_string(v);
      return true;
    }
    case TMut::kSize: {
      std::vector<int> dims;
      for (int i = 0; i < nd; ++i) {
        if (!(a.no_size >> i & 1)) dims.push_back(i);
      }
      if (dims.empty()) return false;
      const int d = pick(r, dims);
      const int64_t old = t.shape[d];
      int64_t v = old;
      while (v == old) {
        v = chance(r, 0.2) ? -uni(r, 1, 3) : old + (chance(r, 0.5) ? 1 : -1) * uni(r, 1, 3);
      }
      t.shape[d] = v;
      // A size-1 last dimension may carry any stride; a larger one must be contiguous. Reset it
      // so that the size is the only thing wrong.
      if (d == nd - 1) t.stride[d] = 1;
      if (a.defining >> d & 1) e->needle.clear();
      if ((a.content_sized >> d & 1) && v > old) {
        e->also = {NSA_ERR_INVALID_STRIDE, NSA_ERR_INVALID_ARGUMENT};
      }
      e->want = NSA_ERR_INVALID_SHAPE;
      e->what +=
          "size[" + std::to_string(d) + "] " + std::to_string(old) + " -> " + std::to_string(v);
      return true;
    }
    case TMut::kNegStride: {
      const int d = static_cast<int>(uni(r, 0, nd - 1));
      t.stride[d] = chance(r, 0.2) ? std::numeric_limits<int64_t>::min() : -uni(r, 1, 1000);
      e->want = NSA_ERR_INVALID_STRIDE, e->what += "negative stride[" + std::to_string(d) + "]";
      return true;
    }
    case TMut::kInnerStride:
      t.stride[nd - 1] = pick(r, std::vector<int64_t>{0, 2, 3, 1 << 20});
      e->want = NSA_ERR_INVALID_STRIDE;
      e->what += "inner stride " + std::to_string(t.stride[nd - 1]);
      return true;
    case TMut::kOverlap: {
      // Collapse an outer dimension of size > 1 onto stride 0, or onto the stride of another
      // dimension of size > 1: two distinct elements then share an address.
      std::vector<int> outer, big;
      for (int i = 0; i < nd; ++i) {
        if (t.shape[i] > 1) big.push_back(i);
        if (t.shape[i] > 1 && i < nd - 1) outer.push_back(i);
      }
      const int d = pick(r, outer);
      std::vector<int> others;
      for (int i : big) {
        if (i != d) others.push_back(i);
      }
      t.stride[d] = others.empty() || chance(r, 0.3) ? 0 : t.stride[pick(r, others)];
      e->want = NSA_ERR_INVALID_STRIDE;
      e->what +=
          "overlapping output, stride[" + std::to_string(d) + "] = " + std::to_string(t.stride[d]);
      return true;
    }
    case TMut::kSpan: {
      std::vector<int> dims;
      for (int i = 0; i < nd; ++i) {
        if (t.shape[i] >= 2) dims.push_back(i);
      }
      const int d = pick(r, dims);
      t.stride[d] = int64_t{1} << 62;  // (size - 1) * stride * element size overflows int64
      e->want = NSA_ERR_INVALID_SHAPE, e->what += "span overflow in dim " + std::to_string(d);
      return true;
    }
  }
  return false;
}

inline TMut random_tmut(Rng& r) {
  return static_cast<TMut>(uni(r, 0, static_cast<int>(TMut::kSpan)));
}

}  // namespace nsa_fuzz
