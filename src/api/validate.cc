// Validation of configs, tensor descriptors, variable-length offsets and caller-supplied indices.
#include "api/validate.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <sstream>
#include <string>
#include <vector>

#include "api/validate_util.h"

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
      return error(NSA_ERR_INVALID_SHAPE,
                   cat(name, ": expected shape ", shape_str(shape), " (-1: any), got ",
                       shape_str(t)));
    }
    if (t.stride[i] < 0) {
      return error(NSA_ERR_INVALID_STRIDE,
                   cat(name, ": negative stride ", t.stride[i], " in dimension ", i));
    }
  }
  if (!span_fits(t)) {
    return error(NSA_ERR_INVALID_SHAPE,
                 cat(name, ": shape ", shape_str(t), " with these strides spans more memory than "
                     "a 64-bit offset can address"));
  }
  if (t.shape[nd - 1] > 1 && t.stride[nd - 1] != 1) {
    return error(NSA_ERR_INVALID_STRIDE, cat(name, ": the last dimension must be contiguous "
                                               "(stride 1), got stride ", t.stride[nd - 1]));
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
    return error(NSA_ERR_INVALID_DTYPE, cat(name, ": dtype ", got,
                                            " is not accepted here (expected ", accepted, ")"));
  }
  return Status::ok();
}

Status check_optional(const char* name, const nsa_tensor& t, const std::vector<int64_t>& shape,
                      const std::vector<nsa_dtype>& dtypes, Role role) {
  return present(t) ? check_tensor(name, t, shape, dtypes, role) : Status::ok();
}

