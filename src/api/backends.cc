// The backend tables this build has: the only place that lists the backends (common/backend.h).
#include <array>

#include "api/call.h"

namespace nsa::api {
namespace {

// Every host backend, in the order AUTO prefers them. AUTO stays on the host backends: for a
// device backend the data pointers would mean device memory, so it is only ever chosen
// explicitly (nsa.h, "Where memory lives").
std::array<const Backend*, 2> host_backends() { return {&cpu::backend(), &ref::backend()}; }

// The device backends this build has (CMake's NSA_CUDA).
#ifdef NSA_HAVE_CUDA
std::array<const Backend*, 1> device_backends() { return {&cuda::backend()}; }
#else
std::array<const Backend*, 0> device_backends() { return {}; }
#endif

}  // namespace

const Backend* find_backend(nsa_backend id) {
  for (const Backend* be : host_backends()) {
    if (be->id == id) return be->available() ? be : nullptr;
  }
  for (const Backend* be : device_backends()) {
    if (be->id == id) return be->available() ? be : nullptr;
  }
  return nullptr;
}

Status select_backend(const nsa_context* ctx, const Backend** out) {
  if (ctx->backend == NSA_BACKEND_AUTO) {
    for (const Backend* be : host_backends()) {
      if (be->available()) {
        *out = be;
        return Status::ok();
      }
    }
  }
  *out = find_backend(ctx->backend);
  if (*out != nullptr) return Status::ok();
  return error(NSA_ERR_UNSUPPORTED, unavailable(ctx->backend));
}

std::string unavailable(nsa_backend id) {
  for (const Backend* be : device_backends()) {
    if (be->id == id) {
      return cat("backend ", be->name, " is not available: built, but no device was found (or "
                                       "no driver to reach one)");
    }
  }
  return cat("backend ", nsa_backend_name(id), " is not available in this build");
}

Status unsupported(const Backend& be, const char* call) {
  return error(NSA_ERR_UNSUPPORTED,
               cat(call, ": the ", be.name, " backend does not implement this call"));
}

}  // namespace nsa::api
