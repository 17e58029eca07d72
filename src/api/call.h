// Shared by the C API's translation units: the outcome of a call into the context, exceptions
// into status codes, and the backend AUTO resolves to.
#pragma once

#include <exception>
#include <new>
#include <stdexcept>
#include <string>

#include "api/context.h"
#include "common/backends.h"
#include "common/status.h"

namespace nsa::api {

// Records the outcome of a call in ctx (when there is one) and returns its code.
inline nsa_status finish(nsa_context* ctx, const nsa::Status& s) {
  if (ctx != nullptr) ctx->last_error = s.is_ok() ? std::string() : s.message;
  return s.code;
}

// Runs `body` (returning Status), turning exceptions into status codes.
template <typename Body>
nsa_status guarded(nsa_context* ctx, Body&& body) {
  try {
    return finish(ctx, body());
  } catch (const std::bad_alloc&) {
    return finish(ctx, nsa::error(NSA_ERR_OUT_OF_MEMORY, "out of memory"));
  } catch (const std::length_error&) {  // a container asked for more than it can ever hold
    return finish(ctx, nsa::error(NSA_ERR_OUT_OF_MEMORY, "out of memory (size beyond max_size)"));
  } catch (const std::exception& e) {
    return finish(ctx, nsa::error(NSA_ERR_INTERNAL, std::string("internal error: ") + e.what()));
  } catch (...) {
    return finish(ctx, nsa::error(NSA_ERR_INTERNAL, "internal error: unknown exception"));
  }
}

// AUTO picks the fastest backend the build has.
inline nsa_backend resolve(nsa_backend b) {
  if (b != NSA_BACKEND_AUTO) return b;
  return nsa::cpu::available() ? NSA_BACKEND_CPU : NSA_BACKEND_REF;
}

inline nsa::Status unavailable(nsa_backend b) {
  return nsa::error(NSA_ERR_UNSUPPORTED, std::string("backend ") + nsa_backend_name(b) +
                                             " is not available in this build");
}

}  // namespace nsa::api
