// The C API of the KV cache and decode (nsa.h, "Decode with a KV cache"): validation, then the
// CPU backend's cache (src/cpu/kv_cache.cc) and decode kernels (src/cpu/decode.cc).
#include <cmath>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "api/call.h"
#include "api/validate.h"
#include "api/validate_util.h"
#include "cpu/kernels.h"
#include "cpu/kv_cache.h"

using nsa::cat;
using nsa::error;
using nsa::present;
using nsa::Role;
using nsa::Status;

namespace {

const std::vector<nsa_dtype> kFloats = {NSA_DTYPE_F32, NSA_DTYPE_BF16};

// Decode runs on the CPU backend; the reference has no cache.
Status check_backend(const nsa_context* ctx) {
  const nsa_backend b = nsa::api::resolve(ctx->backend);
  if (b == NSA_BACKEND_CPU) return Status::ok();
  if (b == NSA_BACKEND_REF) {
    return error(NSA_ERR_UNSUPPORTED, "decode: the reference backend has no KV cache (use nsa_fwd "
                                      "on the prefix as the oracle)");
  }
  return nsa::api::unavailable(ctx->backend);
}

Status check_mlp(const char* prefix, const nsa_tensor* t, int64_t H, int64_t l, int64_t D) {
  const std::string pos = cat(prefix, "pos"), w1 = cat(prefix, "w1"), b1 = cat(prefix, "b1"),
                    w2 = cat(prefix, "w2"), b2 = cat(prefix, "b2");
  int64_t lD = 0;  // w1's row length; checked, as l and D are the caller's
  if (__builtin_mul_overflow(l, D, &lD)) {
    return error(NSA_ERR_INVALID_SHAPE, cat(w1, ": a row of cmp_block * D elements overflows"));
  }
  NSA_RETURN_IF_ERROR(nsa::check_tensor(w1.c_str(), t[1], {H, -1, lD}, kFloats, Role::kInput));
  const int64_t Dh = t[1].shape[1];
  if (Dh < 1) return error(NSA_ERR_INVALID_SHAPE, cat(w1, ": the hidden width must be >= 1"));
  NSA_RETURN_IF_ERROR(nsa::check_tensor(pos.c_str(), t[0], {H, l, D}, kFloats, Role::kInput));
  NSA_RETURN_IF_ERROR(nsa::check_tensor(b1.c_str(), t[2], {H, Dh}, kFloats, Role::kInput));
  NSA_RETURN_IF_ERROR(nsa::check_tensor(w2.c_str(), t[3], {H, D, Dh}, kFloats, Role::kInput));
  return nsa::check_tensor(b2.c_str(), t[4], {H, D}, kFloats, Role::kInput);
}

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
    return error(NSA_ERR_INVALID_SHAPE, cat("capacity: ", p.capacity, " tokens make selection "
                                            "block indices past INT32_MAX"));
  }
  // The storage: (seqs * heads) blocks of (capacity + 64) rows of (Dk + Dv + 32) elements of up
  // to 8 bytes (a bound on the padded tiles of raw and compressed tokens), all in int64.
  int64_t bytes = 0, rows = 0;
  const int64_t row = p.head_dim_k + p.head_dim_v + 32;  // <= 2^21 + 32 by the bounds above
  if (__builtin_add_overflow(p.capacity, 64, &rows) ||
      __builtin_mul_overflow(p.num_seqs, p.num_kv_heads, &bytes) ||
      __builtin_mul_overflow(bytes, rows, &bytes) || __builtin_mul_overflow(bytes, row * 8, &bytes)) {
    return error(NSA_ERR_INVALID_SHAPE,
                 cat("capacity: ", p.capacity, " tokens of ", p.num_seqs, " sequences x ",
                     p.num_kv_heads, " KV heads make a cache whose size overflows 64 bits"));
  }
  return Status::ok();
}

