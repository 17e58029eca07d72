// Validation of configs, tensor descriptors, variable-length offsets and caller-supplied indices.
#include "api/validate.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <sstream>
#include <string>
#include <vector>

#include "api/validate_util.h"
#include "common/backend.h"

namespace nsa {

std::string shape_str(const nsa_tensor& t) {
  std::ostringstream os;
  os << "[";
  for (int i = 0; i < t.ndim; ++i) os << (i ? ", " : "") << t.shape[i];
  os << "]";
  return os.str();
}

namespace {

std::string shape_str(const std::vector<int64_t>& s) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < s.size(); ++i) os << (i ? ", " : "") << s[i];
  os << "]";
  return os.str();
}

// The strides of an output must not let two elements share memory. Sufficient condition: with
// dimensions sorted by stride, each stride is at least the extent of everything inside it.
bool views_overlap(const nsa_tensor& t) {
  std::vector<int> dims;
  for (int i = 0; i < t.ndim; ++i) {
    if (t.shape[i] == 0) return false;  // empty: nothing is written
    if (t.shape[i] > 1) dims.push_back(i);
  }
  std::sort(dims.begin(), dims.end(), [&](int a, int b) { return t.stride[a] < t.stride[b]; });
  int64_t extent = 1;
  for (size_t i = 0; i < dims.size(); ++i) {
    const int d = dims[i];
    if (t.stride[d] < extent) return true;
    // Past int64 only for the outermost dimension once span_fits passed (its last element
    // fits, its extent need not); any dimension after it would start inside it.
    if (__builtin_mul_overflow(t.stride[d], t.shape[d], &extent)) return i + 1 < dims.size();
  }
  return false;
}

// Whether the byte offset of the view's last element fits in int64, so that no offset a kernel
// computes can overflow (sizes and strides are already known to be non-negative).
bool span_fits(const nsa_tensor& t) {
  int64_t last = 0;
  for (int i = 0; i < t.ndim; ++i) {
    if (t.shape[i] == 0) return true;  // empty: no element is ever addressed
    int64_t step = 0;
    if (__builtin_mul_overflow(t.shape[i] - 1, t.stride[i], &step) ||
        __builtin_add_overflow(last, step, &last)) {
      return false;
    }
  }
  const int dtype = enum_value(t.dtype);
  const int64_t size = dtype == NSA_DTYPE_BF16 || dtype == NSA_DTYPE_F16 ? 2 : 4;
  // Elements 0 .. last, so last + 1 of them: at INT64_MAX that count itself overflows.
  int64_t count = 0, bytes = 0;
  return !__builtin_add_overflow(last, 1, &count) && !__builtin_mul_overflow(count, size, &bytes);
}

}  // namespace

