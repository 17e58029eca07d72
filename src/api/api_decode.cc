// The C API of the KV cache and decode (nsa.h, "Decode with a KV cache"; SPEC 7). The handle and
// the sequences' lengths are common code (common/kv_cache.h); validation is validate_decode.cc;
// the storage, the appends and the kernels belong to the cache's backend, reached through its
// table (common/backend.h).
#include <cmath>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "api/call.h"
#include "api/validate.h"
#include "api/validate_util.h"
#include "common/bf16_math.h"

using nsa::Backend;
using nsa::cat;
using nsa::error;
using nsa::present;
using nsa::Status;

namespace {

// The preamble of the calls on a cache with params: a context, a cache, params, and a context
// whose backend has `entry` and is the cache's; then `body`, guarded.
template <typename Params, typename Entry, typename Body>
nsa_status cache_call(nsa_context* ctx, nsa_kv_cache* cache, const Params* p, Entry entry,
                      const char* call, Body&& body) {
  if (ctx == nullptr) return NSA_ERR_NULL_POINTER;
  return nsa::api::guarded(ctx, [&]() -> Status {
    if (cache == nullptr) return error(NSA_ERR_NULL_POINTER, "cache: NULL");
    if (p == nullptr) return error(NSA_ERR_NULL_POINTER, "params: NULL");
    const Backend* be = nullptr;
    NSA_RETURN_IF_ERROR(nsa::api::select_backend(ctx, &be));
    if (be->*entry == nullptr) return nsa::api::unsupported(*be, call);
    if (be != cache->backend) {
      return error(NSA_ERR_INVALID_ARGUMENT, cat("cache: created on the ", cache->backend->name,
                                                 " backend, but the context "
                                                 "runs ",
                                                 be->name));
    }
    return body(*be);
  });
}

int32_t append_threads(const nsa_context* ctx) {
  return ctx->num_threads > 0 ? ctx->num_threads : 0;
}

// Appends row s of k/v (each [S, Hkv, D]) to its sequence (all at once where the backend can),
// then runs the step. A failure on the way (out of memory) restores every length, so the call
// changes nothing (nsa.h).
Status append_and_decode(nsa_context* ctx, nsa_kv_cache* c, const nsa::DecodeProblem& pr,
                         const nsa_tensor& k, const nsa_tensor& v,
                         Status (*step)(const nsa::DecodeProblem&)) {
  const std::vector<int64_t> lens = c->len;
  Status s = Status::ok();
  const Backend& be = *c->backend;
  if (present(k) && be.cache_append_rows != nullptr) {
    s = be.cache_append_rows(*c, pr.seqs.data(), pr.S, k, v, append_threads(ctx), ctx->cuda_stream);
    for (int64_t r = 0; r < pr.S && s.is_ok(); ++r) ++c->len[static_cast<size_t>(pr.seqs[r])];
  }
  for (int64_t r = 0; r < pr.S && present(k) && !be.cache_append_rows && s.is_ok(); ++r) {
    nsa_tensor ks = k, vs = v;
    ks.data = static_cast<char*>(k.data) + r * k.stride[0] * nsa_dtype_size(k.dtype);
    vs.data = static_cast<char*>(v.data) + r * v.stride[0] * nsa_dtype_size(v.dtype);
    ks.shape[0] = vs.shape[0] = 1;
    // One thread per token unless asked: a team for one token's rows costs more than it saves.
    const int32_t threads = ctx->num_threads > 0 ? ctx->num_threads : 1;
    s = be.cache_append(*c, pr.seqs[r], ks, vs, threads, ctx->cuda_stream);
    if (s.is_ok()) ++c->len[static_cast<size_t>(pr.seqs[r])];
  }
  if (s.is_ok()) s = step(pr);
  if (!s.is_ok()) c->len = lens;
  return s;
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
    const Backend* be = nullptr;
    NSA_RETURN_IF_ERROR(nsa::api::select_backend(ctx, &be));
    if (be->cache_create == nullptr) {
      return error(NSA_ERR_UNSUPPORTED, cat("nsa_kv_cache_create: the ", be->name,
                                            " backend has no KV cache (use "
                                            "nsa_fwd on the prefix as the oracle)"));
    }
    NSA_RETURN_IF_ERROR(nsa::check_cache_params(*p));
    auto cache = std::make_unique<nsa_kv_cache>();
    cache->cfg = p->cfg;
    // As nsa_fwd resolves it, so that decode and the forward use the same scale.
    if (cache->cfg.scale == 0.0f) {
      cache->cfg.scale = static_cast<float>(1.0 / std::sqrt(double(p->head_dim_k)));
    }
    cache->num_seqs = p->num_seqs;
    cache->capacity = p->capacity;
    cache->Hkv = p->num_kv_heads;
    cache->Dk = p->head_dim_k;
    cache->Dv = p->head_dim_v;
    cache->dtype = p->dtype;
    cache->cmp_kind = p->cmp_kind;
    cache->backend = be;
    cache->len.assign(static_cast<size_t>(p->num_seqs), 0);
    NSA_RETURN_IF_ERROR(be->cache_create(*p, cache.get(), ctx->cuda_stream));
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
    NSA_RETURN_IF_ERROR(nsa::check_cache_seq(*cache, seq, "seq"));
    // Old tokens stay in the backend's storage but are never read: reads stop at the length.
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
    NSA_RETURN_IF_ERROR(nsa::check_cache_seq(*cache, seq, "seq"));
    const int64_t n = k->shape[0] >= 0 ? k->shape[0] : -1;
    NSA_RETURN_IF_ERROR(nsa::check_append(*cache, seq, *k, *v, n, nsa::kFloatDtypes));
    if (n == 0) return Status::ok();
    NSA_RETURN_IF_ERROR(
        cache->backend->cache_append(*cache, seq, *k, *v, append_threads(ctx), ctx->cuda_stream));
    cache->len[static_cast<size_t>(seq)] += n;
    return Status::ok();
  });
}

