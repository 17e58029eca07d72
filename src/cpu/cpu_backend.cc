// The CPU backend's entry points. Until the CPU kernels land, this build reports the backend as
// unavailable and AUTO resolves to the reference.
#include "common/backends.h"

namespace nsa::cpu {

bool available() { return false; }

Status forward(const FwdProblem&) {
  return error(NSA_ERR_UNSUPPORTED, "backend cpu: not built");
}

Status compress(const CompressProblem&) {
  return error(NSA_ERR_UNSUPPORTED, "backend cpu: not built");
}

}  // namespace nsa::cpu