// Checks presence, rank, shape, strides and dtype of one tensor. `shape` entries of -1 accept any
// size. `dtypes` lists the accepted dtypes.
Status check_tensor(const char* name, const nsa_tensor& t, const std::vector<int64_t>& shape,
                    const std::vector<nsa_dtype>& dtypes, Role role) {
  if (t.data == nullptr) return error(NSA_ERR_NULL_POINTER, cat(name, ": data is NULL"));
  const int nd = static_cast<int>(shape.size());
  if (t.ndim != nd) {
    return error(NSA_ERR_INVALID_SHAPE, cat(name, ": expected ", nd, " dimensions, got ", t.ndim));
  }
  for (int i = 0; i < nd; ++i) {
    if (t.shape[i] < 0) {
      return error(NSA_ERR_INVALID_SHAPE,
                   cat(name, ": negative size ", t.shape[i], " in dimension ", i));
    }
    if (shape[i] >= 0 && t.shape[i] != shape[i]) {
      return error(NSA_ERR_INVALID_SHAPE, cat(name, ": expected shape ", shape_str(shape),
                                              " (-1: any), got ", shape_str(t)));
    }
    if (t.stride[i] < 0) {
      return error(NSA_ERR_INVALID_STRIDE,
                   cat(name, ": negative stride ", t.stride[i], " in dimension ", i));
    }
  }
  if (!span_fits(t)) {
    return error(NSA_ERR_INVALID_SHAPE, cat(name, ": shape ", shape_str(t),
                                            " with these strides spans more memory than "
                                            "a 64-bit offset can address"));
  }
  if (t.shape[nd - 1] > 1 && t.stride[nd - 1] != 1) {
    return error(NSA_ERR_INVALID_STRIDE, cat(name,
                                             ": the last dimension must be contiguous "
                                             "(stride 1), got stride ",
                                             t.stride[nd - 1]));
  }
  if (role == Role::kOutput && views_overlap(t)) {
    return error(NSA_ERR_INVALID_STRIDE,
                 cat(name, ": the strides make elements of this output overlap"));
  }
  const int dtype = enum_value(t.dtype);  // may be any int a C caller stored
  if (std::none_of(dtypes.begin(), dtypes.end(), [&](nsa_dtype d) { return d == dtype; })) {
    std::string accepted;
    for (nsa_dtype d : dtypes) accepted += cat(accepted.empty() ? "" : " or ", nsa_dtype_name(d));
    const bool known = dtype >= NSA_DTYPE_F32 && dtype <= NSA_DTYPE_I32;
    const std::string got = known ? std::string(nsa_dtype_name(static_cast<nsa_dtype>(dtype)))
                                  : cat("unknown (", dtype, ")");
    return error(NSA_ERR_INVALID_DTYPE,
                 cat(name, ": dtype ", got, " is not accepted here (expected ", accepted, ")"));
  }
  return Status::ok();
}

Status check_optional(const char* name, const nsa_tensor& t, const std::vector<int64_t>& shape,
                      const std::vector<nsa_dtype>& dtypes, Role role) {
  return present(t) ? check_tensor(name, t, shape, dtypes, role) : Status::ok();
}

// The descriptor rules of cu_seqlens and num_seqs (nsa.h, nsa_fwd_inputs), reading no entry; a
// fixed-length batch gets its B sequences here, a packed one from the backend's content check.
Status check_packing(const nsa_config& cfg, int64_t B, int64_t T, const int32_t* cu_seqlens,
                     int64_t num_seqs, std::vector<Sequence>* seqs) {
  seqs->clear();
  if (cu_seqlens == nullptr) {
    if (num_seqs != 0) {
      return error(NSA_ERR_NULL_POINTER, cat("cu_seqlens: NULL while num_seqs = ", num_seqs,
                                             " (set num_seqs to 0 "
                                             "for fixed-length batches)"));
    }
    const int64_t tc = nsa_cmp_len(&cfg, T);
    for (int64_t b = 0; b < B; ++b) seqs->push_back({b, 0, T, 0, tc});
    return Status::ok();
  }
  if (B != 1) {
    return error(NSA_ERR_INVALID_SHAPE,
                 cat("cu_seqlens: variable-length packing needs batch size 1, got B = ", B));
  }
  if (num_seqs < 1) {
    return error(NSA_ERR_INVALID_SEQLENS, cat("num_seqs: must be at least 1, got ", num_seqs));
  }
  return Status::ok();
}

Status packed_contents(const Backend& be, const nsa_config& cfg, int64_t T,
                       const int32_t* cu_seqlens, int64_t num_seqs,
                       std::initializer_list<NamedTensor> cmp, std::vector<Sequence>* seqs) {
  if (cu_seqlens == nullptr) return Status::ok();
  PackedArgs a;
  a.cfg = &cfg;
  a.cu_seqlens = cu_seqlens;
  a.num_seqs = num_seqs;
  a.T = T;
  int i = 0;
  for (const NamedTensor& t : cmp) a.cmp[i++] = {t.first, t.second.shape[1]};
  return be.packed(a, seqs);
}

