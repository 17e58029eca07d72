// The float64 reference of dense causal (optionally windowed) attention: the baseline op.
#include <algorithm>
#include <utility>

#include "ref/ref.h"
#include "ref/ref_io.h"
#include "ref/ref_parallel.h"
#include "ref/ref_staged.h"

namespace nsa::ref {

Status dense_forward(const DenseProblem& problem) {
  std::vector<std::pair<int64_t, int64_t>> work;  // (sequence, position)
  for (int64_t si = 0; si < static_cast<int64_t>(problem.seqs.size()); ++si) {
    for (int64_t t = 0; t < problem.seqs[si].len; ++t) work.emplace_back(si, t);
  }
  // The loop writes into staged copies of o and lse (ref_staged.h), committed once it finished.
  DenseProblem pr = problem;
  StagedOutputs staged;
  staged.stage(&pr.p.o);
  staged.stage(&pr.p.lse);
  const nsa_dense_fwd_params& p = pr.p;
  const int64_t n_work = static_cast<int64_t>(work.size());
  NSA_RETURN_IF_ERROR(parallel_for(n_work, pr.num_threads, [&](int64_t w) {
    const Sequence& s = pr.seqs[work[w].first];
    const int64_t t = work[w].second, tok = s.start + t;
    const int64_t first = p.window > 0 ? std::max<int64_t>(0, t - p.window + 1) : 0;
    for (int64_t hk = 0; hk < pr.Hkv; ++hk) {
      std::vector<std::vector<double>> keys, values;
      for (int64_t pos = first; pos <= t; ++pos) {
        keys.push_back(load_row(p.k, s.batch, s.start + pos, hk, pr.Dk));
        values.push_back(load_row(p.v, s.batch, s.start + pos, hk, pr.Dv));
      }
      for (int64_t h = hk * pr.G; h < (hk + 1) * pr.G; ++h) {
        const Attention a = attend(load_row(p.q, s.batch, tok, h, pr.Dk), keys, values, p.scale);
        store_row(p.o, s.batch, tok, h, a.o, pr.Dv);
        if (present(p.lse)) {
          static_cast<float*>(p.lse.data)[offset_of(p.lse, s.batch, tok, h)] =
              static_cast<float>(a.lse);
        }
      }
    }
  }));
  staged.commit();
  return Status::ok();
}

}  // namespace nsa::ref
