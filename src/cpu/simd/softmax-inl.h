// The online softmax step of the CPU kernels with its non-finite rule (per Highway target;
// included after foreach_target.h by forward_lanes.cc, dense_fwd.cc and decode.cc).
//
// Each branch is its own softmax over its keys (SPEC 4 steps 1, 4, 5; paper Eq. 5), computed
// online (Milakov & Gimelshein; FlashAttention-2): a running max m and sum l per head, and the
// output rescaled by alpha = exp(m_old - m_new) when m grows. The rule for non-finite scores,
// the same in every kernel (README "Non-finite inputs", SPEC 4.1):
//   - a NaN or +inf score poisons its head: l becomes NaN, and then o and lse are NaN. Vector
//     Max and Exp would silently drop a NaN, so such a score is caught explicitly (poisoned);
//   - m = -inf (no finite score yet, every key masked) counts as 0 in exp(s - m) (safe_max), so
//     -inf scores give exp(-inf) = 0 and never exp(NaN): an empty branch keeps l = 0, o = 0
//     and gets lse = -inf.
// Two layouts share the rule: heads in lanes (step_lanes: the G heads of a group in one vector,
// keys in rows; every step is vertical) and keys in lanes (step_row: one head's row of scores).
#if defined(NSA_CPU_SIMD_SOFTMAX_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef NSA_CPU_SIMD_SOFTMAX_INL_H_
#undef NSA_CPU_SIMD_SOFTMAX_INL_H_
#else
#define NSA_CPU_SIMD_SOFTMAX_INL_H_
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include <hwy/highway.h>
#include <hwy/contrib/math/math-inl.h>

