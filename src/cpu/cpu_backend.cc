// The CPU backend: f32 accumulation, OpenMP threads and Highway SIMD with runtime dispatch, one
// file per op under src/cpu (forward.cc and compress.cc hold the entry points nsa::cpu::forward
// and nsa::cpu::compress; forward_lanes.cc the forward's kernels).
#include "common/backends.h"

namespace nsa::cpu {

// Highway picks the best SIMD target at run time (down to scalar code), so every build carries
// the CPU kernels and every machine can run them.
bool available() { return true; }

}  // namespace nsa::cpu