Status check_cache_params(const nsa_kv_cache_params& p) {
  NSA_RETURN_IF_ERROR(nsa::validate_config(p.cfg));
  NSA_RETURN_IF_ERROR(check_cache_sizes(p));
  const int dtype = nsa::enum_value(p.dtype);
  if (dtype != NSA_DTYPE_F32 && dtype != NSA_DTYPE_BF16) {
    return error(NSA_ERR_INVALID_DTYPE, cat("dtype: the cache holds f32 or bf16, got ", dtype));
  }
  const int kind = nsa::enum_value(p.cmp_kind);
  if (kind != NSA_CMP_MEAN && kind != NSA_CMP_MLP) {
    return error(NSA_ERR_INVALID_ARGUMENT, cat("cmp_kind: unknown value ", kind));
  }
  if (kind == NSA_CMP_MLP) {
    const int64_t H = p.num_kv_heads, l = p.cfg.cmp_block;
    const nsa_tensor k[5] = {p.k_pos, p.k_w1, p.k_b1, p.k_w2, p.k_b2};
    const nsa_tensor v[5] = {p.v_pos, p.v_w1, p.v_b1, p.v_w2, p.v_b2};
    NSA_RETURN_IF_ERROR(check_mlp("k_", k, H, l, p.head_dim_k));
    NSA_RETURN_IF_ERROR(check_mlp("v_", v, H, l, p.head_dim_v));
  }
  return Status::ok();
}

Status check_seq(const nsa_kv_cache& c, int64_t seq, const char* name) {
  if (seq < 0 || seq >= c.num_seqs) {
    return error(NSA_ERR_INVALID_INDEX,
                 cat(name, ": sequence ", seq, " is not in [0, ", c.num_seqs, ")"));
  }
  return Status::ok();
}

// k [n, Hkv, Dk] and v [n, Hkv, Dv] to append to `seq`, within its capacity.
Status check_append(const nsa_kv_cache& c, int64_t seq, const nsa_tensor& k, const nsa_tensor& v,
                    int64_t n, const std::vector<nsa_dtype>& dtypes) {
  NSA_RETURN_IF_ERROR(nsa::check_tensor("k", k, {n, c.Hkv, c.Dk}, dtypes, Role::kInput));
  NSA_RETURN_IF_ERROR(nsa::check_tensor("v", v, {n, c.Hkv, c.Dv}, dtypes, Role::kInput));
  const int64_t len = c.len[static_cast<size_t>(seq)];
  if (n > c.capacity - len) {
    return error(NSA_ERR_INVALID_SHAPE,
                 cat("k/v: appending ", n, " tokens to sequence ", seq, " (holding ", len,
                     ") would pass the cache's capacity of ", c.capacity, " tokens"));
  }
  return Status::ok();
}

// The rows of a decode call: q [S, Hq, Dk], optional k/v to append, seq_ids.
Status make_decode(const nsa_kv_cache& c, const nsa_tensor& q, const nsa_tensor& k,
                   const nsa_tensor& v, const int32_t* seq_ids, nsa::cpu::DecodeProblem* pr) {
  NSA_RETURN_IF_ERROR(nsa::check_tensor("q", q, {-1, -1, c.Dk}, kFloats, Role::kInput));
  pr->S = q.shape[0];
  pr->Hq = q.shape[1];
  if (pr->Hq < 1 || pr->Hq % c.Hkv != 0) {
    return error(NSA_ERR_INVALID_SHAPE, cat("q: Hq = ", pr->Hq, " query heads is not a positive "
                                            "multiple of the cache's Hkv = ", c.Hkv));
  }
  pr->G = pr->Hq / c.Hkv;
  if (seq_ids == nullptr && pr->S > c.num_seqs) {
    return error(NSA_ERR_INVALID_SHAPE, cat("q: ", pr->S, " rows but the cache holds ",
                                            c.num_seqs, " sequences (give seq_ids)"));
  }
  std::vector<char> seen(static_cast<size_t>(c.num_seqs), 0);
  for (int64_t s = 0; s < pr->S; ++s) {
    const int64_t seq = seq_ids ? seq_ids[s] : s;
    const std::string name = cat("seq_ids[", s, "]");
    NSA_RETURN_IF_ERROR(check_seq(c, seq, name.c_str()));
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
      return error(NSA_ERR_INVALID_ARGUMENT,
                   cat("q: sequence ", seq, " is empty, so its query has no position (append "
                       "its token first, or give k/v)"));
    }
  }
  if (present(k)) {
    // Like nsa_kv_cache_append: f32 or bf16, rounded to the cache's dtype when stored.
    NSA_RETURN_IF_ERROR(nsa::check_tensor("k", k, {pr->S, c.Hkv, c.Dk}, kFloats, Role::kInput));
    NSA_RETURN_IF_ERROR(nsa::check_tensor("v", v, {pr->S, c.Hkv, c.Dv}, kFloats, Role::kInput));
  }
  return Status::ok();
}

