// The CPU backward of NSA attention (SPEC.md section 6): setup. It gathers the forward's saved
// state (per-branch LSEs and ungated outputs), recomputing it with one CPU forward when the
// caller did not pass all of it, and hands everything to the kernels (backward_lanes.cc).
#include "cpu/backward.h"

#include <omp.h>

#include <algorithm>
#include <chrono>
#include <new>

#include "cpu/ops.h"
#include "common/status.h"
#include "cpu/kernels.h"

namespace nsa::cpu {
namespace bwd {

void make_view(const nsa_tensor& t, View* v) {
  if (t.dtype == NSA_DTYPE_F32) {
    v->base = static_cast<const float*>(t.data);
    v->s0 = t.stride[0], v->s1 = t.stride[1], v->s2 = t.stride[2];
    return;
  }
  // bf16: a contiguous f32 copy, converted once.
  const int64_t n0 = t.shape[0], n1 = t.shape[1], n2 = t.shape[2];
  const int64_t n3 = t.ndim == 4 ? t.shape[3] : 1;
  v->owned.resize(static_cast<size_t>(n0 * n1 * n2 * n3));
  v->s2 = n3, v->s1 = n2 * n3, v->s0 = n1 * n2 * n3;
  for (int64_t a = 0; a < n0; ++a)
    for (int64_t b = 0; b < n1; ++b)
      for (int64_t c = 0; c < n2; ++c)
        load_row(t, offset_of(t, a, b, c), n3, v->owned.data() + a * v->s0 + b * v->s1 + c * v->s2);
  v->base = v->owned.data();
}

int64_t selected_set(const BwdProblem& pr, int64_t b, int64_t tok, int64_t hk, int32_t* out,
                     int64_t room) {
  const nsa_tensor& ix = pr.p.slc_indices;
  const int64_t n = pr.p.in.cfg.slc_count;
  int64_t m = 0;
  for (int64_t k = 0; k < n; ++k) {
    const int32_t j = static_cast<const int32_t*>(ix.data)[offset_of(ix, b, tok, hk, k)];
    if (j < 0) continue;
    if (m == room) {  // full of entries that may repeat: keep one of each (at most room - 1)
      std::sort(out, out + m);
      m = std::unique(out, out + m) - out;
    }
    out[m++] = j;
  }
  std::sort(out, out + m);
  return std::unique(out, out + m) - out;
}

}  // namespace bwd

namespace {

// The forward's saved state, recomputed: one CPU forward of the same inputs with the saved
// selection (slc_indices_in), writing the per-branch LSEs and ungated outputs into f32 buffers.
struct Recomputed {
  std::vector<float> o, lse[3], o_branch[3];
  nsa_tensor lse_t[3], o_branch_t[3];
};

Status recompute_forward(const BwdProblem& pr, Recomputed* rc) {
  FwdProblem fp;
  nsa_fwd_params_init(&fp.p);
  nsa_fwd_params& f = fp.p;
  f.in = pr.p.in;  // validated, scale resolved: the forward's inputs as nsa_fwd saw them
  f.slc_indices_in = pr.p.slc_indices;
  const int64_t rows_shape[3] = {pr.B, pr.T, pr.Hq};
  const int64_t out_shape[4] = {pr.B, pr.T, pr.Hq, pr.Dv};
  const size_t rows = static_cast<size_t>(pr.B * pr.T * pr.Hq);
  rc->o.resize(rows * static_cast<size_t>(pr.Dv));
  f.o = nsa_tensor_contiguous(rc->o.data(), NSA_DTYPE_F32, 4, out_shape);
  nsa_tensor* lse_out[3] = {&f.lse_cmp, &f.lse_slc, &f.lse_win};
  nsa_tensor* o_out[3] = {&f.o_cmp, &f.o_slc, &f.o_win};
  for (int c = 0; c < 3; ++c) {
    rc->lse[c].resize(rows);
    rc->o_branch[c].resize(rows * static_cast<size_t>(pr.Dv));
    *lse_out[c] = rc->lse_t[c] =
        nsa_tensor_contiguous(rc->lse[c].data(), NSA_DTYPE_F32, 3, rows_shape);
    *o_out[c] = rc->o_branch_t[c] =
        nsa_tensor_contiguous(rc->o_branch[c].data(), NSA_DTYPE_F32, 4, out_shape);
  }
  static_cast<AttnDims&>(fp) = pr;
  static_cast<Launch&>(fp) = pr;
  // f32 arithmetic whatever the context's bf16 setting: the backward's D = do . O_c must come
  // from the O_c that its own f32 P = exp(S - lse) gives, or dS = P (dP - D) stops summing to 0.
  fp.bf16_math = NSA_BF16_MATH_F32;
  return forward(fp);
}

}  // namespace

Status backward(const BwdProblem& pr) {
  using namespace bwd;
  const nsa_bwd_params& p = pr.p;
  State st;
  st.pr = &pr;
  st.threads = pr.num_threads > 0 ? pr.num_threads : omp_get_max_threads();
  try {
    make_view(p.in.q, &st.q);
    make_view(p.d_o, &st.d_o);
    make_view(p.in.g_cmp, &st.gate[kCmp]);
    make_view(p.in.g_slc, &st.gate[kSlc]);
    make_view(p.in.g_win, &st.gate[kWin]);
    const nsa_tensor* lse[3] = {&p.lse_cmp, &p.lse_slc, &p.lse_win};
    const nsa_tensor* o_branch[3] = {&p.o_cmp, &p.o_slc, &p.o_win};
    bool saved = true;
    for (int c = 0; c < 3; ++c) saved = saved && present(*lse[c]) && present(*o_branch[c]);
    Recomputed rc;
    if (!saved) {
      // Without all six saved tensors, the forward runs once more (its selection fixed): a
      // partial set would save little and mixing saved and recomputed values invites mismatch.
      const auto t0 = std::chrono::steady_clock::now();
      NSA_RETURN_IF_ERROR(recompute_forward(pr, &rc));
      if (pr.profile) {
        pr.profile->forward_s +=
            std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      }
      for (int c = 0; c < 3; ++c) lse[c] = &rc.lse_t[c], o_branch[c] = &rc.o_branch_t[c];
    }
    for (int c = 0; c < 3; ++c) {
      make_view(*lse[c], &st.lse[c]);
      make_view(*o_branch[c], &st.o_branch[c]);
    }
    if (!backward_lanes(st)) {
      return error(NSA_ERR_OUT_OF_MEMORY, "backward: cannot allocate the CPU backward's buffers");
    }
  } catch (const std::bad_alloc&) {
    return error(NSA_ERR_OUT_OF_MEMORY, "backward: cannot allocate the CPU backward's buffers");
  }
  return Status::ok();
}

}  // namespace nsa::cpu
