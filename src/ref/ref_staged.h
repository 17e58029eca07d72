// Staged outputs for the reference's parallel loops. The reference allocates inside its loops
// (it is written to be read: std::vector everywhere), and parallel_for turns a failed allocation
// into NSA_ERR_OUT_OF_MEMORY; but by then other items may have stored their rows, and a failed
// call must write no output (nsa.h). So the loops write into private copies of the outputs, and
// only a loop that finished commits them to the caller's tensors.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <list>
#include <vector>

#include "nsa/nsa.h"

namespace nsa::ref {

class StagedOutputs {
 public:
  // Points *t, when present, at a contiguous copy of its elements (same shape and dtype); the
  // caller's view is kept for commit(). Throws std::bad_alloc: call it before the loop.
  void stage(nsa_tensor* t) {
    if (t->data == nullptr) return;
    Entry& e = entries_.emplace_back();
    e.caller = *t;
    const int64_t esize = static_cast<int64_t>(nsa_dtype_size(t->dtype));
    e.bytes.resize(static_cast<size_t>(std::max<int64_t>(1, numel(*t) * esize)));  // non-null
    nsa_tensor staged = *t;
    staged.data = e.bytes.data();
    int64_t stride = 1;
    for (int i = t->ndim - 1; i >= 0; --i) {
      staged.stride[i] = stride;
      stride *= t->shape[i];
    }
    // The copy starts as the caller's elements, so one the loop leaves alone commits unchanged.
    copy(e.caller, staged, /*to_staged=*/true);
    e.staged = staged;
    *t = staged;
  }

  // Copies every staged element back into the caller's tensor (padding between its elements is
  // never touched).
  void commit() const {
    for (const Entry& e : entries_) copy(e.caller, e.staged, /*to_staged=*/false);
  }

 private:
  struct Entry {
    nsa_tensor caller{}, staged{};
    std::vector<unsigned char> bytes;
  };

  static int64_t numel(const nsa_tensor& t) {
    int64_t n = 1;
    for (int i = 0; i < t.ndim; ++i) n *= t.shape[i];
    return n;
  }

  // Copies between two views of the same shape and dtype, in either direction, row by row (the
  // innermost dimension is contiguous in both: nsa.h requires stride 1 there).
  static void copy(const nsa_tensor& caller, const nsa_tensor& staged, bool to_staged) {
    const int r = caller.ndim - 1;
    const int64_t esize = static_cast<int64_t>(nsa_dtype_size(caller.dtype));
    const size_t row = static_cast<size_t>(caller.shape[r] * esize);
    int64_t n[3] = {1, 1, 1}, sc[3] = {0, 0, 0}, ss[3] = {0, 0, 0};
    for (int i = 0; i < r; ++i) {
      n[i] = caller.shape[i], sc[i] = caller.stride[i] * esize, ss[i] = staged.stride[i] * esize;
    }
    auto* cb = static_cast<unsigned char*>(caller.data);
    auto* sb = static_cast<unsigned char*>(staged.data);
    for (int64_t a = 0; a < n[0]; ++a)
      for (int64_t b = 0; b < n[1]; ++b)
        for (int64_t c = 0; c < n[2]; ++c) {
          unsigned char* x = cb + a * sc[0] + b * sc[1] + c * sc[2];
          unsigned char* y = sb + a * ss[0] + b * ss[1] + c * ss[2];
          if (to_staged) std::memcpy(y, x, row);
          else std::memcpy(x, y, row);
        }
  }

  std::list<Entry> entries_;  // a list: an entry's bytes never move once staged
};

}  // namespace nsa::ref
