// The reference backward behind the C API: arguments converted to float64 once, the float64 core
// (ref_backward.cc, ref_compress_bwd.cc) run, and the gradients stored in the caller's dtype.
#include "common/dtype.h"
#include "ref/ref.h"
#include "ref/ref_io.h"

namespace nsa::ref {
namespace {

// The caller's slc_indices as a contiguous [B, T, Hkv, n] array.
std::vector<int32_t> load_indices(const nsa_tensor& ix) {
  std::vector<int32_t> out;
  out.reserve(static_cast<size_t>(ix.shape[0] * ix.shape[1] * ix.shape[2] * ix.shape[3]));
  for (int64_t b = 0; b < ix.shape[0]; ++b)
    for (int64_t t = 0; t < ix.shape[1]; ++t)
      for (int64_t h = 0; h < ix.shape[2]; ++h)
        for (int64_t k = 0; k < ix.shape[3]; ++k)
          out.push_back(static_cast<const int32_t*>(ix.data)[offset_of(ix, b, t, h, k)]);
  return out;
}

void add_into(Tensor64& sum, const Tensor64& x) {
  for (size_t i = 0; i < sum.data.size(); ++i) sum.data[i] += x.data[i];
}

void store_if_present(const Tensor64& x, const nsa_tensor& t) {
  if (present(t)) store_tensor(x, t);
}

}  // namespace

Status backward(const BwdProblem& pr) {
  const nsa_bwd_params& p = pr.p;
  NsaArgs64 a;
  a.cfg = p.in.cfg;
  a.seqs = pr.seqs;
  a.q = load_tensor(p.in.q);
  a.k_slc = load_tensor(p.in.k_slc);  // k itself when the slc branch has no K/V of its own
  a.v_slc = load_tensor(p.in.v_slc);
  a.k_win = load_tensor(p.in.k_win);
  a.v_win = load_tensor(p.in.v_win);
  a.k_cmp = load_tensor(p.in.k_cmp);
  a.v_cmp = load_tensor(p.in.v_cmp);
  a.g_cmp = load_tensor(p.in.g_cmp);
  a.g_slc = load_tensor(p.in.g_slc);
  a.g_win = load_tensor(p.in.g_win);
  a.slc_indices = load_indices(p.slc_indices);
  NsaGrads64 g;
  NSA_RETURN_IF_ERROR(backward64(a, load_tensor(p.d_o), pr.num_threads, &g));

  // dk/dv: the sum over the branches that read k/v; a branch with its own K/V reports to its own
  // outputs instead (nsa.h, nsa_bwd_params).
  Tensor64 dk(pr.B, pr.T, pr.Hkv, pr.Dk), dv(pr.B, pr.T, pr.Hkv, pr.Dv);
  if (pr.slc_own_kv) {
    store_tensor(g.dk_slc, p.dk_slc);
    store_tensor(g.dv_slc, p.dv_slc);
  } else {
    add_into(dk, g.dk_slc);
    add_into(dv, g.dv_slc);
  }
  if (pr.win_own_kv) {
    store_tensor(g.dk_win, p.dk_win);
    store_tensor(g.dv_win, p.dv_win);
  } else {
    add_into(dk, g.dk_win);
    add_into(dv, g.dv_win);
  }
  store_if_present(dk, p.dk);
  store_if_present(dv, p.dv);
  store_tensor(g.dq, p.dq);
  store_tensor(g.dk_cmp, p.dk_cmp);
  store_tensor(g.dv_cmp, p.dv_cmp);
  store_tensor(g.dg_cmp, p.dg_cmp);
  store_tensor(g.dg_slc, p.dg_slc);
  store_tensor(g.dg_win, p.dg_win);
  return Status::ok();
}

Status compress_backward(const CompressBwdProblem& pr) {
  const nsa_compress_bwd_params& p = pr.p;
  CompressArgs64 a;
  a.cfg = p.cfg;
  a.kind = p.kind;
  a.seqs = pr.seqs;
  a.x = load_tensor(p.x);
  const bool mlp = p.kind == NSA_CMP_MLP;
  if (mlp) {
    a.pos = load_tensor(p.pos);
    a.w1 = load_tensor(p.w1);
    a.b1 = load_tensor(p.b1);
    a.w2 = load_tensor(p.w2);
    a.b2 = load_tensor(p.b2);
  }
  CompressGrads64 g;
  NSA_RETURN_IF_ERROR(compress_backward64(a, load_tensor(p.dout), pr.num_threads, &g));
  store_tensor(g.dx, p.dx);
  if (mlp) {
    store_tensor(g.dpos, p.dpos);
    store_tensor(g.dw1, p.dw1);
    store_tensor(g.db1, p.db1);
    store_tensor(g.dw2, p.dw2);
    store_tensor(g.db2, p.db2);
  }
  return Status::ok();
}

}  // namespace nsa::ref
