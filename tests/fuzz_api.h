// One structured call of the C API per function, each built from a random source (fuzz_rng.h)
// and checked against the promises of nsa.h. Shared by the seeded fuzzer inside ctest
// (test_fuzz.cc) and the coverage-guided libFuzzer targets (fuzz/). Each call is valid, or broken
// in one chosen way whose status nsa.h fixes (fuzz_fwd.h, fuzz_compress.h, fuzz_mutate.h).
// Invariants, checked with GoogleTest assertions:
//   - no crash (and, in the sanitizer builds, no out-of-bounds access or undefined behaviour);
//   - an invalid call returns the status of its mutation with a non-empty message (a NULL
//     context has nowhere to put one) and leaves every buffer, inputs and outputs, byte-identical;
//   - a valid call returns NSA_OK with an empty message, writes every present output element and
//     no padding byte, never writes an input, and on small sizes the CPU backend matches the
//     float64 reference (fuzz_compare.h).
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <map>
#include <string>
#include <vector>

#include "c_enum_shim.h"
#include "fuzz_compare.h"

namespace nsa_fuzz {

inline std::map<std::string, int64_t>& status_counts() {
  static std::map<std::string, int64_t> m;
  return m;
}

// The backends an invalid call goes to: all of them, or one the input picks (budget()).
inline std::vector<nsa_backend> backends(Rng& r) {
  std::vector<nsa_backend> b = {NSA_BACKEND_AUTO, NSA_BACKEND_REF};
  if (nsa_backend_available(NSA_BACKEND_CPU)) b.push_back(NSA_BACKEND_CPU);
  if (!budget().every_backend) return {pick(r, b)};
  return b;
}

// Runs `call` (one of nsa_fwd / nsa_compress on ctx) on `backend` with a random thread count.
template <typename Call>
inline nsa_status on_backend(Rng& r, nsa_backend backend, std::string* msg, Call&& call) {
  nsa_context* ctx = nullptr;
  EXPECT_EQ(nsa_context_create(&ctx), NSA_OK);
  EXPECT_EQ(nsa_context_set_backend(ctx, backend), NSA_OK);
  EXPECT_EQ(nsa_context_set_num_threads(ctx, static_cast<int32_t>(uni(r, 0, 3))), NSA_OK);
  const nsa_status s = call(ctx);
  *msg = nsa_last_error(ctx);
  nsa_context_destroy(ctx);
  ++exec_count();
  ++status_counts()[nsa_status_name(s)];
  return s;
}

// The backend a valid call runs on when it is not compared: the CPU (directly or through AUTO),
// or, on cases cheap enough for it, the reference, so that its code is fuzzed too.
inline nsa_backend valid_backend(Rng& r, double cost) {
  const int64_t k = uni(r, 0, 2);
  if (k == 2 && cost <= 2e5) return NSA_BACKEND_REF;
  return k == 0 ? NSA_BACKEND_CPU : NSA_BACKEND_AUTO;
}

inline void expect_rejected(const Expect& e, nsa_status s, const std::string& msg, bool null_ctx) {
  const bool other = std::find(e.also.begin(), e.also.end(), s) != e.also.end();
  if (!other) {
    EXPECT_EQ(s, e.want) << e.what << ": got " << nsa_status_name(s) << " \"" << msg << "\"";
  }
  if (null_ctx) return;  // no context, no message
  EXPECT_FALSE(msg.empty()) << e.what << ": a failed call must leave a message";
  if (!e.needle.empty() && !other) {
    EXPECT_NE(msg.find(e.needle), std::string::npos)
        << e.what << ": message \"" << msg << "\" does not name \"" << e.needle << "\"";
  }
}

// A valid call returned: OK, no message, inputs intact, no padding byte written; with no token,
// nothing written at all, else every present output element written.
template <typename Written>
inline void expect_valid_result(nsa_status s, const std::string& msg, const Snapshot& ins,
                                const Snapshot& outs, bool no_work, Written&& written) {
  EXPECT_EQ(s, NSA_OK) << nsa_status_name(s) << ": " << msg;
  EXPECT_EQ(msg, "");
  ins.expect_unchanged("valid call: an input");
  outs.expect_padding_unchanged("valid call");
  if (no_work) outs.expect_unchanged("valid call without tokens: an output");
  else if (s == NSA_OK) written();
}

inline std::vector<std::vector<unsigned char>> bytes_of(const std::vector<Buf*>& bufs) {
  std::vector<std::vector<unsigned char>> v;
  for (const Buf* b : bufs) v.push_back(b->storage());
  return v;
}

inline void fuzz_fwd(Rng& r) {
  const BadDims bad = chance(r, 0.05) ? static_cast<BadDims>(uni(r, 1, 5)) : BadDims::kNone;
  FwdCase c = make_fwd(r, bad);
  FwdCall call = make_fwd_call(r, c, bad);
  SCOPED_TRACE("fwd " + c.text + " | " + call.e.what);
  auto run = [&](nsa_backend be, std::string* msg, const nsa_fwd_params* p) {
    return on_backend(r, be, msg, [&](nsa_context* ctx) {
      return nsa_fwd(call.null_ctx ? nullptr : ctx, call.null_params ? nullptr : p);
    });
  };
  std::string msg;
  if (call.e.want != NSA_OK) {
    const Snapshot all(c.all());
    for (nsa_backend be : backends(r)) {
      expect_rejected(call.e, run(be, &msg, &call.p), msg, call.null_ctx);
      all.expect_unchanged("invalid call");
    }
    if (call.restore_off >= 0) c.idx_in.set(call.restore_off, call.restore_val);
    return;
  }
  const Snapshot ins(c.inputs()), outs(c.outputs());
  const bool no_work = c.B == 0 || c.T == 0;
  auto written = [&] { expect_written(c); };
  // Cost of the reference, ~ queries x keys per query x head dims: compare where it is cheap.
  const double cost = double(c.B) * c.T * c.Hq * (c.Dk + c.Dv) * std::min<double>(c.T, 3.0 * 64);
  const nsa_backend fast = chance(r, 0.5) ? NSA_BACKEND_CPU : NSA_BACKEND_AUTO;
  if (cost > budget().compare_cost || !nsa_backend_available(NSA_BACKEND_CPU)) {
    expect_valid_result(run(valid_backend(r, cost), &msg, &call.p), msg, ins, outs, no_work,
                        written);
    return;
  }
  expect_valid_result(run(NSA_BACKEND_REF, &msg, &call.p), msg, ins, outs, no_work, written);
  const std::vector<std::vector<unsigned char>> ref = bytes_of(c.outs());
  outs.restore(c.outs());
  expect_valid_result(run(fast, &msg, &call.p), msg, ins, outs, no_work, written);
  if (no_work) return;
  compare_fwd(c, ref,
              [&](Buf* idx, std::vector<unsigned char>* r_idx, std::vector<unsigned char>* c_idx) {
                *idx = Buf(NSA_DTYPE_I32, {c.B, c.T, c.Hkv, c.n()}, r, LayoutOpts{false, true});
                nsa_fwd_params p = call.p;
                p.slc_indices_out = idx->desc();
                std::string m;
                const bool ok = run(NSA_BACKEND_REF, &m, &p) == NSA_OK;
                *r_idx = idx->storage();
                const bool ok2 = run(NSA_BACKEND_CPU, &m, &p) == NSA_OK;
                *c_idx = idx->storage();
                return ok && ok2;
              });
}

inline void fuzz_compress(Rng& r) {
  const CmpBad bad = chance(r, 0.05) ? static_cast<CmpBad>(uni(r, 1, 3)) : CmpBad::kNone;
  CmpCase c = make_cmp(r, bad);
  CmpCall call = make_cmp_call(r, c, bad);
  SCOPED_TRACE("compress " + c.text + " | " + call.e.what);
  auto run = [&](nsa_backend be, std::string* msg) {
    return on_backend(r, be, msg, [&](nsa_context* ctx) {
      return nsa_compress(call.null_ctx ? nullptr : ctx, call.null_params ? nullptr : &call.p);
    });
  };
  std::string msg;
  if (call.e.want != NSA_OK) {
    std::vector<const Buf*> all = c.inputs();
    all.push_back(&c.out);
    const Snapshot snap(all);
    for (nsa_backend be : backends(r)) {
      expect_rejected(call.e, run(be, &msg), msg, call.null_ctx);
      snap.expect_unchanged("invalid call");
    }
    return;
  }
  const Snapshot ins(c.inputs()), outs(c.outputs());
  const bool no_work = c.B == 0 || c.Tc == 0;
  auto written = [&] {
    int64_t bad_elems = 0;
    c.out.for_each([&](int64_t, int64_t, int64_t, int64_t, int64_t off) {
      bad_elems += !std::isfinite(c.out.get(off));
    });
    EXPECT_EQ(bad_elems, 0) << "out: elements unwritten or not finite";
  };
  const double per_token =
      c.kind == NSA_CMP_MLP ? double(c.Dh) * c.cfg.cmp_block * c.D : double(c.cfg.cmp_block) * c.D;
  const double cost = double(c.B) * c.Tc * c.H * per_token;
  const nsa_backend fast = chance(r, 0.5) ? NSA_BACKEND_CPU : NSA_BACKEND_AUTO;
  if (cost > budget().compare_cost || !nsa_backend_available(NSA_BACKEND_CPU)) {
    expect_valid_result(run(valid_backend(r, cost), &msg), msg, ins, outs, no_work, written);
    return;
  }
  expect_valid_result(run(NSA_BACKEND_REF, &msg), msg, ins, outs, no_work, written);
  const std::vector<unsigned char> ref = c.out.storage();
  outs.restore(c.outs());
  expect_valid_result(run(fast, &msg), msg, ins, outs, no_work, written);
  if (!no_work) compare_cmp(c, ref);
}

// The context setters and nsa_cmp_seqlens: a bad value is rejected and changes nothing.
inline void fuzz_misc(Rng& r) {
  nsa_context* ctx = nullptr;
  ASSERT_EQ(nsa_context_create(&ctx), NSA_OK);
  const int junk = pick(r, std::vector<int>{-1, 4, 99, std::numeric_limits<int>::min()});
  EXPECT_EQ(nsa_test_set_backend_int(ctx, junk), NSA_ERR_INVALID_ARGUMENT);
  EXPECT_STRNE(nsa_last_error(ctx), "");
  EXPECT_EQ(nsa_context_backend(ctx), NSA_BACKEND_AUTO);
  EXPECT_EQ(nsa_context_set_num_threads(ctx, -static_cast<int32_t>(uni(r, 1, 1000))),
            NSA_ERR_INVALID_ARGUMENT);
  EXPECT_EQ(nsa_context_num_threads(ctx), 0);
  const nsa_config cfg = random_config(r, false);
  std::vector<int32_t> cu = random_cu(r, uni(r, 0, 300));
  int64_t num = static_cast<int64_t>(cu.size()) - 1;
  std::vector<int32_t> out(cu.size(), -77);
  const bool valid = chance(r, 0.5);
  std::string what = "valid";
  if (!valid) {
    what = break_cu(r, cu, num);
    if (what == "cu_seqlens does not end at T")
      cu[0] = 3, what = "cu_seqlens[0] != 0";  // no T here
  }
  SCOPED_TRACE("nsa_cmp_seqlens: " + what);
  const nsa_status s = nsa_cmp_seqlens(ctx, &cfg, cu.data(), num, out.data());
  ++exec_count();
  if (valid) {
    EXPECT_EQ(s, NSA_OK) << nsa_last_error(ctx);
    for (size_t i = 0; i + 1 < cu.size(); ++i) {
      EXPECT_EQ(out[i + 1] - out[i], nsa_cmp_len(&cfg, cu[i + 1] - cu[i])) << i;
    }
    EXPECT_EQ(out[0], 0);
  } else {
    EXPECT_EQ(s, NSA_ERR_INVALID_SEQLENS) << nsa_last_error(ctx);
    EXPECT_STRNE(nsa_last_error(ctx), "");
    EXPECT_EQ(out, std::vector<int32_t>(cu.size(), -77)) << "cu_cmp written on error";
  }
  nsa_context_destroy(ctx);
}

}  // namespace nsa_fuzz
