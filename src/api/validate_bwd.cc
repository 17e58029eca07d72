// Validation of the backward calls (SPEC.md sections 6 and 8). The forward's inputs are checked by
// the forward's own code (check_fwd_inputs, check_compress_inputs), so the two can never disagree
// on what a valid input is; what is new here is the saved selection, d_o, the gradient outputs
// and the aliasing rule.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "api/validate.h"
#include "api/validate_util.h"

namespace nsa {
namespace {

// The bytes [lo, hi) that a view can touch, from its first to its last element; lo == hi when it
// has no element.
struct ByteSpan {
  uintptr_t lo = 0, hi = 0;
};

ByteSpan byte_span(const nsa_tensor& t) {
  int64_t last = 0;  // fits: check_tensor verified the span (span_fits)
  for (int i = 0; i < t.ndim; ++i) {
    if (t.shape[i] == 0) return {};
    last += (t.shape[i] - 1) * t.stride[i];
  }
  const uintptr_t lo = reinterpret_cast<uintptr_t>(t.data);
  uintptr_t hi = 0;  // saturated: a span past the address space still intersects what follows
  const uintptr_t bytes = static_cast<uintptr_t>(last + 1) * nsa_dtype_size(t.dtype);
  if (__builtin_add_overflow(lo, bytes, &hi)) hi = UINTPTR_MAX;
  return {lo, hi};
}

bool spans_intersect(const nsa_tensor& a, const nsa_tensor& b) {
  const ByteSpan x = byte_span(a), y = byte_span(b);
  return x.lo < x.hi && y.lo < y.hi && x.lo < y.hi && y.lo < x.hi;
}

// A required output of the backward: present, or a NULL-pointer error that says why it is needed.
Status check_required_output(const char* name, const nsa_tensor& t,
                             const std::vector<int64_t>& shape, const char* why) {
  if (!present(t)) return error(NSA_ERR_NULL_POINTER, cat(name, ": data is NULL (", why, ")"));
  return check_tensor(name, t, shape, kFloatDtypes, Role::kOutput);
}

// The routing of one branch's raw K/V gradients (nsa.h): to its own outputs exactly when the
// forward was given its own K/V, else into dk/dv.
Status check_branch_grads(const char* branch, bool own_kv, const char* dk_name,
                          const nsa_tensor& dk, const char* dv_name, const nsa_tensor& dv,
                          const BwdProblem& pr) {
  if (own_kv) {
    // A literal, not a message built in advance: nothing to allocate on the valid path.
    const char* why = std::strcmp(branch, "slc") == 0 ? "required because k_slc/v_slc were given"
                                                      : "required because k_win/v_win were given";
    NSA_RETURN_IF_ERROR(check_required_output(dk_name, dk, {pr.B, pr.T, pr.Hkv, pr.Dk}, why));
    return check_required_output(dv_name, dv, {pr.B, pr.T, pr.Hkv, pr.Dv}, why);
  }
  for (const NamedTensor& t : {NamedTensor{dk_name, dk}, NamedTensor{dv_name, dv}}) {
    if (present(t.second)) {
      return error(NSA_ERR_INVALID_ARGUMENT,
                   cat(t.first, ": given, but k_", branch, "/v_", branch, " are absent, so the ",
                       branch, " branch reads k/v and its gradient goes to dk/dv"));
    }
  }
  return Status::ok();
}

}  // namespace

Status check_no_aliasing(const std::vector<NamedTensor>& outputs,
                         const std::vector<NamedTensor>& inputs) {
  for (size_t i = 0; i < outputs.size(); ++i) {
    // Named fields, not a structured binding: clang before 16 cannot capture those in a lambda.
    const char* name = outputs[i].first;
    const nsa_tensor& out = outputs[i].second;
    if (!present(out)) continue;
    auto clash = [&](const NamedTensor& other) {
      if (!present(other.second) || !spans_intersect(out, other.second)) return Status::ok();
      return error(NSA_ERR_INVALID_ARGUMENT,
                   cat(name, ": shares memory with ", other.first,
                       " (an output must not overlap an input or another output)"));
    };
    for (size_t j = i + 1; j < outputs.size(); ++j) NSA_RETURN_IF_ERROR(clash(outputs[j]));
    for (const NamedTensor& in : inputs) NSA_RETURN_IF_ERROR(clash(in));
  }
  return Status::ok();
}

Status make_bwd_problem(const nsa_bwd_params& in, const Backend& be, BwdProblem* out) {
  FwdProblem fwd;
  nsa_fwd_params_init(&fwd.p);
  fwd.p.in = in.in;
  NSA_RETURN_IF_ERROR(check_fwd_inputs(&fwd));
  BwdProblem pr;
  pr.p = in;
  nsa_bwd_params& p = pr.p;
  static_cast<AttnDims&>(pr) = fwd;
  pr.seqs = fwd.seqs;
  pr.slc_own_kv = present(in.in.k_slc);
  pr.win_own_kv = present(in.in.k_win);
  p.in = fwd.p.in;  // k_slc .. v_win: k/v when the branch has no K/V of its own

  const std::vector<nsa_dtype>& floats = kFloatDtypes;
  const std::vector<nsa_dtype> f32 = {NSA_DTYPE_F32};
  const std::vector<int64_t> per_head = {pr.B, pr.T, pr.Hq};
  NSA_RETURN_IF_ERROR(check_tensor("slc_indices", p.slc_indices,
                                   {pr.B, pr.T, pr.Hkv, p.in.cfg.slc_count}, {NSA_DTYPE_I32},
                                   Role::kInput));
  NSA_RETURN_IF_ERROR(check_optional("lse_cmp", p.lse_cmp, per_head, f32, Role::kInput));
  NSA_RETURN_IF_ERROR(check_optional("lse_slc", p.lse_slc, per_head, f32, Role::kInput));
  NSA_RETURN_IF_ERROR(check_optional("lse_win", p.lse_win, per_head, f32, Role::kInput));
  const std::vector<int64_t> per_head_v = {pr.B, pr.T, pr.Hq, pr.Dv};
  NSA_RETURN_IF_ERROR(check_optional("o_cmp", p.o_cmp, per_head_v, floats, Role::kInput));
  NSA_RETURN_IF_ERROR(check_optional("o_slc", p.o_slc, per_head_v, floats, Role::kInput));
  NSA_RETURN_IF_ERROR(check_optional("o_win", p.o_win, per_head_v, floats, Role::kInput));
  NSA_RETURN_IF_ERROR(check_tensor("d_o", p.d_o, {pr.B, pr.T, pr.Hq, pr.Dv}, floats, Role::kInput));

  NSA_RETURN_IF_ERROR(check_tensor("dq", p.dq, {pr.B, pr.T, pr.Hq, pr.Dk}, floats, Role::kOutput));
  // dk/dv are needed unless both branches have their own K/V (then nothing reads k/v).
  if (!pr.slc_own_kv || !pr.win_own_kv) {
    const char* why = "required: a branch without its own K/V reads k/v";
    NSA_RETURN_IF_ERROR(check_required_output("dk", p.dk, {pr.B, pr.T, pr.Hkv, pr.Dk}, why));
    NSA_RETURN_IF_ERROR(check_required_output("dv", p.dv, {pr.B, pr.T, pr.Hkv, pr.Dv}, why));
  } else {
    NSA_RETURN_IF_ERROR(
        check_optional("dk", p.dk, {pr.B, pr.T, pr.Hkv, pr.Dk}, floats, Role::kOutput));
    NSA_RETURN_IF_ERROR(
        check_optional("dv", p.dv, {pr.B, pr.T, pr.Hkv, pr.Dv}, floats, Role::kOutput));
  }
  NSA_RETURN_IF_ERROR(
      check_branch_grads("slc", pr.slc_own_kv, "dk_slc", p.dk_slc, "dv_slc", p.dv_slc, pr));
  NSA_RETURN_IF_ERROR(
      check_branch_grads("win", pr.win_own_kv, "dk_win", p.dk_win, "dv_win", p.dv_win, pr));
  // Shaped as k_cmp/v_cmp, whose rows (Tc) are known by now (packed: compared with cu_seqlens
  // by the content check below).
  CmpRows rows = cmp_rows(p.in.cfg, pr.T, p.in.cu_seqlens != nullptr);
  rows.Tc = pr.Tc;
  NSA_RETURN_IF_ERROR(
      check_cmp_tensor("dk_cmp", p.dk_cmp, rows, pr.B, pr.Hkv, pr.Dk, floats, Role::kOutput));
  NSA_RETURN_IF_ERROR(
      check_cmp_tensor("dv_cmp", p.dv_cmp, rows, pr.B, pr.Hkv, pr.Dv, floats, Role::kOutput));
  NSA_RETURN_IF_ERROR(check_tensor("dg_cmp", p.dg_cmp, per_head, floats, Role::kOutput));
  NSA_RETURN_IF_ERROR(check_tensor("dg_slc", p.dg_slc, per_head, floats, Role::kOutput));
  NSA_RETURN_IF_ERROR(check_tensor("dg_win", p.dg_win, per_head, floats, Role::kOutput));

  NSA_RETURN_IF_ERROR(check_no_aliasing({{"dq", p.dq},
                                         {"dk", p.dk},
                                         {"dv", p.dv},
                                         {"dk_slc", p.dk_slc},
                                         {"dv_slc", p.dv_slc},
                                         {"dk_win", p.dk_win},
                                         {"dv_win", p.dv_win},
                                         {"dk_cmp", p.dk_cmp},
                                         {"dv_cmp", p.dv_cmp},
                                         {"dg_cmp", p.dg_cmp},
                                         {"dg_slc", p.dg_slc},
                                         {"dg_win", p.dg_win}},
                                        {{"q", in.in.q},
                                         {"k", in.in.k},
                                         {"v", in.in.v},
                                         {"k_slc", in.in.k_slc},
                                         {"v_slc", in.in.v_slc},
                                         {"k_win", in.in.k_win},
                                         {"v_win", in.in.v_win},
                                         {"k_cmp", in.in.k_cmp},
                                         {"v_cmp", in.in.v_cmp},
                                         {"g_cmp", in.in.g_cmp},
                                         {"g_slc", in.in.g_slc},
                                         {"g_win", in.in.g_win},
                                         {"slc_indices", in.slc_indices},
                                         {"lse_cmp", in.lse_cmp},
                                         {"lse_slc", in.lse_slc},
                                         {"lse_win", in.lse_win},
                                         {"o_cmp", in.o_cmp},
                                         {"o_slc", in.o_slc},
                                         {"o_win", in.o_win},
                                         {"d_o", in.d_o}}));
  // Contents last (nsa.h: slc_indices is checked after every other rule, aliasing included).
  NSA_RETURN_IF_ERROR(check_fwd_contents(be, &fwd));
  pr.seqs = fwd.seqs;
  NSA_RETURN_IF_ERROR(
      indices_contents(be, "slc_indices", p.slc_indices, p.in.cfg, pr.seqs, pr.Hkv));
  if (p.in.cfg.scale == 0.0f) {
    p.in.cfg.scale = static_cast<float>(1.0 / std::sqrt(double(pr.Dk)));
  }
  *out = std::move(pr);
  return Status::ok();
}

Status make_compress_bwd_problem(const nsa_compress_bwd_params& in, const Backend& be,
                                 CompressBwdProblem* out) {
  CompressProblem fwd;
  nsa_compress_params_init(&fwd.p);
  fwd.p.cfg = in.cfg;
  // Copied as bytes: a C caller may have stored any int, and loading that as the enum is
  // undefined (check_compress_inputs reads it safely, through enum_value).
  std::memcpy(&fwd.p.kind, &in.kind, sizeof in.kind);
  fwd.p.x = in.x;
  fwd.p.cu_seqlens = in.cu_seqlens;
  fwd.p.num_seqs = in.num_seqs;
  fwd.p.pos = in.pos;
  fwd.p.w1 = in.w1;
  fwd.p.b1 = in.b1;
  fwd.p.w2 = in.w2;
  fwd.p.b2 = in.b2;
  NSA_RETURN_IF_ERROR(check_compress_inputs(&fwd));
  NSA_RETURN_IF_ERROR(check_compressed_rows("dout", in.dout, Role::kInput, &fwd));
  CompressBwdProblem pr;
  pr.p = in;
  const nsa_compress_bwd_params& p = pr.p;
  static_cast<CmpDims&>(pr) = fwd;

  const std::vector<nsa_dtype>& floats = kFloatDtypes;
  NSA_RETURN_IF_ERROR(check_tensor("dx", p.dx, {pr.B, pr.T, pr.Hkv, pr.D}, floats, Role::kOutput));
  std::vector<NamedTensor> outputs = {{"dx", p.dx}};
  std::vector<NamedTensor> inputs = {{"x", p.x}, {"dout", p.dout}};
  if (p.kind == NSA_CMP_MLP) {
    const int64_t H = pr.Hkv, l = p.cfg.cmp_block, D = pr.D, Dh = pr.Dh;
    const char* why = "required for kind NSA_CMP_MLP";
    NSA_RETURN_IF_ERROR(check_required_output("dpos", p.dpos, {H, l, D}, why));
    NSA_RETURN_IF_ERROR(check_required_output("dw1", p.dw1, {H, Dh, l * D}, why));
    NSA_RETURN_IF_ERROR(check_required_output("db1", p.db1, {H, Dh}, why));
    NSA_RETURN_IF_ERROR(check_required_output("dw2", p.dw2, {H, D, Dh}, why));
    NSA_RETURN_IF_ERROR(check_required_output("db2", p.db2, {H, D}, why));
    outputs.insert(
        outputs.end(),
        {{"dpos", p.dpos}, {"dw1", p.dw1}, {"db1", p.db1}, {"dw2", p.dw2}, {"db2", p.db2}});
    inputs.insert(inputs.end(),
                  {{"pos", p.pos}, {"w1", p.w1}, {"b1", p.b1}, {"w2", p.w2}, {"b2", p.b2}});
  }
  NSA_RETURN_IF_ERROR(check_no_aliasing(outputs, inputs));
  NSA_RETURN_IF_ERROR(compress_contents(be, "dout", in.dout, &fwd));
  pr.seqs = std::move(fwd.seqs);
  *out = std::move(pr);
  return Status::ok();
}

Status make_dense_bwd_problem(const nsa_dense_bwd_params& in, const Backend& be,
                              DenseBwdProblem* out) {
  DenseBwdProblem pr;
  pr.p = in;
  nsa_dense_bwd_params& p = pr.p;
  // The forward's inputs, checked exactly as nsa_dense_fwd checks them.
  nsa_dense_fwd_params fwd;
  nsa_dense_fwd_params_init(&fwd);
  fwd.q = p.q;
  fwd.k = p.k;
  fwd.v = p.v;
  fwd.cu_seqlens = p.cu_seqlens;
  fwd.num_seqs = p.num_seqs;
  fwd.scale = p.scale;
  fwd.window = p.window;
  DenseProblem sizes;
  NSA_RETURN_IF_ERROR(check_dense_inputs(&fwd, &sizes));
  p.scale = fwd.scale;
  static_cast<AttnDims&>(pr) = sizes;
  pr.seqs = std::move(sizes.seqs);

  const std::vector<nsa_dtype>& floats = kFloatDtypes;
  const std::vector<int64_t> per_q = {pr.B, pr.T, pr.Hq, pr.Dv};
  NSA_RETURN_IF_ERROR(check_tensor("o", p.o, per_q, floats, Role::kInput));
  // The backward recomputes P from lse (FlashAttention-2): without it there is nothing to
  // normalise by, so it is required here although the forward may omit it.
  NSA_RETURN_IF_ERROR(
      check_tensor("lse", p.lse, {pr.B, pr.T, pr.Hq}, {NSA_DTYPE_F32}, Role::kInput));
  NSA_RETURN_IF_ERROR(check_tensor("d_o", p.d_o, per_q, {NSA_DTYPE_F32, p.q.dtype}, Role::kInput));
  NSA_RETURN_IF_ERROR(check_tensor("dq", p.dq, {pr.B, pr.T, pr.Hq, pr.Dk}, floats, Role::kOutput));
  NSA_RETURN_IF_ERROR(check_tensor("dk", p.dk, {pr.B, pr.T, pr.Hkv, pr.Dk}, floats, Role::kOutput));
  NSA_RETURN_IF_ERROR(check_tensor("dv", p.dv, {pr.B, pr.T, pr.Hkv, pr.Dv}, floats, Role::kOutput));
  NSA_RETURN_IF_ERROR(check_no_aliasing(
      {{"dq", p.dq}, {"dk", p.dk}, {"dv", p.dv}},
      {{"q", p.q}, {"k", p.k}, {"v", p.v}, {"o", p.o}, {"lse", p.lse}, {"d_o", p.d_o}}));
  NSA_RETURN_IF_ERROR(dense_contents(be, p.cu_seqlens, p.num_seqs, pr.T, &pr.seqs));
  *out = std::move(pr);
  return Status::ok();
}

}  // namespace nsa
