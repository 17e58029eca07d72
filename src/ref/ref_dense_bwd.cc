// The float64 reference of the dense backward: the textbook gradient of softmax attention
// (FlashAttention-2, Algorithm 2, without the tiling). For query row t of head h:
//   P = softmax(scale q k^T) over the visible keys, O = P V (recomputed here: the caller's o is
//   not trusted), D = rowsum(dO * O), dP = dO V^T, dS = P * (dP - D),
//   dq = scale dS K,  dk += scale dS^T q,  dv += P^T dO.
// The caller's lse is not read either: P comes from the float64 scores. One work item is a
// (sequence, KV head), which owns its dk/dv rows and its G query heads' dq rows, so the result
// does not depend on the thread count.
#include <algorithm>
#include <cmath>
#include <utility>

#include "ref/ref.h"
#include "ref/ref_io.h"
#include "ref/ref_parallel.h"
#include "ref/ref_staged.h"

namespace nsa::ref {

Status dense_backward(const DenseBwdProblem& problem) {
  std::vector<std::pair<int64_t, int64_t>> work;  // (sequence, KV head)
  for (int64_t si = 0; si < static_cast<int64_t>(problem.seqs.size()); ++si) {
    for (int64_t hk = 0; hk < problem.Hkv; ++hk) work.emplace_back(si, hk);
  }
  // The loop writes into staged copies of dq, dk, dv (ref_staged.h), committed once it finished.
  DenseBwdProblem pr = problem;
  StagedOutputs staged;
  for (nsa_tensor* t : {&pr.p.dq, &pr.p.dk, &pr.p.dv}) staged.stage(t);
  const nsa_dense_bwd_params& p = pr.p;
  const double scale = p.scale;
  const int64_t n_work = static_cast<int64_t>(work.size());
  NSA_RETURN_IF_ERROR(parallel_for(n_work, pr.num_threads, [&](int64_t w) {
    const Sequence& s = pr.seqs[work[w].first];
    const int64_t hk = work[w].second, n = s.len;
    using Rows = std::vector<std::vector<double>>;
    Rows keys(n), values(n);
    for (int64_t pos = 0; pos < n; ++pos) {
      keys[pos] = load_row(p.k, s.batch, s.start + pos, hk, pr.Dk);
      values[pos] = load_row(p.v, s.batch, s.start + pos, hk, pr.Dv);
    }
    Rows dk(n, std::vector<double>(pr.Dk, 0.0)), dv(n, std::vector<double>(pr.Dv, 0.0));
    for (int64_t h = hk * pr.G; h < (hk + 1) * pr.G; ++h) {
      for (int64_t t = 0; t < n; ++t) {
        const int64_t tok = s.start + t;
        const int64_t first = p.window > 0 ? std::max<int64_t>(0, t - p.window + 1) : 0;
        const std::vector<double> q = load_row(p.q, s.batch, tok, h, pr.Dk);
        const std::vector<double> d_o = load_row(p.d_o, s.batch, tok, h, pr.Dv);
        const Rows visible_k(keys.begin() + first, keys.begin() + t + 1);
        const Rows visible_v(values.begin() + first, values.begin() + t + 1);
        const Attention a = attend(q, visible_k, visible_v, scale);
        double D = 0.0;
        for (int64_t c = 0; c < pr.Dv; ++c) D += d_o[c] * a.o[c];
        std::vector<double> dq(pr.Dk, 0.0);
        for (int64_t j = 0; j <= t - first; ++j) {
          const int64_t pos = first + j;
          const double P = a.p[j];
          double dP = 0.0;
          for (int64_t c = 0; c < pr.Dv; ++c) dP += d_o[c] * values[pos][c];
          const double dS = P * (dP - D);
          for (int64_t c = 0; c < pr.Dk; ++c) {
            dq[c] += scale * dS * keys[pos][c];
            dk[pos][c] += scale * dS * q[c];
          }
          for (int64_t c = 0; c < pr.Dv; ++c) dv[pos][c] += P * d_o[c];
        }
        store_row(p.dq, s.batch, tok, h, dq, pr.Dk);
      }
    }
    for (int64_t pos = 0; pos < n; ++pos) {
      store_row(p.dk, s.batch, s.start + pos, hk, dk[pos], pr.Dk);
      store_row(p.dv, s.batch, s.start + pos, hk, dv[pos], pr.Dv);
    }
  }));
  staged.commit();
  return Status::ok();
}

}  // namespace nsa::ref
