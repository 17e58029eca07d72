// nsa._core: the Python extension's shared pieces. The extension is a client of the public C API
// only (include/nsa/nsa.h), and knows no framework: a tensor arrives as a plain descriptor tuple
// (data pointer, dtype code, shape, strides in elements) that the Python layer builds from a torch
// tensor or a NumPy array, so one build serves every torch version and NumPy alone.
#pragma once

#include <nanobind/nanobind.h>

#include <chrono>
#include <initializer_list>
#include <string>

#include "nsa/nsa.h"

namespace nsa_py {

namespace nb = nanobind;

// The tensor behind a descriptor tuple, or an absent tensor (data NULL) for None. `name` is the
// C field the descriptor fills, quoted in errors.
nsa_tensor to_tensor(nb::handle desc, const char* name);

// A context for one call: the backend by name ("auto", "ref", "cpu", "cuda"), a thread count
// (0: OpenMP's default) and the bf16 arithmetic (an nsa_bf16_math value). One per call, so that
// concurrent calls from Python threads (the GIL is released while the C call runs) never share a
// context's error message.
class Context {
 public:
  Context(const std::string& backend, int threads, int bf16_math = NSA_BF16_MATH_AUTO);
  ~Context();
  Context(const Context&) = delete;
  Context& operator=(const Context&) = delete;
  nsa_context* get() const { return ctx_; }
  // Raises the Python exception for a failed status, with the context's message (which names the
  // offending argument): ValueError for bad arguments, NotImplementedError for a call the backend
  // lacks, MemoryError, RuntimeError otherwise.
  void check(nsa_status status) const;

 private:
  nsa_context* ctx_ = nullptr;
};

// Raises as Context::check does, for a message already known.
[[noreturn]] void raise_status(nsa_status status, const std::string& message);

// The config from the tuple (cmp_block, cmp_stride, slc_block, slc_count, slc_init, slc_local,
// window, scale).
nsa_config to_config(nb::handle cfg);

// nsa_cmp_kind from "mean" or "mlp".
nsa_cmp_kind to_cmp_kind(const std::string& kind);

// cu_seqlens from an int32 descriptor of S + 1 entries (or None: fixed length).
struct Seqlens {
  const int32_t* data = nullptr;
  int64_t num_seqs = 0;
};
Seqlens to_seqlens(nb::handle desc);

// The tensors of one call, from a dict of descriptors keyed by the C params' field names. Names
// the call does not take are refused (a misspelt optional argument would otherwise be absent).
class Tensors {
 public:
  Tensors(nb::dict d, std::initializer_list<const char*> names);
  // The named tensor, or an absent one when the dict lacks the name.
  nsa_tensor operator[](const char* name) const;
  Seqlens seqlens() const;

 private:
  nb::dict d_;
};

// Runs `call` `repeat` times with the GIL released and returns the seconds of the C calls alone
// (the bare-call time the overhead benchmark compares with). Raises on the first failure.
template <class F>
double timed(const Context& ctx, int repeat, F&& call) {
  nsa_status status = NSA_OK;
  double seconds = 0;
  {
    nb::gil_scoped_release released;
    const auto start = std::chrono::steady_clock::now();
    for (int i = 0; i < (repeat < 1 ? 1 : repeat) && status == NSA_OK; ++i) status = call();
    seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  }
  ctx.check(status);
  return seconds;
}

void bind_ops(nb::module_& m);
void bind_cache(nb::module_& m);

}  // namespace nsa_py
