// Validation of the KV-cache calls (nsa.h, "Decode with a KV cache"; SPEC 7): the cache's
// params, appends, the rows of a decode step, and prefill as a forward of one sequence. Like every
// validator, descriptors only on the host; the cache's lengths are host state of the handle.
#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "api/validate.h"
#include "api/validate_util.h"

namespace nsa {
namespace {

// Upper bounds of the cache's sizes (nsa.h): every scratch size decode derives from them fits
// in 64 bits, and seq_ids (int32) can name every sequence.
constexpr int64_t kMaxCacheHeadDim = int64_t{1} << 20;
constexpr int64_t kMaxCacheHeads = int64_t{1} << 20;

Status check_cache_sizes(const nsa_kv_cache_params& p) {
  struct Size {
    const char* name;
    int64_t value, max;
  };
  for (Size s : {Size{"num_seqs", p.num_seqs, INT32_MAX}, Size{"capacity", p.capacity, INT64_MAX},
                 Size{"num_kv_heads", p.num_kv_heads, kMaxCacheHeads},
                 Size{"head_dim_k", p.head_dim_k, kMaxCacheHeadDim},
                 Size{"head_dim_v", p.head_dim_v, kMaxCacheHeadDim}}) {
    if (s.value < 1 || s.value > s.max) {
      return error(NSA_ERR_INVALID_SHAPE,
                   cat(s.name, ": must be in [1, ", s.max, "], got ", s.value));
    }
  }
  // Block indices are int32 (slc_indices_out).
  if (p.capacity / p.cfg.slc_block >= INT32_MAX) {
    return error(NSA_ERR_INVALID_SHAPE, cat("capacity: ", p.capacity,
                                            " tokens make selection "
                                            "block indices past INT32_MAX"));
  }
  // The storage: (seqs * heads) blocks of (capacity + 64) rows of (Dk + Dv + 32) elements of up
  // to 8 bytes (a bound on any backend's padded tiles of raw and compressed tokens), in int64.
  int64_t bytes = 0, rows = 0;
  const int64_t row = p.head_dim_k + p.head_dim_v + 32;  // <= 2^21 + 32 by the bounds above
  if (__builtin_add_overflow(p.capacity, 64, &rows) ||
      __builtin_mul_overflow(p.num_seqs, p.num_kv_heads, &bytes) ||
      __builtin_mul_overflow(bytes, rows, &bytes) ||
      __builtin_mul_overflow(bytes, row * 8, &bytes)) {
    return error(NSA_ERR_INVALID_SHAPE,
                 cat("capacity: ", p.capacity, " tokens of ", p.num_seqs, " sequences x ",
                     p.num_kv_heads, " KV heads make a cache whose size overflows 64 bits"));
  }
  return Status::ok();
}

// A [T, H, D] (or [T, H]) argument of nsa_prefill as the [1, T, H, D] (or [1, T, H]) view
// nsa_fwd takes. The caller's rank is checked first, so that the message reports it as given
// (adding 1 to an unchecked ndim could overflow).
Status batch_of_one(const char* name, const nsa_tensor& t, int rank, nsa_tensor* out) {
  *out = t;
  if (t.data == nullptr) return Status::ok();
  if (t.ndim != rank) {
    return error(NSA_ERR_INVALID_SHAPE,
                 cat(name, ": expected ", rank, " dimensions, got ", t.ndim));
  }
  out->ndim = rank + 1;
  out->shape[0] = 1;
  out->stride[0] = 0;
  for (int i = 0; i < rank; ++i) {
    out->shape[i + 1] = t.shape[i];
    out->stride[i + 1] = t.stride[i];
  }
  return Status::ok();
}

// Stands in for the data of the cache's compressed tokens while a prefill is validated: the
// validators read descriptors only, and the backend supplies the real rows (Backend::prefill).
// Never written: const, and cast only to fill a descriptor's data pointer.
const char prefill_cmp_placeholder = 0;

// The forward nsa_prefill runs: the caller's [T, ...] tensors as a batch of one, with k_cmp/v_cmp
// described as the cache will supply them (contiguous, the cache's dtype).
Status prefill_params(const nsa_kv_cache& c, const nsa_prefill_params& p, nsa_fwd_params* f) {
  nsa_fwd_params_init(f);
  f->in.cfg = c.cfg;
  NSA_RETURN_IF_ERROR(batch_of_one("q", p.q, 3, &f->in.q));
  NSA_RETURN_IF_ERROR(batch_of_one("k", p.k, 3, &f->in.k));
  NSA_RETURN_IF_ERROR(batch_of_one("v", p.v, 3, &f->in.v));
  const int64_t Tc = nsa_cmp_len(&c.cfg, p.q.shape[0]);
  const int64_t kshape[4] = {1, Tc, c.Hkv, c.Dk}, vshape[4] = {1, Tc, c.Hkv, c.Dv};
  f->in.k_cmp =
      nsa_tensor_contiguous(const_cast<char*>(&prefill_cmp_placeholder), c.dtype, 4, kshape);
  f->in.v_cmp =
      nsa_tensor_contiguous(const_cast<char*>(&prefill_cmp_placeholder), c.dtype, 4, vshape);
  NSA_RETURN_IF_ERROR(batch_of_one("g_cmp", p.g_cmp, 2, &f->in.g_cmp));
  NSA_RETURN_IF_ERROR(batch_of_one("g_slc", p.g_slc, 2, &f->in.g_slc));
  NSA_RETURN_IF_ERROR(batch_of_one("g_win", p.g_win, 2, &f->in.g_win));
  NSA_RETURN_IF_ERROR(batch_of_one("o", p.o, 3, &f->o));
  NSA_RETURN_IF_ERROR(batch_of_one("lse_cmp", p.lse_cmp, 2, &f->lse_cmp));
  NSA_RETURN_IF_ERROR(batch_of_one("lse_slc", p.lse_slc, 2, &f->lse_slc));
  NSA_RETURN_IF_ERROR(batch_of_one("lse_win", p.lse_win, 2, &f->lse_win));
  return batch_of_one("slc_indices_out", p.slc_indices_out, 3, &f->slc_indices_out);
}

}  // namespace

Status check_cache_params(const nsa_kv_cache_params& p) {
  NSA_RETURN_IF_ERROR(validate_config(p.cfg));
  NSA_RETURN_IF_ERROR(check_cache_sizes(p));
  const int dtype = enum_value(p.dtype);
  if (dtype != NSA_DTYPE_F32 && dtype != NSA_DTYPE_BF16) {
    return error(NSA_ERR_INVALID_DTYPE, cat("dtype: the cache holds f32 or bf16, got ", dtype));
  }
  const int kind = enum_value(p.cmp_kind);
  if (kind != NSA_CMP_MEAN && kind != NSA_CMP_MLP) {
    return error(NSA_ERR_INVALID_ARGUMENT, cat("cmp_kind: unknown value ", kind));
  }
  if (kind == NSA_CMP_MLP) {
    const int64_t H = p.num_kv_heads, l = p.cfg.cmp_block;
    const nsa_tensor k[5] = {p.k_pos, p.k_w1, p.k_b1, p.k_w2, p.k_b2};
    const nsa_tensor v[5] = {p.v_pos, p.v_w1, p.v_b1, p.v_w2, p.v_b2};
    int64_t Dh = 0;
    NSA_RETURN_IF_ERROR(check_mlp_params("k_", k, H, l, p.head_dim_k, kFloatDtypes, &Dh));
    NSA_RETURN_IF_ERROR(check_mlp_params("v_", v, H, l, p.head_dim_v, kFloatDtypes, &Dh));
  }
  return Status::ok();
}

Status check_cache_seq(const nsa_kv_cache& c, int64_t seq, const char* name) {
  if (seq < 0 || seq >= c.num_seqs) {
    return error(NSA_ERR_INVALID_INDEX,
                 cat(name, ": sequence ", seq, " is not in [0, ", c.num_seqs, ")"));
  }
  return Status::ok();
}

Status check_append(const nsa_kv_cache& c, int64_t seq, const nsa_tensor& k, const nsa_tensor& v,
                    int64_t n, const std::vector<nsa_dtype>& dtypes) {
  NSA_RETURN_IF_ERROR(check_tensor("k", k, {n, c.Hkv, c.Dk}, dtypes, Role::kInput));
  NSA_RETURN_IF_ERROR(check_tensor("v", v, {n, c.Hkv, c.Dv}, dtypes, Role::kInput));
  const int64_t len = c.len[static_cast<size_t>(seq)];
  if (n > c.capacity - len) {
    return error(NSA_ERR_INVALID_SHAPE,
                 cat("k/v: appending ", n, " tokens to sequence ", seq, " (holding ", len,
                     ") would pass the cache's capacity of ", c.capacity, " tokens"));
  }
  return Status::ok();
}

Status make_prefill_problem(const nsa_kv_cache& c, const nsa_prefill_params& p, const Backend& be,
                            FwdProblem* out) {
  NSA_RETURN_IF_ERROR(check_cache_seq(c, p.seq, "seq"));
  if (c.len[static_cast<size_t>(p.seq)] != 0) {
    return error(NSA_ERR_INVALID_ARGUMENT, cat("seq: sequence ", p.seq,
                                               " is not empty (prefill starts a sequence; "
                                               "append and decode extend it)"));
  }
  // q, k, v in the cache's dtype, so that the forward sees the very values decode reads later.
  const std::vector<nsa_dtype> cache_dtype = {c.dtype};
  NSA_RETURN_IF_ERROR(check_tensor("q", p.q, {-1, -1, c.Dk}, cache_dtype, Role::kInput));
  NSA_RETURN_IF_ERROR(check_append(c, p.seq, p.k, p.v, p.q.shape[0], cache_dtype));
  // The forward's own checks cover q's heads, the gates and the outputs.
  nsa_fwd_params f;
  NSA_RETURN_IF_ERROR(prefill_params(c, p, &f));
  return make_fwd_problem(f, be, out);
}

// The rows of a decode call: q [S, Hq, Dk], optional k/v to append, seq_ids.
Status make_decode_rows(const nsa_kv_cache& c, const nsa_tensor& q, const nsa_tensor& k,
                        const nsa_tensor& v, const int32_t* seq_ids, DecodeProblem* pr) {
  NSA_RETURN_IF_ERROR(check_tensor("q", q, {-1, -1, c.Dk}, kFloatDtypes, Role::kInput));
  pr->S = q.shape[0];
  pr->Hq = q.shape[1];
  if (pr->Hq < 1 || pr->Hq % c.Hkv != 0) {
    return error(NSA_ERR_INVALID_SHAPE, cat("q: Hq = ", pr->Hq,
                                            " query heads is not a positive "
                                            "multiple of the cache's Hkv = ",
                                            c.Hkv));
  }
  pr->G = pr->Hq / c.Hkv;
  if (seq_ids == nullptr && pr->S > c.num_seqs) {
    return error(NSA_ERR_INVALID_SHAPE, cat("q: ", pr->S, " rows but the cache holds ", c.num_seqs,
                                            " sequences (give seq_ids)"));
  }
  std::vector<char> seen(static_cast<size_t>(c.num_seqs), 0);
  for (int64_t s = 0; s < pr->S; ++s) {
    const int64_t seq = seq_ids ? seq_ids[s] : s;
    const std::string name = cat("seq_ids[", s, "]");
    NSA_RETURN_IF_ERROR(check_cache_seq(c, seq, name.c_str()));
    if (seen[static_cast<size_t>(seq)]++) {
      return error(NSA_ERR_INVALID_INDEX, cat(name, ": sequence ", seq, " appears twice"));
    }
    pr->seqs.push_back(seq);
  }
  if (present(k) != present(v)) {
    return error(NSA_ERR_NULL_POINTER, "k/v: give both new-token tensors or neither");
  }
  for (int64_t s = 0; s < pr->S; ++s) {
    const int64_t seq = pr->seqs[s], len = c.len[static_cast<size_t>(seq)];
    if (present(k) && len >= c.capacity) {
      return error(NSA_ERR_INVALID_SHAPE,
                   cat("k/v: sequence ", seq, " is full (capacity ", c.capacity, " tokens)"));
    }
    if (!present(k) && len == 0) {
      return error(NSA_ERR_INVALID_ARGUMENT, cat("q: sequence ", seq,
                                                 " is empty, so its query has no position (append "
                                                 "its token first, or give k/v)"));
    }
  }
  if (present(k)) {
    // Like nsa_kv_cache_append: f32 or bf16, rounded to the cache's dtype when stored.
    NSA_RETURN_IF_ERROR(check_tensor("k", k, {pr->S, c.Hkv, c.Dk}, kFloatDtypes, Role::kInput));
    NSA_RETURN_IF_ERROR(check_tensor("v", v, {pr->S, c.Hkv, c.Dv}, kFloatDtypes, Role::kInput));
  }
  return Status::ok();
}

Status make_decode_problem(nsa_kv_cache& c, const nsa_decode_params& p, DecodeProblem* pr) {
  NSA_RETURN_IF_ERROR(make_decode_rows(c, p.q, p.k, p.v, p.seq_ids, pr));
  const std::vector<nsa_dtype> gate = {NSA_DTYPE_F32, p.q.dtype};
  const std::vector<int64_t> per_head = {pr->S, pr->Hq};
  NSA_RETURN_IF_ERROR(check_tensor("g_cmp", p.g_cmp, per_head, gate, Role::kInput));
  NSA_RETURN_IF_ERROR(check_tensor("g_slc", p.g_slc, per_head, gate, Role::kInput));
  NSA_RETURN_IF_ERROR(check_tensor("g_win", p.g_win, per_head, gate, Role::kInput));
  NSA_RETURN_IF_ERROR(check_tensor("o", p.o, {pr->S, pr->Hq, c.Dv}, kFloatDtypes, Role::kOutput));
  const std::vector<nsa_dtype> f32 = {NSA_DTYPE_F32}, i32 = {NSA_DTYPE_I32};
  NSA_RETURN_IF_ERROR(check_optional("lse_cmp", p.lse_cmp, per_head, f32, Role::kOutput));
  NSA_RETURN_IF_ERROR(check_optional("lse_slc", p.lse_slc, per_head, f32, Role::kOutput));
  NSA_RETURN_IF_ERROR(check_optional("lse_win", p.lse_win, per_head, f32, Role::kOutput));
  NSA_RETURN_IF_ERROR(check_optional("slc_indices_out", p.slc_indices_out,
                                     {pr->S, c.Hkv, c.cfg.slc_count}, i32, Role::kOutput));
  pr->cache = &c;
  pr->nsa = &p;
  pr->q = p.q;
  pr->o = p.o;
  pr->scale = c.cfg.scale;
  return Status::ok();
}

Status make_dense_decode_problem(nsa_kv_cache& c, const nsa_dense_decode_params& p,
                                 DecodeProblem* pr) {
  NSA_RETURN_IF_ERROR(make_decode_rows(c, p.q, p.k, p.v, p.seq_ids, pr));
  if (p.window < 0) {
    return error(NSA_ERR_INVALID_ARGUMENT, cat("window: must be >= 0, got ", p.window));
  }
  if (!(std::isfinite(p.scale) && p.scale >= 0.0f)) {
    return error(NSA_ERR_INVALID_ARGUMENT, "scale: must be finite and >= 0 (0: 1/sqrt(Dk))");
  }
  NSA_RETURN_IF_ERROR(check_tensor("o", p.o, {pr->S, pr->Hq, c.Dv}, kFloatDtypes, Role::kOutput));
  NSA_RETURN_IF_ERROR(
      check_optional("lse", p.lse, {pr->S, pr->Hq}, {NSA_DTYPE_F32}, Role::kOutput));
  pr->cache = &c;
  pr->dense = true;
  pr->q = p.q;
  pr->o = p.o;
  pr->lse = p.lse;
  pr->scale = p.scale != 0.0f ? p.scale : static_cast<float>(1.0 / std::sqrt(double(c.Dk)));
  pr->window = p.window;
  return Status::ok();
}

}  // namespace nsa
