// The CPU forward (SPEC.md section 4): orchestration. Every (sequence, position, KV head) is an
// independent work item computed by the same code whatever thread runs it, so results are
// bitwise identical for any thread count.
#include <omp.h>

#include <algorithm>
#include <vector>

#include "common/backends.h"
#include "cpu/kernels.h"

namespace nsa::cpu {
namespace {

// Work items per static chunk: later positions cost more (more compressed tokens, more selected
// blocks), so chunks are dealt round-robin to balance threads while neighbouring positions,
// which share window keys, stay on one thread.
constexpr int64_t kChunk = 8;

// Rounds a scratch size up to 16 floats (64 bytes): sub-buffers start 64 bytes apart, which keeps
// the vector loops on whole lines and the slices of two threads from sharing more than one line.
int64_t padded(int64_t n) { return (n + 15) / 16 * 16; }

struct Layout {
  int64_t floats = 0, ints = 0;  // per thread
  int64_t s_stride = 0, max_blocks = 0;
};

Layout layout_of(const FwdProblem& pr) {
  int64_t max_len = 0, max_cmp = 0;
  for (const Sequence& s : pr.seqs) {
    max_len = std::max(max_len, s.len);
    max_cmp = std::max(max_cmp, s.cmp_len);
  }
  Layout L;
  L.s_stride = padded(std::max(kTile, max_cmp));
  L.max_blocks = max_len > 0 ? (max_len - 1) / pr.p.cfg.slc_block + 1 : 1;
  const int64_t G = pr.G, Dk = pr.Dk, Dv = pr.Dv;
  L.floats = padded(G * Dk) + padded(kTile * Dk) + padded(kTile * Dv) + G * L.s_stride +
             L.s_stride + 2 * padded(G) + 3 * padded(G * Dv) + 3 * padded(G) +
             padded(L.max_blocks);
  // The selected set never holds more than the blocks that exist, however large n is.
  L.ints = padded(L.max_blocks) + padded(std::min<int64_t>(pr.p.cfg.slc_count, L.max_blocks));
  return L;
}

Scratch carve(const FwdProblem& pr, const Layout& L, float* f, int32_t* n) {
  const int64_t G = pr.G, Dk = pr.Dk, Dv = pr.Dv;
  auto take = [&f](int64_t count) {
    float* at = f;
    f += padded(count);
    return at;
  };
  Scratch s;
  s.q = take(G * Dk);
  s.kbuf = take(kTile * Dk);
  s.vbuf = take(kTile * Dv);
  s.s = f;
  f += G * L.s_stride;
  s.s_stride = L.s_stride;
  s.p_sum = take(L.s_stride);
  s.m = take(G);
  s.l = take(G);
  s.o_cmp = take(G * Dv);
  s.o_slc = take(G * Dv);
  s.o_win = take(G * Dv);
  s.lse_cmp = take(G);
  s.lse_slc = take(G);
  s.lse_win = take(G);
  s.score = take(L.max_blocks);
  s.cand = n;
  s.blocks = n + padded(L.max_blocks);
  return s;
}

// All the steps of SPEC 4 for one group; the order matters (scores before selection).
void run_group(const Group& g, Scratch& s, StageClock& clock) {
  const FwdProblem& pr = *g.pr;
  for (int64_t h = 0; h < pr.G; ++h) {
    load_row(pr.p.q, offset_of(pr.p.q, g.seq->batch, g.tok, g.hk * pr.G + h), pr.Dk,
             s.q + h * pr.Dk);
  }
  cmp_attend(g, s);  // the block scores are fused into it: all counted as cmp
  clock.lap(kStageCmp);
  slc_select(g, s);
  clock.lap(kStageTopn);
  slc_attend(g, s);
  clock.lap(kStageSlc);
  win_attend(g, s);
  clock.lap(kStageWin);
  combine(g, s);
  clock.lap(kStageCombine);
}

}  // namespace

Status forward(const FwdProblem& pr) {
  const int threads = pr.num_threads > 0 ? pr.num_threads : omp_get_max_threads();
  // first_item[s]: index of the first work item of sequence s; items are (position, KV head).
  std::vector<int64_t> first_item(pr.seqs.size() + 1, 0);
  for (size_t i = 0; i < pr.seqs.size(); ++i) {
    first_item[i + 1] = first_item[i] + pr.seqs[i].len * pr.Hkv;
  }
  const int64_t total = first_item.back();
  if (total == 0) return Status::ok();
  if (lanes_suit(pr.G)) {
    if (!forward_lanes(pr)) {
      return error(NSA_ERR_OUT_OF_MEMORY, "forward: cannot allocate the packed K/V tiles");
    }
    return Status::ok();
  }

  // Scratch for every thread, allocated here: an exception inside the parallel region could not
  // reach the C API's handler, so nothing below allocates.
  const Layout L = layout_of(pr);
  std::vector<float> fbuf(static_cast<size_t>(threads * L.floats));
  std::vector<int32_t> ibuf(static_cast<size_t>(threads * L.ints));
  std::vector<double> stage_s(pr.profile ? static_cast<size_t>(threads * kStageCount) : 0);

#pragma omp parallel num_threads(threads)
  {
    const int tid = omp_get_thread_num();
    Scratch s = carve(pr, L, fbuf.data() + tid * L.floats, ibuf.data() + tid * L.ints);
    StageClock clock(pr.profile ? stage_s.data() + tid * kStageCount : nullptr);
#pragma omp for schedule(static, kChunk)
    for (int64_t w = 0; w < total; ++w) {
      // The last sequence whose first item is <= w (empty sequences own no item).
      const int64_t si =
          std::upper_bound(first_item.begin(), first_item.end(), w) - first_item.begin() - 1;
      const Sequence& seq = pr.seqs[si];
      const int64_t rem = w - first_item[si];
      Group g;
      g.pr = &pr;
      g.seq = &seq;
      g.t = rem / pr.Hkv;
      g.tok = seq.start + g.t;
      g.hk = rem % pr.Hkv;
      run_group(g, s, clock);
    }
  }
  if (pr.profile) add_stage_times(stage_s.data(), threads, pr.profile);
  return Status::ok();
}

}  // namespace nsa::cpu
