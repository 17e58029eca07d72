// The context behind the opaque nsa_context handle.
#pragma once

#include <string>

#include "nsa/nsa.h"

struct nsa_context {
  nsa_backend backend = NSA_BACKEND_AUTO;
  int32_t num_threads = 0;  // 0: OpenMP's default
  std::string last_error;
};
