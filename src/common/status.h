// Status: the internal error value. Every function below the C API that can fail returns one;
// the C API stores its message in the caller's context and returns its code.
#pragma once

#include <new>
#include <sstream>
#include <string>
#include <utility>

#include "nsa/nsa.h"

namespace nsa {

struct Status {
  nsa_status code = NSA_OK;
  std::string message;

  static Status ok() { return {}; }
  bool is_ok() const { return code == NSA_OK; }
};

inline Status error(nsa_status code, std::string message) { return {code, std::move(message)}; }

// Concatenates the arguments into a message. A stream that fails to allocate sets its badbit
// instead of throwing; that becomes std::bad_alloc here (so NSA_ERR_OUT_OF_MEMORY), never a
// silently truncated message.
template <typename... Args>
std::string cat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  if (!os) throw std::bad_alloc();
  return os.str();
}

}  // namespace nsa

// Returns early from the enclosing function when `expr` yields an error Status.
#define NSA_RETURN_IF_ERROR(expr)                         \
  do {                                                    \
    ::nsa::Status nsa_status_tmp_ = (expr);               \
    if (!nsa_status_tmp_.is_ok()) return nsa_status_tmp_; \
  } while (0)