void nsa_prefill_params_init(nsa_prefill_params* p) {
  if (p != nullptr) std::memset(p, 0, sizeof *p);
}

nsa_status nsa_prefill(nsa_context* ctx, nsa_kv_cache* cache, const nsa_prefill_params* p) {
  return cache_call(ctx, cache, p, &Backend::prefill, "nsa_prefill",
                    [&](const Backend& be) -> Status {
                      nsa::FwdProblem fwd;
                      NSA_RETURN_IF_ERROR(nsa::make_prefill_problem(*cache, *p, be, &fwd));
                      if (fwd.T == 0) return Status::ok();
                      nsa::api::take_settings(ctx, &fwd);
                      // The backend appends the prompt, then runs its forward on the cache's
                      // compressed tokens; the sequence stays empty unless both succeed.
                      NSA_RETURN_IF_ERROR(be.prefill(*cache, p->seq, fwd));
                      cache->len[static_cast<size_t>(p->seq)] = fwd.T;
                      return Status::ok();
                    });
}

void nsa_decode_params_init(nsa_decode_params* p) {
  if (p != nullptr) std::memset(p, 0, sizeof *p);
}

nsa_status nsa_decode(nsa_context* ctx, nsa_kv_cache* cache, const nsa_decode_params* p) {
  return cache_call(ctx, cache, p, &Backend::decode, "nsa_decode",
                    [&](const Backend& be) -> Status {
                      nsa::DecodeProblem pr;
                      NSA_RETURN_IF_ERROR(nsa::make_decode_problem(*cache, *p, &pr));
                      if (pr.S == 0) return Status::ok();
                      nsa::api::take_settings(ctx, &pr);
                      return append_and_decode(ctx, cache, pr, p->k, p->v, be.decode);
                    });
}

void nsa_dense_decode_params_init(nsa_dense_decode_params* p) {
  if (p != nullptr) std::memset(p, 0, sizeof *p);
}

nsa_status nsa_dense_decode(nsa_context* ctx, nsa_kv_cache* cache,
                            const nsa_dense_decode_params* p) {
  return cache_call(ctx, cache, p, &Backend::dense_decode, "nsa_dense_decode",
                    [&](const Backend& be) -> Status {
                      nsa::DecodeProblem pr;
                      NSA_RETURN_IF_ERROR(nsa::make_dense_decode_problem(*cache, *p, &pr));
                      if (pr.S == 0) return Status::ok();
                      nsa::api::take_settings(ctx, &pr);
                      return append_and_decode(ctx, cache, pr, p->k, p->v, be.dense_decode);
                    });
}

}  // extern "C"
