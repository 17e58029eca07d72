// Helpers shared by the API tests (test_api_fwd.cc, test_api_misc.cc): a table of invalid
// configs, and a check that a failed call left every output byte untouched (SPEC.md section 8).
#pragma once

#include <gtest/gtest.h>

#include <initializer_list>
#include <limits>
#include <string>
#include <vector>

#include "test_util.h"

namespace nsa_test {

// One invalid config: the mutation, and the field the error message must name.
struct BadConfig {
  const char* what;  // for failure messages
  nsa_config cfg;
  const char* field;  // substring the message must contain
};

// Every way a config can be wrong, applied to `base` (which must be valid).
inline std::vector<BadConfig> bad_configs(const nsa_config& base) {
  std::vector<BadConfig> v;
  auto add = [&](const char* what, const char* field, auto mutate) {
    nsa_config c = base;
    mutate(c);
    v.push_back({what, c, field});
  };
  add("cmp_block 0", "config.cmp_block", [](nsa_config& c) { c.cmp_block = 0; });
  add("cmp_block < 0", "config.cmp_block", [](nsa_config& c) { c.cmp_block = -32; });
  add("cmp_stride 0", "config.cmp_stride", [](nsa_config& c) { c.cmp_stride = 0; });
  add("cmp_stride < 0", "config.cmp_stride", [](nsa_config& c) { c.cmp_stride = -1; });
  add("cmp_stride > cmp_block", "config.cmp_stride",
      [](nsa_config& c) { c.cmp_stride = c.cmp_block + 1; });
  add("slc_block 0", "config.slc_block", [](nsa_config& c) { c.slc_block = 0; });
  add("slc_block < 0", "config.slc_block", [](nsa_config& c) { c.slc_block = -64; });
  add("slc_count 0", "config.slc_count", [](nsa_config& c) { c.slc_count = 0; });
  add("slc_count < 0", "config.slc_count", [](nsa_config& c) { c.slc_count = -3; });
  add("slc_count < init + local", "config.slc_count",
      [](nsa_config& c) { c.slc_count = c.slc_init + c.slc_local - 1; });
  add("slc_init < 0", "config.slc_init", [](nsa_config& c) { c.slc_init = -1; });
  add("slc_local < 0", "config.slc_local", [](nsa_config& c) { c.slc_local = -1; });
  add("window 0", "config.window", [](nsa_config& c) { c.window = 0; });
  add("window < 0", "config.window", [](nsa_config& c) { c.window = -512; });
  add("scale < 0", "config.scale", [](nsa_config& c) { c.scale = -0.125f; });
  add("scale NaN", "config.scale",
      [](nsa_config& c) { c.scale = std::numeric_limits<float>::quiet_NaN(); });
  add("scale +inf", "config.scale",
      [](nsa_config& c) { c.scale = std::numeric_limits<float>::infinity(); });
  add("scale -inf", "config.scale",
      [](nsa_config& c) { c.scale = -std::numeric_limits<float>::infinity(); });
  return v;
}

// The backing bytes of a set of output tensors, padding included, taken before a call that must
// fail, so that "the call wrote nothing" is checked byte for byte afterwards.
class OutputSnapshot {
 public:
  explicit OutputSnapshot(std::vector<const Tensor*> outputs) : outputs_(std::move(outputs)) {
    for (const Tensor* t : outputs_) bytes_.push_back(t->storage());
  }
  // Non-fatal: reports every tensor that changed.
  void expect_unchanged() const {
    for (size_t i = 0; i < outputs_.size(); ++i) {
      EXPECT_TRUE(outputs_[i]->storage() == bytes_[i]) << "output #" << i << " was written";
    }
  }

 private:
  std::vector<const Tensor*> outputs_;
  std::vector<std::vector<unsigned char>> bytes_;
};

// The backends an API test runs on: validation sits before dispatch, so each must reject alike.
inline std::vector<nsa_backend> test_backends() {
  std::vector<nsa_backend> b = {NSA_BACKEND_AUTO, NSA_BACKEND_REF};
  if (nsa_backend_available(NSA_BACKEND_CPU)) b.push_back(NSA_BACKEND_CPU);
  return b;
}

// Asserts that `message` is non-empty and contains every one of `needles`.
inline void expect_message(const std::string& message, const std::vector<std::string>& needles) {
  EXPECT_FALSE(message.empty()) << "a failed call must leave a message";
  for (const std::string& n : needles) {
    EXPECT_NE(message.find(n), std::string::npos)
        << "message \"" << message << "\" does not name \"" << n << "\"";
  }
}

// An owned context (tests must not leak one per failed assertion).
class Ctx {
 public:
  explicit Ctx(nsa_backend backend = NSA_BACKEND_AUTO) {
    EXPECT_EQ(nsa_context_create(&ctx_), NSA_OK);
    EXPECT_EQ(nsa_context_set_backend(ctx_, backend), NSA_OK) << nsa_last_error(ctx_);
  }
  ~Ctx() { nsa_context_destroy(ctx_); }
  Ctx(const Ctx&) = delete;
  Ctx& operator=(const Ctx&) = delete;
  nsa_context* get() const { return ctx_; }
  std::string error() const { return nsa_last_error(ctx_); }