HWY_BEFORE_NAMESPACE();
namespace nsa::cpu {
namespace HWY_NAMESPACE {
namespace softmax {
namespace hn = hwy::HWY_NAMESPACE;

constexpr float kInfF = std::numeric_limits<float>::infinity();

// The lanes whose score poisons its head: NaN or +inf.
template <class D>
HWY_INLINE hn::Mask<D> poisoned(D d, hn::Vec<D> s) {
  return hn::Or(hn::IsNaN(s), hn::Eq(s, hn::Set(d, kInfF)));
}

// The max used in exp(s - m): -inf (nothing finite seen) replaced by 0.
template <class D>
HWY_INLINE hn::Vec<D> safe_max(D d, hn::Vec<D> m) {
  return hn::IfThenElse(hn::Eq(m, hn::Set(d, -kInfF)), hn::Zero(d), m);
}

// Heads in lanes: one step over rows [lo, hi) of s ([key][GP], one head vector at the lane
// offset of m, l and o): turns the scores into probabilities exp(s - m_new), updates m and l,
// and rescales o ([Dv][GP]).
template <class D>
inline void step_lanes(D d, float* s, int64_t GP, int64_t lo, int64_t hi, int64_t Dv, float* m,
                       float* l, float* o) {
  using V = hn::Vec<D>;
  const V m_old = hn::Load(d, m);
  V mx = m_old;
  V bad = hn::Zero(d);  // all-ones bits in the lanes that met a poisoned score
  for (int64_t j = lo; j < hi; ++j) {
    const V sj = hn::Load(d, s + j * GP);
    mx = hn::Max(mx, sj);
    bad = hn::Or(bad, hn::VecFromMask(d, poisoned(d, sj)));
  }
  const V m_use = safe_max(d, mx);
  const V alpha = hn::Exp(d, hn::Sub(m_old, m_use));  // 0 while nothing was seen
  V sum = hn::Zero(d);
  for (int64_t j = lo; j < hi; ++j) {
    const V pj = hn::Exp(d, hn::Sub(hn::Load(d, s + j * GP), m_use));
    hn::Store(pj, d, s + j * GP);
    sum = hn::Add(sum, pj);
  }
  V lv = hn::MulAdd(hn::Load(d, l), alpha, sum);
  lv =
      hn::IfThenElse(hn::MaskFromVec(bad), hn::Set(d, std::numeric_limits<float>::quiet_NaN()), lv);
  hn::Store(lv, d, l);
  hn::Store(mx, d, m);
  // The running output is rescaled once per step, not per key (alpha = 1 once m settles).
  if (!hn::AllTrue(d, hn::Eq(alpha, hn::Set(d, 1.0f)))) {
    for (int64_t c = 0; c < Dv; ++c)
      hn::Store(hn::Mul(alpha, hn::Load(d, o + c * GP)), d, o + c * GP);
  }
}

// Keys in lanes: one step over one head's scores s[0, n) (n a multiple of Lanes(d); masked keys
// hold -inf), with that head's running max *m, sum *l and output o[0, no) (rescaled when the max
// grows; no = 0 when the caller keeps no running output). Turns s into exp(s - m_new), or into
// zeros when the head is poisoned (its l stays NaN for good) or has seen no finite score yet.
template <class D>
inline void step_row(D d, float* s, int64_t n, float* m, float* l, float* o, int64_t no) {
  using V = hn::Vec<D>;
  const int64_t N = hn::Lanes(d);
  V vmax = hn::LoadU(d, s);
  auto bad = poisoned(d, vmax);
  for (int64_t c = N; c < n; c += N) {
    const V sc = hn::LoadU(d, s + c);
    vmax = hn::Max(vmax, sc);
    bad = hn::Or(bad, poisoned(d, sc));
  }
  if (!hn::AllFalse(d, bad)) *l = std::numeric_limits<float>::quiet_NaN();
  if (std::isnan(*l)) {
    std::fill(s, s + n, 0.0f);
    return;
  }
  const float m_new = std::max(*m, hn::GetLane(hn::MaxOfLanes(d, vmax)));
  if (m_new == -kInfF) {  // every key so far masked: no weight yet
    std::fill(s, s + n, 0.0f);
    return;
  }
  if (m_new > *m) {
    const float alpha = std::exp(*m - m_new);  // 0 on the first visible keys
    *l *= alpha;
    const V va = hn::Set(d, alpha);
    for (int64_t c = 0; c < no; c += N) hn::StoreU(hn::Mul(va, hn::LoadU(d, o + c)), d, o + c);
    *m = m_new;
  }
  const V vm = hn::Set(d, m_new);
  V vsum = hn::Zero(d);
  for (int64_t c = 0; c < n; c += N) {
    const V pc = hn::Exp(d, hn::Sub(hn::LoadU(d, s + c), vm));  // exp(-inf) = 0: masked keys
    hn::StoreU(pc, d, s + c);
    vsum = hn::Add(vsum, pc);
  }
  *l += hn::GetLane(hn::SumOfLanes(d, vsum));
}

// Heads in lanes, at the end of a branch: o /= l and lse = m + log l per lane; an empty head
// (l = 0) keeps o (0) and gets lse = -inf; a poisoned one (l NaN) gets NaN in both.
template <class D>
inline void finish_lanes(D d, int64_t GP, int64_t Dv, const float* m, const float* l, float* o,
                         float* lse) {
  using V = hn::Vec<D>;
  const int64_t N = hn::Lanes(d);
  for (int64_t hv = 0; hv < GP; hv += N) {
    const V lv = hn::Load(d, l + hv), mv = hn::Load(d, m + hv);
    const auto empty = hn::Eq(lv, hn::Zero(d));
    const V inv = hn::IfThenElse(empty, hn::Set(d, 1.0f), hn::Div(hn::Set(d, 1.0f), lv));
    for (int64_t c = 0; c < Dv; ++c) {
      float* oc = o + c * GP + hv;
      hn::Store(hn::Mul(hn::Load(d, oc), inv), d, oc);
    }
    V out = hn::Add(mv, hn::Log(d, hn::IfThenElse(empty, hn::Set(d, 1.0f), lv)));
    out = hn::IfThenElse(empty, hn::Set(d, -kInfF), out);
    out = hn::IfThenElse(hn::IsNaN(lv), lv, out);
    hn::Store(out, d, lse + hv);
  }
}

// Keys in lanes: lse = m + log l of one head's finished softmax: -inf when it saw no finite
// score (l = 0), NaN when poisoned (l NaN).
inline float row_lse(float m, float l) {
  return l == 0.0f ? -kInfF : (std::isnan(l) ? l : m + std::log(l));
}

}  // namespace softmax
}  // namespace HWY_NAMESPACE
}  // namespace nsa::cpu
HWY_AFTER_NAMESPACE();

#endif  // NSA_CPU_SIMD_SOFTMAX_INL_H_
