// nsa._core: descriptors, contexts, errors, and the module definition.
#include "core.h"

#include <nanobind/stl/string.h>

#include <string>

namespace nsa_py {

namespace {
// Where an empty tensor's data points when its framework gave none (a zero-size torch tensor may
// have data_ptr() 0): NULL would make the C API read it as absent, and a size-0 view reads nothing.
alignas(64) const unsigned char kEmpty[64] = {};
}  // namespace

nsa_tensor to_tensor(nb::handle desc, const char* name) {
  nsa_tensor t{};
  if (desc.is_none()) return t;
  nb::tuple d = nb::cast<nb::tuple>(desc);
  if (d.size() != 4) throw nb::value_error((std::string(name) + ": malformed descriptor").c_str());
  const uintptr_t ptr = nb::cast<uintptr_t>(d[0]);
  t.dtype = static_cast<nsa_dtype>(nb::cast<int>(d[1]));
  nb::sequence shape = nb::cast<nb::sequence>(d[2]);
  nb::sequence stride = nb::cast<nb::sequence>(d[3]);
  const size_t ndim = nb::len(shape);
  if (ndim < 1 || ndim > NSA_MAX_DIMS || nb::len(stride) != ndim) {
    throw nb::value_error((std::string(name) + ": a tensor of " + std::to_string(ndim) +
                           " dimensions; nsa takes 1 to " + std::to_string(NSA_MAX_DIMS))
                              .c_str());
  }
  t.ndim = static_cast<int32_t>(ndim);
  bool empty = false;
  for (size_t i = 0; i < ndim; ++i) {
    t.shape[i] = nb::cast<int64_t>(shape[i]);
    t.stride[i] = nb::cast<int64_t>(stride[i]);
    empty = empty || t.shape[i] == 0;
  }
  t.data = ptr != 0 ? reinterpret_cast<void*>(ptr)
                    : (empty ? const_cast<unsigned char*>(kEmpty) : nullptr);
  return t;
}

Context::Context(const std::string& backend, int threads, int bf16_math) {
  nsa_backend b = NSA_BACKEND_AUTO;
  if (backend == "ref") {
    b = NSA_BACKEND_REF;
  } else if (backend == "cpu") {
    b = NSA_BACKEND_CPU;
  } else if (backend == "cuda") {
    b = NSA_BACKEND_CUDA;
  } else if (backend != "auto") {
    throw nb::value_error(
        ("backend: '" + backend + "' is not one of auto, ref, cpu, cuda").c_str());
  }
  if (nsa_context_create(&ctx_) != NSA_OK) throw std::bad_alloc();
  nsa_status s = nsa_context_set_backend(ctx_, b);
  if (s == NSA_OK && threads > 0) s = nsa_context_set_num_threads(ctx_, threads);
  if (s == NSA_OK && bf16_math != NSA_BF16_MATH_AUTO) {
    s = nsa_context_set_bf16_math(ctx_, static_cast<nsa_bf16_math>(bf16_math));
  }
  if (s != NSA_OK) {
    const std::string message = std::string("backend/threads/bf16_math: ") + nsa_last_error(ctx_);
    nsa_context_destroy(ctx_);
    ctx_ = nullptr;
    raise_status(s, message);
  }
}

Context::~Context() { nsa_context_destroy(ctx_); }

void Context::check(nsa_status status) const {
  if (status != NSA_OK) raise_status(status, nsa_last_error(ctx_));
}

void raise_status(nsa_status status, const std::string& message) {
  const std::string text = message + " [" + nsa_status_name(status) + "]";
  PyObject* type = PyExc_ValueError;
  if (status == NSA_ERR_UNSUPPORTED) type = PyExc_NotImplementedError;
  if (status == NSA_ERR_OUT_OF_MEMORY) type = PyExc_MemoryError;
  if (status == NSA_ERR_INTERNAL) type = PyExc_RuntimeError;
  PyErr_SetString(type, text.c_str());
  throw nb::python_error();
}

nsa_config to_config(nb::handle cfg) {
  nb::tuple c = nb::cast<nb::tuple>(cfg);
  if (c.size() != 8) throw nb::value_error("config: expected 8 fields");
  nsa_config out{};
  out.cmp_block = nb::cast<int32_t>(c[0]);
  out.cmp_stride = nb::cast<int32_t>(c[1]);
  out.slc_block = nb::cast<int32_t>(c[2]);
  out.slc_count = nb::cast<int32_t>(c[3]);
  out.slc_init = nb::cast<int32_t>(c[4]);
  out.slc_local = nb::cast<int32_t>(c[5]);
  out.window = nb::cast<int32_t>(c[6]);
  out.scale = nb::cast<float>(c[7]);
  return out;
}

nsa_cmp_kind to_cmp_kind(const std::string& kind) {
  if (kind == "mean") return NSA_CMP_MEAN;
  if (kind == "mlp") return NSA_CMP_MLP;
  throw nb::value_error(("compression: '" + kind + "' is not 'mean' or 'mlp'").c_str());
}

Seqlens to_seqlens(nb::handle desc) {
  Seqlens s;
  if (desc.is_none()) return s;
  const nsa_tensor t = to_tensor(desc, "cu_seqlens");
  if (t.dtype != NSA_DTYPE_I32 || t.ndim != 1 || (t.shape[0] > 1 && t.stride[0] != 1)) {
    throw nb::value_error("cu_seqlens: expected a contiguous 1-D int32 tensor of S + 1 entries");
  }
  if (t.shape[0] < 2) throw nb::value_error("cu_seqlens: needs S + 1 >= 2 entries");
  s.data = static_cast<const int32_t*>(t.data);
  s.num_seqs = t.shape[0] - 1;
  return s;
}

Tensors::Tensors(nb::dict d, std::initializer_list<const char*> names) : d_(d) {
  for (auto item : d) {
    const std::string key = nb::cast<std::string>(item.first);
    bool known = false;
    for (const char* n : names) known = known || key == n;
    if (!known) throw nb::value_error(("unknown tensor argument '" + key + "'").c_str());
  }
}

nsa_tensor Tensors::operator[](const char* name) const {
  return d_.contains(name) ? to_tensor(d_[name], name) : nsa_tensor{};
}

Seqlens Tensors::seqlens() const {
  return d_.contains("cu_seqlens") ? to_seqlens(d_["cu_seqlens"]) : Seqlens{};
}

}  // namespace nsa_py

