// The gated output (SPEC.md 4.6, paper Eq. 5): o = g_cmp o_cmp + g_slc o_slc + g_win o_win, each
// branch normalised on its own, plus the optional per-branch outputs and log-sum-exps.
#include "cpu/kernels.h"

namespace nsa::cpu {
namespace {

void store_lse(const nsa_tensor& t, int64_t b, int64_t tok, int64_t h, float lse) {
  if (present(t)) static_cast<float*>(t.data)[offset_of(t, b, tok, h)] = lse;
}

}  // namespace

void combine(const Group& g, Scratch& s) {
  const FwdProblem& pr = *g.pr;
  const nsa_fwd_params& p = pr.p;
  const int64_t Dv = pr.Dv, b = g.seq->batch, tok = g.tok;
  float* o = s.vbuf;  // free again: the branches are done
  for (int64_t hg = 0; hg < pr.G; ++hg) {
    const int64_t h = g.hk * pr.G + hg;
    // Gate values as given: the op applies no sigmoid (SPEC 3).
    const float gc = load_f32(p.g_cmp, offset_of(p.g_cmp, b, tok, h));
    const float gs = load_f32(p.g_slc, offset_of(p.g_slc, b, tok, h));
    const float gw = load_f32(p.g_win, offset_of(p.g_win, b, tok, h));
    const float* oc = s.o_cmp + hg * Dv;
    const float* os = s.o_slc + hg * Dv;
    const float* ow = s.o_win + hg * Dv;
    for (int64_t i = 0; i < Dv; ++i) o[i] = gc * oc[i] + gs * os[i] + gw * ow[i];
    store_row(p.o, offset_of(p.o, b, tok, h), o, Dv);
    if (present(p.o_cmp)) store_row(p.o_cmp, offset_of(p.o_cmp, b, tok, h), oc, Dv);
    if (present(p.o_slc)) store_row(p.o_slc, offset_of(p.o_slc, b, tok, h), os, Dv);
    if (present(p.o_win)) store_row(p.o_win, offset_of(p.o_win, b, tok, h), ow, Dv);
    store_lse(p.lse_cmp, b, tok, h, s.lse_cmp[hg]);
    store_lse(p.lse_slc, b, tok, h, s.lse_slc[hg]);
    store_lse(p.lse_win, b, tok, h, s.lse_win[hg]);
  }
}

}  // namespace nsa::cpu
