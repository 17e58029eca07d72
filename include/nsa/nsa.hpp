// nsa.hpp: a thin C++ layer over the C API (nsa.h). It adds RAII for the context, exceptions for
// error codes and typed tensor descriptors; it computes nothing itself.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <memory>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "nsa/nsa.h"
#include "nsa/nsa_cuda.h"

namespace nsa {

// A bf16 element: the upper 16 bits of an IEEE float32.
struct bf16 {
  uint16_t bits;
};
// An f16 element: the bits of an IEEE binary16.
struct f16 {
  uint16_t bits;
};

template <typename T>
constexpr nsa_dtype dtype_of();
template <>
constexpr nsa_dtype dtype_of<float>() {
  return NSA_DTYPE_F32;
}
template <>
constexpr nsa_dtype dtype_of<bf16>() {
  return NSA_DTYPE_BF16;
}
template <>
constexpr nsa_dtype dtype_of<f16>() {
  return NSA_DTYPE_F16;
}
template <>
constexpr nsa_dtype dtype_of<int32_t>() {
  return NSA_DTYPE_I32;
}

// Thrown by the C++ layer when a call returns an error; what() carries the library's message.
class Error : public std::runtime_error {
 public:
  Error(nsa_status status, const std::string& message)
      : std::runtime_error(std::string(nsa_status_name(status)) + ": " + message),
        status_(status) {}
  nsa_status status() const { return status_; }

 private:
  nsa_status status_;
};

// A contiguous descriptor of `shape` over `data` (which the caller keeps alive).
template <typename T>
nsa_tensor tensor(T* data, std::initializer_list<int64_t> shape) {
  // Inputs may be const; the descriptor's pointer is not, as in the C API.
  return nsa_tensor_contiguous(const_cast<void*>(static_cast<const void*>(data)),
                               dtype_of<std::remove_const_t<T>>(),
                               static_cast<int32_t>(shape.size()), shape.begin());
}

// A strided descriptor (strides in elements, the last one 1).
template <typename T>
nsa_tensor tensor(T* data, std::initializer_list<int64_t> shape,
                  std::initializer_list<int64_t> strides) {
  nsa_tensor t = tensor(data, shape);
  int i = 0;
  for (int64_t s : strides) {
    if (i < NSA_MAX_DIMS) t.stride[i++] = s;
  }
  return t;
}

inline nsa_config default_config() {
  nsa_config c;
  nsa_config_default(&c);
  return c;
}

// Owns an nsa_context. Every method throws nsa::Error on failure.
class Context {
 public:
  Context() {
    nsa_context* raw = nullptr;
    const nsa_status s = nsa_context_create(&raw);
    if (s != NSA_OK) throw Error(s, "cannot create a context");
    ctx_.reset(raw);
  }
  explicit Context(nsa_backend backend) : Context() { set_backend(backend); }

  void set_backend(nsa_backend b) { check(nsa_context_set_backend(get(), b)); }
  void set_num_threads(int32_t n) { check(nsa_context_set_num_threads(get(), n)); }
  // The CUDA backend's stream (a cudaStream_t; nsa_cuda.h).
  void set_cuda_stream(void* stream) { check(nsa_context_set_cuda_stream(get(), stream)); }
  nsa_backend backend() const { return nsa_context_backend(ctx_.get()); }

  void validate(const nsa_config& cfg) { check(nsa_config_validate(get(), &cfg)); }
  void fwd(const nsa_fwd_params& p) { check(nsa_fwd(get(), &p)); }
  void bwd(const nsa_bwd_params& p) { check(nsa_bwd(get(), &p)); }
  void compress(const nsa_compress_params& p) { check(nsa_compress(get(), &p)); }
  void compress_bwd(const nsa_compress_bwd_params& p) { check(nsa_compress_bwd(get(), &p)); }
  void dense_fwd(const nsa_dense_fwd_params& p) { check(nsa_dense_fwd(get(), &p)); }
  void dense_bwd(const nsa_dense_bwd_params& p) { check(nsa_dense_bwd(get(), &p)); }

  nsa_context* get() { return ctx_.get(); }

 private:
  struct Deleter {
    void operator()(nsa_context* c) const { nsa_context_destroy(c); }
  };
  void check(nsa_status s) {
    if (s != NSA_OK) throw Error(s, nsa_last_error(ctx_.get()));
  }
  std::unique_ptr<nsa_context, Deleter> ctx_;
};

// Owns an nsa_kv_cache (nsa.h, "Decode with a KV cache"), used through the context it was made
// with (which must outlive it). Every method throws nsa::Error on failure.
class KvCache {
 public:
  KvCache(Context& ctx, const nsa_kv_cache_params& p) : ctx_(&ctx) {
    nsa_kv_cache* raw = nullptr;
    check(nsa_kv_cache_create(ctx.get(), &p, &raw));
    cache_.reset(raw);
  }

  int64_t len(int64_t seq) const { return nsa_kv_cache_len(cache_.get(), seq); }
  void reset(int64_t seq) { check(nsa_kv_cache_reset(ctx_->get(), get(), seq)); }
  void append(int64_t seq, const nsa_tensor& k, const nsa_tensor& v) {
    check(nsa_kv_cache_append(ctx_->get(), get(), seq, &k, &v));
  }
  void prefill(const nsa_prefill_params& p) { check(nsa_prefill(ctx_->get(), get(), &p)); }
  void decode(const nsa_decode_params& p) { check(nsa_decode(ctx_->get(), get(), &p)); }
  void dense_decode(const nsa_dense_decode_params& p) {
    check(nsa_dense_decode(ctx_->get(), get(), &p));
  }

  nsa_kv_cache* get() { return cache_.get(); }

 private:
  struct Deleter {
    void operator()(nsa_kv_cache* c) const { nsa_kv_cache_destroy(c); }
  };
  void check(nsa_status s) {
    if (s != NSA_OK) throw Error(s, nsa_last_error(ctx_->get()));
  }
  Context* ctx_;
  std::unique_ptr<nsa_kv_cache, Deleter> cache_;
};

}  // namespace nsa
