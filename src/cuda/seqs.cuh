// Finding a token's sequence on the device (nsa.h, "Where memory lives": a CUDA call reads
// cu_seqlens where it lives, never copying it to the host). Invalid contents (not starting at 0,
// decreasing, not ending at T, more compressed rows than the tensor has) must not make a kernel
// read or write out of bounds: a token whose sequence cannot be placed is skipped, and
// compressed rows are clamped to the tensor's.
#pragma once

#include <cstdint>

namespace nsa::cuda {

// SPEC 3: Tc of a sequence of len tokens.
__host__ __device__ inline int64_t cmp_len(int64_t len, int64_t l, int64_t d) {
  return len >= l ? (len - l) / d + 1 : 0;
}

// One query's place: its batch row, its sequence's first token (row index along T) and length,
// its position t in that sequence, and the first compressed row of the sequence.
struct Place {
  int64_t b = 0, start = 0, len = 0, t = 0, cmp_start = 0;
  bool ok = false;
};

// Token `tok` of batch row b, in a batch of fixed-length sequences (cu == nullptr) or a packed
// one (cu[0..S], B = 1).
__device__ inline Place place_token(const int32_t* cu, int64_t S, int64_t b, int64_t tok, int64_t T,
                                    int64_t l, int64_t d) {
  Place p;
  p.b = b;
  if (cu == nullptr) {
    p.len = T;
    p.t = tok;
    p.ok = true;
    return p;
  }
  // The last s with cu[s] <= tok; cu may be anything, so the search only stays in [0, S).
  int64_t lo = 0, hi = S - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (cu[mid] <= tok) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  const int64_t begin = cu[lo], end = cu[lo + 1];
  if (begin < 0 || begin > tok || end <= tok || end > T) return p;
  p.start = begin;
  p.len = end - begin;
  p.t = tok - begin;
  for (int64_t s = 0; s < lo; ++s) {  // O(S) per token: S is small next to the attention's work
    const int64_t n = int64_t(cu[s + 1]) - cu[s];
    p.cmp_start += n > 0 ? cmp_len(n, l, d) : 0;
  }
  p.ok = true;
  return p;
}

}  // namespace nsa::cuda
