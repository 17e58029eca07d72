// The float64 reference forward: SPEC.md section 4 for every query, one query group at a time.
#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>

#include "common/dtype.h"
#include "ref/ref.h"
#include "ref/ref_io.h"
#include "ref/ref_parallel.h"
#include "ref/ref_staged.h"

namespace nsa::ref {
namespace {

using Rows = std::vector<std::vector<double>>;

void store_lse(const nsa_tensor& t, int64_t b, int64_t tok, int64_t h, double lse) {
  if (present(t)) static_cast<float*>(t.data)[offset_of(t, b, tok, h)] = static_cast<float>(lse);
}

// The caller's selection, as a set: -1 entries dropped, duplicates merged, sorted.
std::vector<int32_t> given_blocks(const FwdProblem& pr, int64_t b, int64_t tok, int64_t hk) {
  const nsa_tensor& ix = pr.p.slc_indices_in;
  const int64_t n = pr.p.in.cfg.slc_count;
  std::vector<int32_t> entries;
  for (int64_t k = 0; k < n; ++k) {
    entries.push_back(static_cast<const int32_t*>(ix.data)[offset_of(ix, b, tok, hk, k)]);
  }
  return as_block_set(std::move(entries));
}

// All queries of one KV group (G heads) at position t of sequence s.
void forward_group(const FwdProblem& pr, const Sequence& s, int64_t t, int64_t hk) {
  const nsa_fwd_params& p = pr.p;
  const nsa_config& cfg = p.in.cfg;
  const double scale = cfg.scale;
  const int64_t b = s.batch, tok = s.start + t;

  Rows q(pr.G);
  for (int64_t g = 0; g < pr.G; ++g) q[g] = load_row(p.in.q, b, tok, hk * pr.G + g, pr.Dk);

  // Step 1: compressed branch over the complete compressed blocks.
  const int64_t nc = visible_cmp_count(cfg, t);
  Rows kc, vc;
  for (int64_t i = 0; i < nc; ++i) {
    kc.push_back(load_row(p.in.k_cmp, b, s.cmp_start + i, hk, pr.Dk));
    vc.push_back(load_row(p.in.v_cmp, b, s.cmp_start + i, hk, pr.Dv));
  }
  std::vector<Attention> cmp(pr.G);
  Rows p_cmp(pr.G);
  for (int64_t g = 0; g < pr.G; ++g) {
    cmp[g] = attend(q[g], kc, vc, scale);
    p_cmp[g] = cmp[g].p;
  }

  // Steps 2-3: block scores summed over the group, then top-n (or the caller's set).
  const std::vector<int32_t> blocks = present(p.slc_indices_in)
                                          ? given_blocks(pr, b, tok, hk)
                                          : selected_set(cfg, t, block_scores(cfg, t, p_cmp));
  if (present(p.slc_indices_out)) {
    // Reported sorted and padded with -1 to n (SPEC 4.3).
    int32_t* out = static_cast<int32_t*>(p.slc_indices_out.data);
    for (int64_t k = 0; k < cfg.slc_count; ++k) {
      out[offset_of(p.slc_indices_out, b, tok, hk, k)] =
          k < static_cast<int64_t>(blocks.size()) ? blocks[k] : -1;
    }
  }

  // Step 4: selected branch, keys p <= t of the chosen blocks (causal only inside block t/l').
  Rows ks, vs;
  for (int32_t j : blocks) {
    const int64_t first = int64_t{j} * cfg.slc_block;
    const int64_t end = std::min<int64_t>(first + cfg.slc_block, t + 1);
    for (int64_t pos = first; pos < end; ++pos) {
      ks.push_back(load_row(p.in.k_slc, b, s.start + pos, hk, pr.Dk));
      vs.push_back(load_row(p.in.v_slc, b, s.start + pos, hk, pr.Dv));
    }
  }

  // Step 5: window branch, keys max(0, t - w + 1) .. t.
  Rows kw, vw;
  for (int64_t pos = std::max<int64_t>(0, t - cfg.window + 1); pos <= t; ++pos) {
    kw.push_back(load_row(p.in.k_win, b, s.start + pos, hk, pr.Dk));
    vw.push_back(load_row(p.in.v_win, b, s.start + pos, hk, pr.Dv));
  }

  // Step 6: gated sum of the three independently normalised branches (Eq. 5).
  for (int64_t g = 0; g < pr.G; ++g) {
    const int64_t h = hk * pr.G + g;
    const Attention slc = attend(q[g], ks, vs, scale);
    const Attention win = attend(q[g], kw, vw, scale);
    const double gc =
        load_as_double(p.in.g_cmp.data, p.in.g_cmp.dtype, offset_of(p.in.g_cmp, b, tok, h));
    const double gs =
        load_as_double(p.in.g_slc.data, p.in.g_slc.dtype, offset_of(p.in.g_slc, b, tok, h));
    const double gw =
        load_as_double(p.in.g_win.data, p.in.g_win.dtype, offset_of(p.in.g_win, b, tok, h));
    std::vector<double> o(pr.Dv, 0.0);
    // An empty branch (no keys) has no o and counts as zeros; gate * 0 is still added so that a
    // NaN or infinite gate poisons o as it does on the CPU (README "Non-finite inputs").
    auto add = [&](const Attention& a, double gate) {
      for (int64_t i = 0; i < pr.Dv; ++i) {
        o[i] += gate * (i < static_cast<int64_t>(a.o.size()) ? a.o[i] : 0.0);
      }
    };
    add(cmp[g], gc);
    add(slc, gs);
    add(win, gw);
    store_row(p.o, b, tok, h, o, pr.Dv);
    if (present(p.o_cmp)) store_row(p.o_cmp, b, tok, h, cmp[g].o, pr.Dv);
    if (present(p.o_slc)) store_row(p.o_slc, b, tok, h, slc.o, pr.Dv);
    if (present(p.o_win)) store_row(p.o_win, b, tok, h, win.o, pr.Dv);
    store_lse(p.lse_cmp, b, tok, h, cmp[g].lse);
    store_lse(p.lse_slc, b, tok, h, slc.lse);
    store_lse(p.lse_win, b, tok, h, win.lse);
  }
}

}  // namespace

Status forward(const FwdProblem& problem) {
  // Every (sequence, position, KV head) is independent, so threads change nothing but speed.
  std::vector<std::pair<int64_t, int64_t>> work;  // (sequence, position)
  for (int64_t si = 0; si < static_cast<int64_t>(problem.seqs.size()); ++si) {
    for (int64_t t = 0; t < problem.seqs[si].len; ++t) work.emplace_back(si, t);
  }
  // The loop writes into staged copies of the outputs (ref_staged.h), committed once it finished.
  FwdProblem pr = problem;
  StagedOutputs out;
  for (nsa_tensor* t : {&pr.p.o, &pr.p.o_cmp, &pr.p.o_slc, &pr.p.o_win, &pr.p.lse_cmp,
                        &pr.p.lse_slc, &pr.p.lse_win, &pr.p.slc_indices_out}) {
    out.stage(t);
  }
  const int64_t n = static_cast<int64_t>(work.size());
  NSA_RETURN_IF_ERROR(parallel_for(n, pr.num_threads, [&](int64_t w) {
    const Sequence& s = pr.seqs[work[w].first];
    for (int64_t hk = 0; hk < pr.Hkv; ++hk) forward_group(pr, s, work[w].second, hk);
  }));
  out.commit();
  return Status::ok();
}

}  // namespace nsa::ref
