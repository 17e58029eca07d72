// The CPU backend: float32 kernels with OpenMP threads, one file per op under src/cpu
// (forward.cc and compress.cc hold the entry points nsa::cpu::forward and nsa::cpu::compress).
#include "common/backends.h"

namespace nsa::cpu {

// The CPU kernels are plain C++ and OpenMP, so every build carries them.
bool available() { return true; }

}  // namespace nsa::cpu