 private:
  nsa_context* ctx_ = nullptr;
};

// ---- nsa_fwd argument tests (test_api_fwd*.cc) ----

// The base case: B = 2 (so batch mismatches show), GQA with G = 2, Dk != Dv, and a small config
// whose Tc = (64 - 16) / 8 + 1 = 7. Every tensor is a padded, NaN-filled view.
inline Shape base_shape() {
  Shape s;
  s.B = 2;
  s.T = 64;
  s.Hq = 4;
  s.Hkv = 2;
  s.Dk = 16;
  s.Dv = 8;
  return s;
}
inline nsa_config base_cfg() { return config(16, 8, 16, 4, 1, 1, 32); }

struct FwdFixture {
  FwdCase c = make_case(base_shape(), base_cfg(), NSA_DTYPE_F32, 7, true);
  // A caller-supplied selection of all -1 (empty, but valid), so slc_indices_in is present.
  Tensor idx_in = [] {
    const Shape s = base_shape();
    Tensor t(NSA_DTYPE_I32, {s.B, s.T, s.Hkv, base_cfg().slc_count}, true);
    t.fill(-1);
    return t;
  }();

  // Every optional argument present: per-branch K/V (aliasing k/v), indices in, all outputs.
  nsa_fwd_params full() {
    nsa_fwd_params p = c.params();
    p.in.k_slc = p.in.k_win = c.k.desc();
    p.in.v_slc = p.in.v_win = c.v.desc();
    p.slc_indices_in = idx_in.desc();
    return p;
  }
  std::vector<const Tensor*> outputs() const {
    return {&c.o, &c.o_cmp, &c.o_slc, &c.o_win, &c.lse_cmp, &c.lse_slc, &c.lse_win, &c.idx_out};
  }
};

// Runs `p` on every backend and checks: status `code`, a message containing `needles`, and no
// byte of the case's outputs (nor of `extra` replacement tensors) changed.
inline void expect_rejected(const char* what, const FwdFixture& f, const nsa_fwd_params& p,
                            nsa_status code, const std::vector<std::string>& needles,
                            const std::vector<const Tensor*>& extra = {}) {
  SCOPED_TRACE(what);
  std::vector<const Tensor*> outs = f.outputs();
  outs.insert(outs.end(), extra.begin(), extra.end());
  const OutputSnapshot snap(outs);
  for (nsa_backend b : test_backends()) {
    SCOPED_TRACE(nsa_backend_name(b));
    Ctx ctx(b);
    const nsa_status s = nsa_fwd(ctx.get(), &p);
    EXPECT_EQ(s, code) << nsa_status_name(s) << ": " << ctx.error();
    expect_message(ctx.error(), needles);
    snap.expect_unchanged();
  }
}

// A tensor field of nsa_fwd_params or nsa_bwd_params: one of the forward's inputs (params.in) or
// one of the params' own tensors; at(p, m) is the field itself.
template <typename Params>
struct Member {
  nsa_tensor nsa_fwd_inputs::*in = nullptr;
  nsa_tensor Params::*own = nullptr;
  Member(nsa_tensor nsa_fwd_inputs::*m) : in(m) {}  // NOLINT: implicit, for the tables
  Member(nsa_tensor Params::*m) : own(m) {}         // NOLINT
  bool operator==(nsa_tensor nsa_fwd_inputs::*m) const { return in == m; }
};
template <typename Params>
nsa_tensor& at(Params& p, const Member<Params>& m) {
  return m.in != nullptr ? p.in.*m.in : p.*m.own;
}

struct Field {
  const char* name;
  Member<nsa_fwd_params> member;
};
inline const Field kRequired[] = {
    {"q", &nsa_fwd_inputs::q},         {"k", &nsa_fwd_inputs::k},
    {"v", &nsa_fwd_inputs::v},         {"k_cmp", &nsa_fwd_inputs::k_cmp},
    {"v_cmp", &nsa_fwd_inputs::v_cmp}, {"g_cmp", &nsa_fwd_inputs::g_cmp},
    {"g_slc", &nsa_fwd_inputs::g_slc}, {"g_win", &nsa_fwd_inputs::g_win},
    {"o", &nsa_fwd_params::o}};
inline const Field kOptional[] = {{"k_slc", &nsa_fwd_inputs::k_slc},
                                  {"v_slc", &nsa_fwd_inputs::v_slc},
                                  {"k_win", &nsa_fwd_inputs::k_win},
                                  {"v_win", &nsa_fwd_inputs::v_win},
                                  {"o_cmp", &nsa_fwd_params::o_cmp},
                                  {"o_slc", &nsa_fwd_params::o_slc},
                                  {"o_win", &nsa_fwd_params::o_win},
                                  {"lse_cmp", &nsa_fwd_params::lse_cmp},
                                  {"lse_slc", &nsa_fwd_params::lse_slc},
                                  {"lse_win", &nsa_fwd_params::lse_win},
                                  {"slc_indices_in", &nsa_fwd_params::slc_indices_in},
                                  {"slc_indices_out", &nsa_fwd_params::slc_indices_out}};

inline Member<nsa_fwd_params> member(const std::string& name) {
  for (const Field& f : kRequired)
    if (name == f.name) return f.member;
  for (const Field& f : kOptional)
    if (name == f.name) return f.member;
  ADD_FAILURE() << "no tensor " << name;
  return &nsa_fwd_inputs::q;
}

// "name:" as the message starts with it; plain "k" would also match "k_cmp".
inline std::string named(const char* name) { return std::string(name) + ":"; }

// A padded tensor like `t` but with one size changed.
inline Tensor resized(const nsa_tensor& t, int dim, int64_t delta) {
  std::vector<int64_t> shape(t.shape, t.shape + t.ndim);
  shape[dim] += delta;
  return Tensor(t.dtype, shape, true);
}

}  // namespace nsa_test