// Appends row s of k/v (each [S, Hkv, D]) to its sequence, then runs the step. A failure on
// the way (out of memory) restores every length, so the call changes nothing (nsa.h).
Status append_and_decode(nsa_context* ctx, nsa_kv_cache* c, const nsa::cpu::DecodeProblem& pr,
                         const nsa_tensor& k, const nsa_tensor& v) {
  const std::vector<int64_t> lens = c->len;
  Status s = Status::ok();
  for (int64_t r = 0; r < pr.S && present(k) && s.is_ok(); ++r) {
    nsa_tensor ks = k, vs = v;
    ks.data = static_cast<char*>(k.data) + r * k.stride[0] * nsa_dtype_size(k.dtype);
    vs.data = static_cast<char*>(v.data) + r * v.stride[0] * nsa_dtype_size(v.dtype);
    ks.shape[0] = vs.shape[0] = 1;
    s = nsa::cpu::kv_cache_append(*c, pr.seqs[r], ks, vs, ctx->num_threads > 0 ? ctx->num_threads : 1);
  }
  if (s.is_ok() && !nsa::cpu::decode(pr)) {
    s = error(NSA_ERR_OUT_OF_MEMORY, "decode: cannot allocate buffers");
  }
  if (!s.is_ok()) c->len = lens;
  return s;
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

// The shared preamble of the calls on a cache with params: a context, a cache, params, and a
// backend that has the cache (the CPU); then `body`, guarded.
template <typename Params, typename Body>
nsa_status cache_call(nsa_context* ctx, nsa_kv_cache* cache, const Params* p, Body&& body) {
  if (ctx == nullptr) return NSA_ERR_NULL_POINTER;
  return nsa::api::guarded(ctx, [&]() -> Status {
    if (cache == nullptr) return error(NSA_ERR_NULL_POINTER, "cache: NULL");
    if (p == nullptr) return error(NSA_ERR_NULL_POINTER, "params: NULL");
    NSA_RETURN_IF_ERROR(check_backend(ctx));
    return body();
  });
}

}  // namespace

