// The sliding-window branch (SPEC.md 4.5, paper Section 3.3.3), and the online-softmax attention
// over a contiguous span of raw keys that it shares with the selected branch (slc.cc).
#include <algorithm>
#include <cmath>

#include "cpu/kernels.h"

namespace nsa::cpu {

NSA_CPU_DISPATCH void attend_span(const Group& g, const nsa_tensor& k, const nsa_tensor& v, int64_t first,
                 int64_t end, Scratch& s, float* acc) {
  const FwdProblem& pr = *g.pr;
  const int64_t G = pr.G, Dk = pr.Dk, Dv = pr.Dv, b = g.seq->batch;
  const float scale = pr.p.cfg.scale;
  const int64_t ss = s.s_stride;
  const float* krow[kTile];
  const float* vrow[kTile];
  // One tile of keys at a time (flash-attention style): the G heads share every K/V row, and
  // the running state is rescaled once per tile, not once per key.
  for (int64_t a = first; a < end; a += kTile) {
    const int64_t nk = std::min(kTile, end - a);
    for (int64_t j = 0; j < nk; ++j) {
      krow[j] = row_f32(k, offset_of(k, b, g.seq->start + a + j, g.hk), Dk, s.kbuf + j * Dk);
    }
    for (int64_t j = 0; j < nk; ++j) {
      for (int64_t h = 0; h < G; ++h) s.s[h * ss + j] = scale * dot(s.q + h * Dk, krow[j], Dk);
    }
    for (int64_t h = 0; h < G; ++h) {
      float* row = s.s + h * ss;
      float mx = s.m[h];
      // max_nan: a NaN score makes m, l and acc NaN for the rest of the span (not "no weight").
      for (int64_t j = 0; j < nk; ++j) mx = max_nan(mx, row[j]);
      if (mx == kNegInf) {  // only -inf scores so far: they carry no weight
        fill(0.0f, row, nk);
        continue;
      }
      // exp(-inf) = 0 on the first tile, where acc and l are still 0.
      const float alpha = std::exp(s.m[h] - mx);
      if (alpha != 1.0f) {
        s.l[h] *= alpha;
        scale_by(alpha, acc + h * Dv, Dv);
      }
      float sum = 0.0f;
      for (int64_t j = 0; j < nk; ++j) {
        row[j] = std::exp(row[j] - mx);
        sum += row[j];
      }
      s.l[h] += sum;
      s.m[h] = mx;
    }
    // acc += P V, four value rows at a time while four remain.
    for (int64_t j = 0; j < nk; ++j) {
      vrow[j] = row_f32(v, offset_of(v, b, g.seq->start + a + j, g.hk), Dv, s.vbuf + j * Dv);
    }
    int64_t j = 0;
    for (; j + 4 <= nk; j += 4) {
      for (int64_t h = 0; h < G; ++h) axpy4(s.s + h * ss + j, vrow + j, acc + h * Dv, Dv);
    }
    for (; j < nk; ++j) {
      for (int64_t h = 0; h < G; ++h) axpy(s.s[h * ss + j], vrow[j], acc + h * Dv, Dv);
    }
  }
}

void win_attend(const Group& g, Scratch& s) {
  const FwdProblem& pr = *g.pr;
  // Keys max(0, t - w + 1) .. t: the window includes the query's own token.
  const int64_t first = std::max<int64_t>(0, g.t - pr.p.cfg.window + 1);
  softmax_begin(pr.G, pr.Dv, s, s.o_win);
  attend_span(g, pr.p.k_win, pr.p.v_win, first, g.t + 1, s, s.o_win);
  softmax_finish(pr.G, pr.Dv, s, s.o_win, s.lse_win);
}

}  // namespace nsa::cpu
