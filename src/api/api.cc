// The C API: argument checks, dispatch through the backend table (common/backend.h), and the
// translation of Status into a status code plus the context's last-error message. No exception
// crosses this boundary.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <new>

#include "api/call.h"
#include "api/context.h"
#include "common/bf16_math.h"
#include "api/validate.h"
#include "build_info.h"

using nsa::Backend;
using nsa::Status;
using nsa::api::finish;
using nsa::api::guarded;

namespace {

// Every op call has this shape: ctx and params checked, the backend chosen, the problem built by
// `make` (descriptors on the host, then contents through the backend's checks), then `body`
// runs it (common/backend.h). Nothing reaches a backend unvalidated.
template <typename Problem, typename Params, typename Make, typename Body>
nsa_status op_call(nsa_context* ctx, const Params* p, Make make, Body body) {
  if (ctx == nullptr) return NSA_ERR_NULL_POINTER;
  return guarded(ctx, [&]() -> Status {
    if (p == nullptr) return nsa::error(NSA_ERR_NULL_POINTER, "params: NULL");
    const Backend* be = nullptr;
    NSA_RETURN_IF_ERROR(nsa::api::select_backend(ctx, &be));
    Problem pr;
    NSA_RETURN_IF_ERROR(make(*p, *be, &pr));
    nsa::api::take_settings(ctx, &pr);
    return body(*be, pr);
  });
}

}  // namespace

