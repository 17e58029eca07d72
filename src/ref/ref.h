// The float64 reference of SPEC.md: the contract in code, and the oracle every fast kernel is
// tested against. Written to be read, one function per step of SPEC section 4; it is slow on
// purpose (every element is converted to double on access).
#pragma once

#include <cstdint>
#include <vector>

#include "common/problem.h"
#include "common/status.h"

namespace nsa::ref {

// ---- The steps of SPEC section 4, for one query at position t of its sequence. ----

// Number of compressed tokens visible at position t: those with i*d + l - 1 <= t (step 1).
int64_t visible_cmp_count(const nsa_config& cfg, int64_t t);

// ov(i, j): overlap of compressed block i with selection block j, in strides (step 2).
double overlap_weight(const nsa_config& cfg, int64_t i, int64_t j);

// Block scores of blocks 0 .. t/l' from the compressed probabilities of the G heads of a group,
// p_cmp[h][i] for the visible i (step 2, Eqs. 8-10).
std::vector<double> block_scores(const nsa_config& cfg, int64_t t,
                                 const std::vector<std::vector<double>>& p_cmp);

// The selected set I_t: forced blocks, then the highest scores, ties to the lower index; sorted
// ascending (step 3). It holds min(n, t / l' + 1) blocks, whatever n is.
std::vector<int32_t> selected_set(const nsa_config& cfg, int64_t t,
                                  const std::vector<double>& scores);
// The same in the reported form: padded with -1 to slc_count.
std::vector<int32_t> select_blocks(const nsa_config& cfg, int64_t t,
                                   const std::vector<double>& scores);

// Softmax attention of one query row over a set of key rows: o = sum_p softmax(scale q.k_p) v_p.
// An empty set gives o = 0 and lse = -inf.
struct Attention {
  std::vector<double> o;
  double lse = 0.0;
  std::vector<double> p;  // the probabilities, in the order of the key rows given
};
Attention attend(const std::vector<double>& q, const std::vector<std::vector<double>>& keys,
                 const std::vector<std::vector<double>>& values, double scale);

// ---- Whole ops. ----

Status forward(const FwdProblem& problem);
Status compress(const CompressProblem& problem);
// Dense causal attention (the baseline op), optionally windowed.
Status dense_forward(const DenseProblem& problem);

}  // namespace nsa::ref