Status indices_contents(const Backend& be, const char* name, const nsa_tensor& ix,
                        const nsa_config& cfg, const std::vector<Sequence>& seqs, int64_t Hkv) {
  IndexArgs a;
  a.name = name;
  a.indices = &ix;
  a.cfg = &cfg;
  a.seqs = &seqs;
  a.Hkv = Hkv;
  return be.indices(a);
}

// A shape error on a fixed-length call's compressed tensor gets Tc explained, since Tc is derived
// (SPEC 3) rather than visible in any other argument. (Packed calls: host_packed explains it.)
Status explain_cmp_rows(Status s, const nsa_tensor& t, int64_t Tc, const nsa_config& cfg,
                        int64_t T) {
  if (s.code != NSA_ERR_INVALID_SHAPE || t.ndim != 4 || t.shape[1] == Tc) return s;
  s.message += cat("; Tc = ", Tc, " compressed tokens for T = ", T, " (cmp_block ", cfg.cmp_block,
                   ", cmp_stride ", cfg.cmp_stride, ")");
  return s;
}

// A compressed tensor [B, Tc, H, D]: Tc of T for a fixed-length batch (Tc >= 0); any row count
// for a packed one (Tc = -1: the backend's content check compares it with cu_seqlens).
Status check_cmp_tensor(const char* name, const nsa_tensor& t, const CmpRows& rows, int64_t B,
                        int64_t H, int64_t D, const std::vector<nsa_dtype>& dtypes, Role role) {
  const Status s = check_tensor(name, t, {B, rows.Tc, H, D}, dtypes, role);
  return rows.derived ? explain_cmp_rows(s, t, rows.Tc, *rows.cfg, rows.T) : s;
}

Status validate_config(const nsa_config& c) {
  struct Field {
    const char* name;
    int32_t value;
    int32_t min;
  };
  const Field fields[] = {{"cmp_block", c.cmp_block, 1}, {"cmp_stride", c.cmp_stride, 1},
                          {"slc_block", c.slc_block, 1}, {"slc_count", c.slc_count, 1},
                          {"slc_init", c.slc_init, 0},   {"slc_local", c.slc_local, 0},
                          {"window", c.window, 1}};
  for (const Field& f : fields) {
    if (f.value < f.min) {
      return error(NSA_ERR_INVALID_CONFIG,
                   cat("config.", f.name, ": must be at least ", f.min, ", got ", f.value));
    }
  }
  if (c.cmp_stride > c.cmp_block) {
    return error(NSA_ERR_INVALID_CONFIG,
                 cat("config.cmp_stride: must not exceed cmp_block (", c.cmp_block, "), got ",
                     c.cmp_stride, "; blocks would leave gaps"));
  }
  if (static_cast<int64_t>(c.slc_init) + c.slc_local > c.slc_count) {
    return error(NSA_ERR_INVALID_CONFIG,
                 cat("config.slc_count: must be at least slc_init + slc_local (", c.slc_init, " + ",
                     c.slc_local, "), got ", c.slc_count));
  }
  if (!std::isfinite(c.scale) || c.scale < 0.0f) {
    return error(
        NSA_ERR_INVALID_CONFIG,
        cat("config.scale: must be finite and >= 0 (0 selects 1/sqrt(Dk)), got ", c.scale));
  }
  return Status::ok();
}

