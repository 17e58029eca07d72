// The KV cache behind the opaque nsa_kv_cache handle (nsa.h, "Decode with a KV cache"): what every
// backend shares (the config, the sizes, the dtype, the owning backend and each sequence's
// length) in common code; the token storage itself belongs to the backend that created the cache
// and is reached only through it (SPEC 7).
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "nsa/nsa.h"

namespace nsa {

struct Backend;

// A backend's storage for one cache: raw and compressed tokens, the compressor's parameters,
// reusable scratch. Only its backend knows the concrete type; common code owns and destroys it.
class CacheStorage {
 public:
  virtual ~CacheStorage() = default;
};

}  // namespace nsa

struct nsa_kv_cache {
  nsa_config cfg{};  // scale resolved to 1/sqrt(Dk) when it was 0
  int64_t num_seqs = 0, capacity = 0, Hkv = 0, Dk = 0, Dv = 0;
  nsa_dtype dtype = NSA_DTYPE_F32;
  nsa_cmp_kind cmp_kind = NSA_CMP_MEAN;
  const nsa::Backend* backend = nullptr;  // the backend that created it and serves every call
  std::vector<int64_t> len;               // tokens held, per sequence
  std::unique_ptr<nsa::CacheStorage> storage;

  int64_t cmp_len(int64_t seq) const {  // compressed tokens held by sequence seq
    return nsa_cmp_len(&cfg, len[static_cast<size_t>(seq)]);
  }
};
