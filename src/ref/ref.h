// The float64 reference of SPEC.md: the contract in code, and the oracle every fast kernel is
// tested against. Written to be read, one function per step of SPEC section 4; it is slow on
// purpose (every element is converted to double on access).
#pragma once

#include <cstdint>
#include <vector>

#include "common/problem.h"
#include "common/status.h"
#include "ref/tensor64.h"

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

// A caller's selection entries as a set (SPEC 4.3 / nsa.h): -1 entries dropped, duplicates merged,
// sorted ascending.
std::vector<int32_t> as_block_set(std::vector<int32_t> entries);

// Softmax attention of one query row over a set of key rows: o = sum_p softmax(scale q.k_p) v_p.
// An empty set gives o = 0 and lse = -inf.
struct Attention {
  std::vector<double> o;
  double lse = 0.0;
  std::vector<double> p;  // the probabilities, in the order of the key rows given
};
Attention attend(const std::vector<double>& q, const std::vector<std::vector<double>>& keys,
                 const std::vector<std::vector<double>>& values, double scale);

// ---- The float64 core of the backward (SPEC section 6), on Tensor64 arguments. ----

// NSA's arguments (SPEC 3) with the selected sets I_t fixed, as the backward takes them (SPEC 6).
struct NsaArgs64 {
  nsa_config cfg{};  // scale resolved (never 0)
  std::vector<Sequence> seqs;
  Tensor64 q;                           // [B, T, Hq, Dk]
  Tensor64 k_slc, v_slc, k_win, v_win;  // [B, T, Hkv, Dk or Dv]: each branch's raw K/V
  Tensor64 k_cmp, v_cmp;                // [B, Tc, Hkv, Dk or Dv]
  Tensor64 g_cmp, g_slc, g_win;         // [B, T, Hq]
  std::vector<int32_t> slc_indices;     // [B, T, Hkv, n] row-major; a set per query, -1 unused
};

// The ungated branch outputs and o (SPEC 4 step 6), each [B, T, Hq, Dv].
struct NsaOutputs64 {
  Tensor64 o, o_cmp, o_slc, o_win;
};

// dL/d(each argument of NsaArgs64), shaped as the argument.
struct NsaGrads64 {
  Tensor64 dq, dk_slc, dv_slc, dk_win, dv_win, dk_cmp, dv_cmp, dg_cmp, dg_slc, dg_win;
};

// SPEC 4 steps 1, 4, 5 and 6 with the selection taken from args.slc_indices (steps 2-3 skipped):
// the function whose gradients backward64 computes.
Status forward_fixed64(const NsaArgs64& args, int32_t num_threads, NsaOutputs64* out);
// The gradients of L = sum(d_o * o) through forward_fixed64 (SPEC 6). Deterministic: one thread
// owns each (sequence, KV head), and a KV head's gradients come only from its own G query heads.
Status backward64(const NsaArgs64& args, const Tensor64& d_o, int32_t num_threads,
                  NsaGrads64* grads);

// The compression functions phi (SPEC 5) in float64.
struct CompressArgs64 {
  nsa_config cfg{};  // cmp_block l and cmp_stride d
  nsa_cmp_kind kind = NSA_CMP_MEAN;
  std::vector<Sequence> seqs;
  Tensor64 x;                    // [B, T, Hkv, D]
  Tensor64 pos, w1, b1, w2, b2;  // mlp only: [Hkv, l, D], [Hkv, Dh, l*D], [Hkv, Dh],
                                 // [Hkv, D, Dh], [Hkv, D]
};

struct CompressGrads64 {
  Tensor64 dx, dpos, dw1, db1, dw2, db2;  // shaped as x, pos, ...; the mlp ones empty for mean
};

// out [B, Tc, Hkv, D]: phi of every block (Tc summed over the sequences).
Status compress64(const CompressArgs64& args, int32_t num_threads, Tensor64* out);
// Gradients of L = sum(dout * out) through compress64. Overlapping blocks (d < l) add up in dx;
// tokens in no block get 0. Deterministic: one thread owns each KV head.
Status compress_backward64(const CompressArgs64& args, const Tensor64& dout, int32_t num_threads,
                           CompressGrads64* grads);

// ---- Whole ops. ----

Status forward(const FwdProblem& problem);
Status compress(const CompressProblem& problem);
// Dense causal attention (the baseline op), optionally windowed.
Status dense_forward(const DenseProblem& problem);
// Its gradients (FlashAttention-2's backward) in float64, O recomputed (ref_dense_bwd.cc).
Status dense_backward(const DenseBwdProblem& problem);
// SPEC 6 through the C API: the arguments converted to float64, backward64, the results stored.
Status backward(const BwdProblem& problem);
Status compress_backward(const CompressBwdProblem& problem);

}  // namespace nsa::ref
