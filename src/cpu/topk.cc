// Top-n block selection (SPEC.md 4.3, paper Eq. 11) for one KV group at one query position, in
// O(blocks) per query: a partial selection (std::nth_element) over the non-forced candidates
// under a strict total order, so the selected set is exactly the reference's stable sort prefix.
// Or the caller's own selection, normalised like the reference's.
#include <algorithm>
#include <cmath>

#include "cpu/kernels.h"

namespace nsa::cpu {
namespace {

// The caller's selection (already validated: entries are -1 or in [0, t / l']): -1 ignored,
// duplicates count once, and the forced blocks are not added (nsa.h: "the caller's set is used
// as given"). Marks in `mark` (one per block) make it O(n + blocks) and never longer than the
// blocks that exist. Returns the set's size.
int64_t given_blocks(const Group& g, int32_t* mark, int32_t* blocks) {
  const nsa_tensor& ix = g.pr->p.slc_indices_in;
  const int64_t n = g.pr->p.in.cfg.slc_count, last = g.t / g.pr->p.in.cfg.slc_block;
  const int32_t* base = static_cast<const int32_t*>(ix.data);
  std::fill(mark, mark + last + 1, 0);
  for (int64_t k = 0; k < n; ++k) {
    const int32_t j = base[offset_of(ix, g.seq->batch, g.tok, g.hk, k)];
    if (j >= 0) mark[j] = 1;
  }
  int64_t count = 0;
  for (int64_t j = 0; j <= last; ++j) {
    if (mark[j]) blocks[count++] = static_cast<int32_t>(j);
  }
  return count;
}

}  // namespace

// I_t = F_t plus the n - |F_t| best-scoring other blocks; ties to the lower index (SPEC 4.3).
// Returns the set's size, at most min(n, t / l' + 1); blocks come out sorted.
int64_t top_blocks(const nsa_config& cfg, int64_t t, const float* score, int32_t* cand,
                   int32_t* blocks) {
  const int64_t n = cfg.slc_count;
  const int64_t last = t / cfg.slc_block;  // J, the query's own block
  int64_t count = 0;
  if (last + 1 <= n) {
    // Fewer eligible blocks than n: all of them.
    for (int64_t j = 0; j <= last; ++j) blocks[count++] = static_cast<int32_t>(j);
    return count;
  }
  int64_t num_cand = 0;
  for (int64_t j = 0; j <= last; ++j) {
    // Forced: the n_init leading blocks and the n_local most recent ones (the own block J and
    // those just before it).
    const bool forced = j < cfg.slc_init || j > last - cfg.slc_local;
    if (forced) {
      blocks[count++] = static_cast<int32_t>(j);
    } else {
      cand[num_cand++] = static_cast<int32_t>(j);
    }
  }
  // A NaN score ranks below every number, so it never displaces a real one (as the reference).
  auto key = [score](int32_t j) { return std::isnan(score[j]) ? kNegInf : score[j]; };
  // Strict total order: larger score first, then the lower index. nth_element under it puts
  // exactly the `room` best candidates in front, whatever their initial order.
  auto better = [&key](int32_t a, int32_t b) {
    const float ka = key(a), kb = key(b);
    return ka > kb || (ka == kb && a < b);
  };
  const int64_t room = std::min<int64_t>(n - count, num_cand);
  if (room > 0 && room < num_cand) std::nth_element(cand, cand + room, cand + num_cand, better);
  for (int64_t r = 0; r < room; ++r) blocks[count++] = cand[r];
  std::sort(blocks, blocks + count);  // the forced and chosen blocks are distinct
  return count;
}

void slc_select(const Group& g, Scratch& s) {
  const nsa_fwd_params& p = g.pr->p;
  s.num_blocks = present(p.slc_indices_in) ? given_blocks(g, s.cand, s.blocks)
                                           : top_blocks(p.in.cfg, g.t, s.score, s.cand, s.blocks);
  if (present(p.slc_indices_out)) {
    // The reported form: sorted ascending, padded with -1 to n (SPEC 4.3).
    int32_t* out = static_cast<int32_t*>(p.slc_indices_out.data);
    for (int64_t k = 0; k < p.in.cfg.slc_count; ++k) {
      out[offset_of(p.slc_indices_out, g.seq->batch, g.tok, g.hk, k)] =
          k < s.num_blocks ? s.blocks[k] : -1;
    }
  }
}

}  // namespace nsa::cpu