extern "C" {

void nsa_kv_cache_params_init(nsa_kv_cache_params* p) {
  if (p == nullptr) return;
  std::memset(p, 0, sizeof *p);
  nsa_config_default(&p->cfg);
  p->dtype = NSA_DTYPE_F32;
  p->cmp_kind = NSA_CMP_MEAN;
}

nsa_status nsa_kv_cache_create(nsa_context* ctx, const nsa_kv_cache_params* p, nsa_kv_cache** out) {
  if (ctx == nullptr) return NSA_ERR_NULL_POINTER;
  return nsa::api::guarded(ctx, [&]() -> Status {
    if (p == nullptr) return error(NSA_ERR_NULL_POINTER, "params: NULL");
    if (out == nullptr) return error(NSA_ERR_NULL_POINTER, "out: NULL");
    NSA_RETURN_IF_ERROR(check_backend(ctx));
    NSA_RETURN_IF_ERROR(check_cache_params(*p));
    auto cache = std::make_unique<nsa_kv_cache>();
    NSA_RETURN_IF_ERROR(nsa::cpu::kv_cache_init(*p, cache.get()));
    *out = cache.release();
    return Status::ok();
  });
}

void nsa_kv_cache_destroy(nsa_kv_cache* cache) { delete cache; }

int64_t nsa_kv_cache_len(const nsa_kv_cache* cache, int64_t seq) {
  if (cache == nullptr || seq < 0 || seq >= cache->num_seqs) return -1;
  return cache->len[static_cast<size_t>(seq)];
}

nsa_status nsa_kv_cache_reset(nsa_context* ctx, nsa_kv_cache* cache, int64_t seq) {
  if (ctx == nullptr) return NSA_ERR_NULL_POINTER;
  return nsa::api::guarded(ctx, [&]() -> Status {
    if (cache == nullptr) return error(NSA_ERR_NULL_POINTER, "cache: NULL");
    NSA_RETURN_IF_ERROR(check_seq(*cache, seq, "seq"));
    // Old tokens stay in memory but are never read: reads stop at the length.
    cache->len[static_cast<size_t>(seq)] = 0;
    return Status::ok();
  });
}

nsa_status nsa_kv_cache_append(nsa_context* ctx, nsa_kv_cache* cache, int64_t seq,
                               const nsa_tensor* k, const nsa_tensor* v) {
  if (ctx == nullptr) return NSA_ERR_NULL_POINTER;
  return nsa::api::guarded(ctx, [&]() -> Status {
    if (cache == nullptr) return error(NSA_ERR_NULL_POINTER, "cache: NULL");
    if (k == nullptr || v == nullptr) return error(NSA_ERR_NULL_POINTER, "k/v: NULL");
    NSA_RETURN_IF_ERROR(check_seq(*cache, seq, "seq"));
    NSA_RETURN_IF_ERROR(check_append(*cache, seq, *k, *v, k->shape[0] >= 0 ? k->shape[0] : -1, kFloats));
    if (k->shape[0] == 0) return Status::ok();
    return nsa::cpu::kv_cache_append(*cache, seq, *k, *v, ctx->num_threads > 0 ? ctx->num_threads : 0);
  });
}

void nsa_prefill_params_init(nsa_prefill_params* p) {
  if (p != nullptr) std::memset(p, 0, sizeof *p);
}

nsa_status nsa_prefill(nsa_context* ctx, nsa_kv_cache* cache, const nsa_prefill_params* p) {
  return cache_call(ctx, cache, p, [&]() -> Status {
    NSA_RETURN_IF_ERROR(check_seq(*cache, p->seq, "seq"));
    if (cache->len[static_cast<size_t>(p->seq)] != 0) {
      return error(NSA_ERR_INVALID_ARGUMENT,
                   cat("seq: sequence ", p->seq, " is not empty (prefill starts a sequence; "
                       "append and decode extend it)"));
    }
    const std::vector<nsa_dtype> cache_dtype = {cache->dtype};
    NSA_RETURN_IF_ERROR(nsa::check_tensor("q", p->q, {-1, -1, cache->Dk}, cache_dtype, Role::kInput));
    const int64_t T = p->q.shape[0];
    NSA_RETURN_IF_ERROR(check_append(*cache, p->seq, p->k, p->v, T, cache_dtype));
    // The forward's own validation covers q's heads, the gates and the outputs; it runs on
    // views of the caller's tensors plus the cache's compressed tokens, so it is checked first
    // with a stand-in for k_cmp/v_cmp and nothing is appended until everything passed.
    const int64_t Tc = nsa_cmp_len(&cache->cfg, T);
    const size_t esize = nsa_dtype_size(cache->dtype);
    std::vector<char> kc(static_cast<size_t>(std::max<int64_t>(Tc, 1) * cache->Hkv * cache->Dk) * esize);
    std::vector<char> vc(static_cast<size_t>(std::max<int64_t>(Tc, 1) * cache->Hkv * cache->Dv) * esize);
    nsa_fwd_params f;
    nsa_fwd_params_init(&f);
    f.cfg = cache->cfg;
    NSA_RETURN_IF_ERROR(batch_of_one("q", p->q, 3, &f.q));
    NSA_RETURN_IF_ERROR(batch_of_one("k", p->k, 3, &f.k));
    NSA_RETURN_IF_ERROR(batch_of_one("v", p->v, 3, &f.v));
    const int64_t kshape[4] = {1, Tc, cache->Hkv, cache->Dk};
    const int64_t vshape[4] = {1, Tc, cache->Hkv, cache->Dv};
    f.k_cmp = nsa_tensor_contiguous(kc.data(), cache->dtype, 4, kshape);
    f.v_cmp = nsa_tensor_contiguous(vc.data(), cache->dtype, 4, vshape);
    NSA_RETURN_IF_ERROR(batch_of_one("g_cmp", p->g_cmp, 2, &f.g_cmp));
    NSA_RETURN_IF_ERROR(batch_of_one("g_slc", p->g_slc, 2, &f.g_slc));
    NSA_RETURN_IF_ERROR(batch_of_one("g_win", p->g_win, 2, &f.g_win));
    NSA_RETURN_IF_ERROR(batch_of_one("o", p->o, 3, &f.o));
    NSA_RETURN_IF_ERROR(batch_of_one("lse_cmp", p->lse_cmp, 2, &f.lse_cmp));
    NSA_RETURN_IF_ERROR(batch_of_one("lse_slc", p->lse_slc, 2, &f.lse_slc));
    NSA_RETURN_IF_ERROR(batch_of_one("lse_win", p->lse_win, 2, &f.lse_win));
    NSA_RETURN_IF_ERROR(batch_of_one("slc_indices_out", p->slc_indices_out, 3, &f.slc_indices_out));
    nsa::FwdProblem check;
    NSA_RETURN_IF_ERROR(nsa::make_fwd_problem(f, &check));
    if (T == 0) return Status::ok();
    // Allocated before the append, so that running out of memory leaves the sequence empty.
    std::vector<float> row(static_cast<size_t>(std::max(cache->Dk, cache->Dv)));
    NSA_RETURN_IF_ERROR(nsa::cpu::kv_cache_append(*cache, p->seq, p->k, p->v,
                                                  ctx->num_threads > 0 ? ctx->num_threads : 0));
    // The forward reads the compressed tokens exactly as the cache holds them.
    for (int64_t i = 0; i < Tc; ++i) {
      for (int64_t h = 0; h < cache->Hkv; ++h) {
        cache->cmp.read_k(p->seq, h, i, row.data());
        nsa::cpu::store_row(f.k_cmp, nsa::offset_of(f.k_cmp, 0, i, h), row.data(), cache->Dk);
        cache->cmp.read_v(p->seq, h, i, row.data());
        nsa::cpu::store_row(f.v_cmp, nsa::offset_of(f.v_cmp, 0, i, h), row.data(), cache->Dv);
      }
    }
    const nsa_backend saved = ctx->backend;
    ctx->backend = NSA_BACKEND_CPU;
    const nsa_status st = nsa_fwd(ctx, &f);
    ctx->backend = saved;
    if (st != NSA_OK) {
      cache->len[static_cast<size_t>(p->seq)] = 0;  // leave the sequence as it was: empty
      return error(st, cat("prefill: ", ctx->last_error));
    }
    return Status::ok();
  });
}

void nsa_decode_params_init(nsa_decode_params* p) {
  if (p != nullptr) std::memset(p, 0, sizeof *p);
}

nsa_status nsa_decode(nsa_context* ctx, nsa_kv_cache* cache, const nsa_decode_params* p) {
  return cache_call(ctx, cache, p, [&]() -> Status {
    nsa::cpu::DecodeProblem pr;
    NSA_RETURN_IF_ERROR(make_decode(*cache, p->q, p->k, p->v, p->seq_ids, &pr));
    const std::vector<nsa_dtype> gate = {NSA_DTYPE_F32, p->q.dtype};
    const std::vector<int64_t> per_head = {pr.S, pr.Hq};
    NSA_RETURN_IF_ERROR(nsa::check_tensor("g_cmp", p->g_cmp, per_head, gate, Role::kInput));
    NSA_RETURN_IF_ERROR(nsa::check_tensor("g_slc", p->g_slc, per_head, gate, Role::kInput));
    NSA_RETURN_IF_ERROR(nsa::check_tensor("g_win", p->g_win, per_head, gate, Role::kInput));
    NSA_RETURN_IF_ERROR(
        nsa::check_tensor("o", p->o, {pr.S, pr.Hq, cache->Dv}, kFloats, Role::kOutput));
    const std::vector<nsa_dtype> f32 = {NSA_DTYPE_F32}, i32 = {NSA_DTYPE_I32};
    NSA_RETURN_IF_ERROR(nsa::check_optional("lse_cmp", p->lse_cmp, per_head, f32, Role::kOutput));
    NSA_RETURN_IF_ERROR(nsa::check_optional("lse_slc", p->lse_slc, per_head, f32, Role::kOutput));
    NSA_RETURN_IF_ERROR(nsa::check_optional("lse_win", p->lse_win, per_head, f32, Role::kOutput));
    NSA_RETURN_IF_ERROR(nsa::check_optional("slc_indices_out", p->slc_indices_out,
                                            {pr.S, cache->Hkv, cache->cfg.slc_count}, i32,
                                            Role::kOutput));
    if (pr.S == 0) return Status::ok();
    pr.cache = cache;
    pr.nsa = p;
    pr.q = p->q;
    pr.o = p->o;
    pr.scale = cache->cfg.scale;
    pr.num_threads = ctx->num_threads;
    return append_and_decode(ctx, cache, pr, p->k, p->v);
  });
}

void nsa_dense_decode_params_init(nsa_dense_decode_params* p) {
  if (p != nullptr) std::memset(p, 0, sizeof *p);
}

nsa_status nsa_dense_decode(nsa_context* ctx, nsa_kv_cache* cache,
                            const nsa_dense_decode_params* p) {
  return cache_call(ctx, cache, p, [&]() -> Status {
    nsa::cpu::DecodeProblem pr;
    NSA_RETURN_IF_ERROR(make_decode(*cache, p->q, p->k, p->v, p->seq_ids, &pr));
    if (p->window < 0) {
      return error(NSA_ERR_INVALID_ARGUMENT, cat("window: must be >= 0, got ", p->window));
    }
    if (!(std::isfinite(p->scale) && p->scale >= 0.0f)) {
      return error(NSA_ERR_INVALID_ARGUMENT, "scale: must be finite and >= 0 (0: 1/sqrt(Dk))");
    }
    NSA_RETURN_IF_ERROR(
        nsa::check_tensor("o", p->o, {pr.S, pr.Hq, cache->Dv}, kFloats, Role::kOutput));
    NSA_RETURN_IF_ERROR(nsa::check_optional("lse", p->lse, {pr.S, pr.Hq}, {NSA_DTYPE_F32},
                                            Role::kOutput));
    if (pr.S == 0) return Status::ok();
    pr.cache = cache;
    pr.dense = true;
    pr.q = p->q;
    pr.o = p->o;
    pr.lse = p->lse;
    pr.scale = p->scale != 0.0f ? p->scale : static_cast<float>(1.0 / std::sqrt(double(cache->Dk)));
    pr.window = p->window;
    pr.num_threads = ctx->num_threads;
    return append_and_decode(ctx, cache, pr, p->k, p->v);
  });
}

}  // extern "C"