// q [B, T, Hq, Dk], k [B, T, Hkv, Dk], v [B, T, Hkv, Dv] and the head counts: the sizes of an
// attention problem, NSA's and the dense baseline's alike.
Status check_qkv(const nsa_tensor& q, const nsa_tensor& k, const nsa_tensor& v, AttnDims* d) {
  const std::vector<nsa_dtype>& floats = kFloatDtypes;
  NSA_RETURN_IF_ERROR(check_tensor("q", q, {-1, -1, -1, -1}, floats, Role::kInput));
  d->B = q.shape[0];
  d->T = q.shape[1];
  d->Hq = q.shape[2];
  d->Dk = q.shape[3];
  const std::vector<nsa_dtype> same = {q.dtype};
  NSA_RETURN_IF_ERROR(check_tensor("k", k, {d->B, d->T, -1, d->Dk}, same, Role::kInput));
  d->Hkv = k.shape[2];
  NSA_RETURN_IF_ERROR(check_tensor("v", v, {d->B, d->T, d->Hkv, -1}, same, Role::kInput));
  d->Dv = v.shape[3];
  if (d->Hq < 1 || d->Dk < 1) {
    return error(NSA_ERR_INVALID_SHAPE,
                 cat("q: needs at least one head and Dk >= 1, got shape ", shape_str(q)));
  }
  if (d->Hkv < 1 || d->Dv < 1) {
    return error(NSA_ERR_INVALID_SHAPE, cat("k/v: need at least one KV head and Dv >= 1, got k ",
                                            shape_str(k), ", v ", shape_str(v)));
  }
  if (d->Hq % d->Hkv != 0) {
    return error(
        NSA_ERR_INVALID_SHAPE,
        cat("q/k: Hq = ", d->Hq, " query heads is not a multiple of Hkv = ", d->Hkv, " KV heads"));
  }
  d->G = d->Hq / d->Hkv;
  return Status::ok();
}

// Per-branch K/V (SPEC 3): both of a pair or neither; absent ones alias k/v.
Status check_branch_kv(nsa_fwd_inputs* in, const AttnDims& d) {
  struct Pair {
    const char* kname;
    const char* vname;
    nsa_tensor* k;
    nsa_tensor* v;
  };
  const std::vector<nsa_dtype> same = {in->q.dtype};
  for (Pair pair : {Pair{"k_slc", "v_slc", &in->k_slc, &in->v_slc},
                    Pair{"k_win", "v_win", &in->k_win, &in->v_win}}) {
    if (present(*pair.k) != present(*pair.v)) {
      return error(NSA_ERR_NULL_POINTER,
                   cat(pair.kname, "/", pair.vname, ": give both of a branch's K/V or neither"));
    }
    if (!present(*pair.k)) {
      *pair.k = in->k;
      *pair.v = in->v;
      continue;
    }
    NSA_RETURN_IF_ERROR(
        check_tensor(pair.kname, *pair.k, {d.B, d.T, d.Hkv, d.Dk}, same, Role::kInput));
    NSA_RETURN_IF_ERROR(
        check_tensor(pair.vname, *pair.v, {d.B, d.T, d.Hkv, d.Dv}, same, Role::kInput));
  }
  return Status::ok();
}

Status check_fwd_inputs(FwdProblem* problem) {
  FwdProblem& pr = *problem;
  nsa_fwd_inputs& in = pr.p.in;
  NSA_RETURN_IF_ERROR(validate_config(in.cfg));
  NSA_RETURN_IF_ERROR(check_qkv(in.q, in.k, in.v, &pr));
  NSA_RETURN_IF_ERROR(check_branch_kv(&in, pr));
  NSA_RETURN_IF_ERROR(check_packing(in.cfg, pr.B, pr.T, in.cu_seqlens, in.num_seqs, &pr.seqs));
  // Selection block indices are int32 (slc_indices_in/out, and the kernels' block lists), so the
  // last block of the longest sequence, (len - 1) / l', must fit one. Only a fixed-length T past
  // 2^31 tokens can break this (packed lengths are int32 already).
  if (in.cu_seqlens == nullptr && pr.T > 0 && (pr.T - 1) / in.cfg.slc_block > INT32_MAX) {
    return error(NSA_ERR_INVALID_SHAPE,
                 cat("q: T = ", pr.T, " tokens make more selection blocks (slc_block ",
                     in.cfg.slc_block, ") than an int32 block index can number"));
  }
  const std::vector<nsa_dtype> same = {in.q.dtype};
  const CmpRows rows = cmp_rows(in.cfg, pr.T, in.cu_seqlens != nullptr);
  NSA_RETURN_IF_ERROR(
      check_cmp_tensor("k_cmp", in.k_cmp, rows, pr.B, pr.Hkv, pr.Dk, same, Role::kInput));
  pr.Tc = in.k_cmp.shape[1];
  NSA_RETURN_IF_ERROR(
      check_cmp_tensor("v_cmp", in.v_cmp, rows, pr.B, pr.Hkv, pr.Dv, same, Role::kInput));
  const std::vector<nsa_dtype> gate_dtypes =
      in.q.dtype == NSA_DTYPE_F32 ? std::vector<nsa_dtype>{NSA_DTYPE_F32}
                                  : std::vector<nsa_dtype>{NSA_DTYPE_F32, in.q.dtype};
  const std::vector<int64_t> per_head = {pr.B, pr.T, pr.Hq};
  NSA_RETURN_IF_ERROR(check_tensor("g_cmp", in.g_cmp, per_head, gate_dtypes, Role::kInput));
  NSA_RETURN_IF_ERROR(check_tensor("g_slc", in.g_slc, per_head, gate_dtypes, Role::kInput));
  NSA_RETURN_IF_ERROR(check_tensor("g_win", in.g_win, per_head, gate_dtypes, Role::kInput));
  return Status::ok();
}

