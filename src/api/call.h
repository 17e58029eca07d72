// Shared by the C API's translation units: the outcome of a call into the context, exceptions
// into status codes, and dispatch through the backend table (common/backend.h).
#pragma once

#include <chrono>
#include <exception>
#include <new>
#include <stdexcept>
#include <string>

#include "api/context.h"
#include "common/backend.h"
#include "common/bf16_math.h"
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

// The backend table (common/backend.h) of a backend id, or nullptr when this build lacks it or,
// for a device backend, no device is present (backends.cc).
const Backend* find_backend(nsa_backend id);
// The backend a call on ctx runs: ctx's choice, AUTO resolved to the fastest host backend
// available; NSA_ERR_UNSUPPORTED when it is not available.
Status select_backend(const nsa_context* ctx, const Backend** out);
// Why backend `id` is not available: not built, or (a device backend) no device.
std::string unavailable(nsa_backend id);
// NSA_ERR_UNSUPPORTED naming the backend and the call (an absent table entry).
Status unsupported(const Backend& be, const char* call);

// Copies the context's settings that every call passes down (thread count, bf16 arithmetic, the
// device stream and workspace) into a problem (common/problem.h: Launch, DecodeProblem).
template <typename Problem>
void take_settings(nsa_context* ctx, Problem* pr) {
  pr->num_threads = ctx->num_threads;
  pr->bf16_math = bf16_math_resolve(ctx->bf16_math);
  pr->stream = ctx->cuda_stream;
  pr->workspace = &ctx->workspace;
}

// Runs the table entry `entry` of `be` on a validated problem, or reports it unsupported.
template <typename Problem>
Status run(const Backend& be, Status (*Backend::*entry)(const Problem&), const char* call,
           const Problem& pr) {
  const auto fn = be.*entry;
  if (fn == nullptr) return unsupported(be, call);
  return fn(pr);
}

// run() with the context's profiling: the backend fills the stage times of *pr.profile, the wall
// time is measured here, and the profile is kept in *slot when the call succeeded.
template <typename Problem, typename Profile>
Status run_profiled(nsa_context* ctx, const Backend& be, Status (*Backend::*entry)(const Problem&),
                    const char* call, Problem& pr, Profile* slot) {
  if (!ctx->profiling) return run(be, entry, call, pr);
  Profile profile{};
  pr.profile = &profile;
  const auto t0 = std::chrono::steady_clock::now();
  Status st = run(be, entry, call, static_cast<const Problem&>(pr));
  pr.profile = nullptr;
  if (!st.is_ok()) return st;
  profile.wall_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  *slot = profile;
  return st;
}

}  // namespace nsa::api