// Builds the sequence list from cu_seqlens (or from B rows of T tokens).
Status make_sequences(const nsa_config& cfg, int64_t B, int64_t T, const int32_t* cu_seqlens,
                      int64_t num_seqs, std::vector<Sequence>* seqs) {
  seqs->clear();
  if (cu_seqlens == nullptr) {
    if (num_seqs != 0) {
      return error(NSA_ERR_NULL_POINTER,
                   cat("cu_seqlens: NULL while num_seqs = ", num_seqs, " (set num_seqs to 0 "
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
  if (cu_seqlens[0] != 0) {
    return error(NSA_ERR_INVALID_SEQLENS,
                 cat("cu_seqlens[0]: must be 0, got ", cu_seqlens[0]));
  }
  int64_t cmp_start = 0;
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int64_t a = cu_seqlens[s], e = cu_seqlens[s + 1];
    if (e < a) {
      return error(NSA_ERR_INVALID_SEQLENS,
                   cat("cu_seqlens: decreases at index ", s + 1, " (", a, " then ", e, ")"));
    }
    const int64_t tc = nsa_cmp_len(&cfg, e - a);
    seqs->push_back({0, a, e - a, cmp_start, tc});
    cmp_start += tc;
  }
  if (cu_seqlens[num_seqs] != T) {
    return error(NSA_ERR_INVALID_SEQLENS,
                 cat("cu_seqlens[", num_seqs, "]: must equal T = ", T, ", got ",
                     cu_seqlens[num_seqs]));
  }
  return Status::ok();
}

// Rows of k_cmp / v_cmp / compress out: Tc of T for a fixed-length batch (even when B = 0, where
// there is no sequence to ask), else the per-sequence Tc summed.
int64_t total_cmp_len(const nsa_config& cfg, int64_t T, const std::vector<Sequence>& seqs,
                      bool packed) {
  if (!packed) return nsa_cmp_len(&cfg, T);
  int64_t n = 0;
  for (const Sequence& s : seqs) n += s.cmp_len;
  return n;
}

// A shape error on a compressed tensor whose row count is wrong gets Tc explained, since Tc is
// derived (SPEC 3) rather than visible in any other argument.
Status explain_cmp_rows(Status s, const nsa_tensor& t, int64_t Tc, const nsa_config& cfg,
                        int64_t T, int64_t num_seqs, bool packed) {
  if (s.code != NSA_ERR_INVALID_SHAPE || t.ndim != 4 || t.shape[1] == Tc) return s;
  if (packed) {
    s.message += cat("; Tc = ", Tc, " compressed tokens, summed over the ", num_seqs,
                     " packed sequences (see nsa_cmp_seqlens)");
  } else {
    s.message += cat("; Tc = ", Tc, " compressed tokens for T = ", T, " (cmp_block ",
                     cfg.cmp_block, ", cmp_stride ", cfg.cmp_stride, ")");
  }
  return s;
}

// Every caller-supplied index is -1 or a visible block of its query: [0, t / l'].
Status check_indices(const char* name, const nsa_tensor& ix, const nsa_config& cfg,
                     const std::vector<Sequence>& seqs, int64_t Hkv) {
  const int64_t n = cfg.slc_count, lp = cfg.slc_block;
  const int32_t* base = static_cast<const int32_t*>(ix.data);
  for (const Sequence& s : seqs) {
    for (int64_t t = 0; t < s.len; ++t) {
      for (int64_t h = 0; h < Hkv; ++h) {
        for (int64_t k = 0; k < n; ++k) {
          const int32_t j = base[offset_of(ix, s.batch, s.start + t, h, k)];
          if (j == -1) continue;
          if (j < 0 || j > t / lp) {
            return error(NSA_ERR_INVALID_INDEX,
                         cat(name, "[", s.batch, ", ", s.start + t, ", ", h, ", ", k,
                             "] = ", j, ": out of range for a query at position ", t,
                             " of its sequence (valid: -1, or 0 .. ", t / lp, ")"));
          }
        }
      }
    }
  }
  return Status::ok();
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
                 cat("config.slc_count: must be at least slc_init + slc_local (", c.slc_init,
                     " + ", c.slc_local, "), got ", c.slc_count));
  }
  if (!std::isfinite(c.scale) || c.scale < 0.0f) {
    return error(NSA_ERR_INVALID_CONFIG,
                 cat("config.scale: must be finite and >= 0 (0 selects 1/sqrt(Dk)), got ",
                     c.scale));
  }
  return Status::ok();
}

Status check_fwd_inputs(FwdProblem* problem) {
  FwdProblem& pr = *problem;
  nsa_fwd_params& p = pr.p;
  NSA_RETURN_IF_ERROR(validate_config(p.cfg));

  const std::vector<nsa_dtype> floats = {NSA_DTYPE_F32, NSA_DTYPE_BF16};
  NSA_RETURN_IF_ERROR(check_tensor("q", p.q, {-1, -1, -1, -1}, floats, Role::kInput));
  pr.B = p.q.shape[0];
  pr.T = p.q.shape[1];
  pr.Hq = p.q.shape[2];
  pr.Dk = p.q.shape[3];
  const nsa_dtype dt = p.q.dtype;
  const std::vector<nsa_dtype> same = {dt};
  NSA_RETURN_IF_ERROR(check_tensor("k", p.k, {pr.B, pr.T, -1, pr.Dk}, same, Role::kInput));
  pr.Hkv = p.k.shape[2];
  NSA_RETURN_IF_ERROR(check_tensor("v", p.v, {pr.B, pr.T, pr.Hkv, -1}, same, Role::kInput));
  pr.Dv = p.v.shape[3];
  if (pr.Hq < 1 || pr.Dk < 1) {
    return error(NSA_ERR_INVALID_SHAPE,
                 cat("q: needs at least one head and Dk >= 1, got shape ", shape_str(p.q)));
  }
  if (pr.Hkv < 1 || pr.Dv < 1) {
    return error(NSA_ERR_INVALID_SHAPE,
                 cat("k/v: need at least one KV head and Dv >= 1, got k ", shape_str(p.k),
                     ", v ", shape_str(p.v)));
  }
  if (pr.Hq % pr.Hkv != 0) {
    return error(NSA_ERR_INVALID_SHAPE,
                 cat("q/k: Hq = ", pr.Hq, " query heads is not a multiple of Hkv = ", pr.Hkv,
                     " KV heads"));
  }
  pr.G = pr.Hq / pr.Hkv;

  // Per-branch K/V (SPEC 3): both of a pair or neither; absent ones alias k/v.
  struct Pair {
    const char* kname;
    const char* vname;
    nsa_tensor* k;
    nsa_tensor* v;
  };
  for (Pair pair : {Pair{"k_slc", "v_slc", &p.k_slc, &p.v_slc},
                    Pair{"k_win", "v_win", &p.k_win, &p.v_win}}) {
    if (present(*pair.k) != present(*pair.v)) {
      return error(NSA_ERR_NULL_POINTER, cat(pair.kname, "/", pair.vname,
                                             ": give both of a branch's K/V or neither"));
    }
    if (!present(*pair.k)) {
      *pair.k = p.k;
      *pair.v = p.v;
      continue;
    }
    NSA_RETURN_IF_ERROR(
        check_tensor(pair.kname, *pair.k, {pr.B, pr.T, pr.Hkv, pr.Dk}, same, Role::kInput));
    NSA_RETURN_IF_ERROR(
        check_tensor(pair.vname, *pair.v, {pr.B, pr.T, pr.Hkv, pr.Dv}, same, Role::kInput));
  }

  NSA_RETURN_IF_ERROR(make_sequences(p.cfg, pr.B, pr.T, p.cu_seqlens, p.num_seqs, &pr.seqs));
  // Selection block indices are int32 (slc_indices_in/out, and the kernels' block lists), so the
  // last block of the longest sequence, (len - 1) / l', must fit one. Only a fixed-length T past
  // 2^31 tokens can break this (packed lengths are int32 already).
  for (const Sequence& s : pr.seqs) {
    if (s.len > 0 && (s.len - 1) / p.cfg.slc_block > INT32_MAX) {
      return error(NSA_ERR_INVALID_SHAPE,
                   cat("q: T = ", s.len, " tokens make more selection blocks (slc_block ",
                       p.cfg.slc_block, ") than an int32 block index can number"));
    }
  }
  const bool packed = p.cu_seqlens != nullptr;
  pr.Tc = total_cmp_len(p.cfg, pr.T, pr.seqs, packed);
  NSA_RETURN_IF_ERROR(explain_cmp_rows(
      check_tensor("k_cmp", p.k_cmp, {pr.B, pr.Tc, pr.Hkv, pr.Dk}, same, Role::kInput), p.k_cmp,
      pr.Tc, p.cfg, pr.T, p.num_seqs, packed));
  NSA_RETURN_IF_ERROR(explain_cmp_rows(
      check_tensor("v_cmp", p.v_cmp, {pr.B, pr.Tc, pr.Hkv, pr.Dv}, same, Role::kInput), p.v_cmp,
      pr.Tc, p.cfg, pr.T, p.num_seqs, packed));

  const std::vector<nsa_dtype> gate_dtypes =
      dt == NSA_DTYPE_F32 ? std::vector<nsa_dtype>{NSA_DTYPE_F32} : floats;
  const std::vector<int64_t> per_head = {pr.B, pr.T, pr.Hq};
  NSA_RETURN_IF_ERROR(check_tensor("g_cmp", p.g_cmp, per_head, gate_dtypes, Role::kInput));
  NSA_RETURN_IF_ERROR(check_tensor("g_slc", p.g_slc, per_head, gate_dtypes, Role::kInput));
  NSA_RETURN_IF_ERROR(check_tensor("g_win", p.g_win, per_head, gate_dtypes, Role::kInput));
  return Status::ok();
}

Status make_fwd_problem(const nsa_fwd_params& in, FwdProblem* out) {
  FwdProblem pr;
  pr.p = in;
  nsa_fwd_params& p = pr.p;
  NSA_RETURN_IF_ERROR(check_fwd_inputs(&pr));
  const std::vector<nsa_dtype> floats = {NSA_DTYPE_F32, NSA_DTYPE_BF16};
  const std::vector<int64_t> per_head = {pr.B, pr.T, pr.Hq};

  const std::vector<int64_t> idx_shape = {pr.B, pr.T, pr.Hkv, p.cfg.slc_count};
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

  if (present(p.slc_indices_in)) {
    NSA_RETURN_IF_ERROR(check_indices("slc_indices_in", p.slc_indices_in, p.cfg, pr.seqs, pr.Hkv));
  }
  if (p.cfg.scale == 0.0f) p.cfg.scale = static_cast<float>(1.0 / std::sqrt(double(pr.Dk)));
  *out = std::move(pr);
  return Status::ok();
}

Status check_compress_inputs(CompressProblem* problem) {
  CompressProblem& pr = *problem;
  const nsa_compress_params& p = pr.p;
  NSA_RETURN_IF_ERROR(validate_config(p.cfg));
  const int kind = enum_value(p.kind);  // may hold any int a C caller stored
  if (kind != NSA_CMP_MEAN && kind != NSA_CMP_MLP) {
    return error(NSA_ERR_INVALID_ARGUMENT,
                 cat("kind: unknown compression kind ", kind, " (expected NSA_CMP_MEAN or "
                     "NSA_CMP_MLP)"));
  }
  const std::vector<nsa_dtype> floats = {NSA_DTYPE_F32, NSA_DTYPE_BF16};
  NSA_RETURN_IF_ERROR(check_tensor("x", p.x, {-1, -1, -1, -1}, floats, Role::kInput));
  pr.B = p.x.shape[0];
  pr.T = p.x.shape[1];
  pr.Hkv = p.x.shape[2];
  pr.D = p.x.shape[3];
  if (pr.Hkv < 1 || pr.D < 1) {
    return error(NSA_ERR_INVALID_SHAPE,
                 cat("x: needs at least one head and D >= 1, got shape ", shape_str(p.x)));
  }
  NSA_RETURN_IF_ERROR(make_sequences(p.cfg, pr.B, pr.T, p.cu_seqlens, p.num_seqs, &pr.seqs));
  const bool packed = p.cu_seqlens != nullptr;
  pr.Tc = total_cmp_len(p.cfg, pr.T, pr.seqs, packed);
  if (p.kind == NSA_CMP_MLP) {
    const std::vector<nsa_dtype> same = {p.x.dtype};
    const int64_t l = p.cfg.cmp_block, H = pr.Hkv, D = pr.D;
    NSA_RETURN_IF_ERROR(check_tensor("pos", p.pos, {H, l, D}, same, Role::kInput));
    int64_t lD = 0;  // w1's row length; l and D are the caller's, so the product may overflow
    if (__builtin_mul_overflow(l, D, &lD)) {
      return error(NSA_ERR_INVALID_SHAPE, cat("w1: a row of cmp_block * D = ", l, " * ", D,
                                              " elements overflows 64 bits"));
    }
    NSA_RETURN_IF_ERROR(check_tensor("w1", p.w1, {H, -1, lD}, same, Role::kInput));
    pr.Dh = p.w1.shape[1];
    if (pr.Dh < 1) return error(NSA_ERR_INVALID_SHAPE, "w1: the hidden width Dh must be >= 1");
    NSA_RETURN_IF_ERROR(check_tensor("b1", p.b1, {H, pr.Dh}, same, Role::kInput));
    NSA_RETURN_IF_ERROR(check_tensor("w2", p.w2, {H, D, pr.Dh}, same, Role::kInput));
    NSA_RETURN_IF_ERROR(check_tensor("b2", p.b2, {H, D}, same, Role::kInput));
  }
  return Status::ok();
}

Status make_compress_problem(const nsa_compress_params& in, CompressProblem* out) {
  CompressProblem pr;
  pr.p = in;
  const nsa_compress_params& p = pr.p;
  NSA_RETURN_IF_ERROR(check_compress_inputs(&pr));
  const std::vector<nsa_dtype> floats = {NSA_DTYPE_F32, NSA_DTYPE_BF16};
  const bool packed = p.cu_seqlens != nullptr;
  NSA_RETURN_IF_ERROR(explain_cmp_rows(
      check_tensor("out", p.out, {pr.B, pr.Tc, pr.Hkv, pr.D}, floats, Role::kOutput), p.out,
      pr.Tc, p.cfg, pr.T, p.num_seqs, packed));
  *out = std::move(pr);
  return Status::ok();
}

Status check_dense_inputs(nsa_dense_fwd_params* params, DenseProblem* pr) {
  nsa_dense_fwd_params& p = *params;
  const std::vector<nsa_dtype> floats = {NSA_DTYPE_F32, NSA_DTYPE_BF16};
  NSA_RETURN_IF_ERROR(check_tensor("q", p.q, {-1, -1, -1, -1}, floats, Role::kInput));
  pr->B = p.q.shape[0];
  pr->T = p.q.shape[1];
  pr->Hq = p.q.shape[2];
  pr->Dk = p.q.shape[3];
  const std::vector<nsa_dtype> same = {p.q.dtype};
  NSA_RETURN_IF_ERROR(check_tensor("k", p.k, {pr->B, pr->T, -1, pr->Dk}, same, Role::kInput));
  pr->Hkv = p.k.shape[2];
  NSA_RETURN_IF_ERROR(check_tensor("v", p.v, {pr->B, pr->T, pr->Hkv, -1}, same, Role::kInput));
  pr->Dv = p.v.shape[3];
  if (pr->Hq < 1 || pr->Dk < 1 || pr->Hkv < 1 || pr->Dv < 1) {
    return error(NSA_ERR_INVALID_SHAPE, cat("q/k/v: need at least one head and head dims >= 1, "
                                            "got q ", shape_str(p.q), ", v ", shape_str(p.v)));
  }
  if (pr->Hq % pr->Hkv != 0) {
    return error(NSA_ERR_INVALID_SHAPE,
                 cat("q/k: Hq = ", pr->Hq, " query heads is not a multiple of Hkv = ", pr->Hkv,
                     " KV heads"));
  }
  pr->G = pr->Hq / pr->Hkv;
  if (p.window < 0) {
    return error(NSA_ERR_INVALID_ARGUMENT,
                 cat("window: must be >= 0 (0: no window), got ", p.window));
  }
  if (!std::isfinite(p.scale) || p.scale < 0.0f) {
    return error(NSA_ERR_INVALID_ARGUMENT,
                 cat("scale: must be finite and >= 0 (0 selects 1/sqrt(Dk)), got ", p.scale));
  }
  nsa_config cfg;  // only for the sequence list; compressed lengths are unused here
  nsa_config_default(&cfg);
  NSA_RETURN_IF_ERROR(make_sequences(cfg, pr->B, pr->T, p.cu_seqlens, p.num_seqs, &pr->seqs));
  if (p.scale == 0.0f) p.scale = static_cast<float>(1.0 / std::sqrt(double(pr->Dk)));
  return Status::ok();
}

Status make_dense_problem(const nsa_dense_fwd_params& in, DenseProblem* out) {
  DenseProblem pr;
  pr.p = in;
  nsa_dense_fwd_params& p = pr.p;
  NSA_RETURN_IF_ERROR(check_dense_inputs(&p, &pr));
  const std::vector<nsa_dtype> floats = {NSA_DTYPE_F32, NSA_DTYPE_BF16};
  NSA_RETURN_IF_ERROR(check_tensor("o", p.o, {pr.B, pr.T, pr.Hq, pr.Dv}, floats, Role::kOutput));
  NSA_RETURN_IF_ERROR(check_optional("lse", p.lse, {pr.B, pr.T, pr.Hq}, {NSA_DTYPE_F32},
                                     Role::kOutput));
  *out = std::move(pr);
  return Status::ok();
}

}  // namespace nsa
