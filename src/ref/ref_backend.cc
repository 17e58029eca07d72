// The float64 reference's table (common/backend.h): every op of the contract, slow and exact, the
// oracle every other backend is tested against. It keeps no KV cache (nsa_fwd over the prefix is
// decode's oracle), so its cache entries are absent and those calls answer NSA_ERR_UNSUPPORTED.
#include "common/backend.h"
#include "ref/ref.h"

namespace nsa::ref {
namespace {

bool available() { return true; }  // always built

Backend make_table() {
  Backend b;
  b.id = NSA_BACKEND_REF;
  b.name = "ref";
  b.available = available;
  b.packed = host_packed;
  b.indices = host_indices;
  b.forward = forward;
  b.backward = backward;
  b.compress = compress;
  b.compress_backward = compress_backward;
  b.dense_forward = dense_forward;
  b.dense_backward = dense_backward;
  return b;
}

}  // namespace

const Backend& backend() {
  static const Backend table = make_table();
  return table;
}

}  // namespace nsa::ref
