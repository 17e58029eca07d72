// The CPU forward (SPEC.md section 4): the entry point. The work is done by the heads-in-lanes
// kernels (forward_lanes.cc), for every group size: measured against per-head loops, padding a
// small group into a vector's lanes still wins (1.3x at G = 1, 1.7x at G = 2 and 4, T = 4096).
#include <new>

#include "cpu/ops.h"
#include "cpu/kernels.h"

namespace nsa::cpu {

Status forward(const FwdProblem& pr) {
  int64_t tokens = 0;
  for (const Sequence& s : pr.seqs) tokens += s.len;
  if (tokens == 0) return Status::ok();
  // Every buffer is allocated before the kernels' parallel regions and their first output
  // write, so a failed allocation (false, or a vector's bad_alloc) leaves the outputs untouched.
  bool ok = false;
  try {
    ok = forward_lanes(pr);
  } catch (const std::bad_alloc&) {
    ok = false;
  }
  if (!ok) return error(NSA_ERR_OUT_OF_MEMORY, "forward: cannot allocate the packed K/V tiles");
  return Status::ok();
}

}  // namespace nsa::cpu
