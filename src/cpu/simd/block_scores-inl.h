// The block scores of SPEC.md section 4 step 2 (paper Eqs. 8-10), shared by the forward
// (forward_lanes.cc) and decode (decode.cc); per Highway target, included after
// foreach_target.h. The sums are whatever type the kernel keeps them in (one float per block in
// decode, a vector of per-head partial sums in the heads-in-lanes forward); the routine is
// compiled for each target so that the kernel's vector operations inline into it.
#if defined(NSA_CPU_SIMD_BLOCK_SCORES_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef NSA_CPU_SIMD_BLOCK_SCORES_INL_H_
#undef NSA_CPU_SIMD_BLOCK_SCORES_INL_H_
#else
#define NSA_CPU_SIMD_BLOCK_SCORES_INL_H_
#endif

#include <algorithm>
#include <cstdint>

#include <hwy/highway.h>

HWY_BEFORE_NAMESPACE();
namespace nsa::cpu {
namespace HWY_NAMESPACE {

// score[j] = sum over i in C_t of mass(i) * ov(i, j), j = 0 .. last (J = t / l'), where mass(i)
// is the group's probability mass on compressed token i (summed over the G heads: Eq. 10 shares
// one selection per group) and ov(i, j) = |[i d, i d + l) ∩ [j l', (j + 1) l')| / d, the
// overlap-consistent reading of Eq. 9 (SPEC 4.2). Tokens are taken in order 0 .. nc - 1, so each
// block's sum has the same order in every kernel:
//   mass(i) -> Acc          token i's mass (called once per token);
//   madd(m, w, acc) -> Acc  acc + m w, w the overlap weight ov(i, j) as a float;
//   load(j) -> Acc, store(j, acc)  block j's sum in the caller's memory, which starts zeroed.
// With l <= l' a token overlaps at most two blocks, j and j + 1: their sums stay in locals and
// each block is stored once, when the tokens move past it. A visible token ends at or before t,
// so it never reaches past J; the bound is kept for safety.
template <typename Acc, typename Mass, typename MulAdd, typename Load, typename Store>
HWY_INLINE void overlap_block_scores(int64_t l, int64_t d, int64_t lp, int64_t nc, int64_t last,
                                     Acc zero, Mass mass, MulAdd madd, Load load, Store store) {
  const float inv_d = 1.0f / static_cast<float>(d);
  int64_t j_lo = 0;  // the block holding token i's first position, advanced without a division
  if (l <= lp) {
    Acc cur = zero, next = zero;
    for (int64_t i = 0; i < nc; ++i) {
      const Acc m = mass(i);
      const int64_t lo = i * d, hi = lo + l;
      while ((j_lo + 1) * lp <= lo) {
        store(j_lo, cur);
        cur = next;
        next = zero;
        ++j_lo;
      }
      const int64_t split = (j_lo + 1) * lp;  // the end of block j_lo
      cur = madd(m, static_cast<float>(std::min(hi, split) - lo) * inv_d, cur);
      if (hi > split && j_lo + 1 <= last) {
        next = madd(m, static_cast<float>(hi - split) * inv_d, next);
      }
    }
    store(j_lo, cur);
    if (j_lo + 1 <= last) store(j_lo + 1, next);
    return;
  }
  for (int64_t i = 0; i < nc; ++i) {
    const Acc m = mass(i);
    const int64_t lo = i * d, hi = lo + l;
    while ((j_lo + 1) * lp <= lo) ++j_lo;
    for (int64_t j = j_lo; j * lp < hi && j <= last; ++j) {
      const int64_t ov = std::min(hi, (j + 1) * lp) - std::max(lo, j * lp);
      store(j, madd(m, static_cast<float>(ov) * inv_d, load(j)));
    }
  }
}

}  // namespace HWY_NAMESPACE
}  // namespace nsa::cpu
HWY_AFTER_NAMESPACE();

#endif  // NSA_CPU_SIMD_BLOCK_SCORES_INL_H_
