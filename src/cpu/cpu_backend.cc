// The CPU backend's table (common/backend.h): f32 accumulation, OpenMP threads and Highway SIMD
// with runtime dispatch, one file per op under src/cpu (docs/ARCHITECTURE.md lists them).
#include "common/backend.h"
#include "cpu/kv_cache.h"
#include "cpu/ops.h"

namespace nsa::cpu {
namespace {

// Highway picks the best SIMD target at run time (down to scalar code), so every build carries
// the CPU kernels and every machine can run them.
bool available() { return true; }

Status decode_step(const DecodeProblem& pr) {
  if (!decode(pr)) return error(NSA_ERR_OUT_OF_MEMORY, "decode: cannot allocate buffers");
  return Status::ok();
}

Backend make_table() {
  Backend b;
  b.id = NSA_BACKEND_CPU;
  b.name = "cpu";
  b.available = available;
  b.packed = host_packed;  // host memory: cu_seqlens and indices are read where they are
  b.indices = host_indices;
  b.forward = forward;
  b.backward = backward;
  b.compress = compress;
  b.compress_backward = compress_backward;
  b.dense_forward = dense_forward;
  b.dense_backward = dense_backward;
  b.cache_create = kv_cache_create;
  b.cache_append = kv_cache_append;
  b.prefill = kv_cache_prefill;
  b.decode = decode_step;  // DecodeProblem::dense tells the kernels which step
  b.dense_decode = decode_step;
  return b;
}

}  // namespace

const Backend& backend() {
  static const Backend table = make_table();
  return table;
}

}  // namespace nsa::cpu
