// The float64 reference backward of NSA attention (SPEC.md section 6): the gradients of SPEC 4 with
// the selected sets I_t fixed. Each branch is plain softmax attention over the key rows it reads,
// so its backward is the standard one (as in FlashAttention-2), gated:
//   dO_c = g_c * do,  dP = dO_c V^T,  dS = P o (dP - rowsum(dO_c o O_c)),
//   dq += scale dS K,  dk += scale dS^T q,  dv += P^T dO_c,  dg_c = sum(do o O_c).
// Everything is recomputed per query in float64 from the inputs; nothing the forward saved but
// the selection is read.
#include <algorithm>
#include <utility>

#include "ref/ref.h"
#include "ref/ref_parallel.h"

namespace nsa::ref {
namespace {

using Rows = std::vector<std::vector<double>>;

// The three branches of SPEC 4 (steps 1, 4, 5) and the arguments each reads.
enum class Branch { kCmp, kSlc, kWin };
constexpr Branch kBranches[] = {Branch::kCmp, Branch::kSlc, Branch::kWin};

struct BranchArgs {
  const Tensor64& k;
  const Tensor64& v;
  const Tensor64& gate;
};

BranchArgs args_of(const NsaArgs64& a, Branch br) {
  switch (br) {
    case Branch::kCmp: return {a.k_cmp, a.v_cmp, a.g_cmp};
    case Branch::kSlc: return {a.k_slc, a.v_slc, a.g_slc};
    case Branch::kWin: break;
  }
  return {a.k_win, a.v_win, a.g_win};
}

// The gradient tensors of one branch's K/V and gate.
struct BranchGrads {
  Tensor64& dk;
  Tensor64& dv;
  Tensor64& dgate;
};

BranchGrads grads_of(NsaGrads64& g, Branch br) {
  switch (br) {
    case Branch::kCmp: return {g.dk_cmp, g.dv_cmp, g.dg_cmp};
    case Branch::kSlc: return {g.dk_slc, g.dv_slc, g.dg_slc};
    case Branch::kWin: break;
  }
  return {g.dk_win, g.dv_win, g.dg_win};
}

// The rows (dimension 1 of the branch's K/V tensors) that query t of sequence s, KV head hk, reads
// in branch `br`, in the forward's order.
std::vector<int64_t> branch_rows(const NsaArgs64& a, const Sequence& s, int64_t t, int64_t hk,
                                 Branch br) {
  const nsa_config& cfg = a.cfg;
  std::vector<int64_t> rows;
  if (br == Branch::kCmp) {
    // Step 1: the complete compressed blocks, i*d + l - 1 <= t.
    for (int64_t i = 0; i < visible_cmp_count(cfg, t); ++i) rows.push_back(s.cmp_start + i);
  } else if (br == Branch::kSlc) {
    // Step 4 with I_t fixed (SPEC 6): positions p <= t of the given blocks.
    const int64_t n = cfg.slc_count;
    const int64_t Hkv = a.k_slc.shape[2];
    const auto first =
        a.slc_indices.begin() + ((s.batch * a.q.shape[1] + s.start + t) * Hkv + hk) * n;
    for (int32_t j : as_block_set(std::vector<int32_t>(first, first + n))) {
      const int64_t begin = int64_t{j} * cfg.slc_block;
      const int64_t end = std::min<int64_t>(begin + cfg.slc_block, t + 1);
      for (int64_t pos = begin; pos < end; ++pos) rows.push_back(s.start + pos);
    }
  } else {
    // Step 5: the window max(0, t - w + 1) .. t.
    for (int64_t pos = std::max<int64_t>(0, t - cfg.window + 1); pos <= t; ++pos) {
      rows.push_back(s.start + pos);
    }
  }
  return rows;
}

std::vector<double> row_of(const Tensor64& x, int64_t i0, int64_t i1, int64_t i2) {
  const double* r = x.row(i0, i1, i2);
  return std::vector<double>(r, r + x.shape[3]);
}

Rows gather(const Tensor64& x, int64_t b, const std::vector<int64_t>& rows, int64_t hk) {
  Rows out;
  for (int64_t r : rows) out.push_back(row_of(x, b, r, hk));
  return out;
}

// One branch of one query head, recomputed: its key rows and its attention (SPEC 4).
struct BranchQuery {
  int64_t b = 0, tok = 0, h = 0, hk = 0;  // tok: the query's row in dimension 1 of q
  Branch branch = Branch::kCmp;
  const std::vector<int64_t>* rows = nullptr;
  const Rows* keys = nullptr;
  const Rows* values = nullptr;
  const std::vector<double>* q = nullptr;
  Attention att;  // att.o is empty for an empty branch: o_c = 0
};

// Calls visit(BranchQuery&) for every branch of every query head of KV head hk in sequence s, in
// a fixed order (positions ascending), so that sums over queries are deterministic.
template <typename Visit>
void for_each_branch_query(const NsaArgs64& a, const Sequence& s, int64_t hk, Visit&& visit) {
  const int64_t G = a.q.shape[2] / a.k_slc.shape[2];
  for (int64_t t = 0; t < s.len; ++t) {
    for (Branch br : kBranches) {
      const BranchArgs ba = args_of(a, br);
      const std::vector<int64_t> rows = branch_rows(a, s, t, hk, br);
      const Rows keys = gather(ba.k, s.batch, rows, hk);
      const Rows values = gather(ba.v, s.batch, rows, hk);
      for (int64_t g = 0; g < G; ++g) {
        BranchQuery bq;
        bq.b = s.batch;
        bq.tok = s.start + t;
        bq.h = hk * G + g;
        bq.hk = hk;
        bq.branch = br;
        bq.rows = &rows;
        bq.keys = &keys;
        bq.values = &values;
        const std::vector<double> q = row_of(a.q, bq.b, bq.tok, bq.h);
        bq.q = &q;
        bq.att = attend(q, keys, values, a.cfg.scale);
        visit(bq);
      }
    }
  }
}

// Runs body(sequence, KV head) for every pair, in parallel: the pairs share no output element.
template <typename Body>
Status for_each_sequence_head(const NsaArgs64& a, int32_t num_threads, Body&& body) {
  const int64_t Hkv = a.k_slc.shape[2];
  const int64_t S = static_cast<int64_t>(a.seqs.size());
  return parallel_for(S * Hkv, num_threads,
                      [&](int64_t item) { body(a.seqs[item / Hkv], item % Hkv); });
}

double dot(const double* x, const std::vector<double>& y) {
  double acc = 0.0;
  for (size_t i = 0; i < y.size(); ++i) acc += x[i] * y[i];
  return acc;
}

// The backward of one query row's softmax attention o = sum_j P_j v_j, P = softmax(scale q.k_j),
// given d_out = dL/do. Adds into dq (the query's row) and the rows of dk, dv it read.
void attend_backward(const BranchQuery& bq, const std::vector<double>& d_out, double scale,
                     double* dq, Tensor64& dk, Tensor64& dv) {
  const Rows& keys = *bq.keys;
  const Rows& values = *bq.values;
  const std::vector<double>& p = bq.att.p;
  // rowsum(dO o O) = sum_j P_j dP_j: the softmax Jacobian's correction term.
  const double d_row = dot(d_out.data(), bq.att.o);
  for (size_t j = 0; j < keys.size(); ++j) {
    const double dp = dot(d_out.data(), values[j]);  // dP_j = dO . v_j
    const double ds = p[j] * (dp - d_row);           // dS_j, the gradient of score j
    const int64_t r = (*bq.rows)[j];
    double* dk_row = dk.row(bq.b, r, bq.hk);
    double* dv_row = dv.row(bq.b, r, bq.hk);
    for (size_t i = 0; i < keys[j].size(); ++i) {
      dq[i] += scale * ds * keys[j][i];
      dk_row[i] += scale * ds * (*bq.q)[i];
    }
    for (size_t i = 0; i < d_out.size(); ++i) dv_row[i] += p[j] * d_out[i];
  }
}

// Zeros shaped as x.
Tensor64 zeros_like(const Tensor64& x) {
  return Tensor64(x.shape[0], x.shape[1], x.shape[2], x.shape[3]);
}

}  // namespace

Status forward_fixed64(const NsaArgs64& a, int32_t num_threads, NsaOutputs64* out) {
  const int64_t B = a.q.shape[0], T = a.q.shape[1], Hq = a.q.shape[2], Dv = a.v_slc.shape[3];
  for (Tensor64* o : {&out->o, &out->o_cmp, &out->o_slc, &out->o_win}) *o = Tensor64(B, T, Hq, Dv);
  return for_each_sequence_head(a, num_threads, [&](const Sequence& s, int64_t hk) {
    for_each_branch_query(a, s, hk, [&](const BranchQuery& bq) {
      Tensor64& o_c = bq.branch == Branch::kCmp   ? out->o_cmp
                      : bq.branch == Branch::kSlc ? out->o_slc
                                                  : out->o_win;
      // Step 6: o = sum of the gated branches (Eq. 5); an empty branch adds nothing.
      const double gate = args_of(a, bq.branch).gate.at(bq.b, bq.tok, bq.h);
      for (size_t i = 0; i < bq.att.o.size(); ++i) {
        o_c.at(bq.b, bq.tok, bq.h, i) = bq.att.o[i];
        out->o.at(bq.b, bq.tok, bq.h, i) += gate * bq.att.o[i];
      }
    });
  });
}

Status backward64(const NsaArgs64& a, const Tensor64& d_o, int32_t num_threads, NsaGrads64* grads) {
  NsaGrads64& g = *grads;
  g.dq = zeros_like(a.q);
  g.dk_slc = zeros_like(a.k_slc);
  g.dv_slc = zeros_like(a.v_slc);
  g.dk_win = zeros_like(a.k_win);
  g.dv_win = zeros_like(a.v_win);
  g.dk_cmp = zeros_like(a.k_cmp);
  g.dv_cmp = zeros_like(a.v_cmp);
  g.dg_cmp = zeros_like(a.g_cmp);
  g.dg_slc = zeros_like(a.g_slc);
  g.dg_win = zeros_like(a.g_win);
  return for_each_sequence_head(a, num_threads, [&](const Sequence& s, int64_t hk) {
    for_each_branch_query(a, s, hk, [&](const BranchQuery& bq) {
      const BranchGrads bg = grads_of(g, bq.branch);
      const std::vector<double> d_out = row_of(d_o, bq.b, bq.tok, bq.h);
      // o = ... + g_c o_c: dg_c = do . o_c (0 for an empty branch, whose o_c is 0).
      bg.dgate.at(bq.b, bq.tok, bq.h) = dot(d_out.data(), bq.att.o);
      if (bq.rows->empty()) return;  // an empty branch has no key: no gradient, never NaN
      // dO_c = g_c do, then the branch's own softmax attention backward.
      std::vector<double> d_branch = d_out;
      const double gate = args_of(a, bq.branch).gate.at(bq.b, bq.tok, bq.h);
      for (double& x : d_branch) x *= gate;
      attend_backward(bq, d_branch, a.cfg.scale, g.dq.row(bq.b, bq.tok, bq.h), bg.dk, bg.dv);
    });
  });
}

}  // namespace nsa::ref
