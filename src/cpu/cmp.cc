// The compressed branch and the block scores (SPEC.md 4.1-4.2, paper Eqs. 5, 8-10) for the G
// heads of one KV group at one query position. The probabilities are needed explicitly (they
// feed the block scores), so this is a two-pass softmax over at most Tc_max scores per head; the
// scores go straight into the per-block sums, no [T, Tc] matrix exists.
#include <algorithm>
#include <cmath>

#include "cpu/kernels.h"

namespace nsa::cpu {

// |C_t|: compressed token i is visible once complete, i*d + l - 1 <= t (SPEC 4.1).
int64_t visible_cmp_count(const nsa_config& cfg, int64_t t) {
  const int64_t l = cfg.cmp_block, d = cfg.cmp_stride;
  return t + 1 >= l ? (t + 1 - l) / d + 1 : 0;
}

// score[j] = sum_i p_sum[i] * ov(i, j), ov the overlap of compressed block i with selection
// block j in strides: the overlap-consistent reading of Eq. 9 (SPEC 4.2). Only the selection
// blocks that compressed block i touches receive a share.
void block_scores(const nsa_config& cfg, int64_t t, int64_t nc, const float* p_sum,
                  float* score) {
  const int64_t l = cfg.cmp_block, d = cfg.cmp_stride, lp = cfg.slc_block;
  const int64_t last = t / lp;  // J
  fill(0.0f, score, last + 1);
  const float inv_d = 1.0f / static_cast<float>(d);
  int64_t j_lo = 0;  // the block holding token i * d, advanced without a division per token
  for (int64_t i = 0; i < nc; ++i) {
    const int64_t lo = i * d, hi = i * d + l;
    while ((j_lo + 1) * lp <= lo) ++j_lo;
    // A visible block ends at or before t, so j never passes J; the bound is kept for safety.
    for (int64_t j = j_lo; j * lp < hi && j <= last; ++j) {
      const int64_t ov = std::min(hi, (j + 1) * lp) - std::max(lo, j * lp);
      score[j] += p_sum[i] * (static_cast<float>(ov) * inv_d);
    }
  }
}

NSA_CPU_DISPATCH void cmp_attend(const Group& g, Scratch& s) {
  const FwdProblem& pr = *g.pr;
  const nsa_fwd_params& p = pr.p;
  const int64_t G = pr.G, Dk = pr.Dk, Dv = pr.Dv, b = g.seq->batch;
  const float scale = p.cfg.scale;
  const int64_t nc = visible_cmp_count(p.cfg, g.t);
  fill(0.0f, s.o_cmp, G * Dv);
  if (nc == 0) {
    // Empty C_t: o_cmp = 0, lse_cmp = -inf, never NaN; every block score is 0 (SPEC 4.1).
    fill(kNegInf, s.lse_cmp, G);
    fill(0.0f, s.score, g.t / p.cfg.slc_block + 1);
    return;
  }

  // Scores s[h][i] = scale * q_h . k_cmp[i]; each key row is read once for all G heads.
  float* sc = s.s;
  const int64_t ss = s.s_stride;
  for (int64_t i = 0; i < nc; ++i) {
    const float* k = row_f32(p.k_cmp, offset_of(p.k_cmp, b, g.seq->cmp_start + i, g.hk), Dk,
                             s.kbuf);
    for (int64_t h = 0; h < G; ++h) sc[h * ss + i] = scale * dot(s.q + h * Dk, k, Dk);
  }

  // Softmax per head, shifted by the maximum so exp never overflows.
  for (int64_t h = 0; h < G; ++h) {
    float* row = sc + h * ss;
    float mx = kNegInf;
    // max_nan: a NaN score makes the maximum, and so every probability, NaN (not "empty").
    for (int64_t i = 0; i < nc; ++i) mx = max_nan(mx, row[i]);
    if (mx == kNegInf) {  // every score -inf: treated as empty, like the reference
      fill(0.0f, row, nc);
      s.lse_cmp[h] = kNegInf;
      continue;
    }
    float sum = 0.0f;
    for (int64_t i = 0; i < nc; ++i) {
      row[i] = std::exp(row[i] - mx);
      sum += row[i];
    }
    s.lse_cmp[h] = mx + std::log(sum);
    const float inv = 1.0f / sum;
    scale_by(inv, row, nc);
  }

  // o_cmp[h] = sum_i p[h][i] v_cmp[i], each value row read once for all G heads (four rows per
  // axpy4 while four remain).
  const float* vrow[4];
  int64_t i = 0;
  for (; i + 4 <= nc; i += 4) {
    for (int r = 0; r < 4; ++r) {
      vrow[r] = row_f32(p.v_cmp, offset_of(p.v_cmp, b, g.seq->cmp_start + i + r, g.hk), Dv,
                        s.vbuf + r * Dv);
    }
    for (int64_t h = 0; h < G; ++h) axpy4(sc + h * ss + i, vrow, s.o_cmp + h * Dv, Dv);
  }
  for (; i < nc; ++i) {
    const float* v = row_f32(p.v_cmp, offset_of(p.v_cmp, b, g.seq->cmp_start + i, g.hk), Dv,
                             s.vbuf);
    for (int64_t h = 0; h < G; ++h) axpy(sc[h * ss + i], v, s.o_cmp + h * Dv, Dv);
  }
  // The group's probabilities summed (Eq. 10: one selection serves the whole group).
  for (int64_t c = 0; c < nc; ++c) {
    float ps = 0.0f;
    for (int64_t h = 0; h < G; ++h) ps += sc[h * ss + c];
    s.p_sum[c] = ps;
  }
  block_scores(p.cfg, g.t, nc, s.p_sum, s.score);
}

}  // namespace nsa::cpu