Status check_fwd_contents(const Backend& be, FwdProblem* pr) {
  const nsa_fwd_inputs& in = pr->p.in;
  return packed_contents(be, in.cfg, pr->T, in.cu_seqlens, in.num_seqs,
                         {{"k_cmp", in.k_cmp}, {"v_cmp", in.v_cmp}}, &pr->seqs);
}

Status make_fwd_problem(const nsa_fwd_params& params, const Backend& be, FwdProblem* out) {
  FwdProblem pr;
  pr.p = params;
  nsa_fwd_params& p = pr.p;
  NSA_RETURN_IF_ERROR(check_fwd_inputs(&pr));
  const std::vector<nsa_dtype>& floats = kFloatDtypes;
  const std::vector<int64_t> per_head = {pr.B, pr.T, pr.Hq};

  const std::vector<int64_t> idx_shape = {pr.B, pr.T, pr.Hkv, p.in.cfg.slc_count};
  const std::vector<nsa_dtype> i32 = {NSA_DTYPE_I32};
  NSA_RETURN_IF_ERROR(
      check_optional("slc_indices_in", p.slc_indices_in, idx_shape, i32, Role::kInput));

  const std::vector<int64_t> o_shape = {pr.B, pr.T, pr.Hq, pr.Dv};
  const std::vector<nsa_dtype> f32 = {NSA_DTYPE_F32};
  NSA_RETURN_IF_ERROR(check_tensor("o", p.o, o_shape, floats, Role::kOutput));
  NSA_RETURN_IF_ERROR(check_optional("o_cmp", p.o_cmp, o_shape, floats, Role::kOutput));
  NSA_RETURN_IF_ERROR(check_optional("o_slc", p.o_slc, o_shape, floats, Role::kOutput));
  NSA_RETURN_IF_ERROR(check_optional("o_win", p.o_win, o_shape, floats, Role::kOutput));
  NSA_RETURN_IF_ERROR(check_optional("lse_cmp", p.lse_cmp, per_head, f32, Role::kOutput));
  NSA_RETURN_IF_ERROR(check_optional("lse_slc", p.lse_slc, per_head, f32, Role::kOutput));
  NSA_RETURN_IF_ERROR(check_optional("lse_win", p.lse_win, per_head, f32, Role::kOutput));
  NSA_RETURN_IF_ERROR(
      check_optional("slc_indices_out", p.slc_indices_out, idx_shape, i32, Role::kOutput));

  // Contents last (nsa.h: slc_indices_in is reported only when every other rule holds).
  NSA_RETURN_IF_ERROR(check_fwd_contents(be, &pr));
  if (present(p.slc_indices_in)) {
    NSA_RETURN_IF_ERROR(
        indices_contents(be, "slc_indices_in", p.slc_indices_in, p.in.cfg, pr.seqs, pr.Hkv));
  }
  if (p.in.cfg.scale == 0.0f) p.in.cfg.scale = static_cast<float>(1.0 / std::sqrt(double(pr.Dk)));
  *out = std::move(pr);
  return Status::ok();
}

