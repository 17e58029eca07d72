// The float64 reference of the compression functions phi (SPEC.md section 5, paper Eq. 7).
#include <algorithm>

#include "common/dtype.h"
#include "ref/ref.h"
#include "ref/ref_parallel.h"
#include "ref/ref_staged.h"

namespace nsa::ref {
namespace {

double at(const nsa_tensor& t, int64_t i0, int64_t i1, int64_t i2 = 0, int64_t i3 = 0) {
  return load_as_double(t.data, t.dtype, offset_of(t, i0, i1, i2, i3));
}

// phi for one block: the l tokens starting at raw position `first` of head h.
std::vector<double> compress_block(const CompressProblem& pr, const Sequence& s, int64_t first,
                                   int64_t h) {
  const nsa_compress_params& p = pr.p;
  const int64_t l = p.cfg.cmp_block, D = pr.D;
  std::vector<double> out(D, 0.0);
  if (p.kind == NSA_CMP_MEAN) {
    for (int64_t r = 0; r < l; ++r) {
      for (int64_t i = 0; i < D; ++i) out[i] += at(p.x, s.batch, first + r, h, i);
    }
    for (double& v : out) v /= static_cast<double>(l);
    return out;
  }
  // mlp: W2 relu(W1 flatten(X + P) + b1) + b2, flatten row-major over [l, D].
  std::vector<double> flat(l * D);
  for (int64_t r = 0; r < l; ++r) {
    for (int64_t i = 0; i < D; ++i)
      flat[r * D + i] = at(p.x, s.batch, first + r, h, i) + at(p.pos, h, r, i);
  }
  std::vector<double> hidden(pr.Dh);
  for (int64_t u = 0; u < pr.Dh; ++u) {
    double acc = at(p.b1, h, u);
    for (int64_t k = 0; k < l * D; ++k) acc += at(p.w1, h, u, k) * flat[k];
    hidden[u] = std::max(acc, 0.0);
  }
  for (int64_t i = 0; i < D; ++i) {
    double acc = at(p.b2, h, i);
    for (int64_t u = 0; u < pr.Dh; ++u) acc += at(p.w2, h, i, u) * hidden[u];
    out[i] = acc;
  }
  return out;
}

}  // namespace

Status compress(const CompressProblem& problem) {
  // The loops write into a staged copy of out (ref_staged.h), committed once every one finished.
  CompressProblem pr = problem;
  StagedOutputs staged;
  staged.stage(&pr.p.out);
  const nsa_compress_params& p = pr.p;
  const int64_t d = p.cfg.cmp_stride;
  for (const Sequence& s : pr.seqs) {
    NSA_RETURN_IF_ERROR(parallel_for(s.cmp_len * pr.Hkv, pr.num_threads, [&](int64_t item) {
      const int64_t i = item / pr.Hkv, h = item % pr.Hkv;
      // Compressed token i summarises raw tokens i*d .. i*d + l - 1 of its sequence (SPEC 3).
      const std::vector<double> c = compress_block(pr, s, s.start + i * d, h);
      const int64_t base = offset_of(p.out, s.batch, s.cmp_start + i, h);
      for (int64_t k = 0; k < pr.D; ++k) store_from_double(p.out.data, p.out.dtype, base + k, c[k]);
    }));
  }
  staged.commit();
  return Status::ok();
}

}  // namespace nsa::ref
