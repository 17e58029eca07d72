// nsa._core: the stateless ops (forward, backward, compression, dense baseline). Each takes the
// backend's name, a thread count, and a dict of tensor descriptors keyed by the C params' field
// names (nsa.h), so that a message from the C API names the argument the Python caller passed.
#include <nanobind/stl/string.h>

#include <string>

#include "core.h"

namespace nsa_py {
namespace {

#define NSA_FWD_INPUT_NAMES                                                                       \
  "q", "k", "v", "k_slc", "v_slc", "k_win", "v_win", "k_cmp", "v_cmp", "g_cmp", "g_slc", "g_win", \
      "cu_seqlens"

void fill_inputs(const Tensors& t, nb::handle cfg, nsa_fwd_inputs& in) {
  in.cfg = to_config(cfg);
  in.q = t["q"], in.k = t["k"], in.v = t["v"];
  in.k_slc = t["k_slc"], in.v_slc = t["v_slc"], in.k_win = t["k_win"], in.v_win = t["v_win"];
  in.k_cmp = t["k_cmp"], in.v_cmp = t["v_cmp"];
  in.g_cmp = t["g_cmp"], in.g_slc = t["g_slc"], in.g_win = t["g_win"];
  const Seqlens s = t.seqlens();
  in.cu_seqlens = s.data;
  in.num_seqs = s.num_seqs;
}

double fwd(const std::string& backend, int threads, nb::handle cfg, nb::dict tensors, int repeat,
           int bf16_math) {
  const Tensors t(tensors, {NSA_FWD_INPUT_NAMES, "slc_indices_in", "o", "lse_cmp", "lse_slc",
                            "lse_win", "o_cmp", "o_slc", "o_win", "slc_indices_out"});
  nsa_fwd_params p;
  nsa_fwd_params_init(&p);
  fill_inputs(t, cfg, p.in);
  p.slc_indices_in = t["slc_indices_in"];
  p.o = t["o"];
  p.lse_cmp = t["lse_cmp"], p.lse_slc = t["lse_slc"], p.lse_win = t["lse_win"];
  p.o_cmp = t["o_cmp"], p.o_slc = t["o_slc"], p.o_win = t["o_win"];
  p.slc_indices_out = t["slc_indices_out"];
  const Context ctx(backend, threads, bf16_math);
  return timed(ctx, repeat, [&] { return nsa_fwd(ctx.get(), &p); });
}

void bwd(const std::string& backend, int threads, nb::handle cfg, nb::dict tensors) {
  const Tensors t(tensors, {NSA_FWD_INPUT_NAMES,
                            "slc_indices",
                            "lse_cmp",
                            "lse_slc",
                            "lse_win",
                            "o_cmp",
                            "o_slc",
                            "o_win",
                            "d_o",
                            "dq",
                            "dk",
                            "dv",
                            "dk_slc",
                            "dv_slc",
                            "dk_win",
                            "dv_win",
                            "dk_cmp",
                            "dv_cmp",
                            "dg_cmp",
                            "dg_slc",
                            "dg_win"});
  nsa_bwd_params p;
  nsa_bwd_params_init(&p);
  fill_inputs(t, cfg, p.in);
  p.slc_indices = t["slc_indices"];
  p.lse_cmp = t["lse_cmp"], p.lse_slc = t["lse_slc"], p.lse_win = t["lse_win"];
  p.o_cmp = t["o_cmp"], p.o_slc = t["o_slc"], p.o_win = t["o_win"];
  p.d_o = t["d_o"];
  p.dq = t["dq"], p.dk = t["dk"], p.dv = t["dv"];
  p.dk_slc = t["dk_slc"], p.dv_slc = t["dv_slc"], p.dk_win = t["dk_win"], p.dv_win = t["dv_win"];
  p.dk_cmp = t["dk_cmp"], p.dv_cmp = t["dv_cmp"];
  p.dg_cmp = t["dg_cmp"], p.dg_slc = t["dg_slc"], p.dg_win = t["dg_win"];
  const Context ctx(backend, threads);
  timed(ctx, 1, [&] { return nsa_bwd(ctx.get(), &p); });
}

#define NSA_MLP_NAMES "pos", "w1", "b1", "w2", "b2"

// The compression's inputs, shared by nsa_compress_params and nsa_compress_bwd_params (the
// backward takes the forward's inputs again under the same names).
template <class Params>
void fill_compress_inputs(const Tensors& t, nb::handle cfg, const std::string& kind, Params& p) {
  p.cfg = to_config(cfg);
  p.kind = to_cmp_kind(kind);
  p.x = t["x"];
  const Seqlens s = t.seqlens();
  p.cu_seqlens = s.data, p.num_seqs = s.num_seqs;
  p.pos = t["pos"], p.w1 = t["w1"], p.b1 = t["b1"], p.w2 = t["w2"], p.b2 = t["b2"];
}

void compress(const std::string& backend, int threads, nb::handle cfg, const std::string& kind,
              nb::dict tensors) {
  const Tensors t(tensors, {"x", "cu_seqlens", NSA_MLP_NAMES, "out"});
  nsa_compress_params p;
  nsa_compress_params_init(&p);
  fill_compress_inputs(t, cfg, kind, p);
  p.out = t["out"];
  const Context ctx(backend, threads);
  timed(ctx, 1, [&] { return nsa_compress(ctx.get(), &p); });
}

void compress_bwd(const std::string& backend, int threads, nb::handle cfg, const std::string& kind,
                  nb::dict tensors) {
  const Tensors t(tensors, {"x", "cu_seqlens", NSA_MLP_NAMES, "dout", "dx", "dpos", "dw1", "db1",
                            "dw2", "db2"});
  nsa_compress_bwd_params p;
  nsa_compress_bwd_params_init(&p);
  fill_compress_inputs(t, cfg, kind, p);
  p.dout = t["dout"], p.dx = t["dx"];
  p.dpos = t["dpos"], p.dw1 = t["dw1"], p.db1 = t["db1"], p.dw2 = t["dw2"], p.db2 = t["db2"];
  const Context ctx(backend, threads);
  timed(ctx, 1, [&] { return nsa_compress_bwd(ctx.get(), &p); });
}

double dense_fwd(const std::string& backend, int threads, float scale, int window, nb::dict tensors,
                 int repeat, int bf16_math) {
  const Tensors t(tensors, {"q", "k", "v", "cu_seqlens", "o", "lse"});
  nsa_dense_fwd_params p;
  nsa_dense_fwd_params_init(&p);
  p.q = t["q"], p.k = t["k"], p.v = t["v"];
  const Seqlens s = t.seqlens();
  p.cu_seqlens = s.data, p.num_seqs = s.num_seqs;
  p.scale = scale, p.window = window;
  p.o = t["o"], p.lse = t["lse"];
  const Context ctx(backend, threads, bf16_math);
  return timed(ctx, repeat, [&] { return nsa_dense_fwd(ctx.get(), &p); });
}

void dense_bwd(const std::string& backend, int threads, float scale, int window, nb::dict tensors) {
  const Tensors t(tensors, {"q", "k", "v", "o", "lse", "d_o", "cu_seqlens", "dq", "dk", "dv"});
  nsa_dense_bwd_params p;
  nsa_dense_bwd_params_init(&p);
  p.q = t["q"], p.k = t["k"], p.v = t["v"], p.o = t["o"], p.lse = t["lse"], p.d_o = t["d_o"];
  const Seqlens s = t.seqlens();
  p.cu_seqlens = s.data, p.num_seqs = s.num_seqs;
  p.scale = scale, p.window = window;
  p.dq = t["dq"], p.dk = t["dk"], p.dv = t["dv"];
  const Context ctx(backend, threads);
  timed(ctx, 1, [&] { return nsa_dense_bwd(ctx.get(), &p); });
}

// cu_cmp[0..S] for cu_seqlens[0..S] (both int32 host descriptors).
void cmp_seqlens(nb::handle cfg, nb::handle cu_seqlens, nb::handle cu_cmp) {
  const nsa_config c = to_config(cfg);
  const Seqlens s = to_seqlens(cu_seqlens);
  const Seqlens out = to_seqlens(cu_cmp);
  if (out.num_seqs != s.num_seqs)
    throw nb::value_error("cu_cmp: needs as many entries as cu_seqlens");
  const nsa_status status =
      nsa_cmp_seqlens(nullptr, &c, s.data, s.num_seqs, const_cast<int32_t*>(out.data));
  if (status != NSA_OK) raise_status(status, "cu_seqlens: must start at 0 and never decrease");
}

}  // namespace

void bind_ops(nb::module_& m) {
  using nb::arg;
  m.def("fwd", &fwd, arg("backend"), arg("threads"), arg("cfg"), arg("tensors"), arg("repeat") = 1,
        arg("bf16_math") = 0, "nsa_fwd; returns the seconds spent in the C calls.");
  m.def("bwd", &bwd, arg("backend"), arg("threads"), arg("cfg"), arg("tensors"), "nsa_bwd.");
  m.def("compress", &compress, arg("backend"), arg("threads"), arg("cfg"), arg("kind"),
        arg("tensors"), "nsa_compress.");
  m.def("compress_bwd", &compress_bwd, arg("backend"), arg("threads"), arg("cfg"), arg("kind"),
        arg("tensors"), "nsa_compress_bwd.");
  m.def("dense_fwd", &dense_fwd, arg("backend"), arg("threads"), arg("scale"), arg("window"),
        arg("tensors"), arg("repeat") = 1, arg("bf16_math") = 0,
        "nsa_dense_fwd; returns the seconds in the C calls.");
  m.def("dense_bwd", &dense_bwd, arg("backend"), arg("threads"), arg("scale"), arg("window"),
        arg("tensors"), "nsa_dense_bwd.");
  m.def("cmp_seqlens", &cmp_seqlens, arg("cfg"), arg("cu_seqlens"), arg("cu_cmp"),
        "nsa_cmp_seqlens into the int32 array cu_cmp.");
}

}  // namespace nsa_py