Status check_compress_inputs(CompressProblem* problem) {
  CompressProblem& pr = *problem;
  const nsa_compress_params& p = pr.p;
  NSA_RETURN_IF_ERROR(validate_config(p.cfg));
  const int kind = enum_value(p.kind);  // may hold any int a C caller stored
  if (kind != NSA_CMP_MEAN && kind != NSA_CMP_MLP) {
    return error(NSA_ERR_INVALID_ARGUMENT, cat("kind: unknown compression kind ", kind,
                                               " (expected NSA_CMP_MEAN or "
                                               "NSA_CMP_MLP)"));
  }
  const std::vector<nsa_dtype>& floats = kFloatDtypes;
  NSA_RETURN_IF_ERROR(check_tensor("x", p.x, {-1, -1, -1, -1}, floats, Role::kInput));
  pr.B = p.x.shape[0];
  pr.T = p.x.shape[1];
  pr.Hkv = p.x.shape[2];
  pr.D = p.x.shape[3];
  if (pr.Hkv < 1 || pr.D < 1) {
    return error(NSA_ERR_INVALID_SHAPE,
                 cat("x: needs at least one head and D >= 1, got shape ", shape_str(p.x)));
  }
  NSA_RETURN_IF_ERROR(check_packing(p.cfg, pr.B, pr.T, p.cu_seqlens, p.num_seqs, &pr.seqs));
  pr.Tc = cmp_rows(p.cfg, pr.T, p.cu_seqlens != nullptr).Tc;  // packed: -1 until the contents
  if (p.kind == NSA_CMP_MLP) {
    const nsa_tensor phi[5] = {p.pos, p.w1, p.b1, p.w2, p.b2};
    NSA_RETURN_IF_ERROR(
        check_mlp_params("", phi, pr.Hkv, p.cfg.cmp_block, pr.D, {p.x.dtype}, &pr.Dh));
  }
  return Status::ok();
}

Status check_mlp_params(const char* prefix, const nsa_tensor* phi, int64_t H, int64_t l, int64_t D,
                        const std::vector<nsa_dtype>& dtypes, int64_t* Dh) {
  const std::string pos = cat(prefix, "pos"), w1 = cat(prefix, "w1"), b1 = cat(prefix, "b1"),
                    w2 = cat(prefix, "w2"), b2 = cat(prefix, "b2");
  NSA_RETURN_IF_ERROR(check_tensor(pos.c_str(), phi[0], {H, l, D}, dtypes, Role::kInput));
  int64_t lD = 0;  // w1's row length; l and D are the caller's, so the product may overflow
  if (__builtin_mul_overflow(l, D, &lD)) {
    return error(NSA_ERR_INVALID_SHAPE, cat(w1, ": a row of cmp_block * D = ", l, " * ", D,
                                            " elements overflows 64 bits"));
  }
  NSA_RETURN_IF_ERROR(check_tensor(w1.c_str(), phi[1], {H, -1, lD}, dtypes, Role::kInput));
  *Dh = phi[1].shape[1];
  if (*Dh < 1) return error(NSA_ERR_INVALID_SHAPE, cat(w1, ": the hidden width Dh must be >= 1"));
  NSA_RETURN_IF_ERROR(check_tensor(b1.c_str(), phi[2], {H, *Dh}, dtypes, Role::kInput));
  NSA_RETURN_IF_ERROR(check_tensor(w2.c_str(), phi[3], {H, D, *Dh}, dtypes, Role::kInput));
  return check_tensor(b2.c_str(), phi[4], {H, D}, dtypes, Role::kInput);
}