NB_MODULE(_core, m) {
  namespace nb = nanobind;
  m.doc() = "nsa's C API, framework-free: tensors are (data_ptr, dtype, shape, strides) tuples.";
  m.def("version", [] { return std::string(nsa_version()); });
  m.def("build_info", [] { return std::string(nsa_build_info()); });
  m.def("backend_available", [](const std::string& name) {
    const nsa_backend b = name == "ref"    ? NSA_BACKEND_REF
                          : name == "cpu"  ? NSA_BACKEND_CPU
                          : name == "cuda" ? NSA_BACKEND_CUDA
                                           : NSA_BACKEND_AUTO;
    return nsa_backend_available(b) != 0;
  });
  m.def("bf16_math_available", [](int math) {
    return nsa_bf16_math_available(static_cast<nsa_bf16_math>(math)) != 0;
  });
  m.def("bf16_math_auto", [] { return static_cast<int>(nsa_bf16_math_auto()); });
  m.def("config_default", [] {
    nsa_config c;
    nsa_config_default(&c);
    return nb::make_tuple(c.cmp_block, c.cmp_stride, c.slc_block, c.slc_count, c.slc_init,
                          c.slc_local, c.window, c.scale);
  });
  m.def("config_validate", [](nb::handle cfg) {
    nsa_py::Context ctx("auto", 0);
    const nsa_config c = nsa_py::to_config(cfg);
    ctx.check(nsa_config_validate(ctx.get(), &c));
  });
  nsa_py::bind_ops(m);
  nsa_py::bind_cache(m);
}
