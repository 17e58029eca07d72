// The selected branch (SPEC.md 4.4, paper Section 3.3.2), group-centric as the paper's kernel
// design (Section 3.4): the G query heads of a KV group share the selected set, so every K/V
// block is loaded once for all of them. One online softmax runs across the selected blocks.
#include <algorithm>

#include "cpu/kernels.h"

namespace nsa::cpu {

void slc_attend(const Group& g, Scratch& s) {
  const FwdProblem& pr = *g.pr;
  const nsa_config& cfg = pr.p.cfg;
  softmax_begin(pr.G, pr.Dv, s, s.o_slc);
  for (int64_t k = 0; k < s.num_blocks; ++k) {
    const int64_t j = s.blocks[k];
    // Keys p <= t of block j: the causal mask cuts only the query's own block, j = t / l'.
    const int64_t first = j * cfg.slc_block;
    const int64_t end = std::min<int64_t>(first + cfg.slc_block, g.t + 1);
    attend_span(g, pr.p.k_slc, pr.p.v_slc, first, end, s, s.o_slc);
  }
  softmax_finish(pr.G, pr.Dv, s, s.o_slc, s.lse_slc);
}

}  // namespace nsa::cpu
