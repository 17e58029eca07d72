// The CUDA backend's table (common/backend.h): device memory, kernels enqueued on the context's
// stream (nsa_cuda.h). It has the forward, the dense baseline, the compression and the KV cache
// with decode; the backward is not built yet (NSA_ERR_UNSUPPORTED, from the absent entries).
#include <cuda_runtime.h>

#include "common/backend.h"
#include "cuda/device.h"
#include "cuda/ops.h"

namespace nsa::cuda {
namespace {

bool available() { return device_count() > 0; }

// Contents live on the device and are not read on the host (nsa.h, "Where memory lives"): the
// kernels skip what invalid cu_seqlens cannot place and ignore out-of-range caller indices. A
// packed batch's sequences are found by each block on the device, so `seqs` stays empty.
Status device_packed(const PackedArgs&, std::vector<Sequence>* seqs) {
  seqs->clear();
  return Status::ok();
}
Status device_indices(const IndexArgs&) { return Status::ok(); }

Backend make_table() {
  Backend b;
  b.id = NSA_BACKEND_CUDA;
  b.name = "cuda";
  b.available = available;
  b.packed = device_packed;
  b.indices = device_indices;
  b.forward = forward;
  b.compress = compress;
  b.dense_forward = dense_forward;
  b.cache_create = kv_cache_create;
  b.cache_append = kv_cache_append;
  b.cache_append_rows = kv_cache_append_rows;
  b.prefill = kv_cache_prefill;
  b.decode = decode;
  b.dense_decode = decode;
  b.reserve_workspace = reserve_workspace;
  return b;
}

}  // namespace

int32_t device_count() {
  int n = 0;
  // No driver, or a driver older than the runtime: no device (the error is not sticky).
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
}

Status reserve_workspace(std::unique_ptr<Workspace>* slot, size_t bytes) {
  DeviceWorkspace* ws = nullptr;
  return workspace(slot, bytes, &ws);
}

const Backend& backend() {
  static const Backend table = make_table();
  return table;
}

}  // namespace nsa::cuda