extern "C" {

const char* nsa_status_name(nsa_status status) {
  switch (nsa::enum_value(status)) {  // any int: C callers may pass one
    case NSA_OK: return "NSA_OK";
    case NSA_ERR_NULL_POINTER: return "NSA_ERR_NULL_POINTER";
    case NSA_ERR_INVALID_CONFIG: return "NSA_ERR_INVALID_CONFIG";
    case NSA_ERR_INVALID_SHAPE: return "NSA_ERR_INVALID_SHAPE";
    case NSA_ERR_INVALID_STRIDE: return "NSA_ERR_INVALID_STRIDE";
    case NSA_ERR_INVALID_DTYPE: return "NSA_ERR_INVALID_DTYPE";
    case NSA_ERR_INVALID_SEQLENS: return "NSA_ERR_INVALID_SEQLENS";
    case NSA_ERR_INVALID_INDEX: return "NSA_ERR_INVALID_INDEX";
    case NSA_ERR_INVALID_ARGUMENT: return "NSA_ERR_INVALID_ARGUMENT";
    case NSA_ERR_UNSUPPORTED: return "NSA_ERR_UNSUPPORTED";
    case NSA_ERR_OUT_OF_MEMORY: return "NSA_ERR_OUT_OF_MEMORY";
    case NSA_ERR_INTERNAL: return "NSA_ERR_INTERNAL";
  }
  return "NSA_ERR_UNKNOWN";
}

nsa_status nsa_context_create(nsa_context** out) {
  if (out == nullptr) return NSA_ERR_NULL_POINTER;
  *out = new (std::nothrow) nsa_context();
  return *out != nullptr ? NSA_OK : NSA_ERR_OUT_OF_MEMORY;
}

void nsa_context_destroy(nsa_context* ctx) { delete ctx; }

nsa_status nsa_context_set_backend(nsa_context* ctx, nsa_backend backend) {
  if (ctx == nullptr) return NSA_ERR_NULL_POINTER;
  // Guarded: building a message allocates, and out of memory must stay a status.
  return guarded(ctx, [&]() -> Status {
    const int b = nsa::enum_value(backend);  // any int: C callers may pass one
    if (b < NSA_BACKEND_AUTO || b > NSA_BACKEND_CUDA) {
      return nsa::error(NSA_ERR_INVALID_ARGUMENT, "backend: unknown value " + std::to_string(b));
    }
    if (!nsa_backend_available(backend)) {
      return nsa::error(NSA_ERR_UNSUPPORTED, nsa::api::unavailable(backend));
    }
    ctx->backend = backend;
    return Status::ok();
  });
}

nsa_backend nsa_context_backend(const nsa_context* ctx) {
  return ctx != nullptr ? ctx->backend : NSA_BACKEND_AUTO;
}

nsa_status nsa_context_set_num_threads(nsa_context* ctx, int32_t n) {
  if (ctx == nullptr) return NSA_ERR_NULL_POINTER;
  return guarded(ctx, [&]() -> Status {
    // Bounded: OpenMP ends the process when it cannot start a team of the size asked for.
    if (n < 0 || n > NSA_MAX_THREADS) {
      return nsa::error(NSA_ERR_INVALID_ARGUMENT, "num_threads: must be in [0, " +
                                                      std::to_string(NSA_MAX_THREADS) +
                                                      "] (0: default), got " + std::to_string(n));
    }
    ctx->num_threads = n;
    return Status::ok();
  });
}

int32_t nsa_context_num_threads(const nsa_context* ctx) {
  return ctx != nullptr ? ctx->num_threads : 0;
}

nsa_status nsa_context_set_bf16_math(nsa_context* ctx, nsa_bf16_math math) {
  if (ctx == nullptr) return NSA_ERR_NULL_POINTER;
  return guarded(ctx, [&]() -> Status {
    const int m = nsa::enum_value(math);  // any int: C callers may pass one
    if (m < NSA_BF16_MATH_AUTO || m > NSA_BF16_MATH_EMULATED) {
      return nsa::error(NSA_ERR_INVALID_ARGUMENT, "bf16_math: unknown value " + std::to_string(m));
    }
    if (!nsa::bf16_math_runs(math)) {
      return nsa::error(NSA_ERR_UNSUPPORTED,
                        math == NSA_BF16_MATH_NATIVE
                            ? "bf16_math NATIVE: this CPU lacks AVX512_BF16 (or AVX-512)"
                            : "bf16_math EMULATED: this CPU lacks AVX-512 (F, BW, DQ, VL)");
    }
    ctx->bf16_math = math;
    return Status::ok();
  });
}

nsa_bf16_math nsa_context_bf16_math(const nsa_context* ctx) {
  return ctx != nullptr ? ctx->bf16_math : NSA_BF16_MATH_AUTO;
}

int32_t nsa_bf16_math_available(nsa_bf16_math math) {
  const int m = nsa::enum_value(math);
  if (m < NSA_BF16_MATH_AUTO || m > NSA_BF16_MATH_EMULATED) return 0;
  return nsa::bf16_math_runs(math) ? 1 : 0;
}

nsa_bf16_math nsa_bf16_math_auto(void) { return nsa::bf16_math_resolve(NSA_BF16_MATH_AUTO); }

nsa_status nsa_context_set_profiling(nsa_context* ctx, int32_t on) {
  if (ctx == nullptr) return NSA_ERR_NULL_POINTER;
  ctx->profiling = on != 0;
  return finish(ctx, Status::ok());
}

nsa_status nsa_context_fwd_profile(const nsa_context* ctx, nsa_fwd_profile* out) {
  if (ctx == nullptr || out == nullptr) return NSA_ERR_NULL_POINTER;
  *out = ctx->fwd_profile;
  return NSA_OK;
}

nsa_status nsa_context_bwd_profile(const nsa_context* ctx, nsa_bwd_profile* out) {
  if (ctx == nullptr || out == nullptr) return NSA_ERR_NULL_POINTER;
  *out = ctx->bwd_profile;
  return NSA_OK;
}

const char* nsa_last_error(const nsa_context* ctx) {
  return ctx != nullptr ? ctx->last_error.c_str() : "";
}

int32_t nsa_backend_available(nsa_backend backend) {
  const int b = nsa::enum_value(backend);  // any int: C callers may pass one
  if (b == NSA_BACKEND_AUTO) return 1;
  return nsa::api::find_backend(static_cast<nsa_backend>(b)) != nullptr ? 1 : 0;
}

const char* nsa_backend_name(nsa_backend backend) {
  static const char* const names[] = {"auto", "ref", "cpu", "cuda"};  // by enum value
  const int b = nsa::enum_value(backend);
  return b >= 0 && b < 4 ? names[b] : "unknown";
}

void nsa_config_default(nsa_config* cfg) {
  if (cfg == nullptr) return;
  cfg->cmp_block = 32;
  cfg->cmp_stride = 16;
  cfg->slc_block = 64;
  cfg->slc_count = 16;
  cfg->slc_init = 1;
  cfg->slc_local = 2;
  cfg->window = 512;
  cfg->scale = 0.0f;
}

nsa_status nsa_config_validate(nsa_context* ctx, const nsa_config* cfg) {
  return guarded(ctx, [&]() -> Status {
    if (cfg == nullptr) return nsa::error(NSA_ERR_NULL_POINTER, "cfg: NULL");
    return nsa::validate_config(*cfg);
  });
}

int64_t nsa_cmp_len(const nsa_config* cfg, int64_t t) {
  if (cfg == nullptr || cfg->cmp_block < 1 || cfg->cmp_stride < 1 || t < cfg->cmp_block) return 0;
  return (t - cfg->cmp_block) / cfg->cmp_stride + 1;
}

const char* nsa_dtype_name(nsa_dtype dtype) {
  switch (nsa::enum_value(dtype)) {
    case NSA_DTYPE_F32: return "f32";
    case NSA_DTYPE_BF16: return "bf16";
    case NSA_DTYPE_F16: return "f16";
    case NSA_DTYPE_I32: return "i32";
  }
  return "unknown";
}

size_t nsa_dtype_size(nsa_dtype dtype) {
  switch (nsa::enum_value(dtype)) {
    case NSA_DTYPE_F32:
    case NSA_DTYPE_I32: return 4;
    case NSA_DTYPE_BF16:
    case NSA_DTYPE_F16: return 2;
  }
  return 0;
}

nsa_tensor nsa_tensor_contiguous(void* data, nsa_dtype dtype, int32_t ndim, const int64_t* shape) {
  nsa_tensor t;
  std::memset(&t, 0, sizeof t);
  t.data = data;
  std::memcpy(&t.dtype, &dtype, sizeof dtype);  // copied, not loaded: any int passes through
  if (shape == nullptr || ndim < 1 || ndim > NSA_MAX_DIMS) {
    t.ndim = 0;  // rejected by every op as a shape error
    return t;
  }
  t.ndim = ndim;
  int64_t stride = 1;
  for (int32_t i = ndim - 1; i >= 0; --i) {
    t.shape[i] = shape[i];
    t.stride[i] = stride;
    // A product past INT64_MAX (signed overflow, undefined) saturates instead: such a tensor
    // cannot be addressed, and every op rejects the saturated stride as a span that does not fit
    // a 64-bit offset (validate.cc, span_fits), rather than seeing a wrapped stride.
    if (__builtin_mul_overflow(stride, shape[i] > 0 ? shape[i] : 1, &stride)) stride = INT64_MAX;
  }
  return t;
}

void nsa_fwd_params_init(nsa_fwd_params* p) {
  if (p == nullptr) return;
  std::memset(p, 0, sizeof *p);
  nsa_config_default(&p->in.cfg);
}

nsa_status nsa_fwd(nsa_context* ctx, const nsa_fwd_params* p) {
  return op_call<nsa::FwdProblem>(
      ctx, p, nsa::make_fwd_problem, [&](const Backend& be, nsa::FwdProblem& pr) -> Status {
        // No token: nothing to compute or write, so no backend needs to handle the empty case.
        if (pr.B == 0 || pr.T == 0) return Status::ok();
        return nsa::api::run_profiled(ctx, be, &Backend::forward, "nsa_fwd", pr, &ctx->fwd_profile);
      });
}

void nsa_bwd_params_init(nsa_bwd_params* p) {
  if (p == nullptr) return;
  std::memset(p, 0, sizeof *p);
  nsa_config_default(&p->in.cfg);
}

nsa_status nsa_bwd(nsa_context* ctx, const nsa_bwd_params* p) {
  return op_call<nsa::BwdProblem>(ctx, p, nsa::make_bwd_problem,
                                  [&](const Backend& be, nsa::BwdProblem& pr) -> Status {
                                    // No token: every output is empty, so there is nothing to
                                    // write.
                                    if (pr.B == 0 || pr.T == 0) return Status::ok();
                                    return nsa::api::run_profiled(ctx, be, &Backend::backward,
                                                                  "nsa_bwd", pr, &ctx->bwd_profile);
                                  });
}

nsa_status nsa_cmp_seqlens(nsa_context* ctx, const nsa_config* cfg, const int32_t* cu_seqlens,
                           int64_t num_seqs, int32_t* cu_cmp) {
  return guarded(ctx, [&]() -> Status {
    if (cfg == nullptr) return nsa::error(NSA_ERR_NULL_POINTER, "cfg: NULL");
    if (cu_seqlens == nullptr) return nsa::error(NSA_ERR_NULL_POINTER, "cu_seqlens: NULL");
    if (cu_cmp == nullptr) return nsa::error(NSA_ERR_NULL_POINTER, "cu_cmp: NULL");
    NSA_RETURN_IF_ERROR(nsa::validate_config(*cfg));
    if (num_seqs < 1) {
      return nsa::error(NSA_ERR_INVALID_SEQLENS,
                        "num_seqs: must be at least 1, got " + std::to_string(num_seqs));
    }
    // Host arrays for every backend (nsa.h): the host content check, then the prefix sums.
    std::vector<nsa::Sequence> seqs;
    NSA_RETURN_IF_ERROR(nsa::host_sequences(*cfg, cu_seqlens, num_seqs, &seqs));
    cu_cmp[0] = 0;
    for (size_t s = 0; s < seqs.size(); ++s) {
      // Narrowed: every compressed prefix sum is <= cu_seqlens[s + 1] <= INT32_MAX.
      cu_cmp[s + 1] = static_cast<int32_t>(seqs[s].cmp_start + seqs[s].cmp_len);
    }
    return Status::ok();
  });
}

void nsa_compress_params_init(nsa_compress_params* p) {
  if (p == nullptr) return;
  std::memset(p, 0, sizeof *p);
  nsa_config_default(&p->cfg);
  p->kind = NSA_CMP_MEAN;
}

nsa_status nsa_compress(nsa_context* ctx, const nsa_compress_params* p) {
  return op_call<nsa::CompressProblem>(ctx, p, nsa::make_compress_problem,
                                       [](const Backend& be, nsa::CompressProblem& pr) -> Status {
                                         if (pr.B == 0 || pr.Tc == 0)
                                           return Status::ok();  // no compressed token to write
                                         return nsa::api::run(be, &Backend::compress,
                                                              "nsa_compress", pr);
                                       });
}

void nsa_compress_bwd_params_init(nsa_compress_bwd_params* p) {
  if (p == nullptr) return;
  std::memset(p, 0, sizeof *p);
  nsa_config_default(&p->cfg);
  p->kind = NSA_CMP_MEAN;
}

nsa_status nsa_compress_bwd(nsa_context* ctx, const nsa_compress_bwd_params* p) {
  return op_call<nsa::CompressBwdProblem>(
      ctx, p, nsa::make_compress_bwd_problem,
      [](const Backend& be, nsa::CompressBwdProblem& pr) -> Status {
        // Runs even when Tc = 0: every output is overwritten, with zeros where no block reaches.
        return nsa::api::run(be, &Backend::compress_backward, "nsa_compress_bwd", pr);
      });
}

void nsa_dense_fwd_params_init(nsa_dense_fwd_params* p) {
  if (p != nullptr) std::memset(p, 0, sizeof *p);
}

nsa_status nsa_dense_fwd(nsa_context* ctx, const nsa_dense_fwd_params* p) {
  return op_call<nsa::DenseProblem>(
      ctx, p, nsa::make_dense_problem, [](const Backend& be, nsa::DenseProblem& pr) -> Status {
        if (pr.B == 0 || pr.T == 0) return Status::ok();
        return nsa::api::run(be, &Backend::dense_forward, "nsa_dense_fwd", pr);
      });
}

void nsa_dense_bwd_params_init(nsa_dense_bwd_params* p) {
  if (p != nullptr) std::memset(p, 0, sizeof *p);
}

nsa_status nsa_dense_bwd(nsa_context* ctx, const nsa_dense_bwd_params* p) {
  return op_call<nsa::DenseBwdProblem>(ctx, p, nsa::make_dense_bwd_problem,
                                       [](const Backend& be, nsa::DenseBwdProblem& pr) -> Status {
                                         if (pr.B == 0 || pr.T == 0) return Status::ok();
                                         return nsa::api::run(be, &Backend::dense_backward,
                                                              "nsa_dense_bwd", pr);
                                       });
}

const char* nsa_version(void) { return NSA_VERSION_STRING; }

const char* nsa_build_info(void) { return NSA_BUILD_INFO; }

}  // extern "C"
