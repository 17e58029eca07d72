// The CUDA part of the C API (nsa_cuda.h): present in every build, so that a caller compiles and
// links the same way with or without the CUDA backend.
#include "nsa/nsa_cuda.h"

#include "api/call.h"
#include "api/context.h"

using nsa::Status;

extern "C" {

int32_t nsa_cuda_device_count(void) {
#ifdef NSA_HAVE_CUDA
  return nsa::cuda::device_count();
#else
  return 0;
#endif
}

nsa_status nsa_context_set_cuda_stream(nsa_context* ctx, void* stream) {
  if (ctx == nullptr) return NSA_ERR_NULL_POINTER;
  ctx->cuda_stream = stream;
  ctx->last_error.clear();
  return NSA_OK;
}

void* nsa_context_cuda_stream(const nsa_context* ctx) {
  return ctx != nullptr ? ctx->cuda_stream : nullptr;
}

nsa_status nsa_context_reserve_cuda_workspace(nsa_context* ctx, size_t bytes) {
  if (ctx == nullptr) return NSA_ERR_NULL_POINTER;
  return nsa::api::guarded(ctx, [&]() -> Status {
    const nsa::Backend* be = nsa::api::find_backend(NSA_BACKEND_CUDA);
    if (be == nullptr)
      return nsa::error(NSA_ERR_UNSUPPORTED, nsa::api::unavailable(NSA_BACKEND_CUDA));
    return be->reserve_workspace(&ctx->workspace, bytes);
  });
}

size_t nsa_context_cuda_workspace_size(const nsa_context* ctx) {
  return ctx != nullptr && ctx->workspace != nullptr ? ctx->workspace->size() : 0;
}

}  // extern "C"
