// nsa._core: the KV cache (nsa_kv_cache_*) and the calls on it (prefill, decode, dense decode).
// A Cache object owns the C handle; the calls take the handle as an integer so that a torch op
// (whose schema has no place for a Python object) can carry it. The Python layer keeps the Cache
// alive for as long as its handle is used.
#include <nanobind/stl/string.h>

#include <string>

#include "core.h"

namespace nsa_py {
namespace {

class Cache {
 public:
  Cache(const std::string& backend, int threads, nb::handle cfg, int64_t num_seqs, int64_t capacity,
        int64_t num_kv_heads, int64_t head_dim_k, int64_t head_dim_v, int dtype,
        const std::string& kind, nb::dict mlp)
      : backend_(backend) {
    nsa_kv_cache_params p;
    nsa_kv_cache_params_init(&p);
    p.cfg = to_config(cfg);
    p.num_seqs = num_seqs, p.capacity = capacity, p.num_kv_heads = num_kv_heads;
    p.head_dim_k = head_dim_k, p.head_dim_v = head_dim_v;
    p.dtype = static_cast<nsa_dtype>(dtype);
    p.cmp_kind = to_cmp_kind(kind);
    const Tensors arg(
        mlp, {"k_pos", "k_w1", "k_b1", "k_w2", "k_b2", "v_pos", "v_w1", "v_b1", "v_w2", "v_b2"});
    p.k_pos = arg["k_pos"], p.k_w1 = arg["k_w1"], p.k_b1 = arg["k_b1"], p.k_w2 = arg["k_w2"];
    p.k_b2 = arg["k_b2"], p.v_pos = arg["v_pos"], p.v_w1 = arg["v_w1"], p.v_b1 = arg["v_b1"];
    p.v_w2 = arg["v_w2"], p.v_b2 = arg["v_b2"];
    const Context ctx(backend, threads);
    ctx.check(nsa_kv_cache_create(ctx.get(), &p, &cache_));
  }
  ~Cache() { nsa_kv_cache_destroy(cache_); }
  Cache(const Cache&) = delete;
  Cache& operator=(const Cache&) = delete;

  uintptr_t handle() const { return reinterpret_cast<uintptr_t>(cache_); }
  const std::string& backend() const { return backend_; }
  int64_t len(int64_t seq) const { return nsa_kv_cache_len(cache_, seq); }
  void reset(int64_t seq) {
    const Context ctx(backend_, 0);
    ctx.check(nsa_kv_cache_reset(ctx.get(), cache_, seq));
  }
  void close() {
    nsa_kv_cache_destroy(cache_);
    cache_ = nullptr;
  }

 private:
  std::string backend_;
  nsa_kv_cache* cache_ = nullptr;
};

nsa_kv_cache* from_handle(uintptr_t handle) {
  if (handle == 0) throw nb::value_error("cache: closed or never created");
  return reinterpret_cast<nsa_kv_cache*>(handle);
}

void prefill(uintptr_t handle, const std::string& backend, int threads, int64_t seq, nb::dict t) {
  nsa_prefill_params p;
  nsa_prefill_params_init(&p);
  const Tensors arg(t, {"q", "k", "v", "g_cmp", "g_slc", "g_win", "o", "lse_cmp", "lse_slc",
                        "lse_win", "slc_indices_out"});
  p.seq = seq;
  p.q = arg["q"], p.k = arg["k"], p.v = arg["v"];
  p.g_cmp = arg["g_cmp"], p.g_slc = arg["g_slc"], p.g_win = arg["g_win"];
  p.o = arg["o"], p.lse_cmp = arg["lse_cmp"], p.lse_slc = arg["lse_slc"];
  p.lse_win = arg["lse_win"], p.slc_indices_out = arg["slc_indices_out"];
  const Context ctx(backend, threads);
  timed(ctx, 1, [&] { return nsa_prefill(ctx.get(), from_handle(handle), &p); });
}

double decode(uintptr_t handle, const std::string& backend, int threads, nb::dict t, int repeat) {
  nsa_decode_params p;
  nsa_decode_params_init(&p);
  const Tensors arg(t, {"q", "k", "v", "seq_ids", "g_cmp", "g_slc", "g_win", "o", "lse_cmp",
                        "lse_slc", "lse_win", "slc_indices_out"});
  p.q = arg["q"], p.k = arg["k"], p.v = arg["v"];
  const nsa_tensor ids = arg["seq_ids"];
  if (ids.data != nullptr &&
      (ids.dtype != NSA_DTYPE_I32 || ids.ndim != 1 || (ids.shape[0] > 1 && ids.stride[0] != 1))) {
    throw nb::value_error("seq_ids: expected a contiguous 1-D int32 tensor");
  }
  p.seq_ids = static_cast<const int32_t*>(ids.data);
  p.g_cmp = arg["g_cmp"], p.g_slc = arg["g_slc"], p.g_win = arg["g_win"];
  p.o = arg["o"], p.lse_cmp = arg["lse_cmp"], p.lse_slc = arg["lse_slc"];
  p.lse_win = arg["lse_win"], p.slc_indices_out = arg["slc_indices_out"];
  const Context ctx(backend, threads);
  return timed(ctx, repeat, [&] { return nsa_decode(ctx.get(), from_handle(handle), &p); });
}

}  // namespace

void bind_cache(nb::module_& m) {
  using nb::arg;
  nb::class_<Cache>(m, "Cache", "An nsa_kv_cache (owned; destroyed with this object or close()).")
      .def(nb::init<const std::string&, int, nb::handle, int64_t, int64_t, int64_t, int64_t,
                    int64_t, int, const std::string&, nb::dict>(),
           arg("backend"), arg("threads"), arg("cfg"), arg("num_seqs"), arg("capacity"),
           arg("num_kv_heads"), arg("head_dim_k"), arg("head_dim_v"), arg("dtype"), arg("kind"),
           arg("mlp"))
      .def_prop_ro("handle", &Cache::handle)
      .def_prop_ro("backend", &Cache::backend)
      .def("len", &Cache::len, arg("seq"))
      .def("reset", &Cache::reset, arg("seq"))
      .def("close", &Cache::close);
  m.def("prefill", &prefill, arg("handle"), arg("backend"), arg("threads"), arg("seq"),
        arg("tensors"));
  m.def("decode", &decode, arg("handle"), arg("backend"), arg("threads"), arg("tensors"),
        arg("repeat") = 1, "nsa_decode; returns the seconds spent in the C calls.");
}

}  // namespace nsa_py