Status check_compressed_rows(const char* name, const nsa_tensor& t, Role role,
                             CompressProblem* pr) {
  const nsa_compress_params& p = pr->p;
  const CmpRows rows = cmp_rows(p.cfg, pr->T, p.cu_seqlens != nullptr);
  NSA_RETURN_IF_ERROR(check_cmp_tensor(name, t, rows, pr->B, pr->Hkv, pr->D,
                                       kFloatDtypes, role));
  pr->Tc = t.shape[1];
  return Status::ok();
}

Status compress_contents(const Backend& be, const char* cmp_name, const nsa_tensor& cmp,
                         CompressProblem* pr) {
  const nsa_compress_params& p = pr->p;
  return packed_contents(be, p.cfg, pr->T, p.cu_seqlens, p.num_seqs, {{cmp_name, cmp}}, &pr->seqs);
}

Status make_compress_problem(const nsa_compress_params& in, const Backend& be,
                             CompressProblem* out) {
  CompressProblem pr;
  pr.p = in;
  NSA_RETURN_IF_ERROR(check_compress_inputs(&pr));
  NSA_RETURN_IF_ERROR(check_compressed_rows("out", pr.p.out, Role::kOutput, &pr));
  NSA_RETURN_IF_ERROR(compress_contents(be, "out", pr.p.out, &pr));
  *out = std::move(pr);
  return Status::ok();
}

// The sequence list of a dense call needs a config only for compressed lengths, unused here.
nsa_config dense_cfg() {
  nsa_config cfg;
  nsa_config_default(&cfg);
  return cfg;
}

Status check_dense_inputs(nsa_dense_fwd_params* params, DenseProblem* pr) {
  nsa_dense_fwd_params& p = *params;
  NSA_RETURN_IF_ERROR(check_qkv(p.q, p.k, p.v, pr));
  if (p.window < 0) {
    return error(NSA_ERR_INVALID_ARGUMENT,
                 cat("window: must be >= 0 (0: no window), got ", p.window));
  }
  if (!std::isfinite(p.scale) || p.scale < 0.0f) {
    return error(NSA_ERR_INVALID_ARGUMENT,
                 cat("scale: must be finite and >= 0 (0 selects 1/sqrt(Dk)), got ", p.scale));
  }
  NSA_RETURN_IF_ERROR(
      check_packing(dense_cfg(), pr->B, pr->T, p.cu_seqlens, p.num_seqs, &pr->seqs));
  if (p.scale == 0.0f) p.scale = static_cast<float>(1.0 / std::sqrt(double(pr->Dk)));
  return Status::ok();
}

Status dense_contents(const Backend& be, const int32_t* cu_seqlens, int64_t num_seqs, int64_t T,
                      std::vector<Sequence>* seqs) {
  const nsa_config cfg = dense_cfg();
  return packed_contents(be, cfg, T, cu_seqlens, num_seqs, {}, seqs);
}

Status make_dense_problem(const nsa_dense_fwd_params& in, const Backend& be, DenseProblem* out) {
  DenseProblem pr;
  pr.p = in;
  nsa_dense_fwd_params& p = pr.p;
  NSA_RETURN_IF_ERROR(check_dense_inputs(&p, &pr));
  const std::vector<nsa_dtype>& floats = kFloatDtypes;
  NSA_RETURN_IF_ERROR(check_tensor("o", p.o, {pr.B, pr.T, pr.Hq, pr.Dv}, floats, Role::kOutput));
  NSA_RETURN_IF_ERROR(
      check_optional("lse", p.lse, {pr.B, pr.T, pr.Hq}, {NSA_DTYPE_F32}, Role::kOutput));
  NSA_RETURN_IF_ERROR(dense_contents(be, p.cu_seqlens, p.num_seqs, pr.T, &pr.seqs));
  *out = std::move(pr);
  return Status::ok();
}

}  // namespace nsa
