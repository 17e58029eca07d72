// API tests outside nsa_fwd / nsa_compress: status names, contexts and backends, configs, the
// Tc helpers, tensor descriptors, version, and the C++ layer (nsa.hpp).
#include <gtest/gtest.h>

#include <cstring>

#include "api_util.h"
#include "nsa/nsa.hpp"

using namespace nsa_test;

TEST(ApiMisc, StatusNameOfEveryCode) {
  const std::pair<nsa_status, const char*> names[] = {
      {NSA_OK, "NSA_OK"},
      {NSA_ERR_NULL_POINTER, "NSA_ERR_NULL_POINTER"},
      {NSA_ERR_INVALID_CONFIG, "NSA_ERR_INVALID_CONFIG"},
      {NSA_ERR_INVALID_SHAPE, "NSA_ERR_INVALID_SHAPE"},
      {NSA_ERR_INVALID_STRIDE, "NSA_ERR_INVALID_STRIDE"},
      {NSA_ERR_INVALID_DTYPE, "NSA_ERR_INVALID_DTYPE"},
      {NSA_ERR_INVALID_SEQLENS, "NSA_ERR_INVALID_SEQLENS"},
      {NSA_ERR_INVALID_INDEX, "NSA_ERR_INVALID_INDEX"},
      {NSA_ERR_INVALID_ARGUMENT, "NSA_ERR_INVALID_ARGUMENT"},
      {NSA_ERR_UNSUPPORTED, "NSA_ERR_UNSUPPORTED"},
      {NSA_ERR_OUT_OF_MEMORY, "NSA_ERR_OUT_OF_MEMORY"},
      {NSA_ERR_INTERNAL, "NSA_ERR_INTERNAL"}};
  for (auto [code, name] : names) EXPECT_STREQ(nsa_status_name(code), name);
  // Never NULL, even for a value no call returns.
  ASSERT_NE(nsa_status_name(static_cast<nsa_status>(99)), nullptr);
  EXPECT_STREQ(nsa_status_name(static_cast<nsa_status>(99)), "NSA_ERR_UNKNOWN");
}

TEST(ApiMisc, ConfigDefaultIsThePapers) {
  nsa_config c;
  std::memset(&c, 0xff, sizeof c);  // every field must be written
  nsa_config_default(&c);
  EXPECT_EQ(c.cmp_block, 32);
  EXPECT_EQ(c.cmp_stride, 16);
  EXPECT_EQ(c.slc_block, 64);
  EXPECT_EQ(c.slc_count, 16);
  EXPECT_EQ(c.slc_init, 1);
  EXPECT_EQ(c.slc_local, 2);
  EXPECT_EQ(c.window, 512);
  EXPECT_EQ(c.scale, 0.0f);
  nsa_config_default(nullptr);  // a no-op, not a crash
  // nsa_fwd_params_init and nsa_compress_params_init carry the same defaults.
  nsa_fwd_params p;
  nsa_fwd_params_init(&p);
  EXPECT_EQ(std::memcmp(&p.in.cfg, &c, sizeof c), 0);
  EXPECT_EQ(p.in.q.data, nullptr);
  EXPECT_EQ(p.in.cu_seqlens, nullptr);
  nsa_compress_params cp;
  nsa_compress_params_init(&cp);
  EXPECT_EQ(std::memcmp(&cp.cfg, &c, sizeof c), 0);
  EXPECT_EQ(cp.kind, NSA_CMP_MEAN);
}

TEST(ApiMisc, ConfigValidate) {
  nsa_config def;
  nsa_config_default(&def);
  Ctx ctx;
  for (const BadConfig& bad : bad_configs(def)) {
    SCOPED_TRACE(bad.what);
    EXPECT_EQ(nsa_config_validate(ctx.get(), &bad.cfg), NSA_ERR_INVALID_CONFIG);
    expect_message(ctx.error(), {bad.field});
    // Without a context the code is the same; there is just nowhere to put the message.
    EXPECT_EQ(nsa_config_validate(nullptr, &bad.cfg), NSA_ERR_INVALID_CONFIG);
  }
  EXPECT_EQ(nsa_config_validate(ctx.get(), nullptr), NSA_ERR_NULL_POINTER);
  expect_message(ctx.error(), {"cfg"});
  EXPECT_EQ(nsa_config_validate(ctx.get(), &def), NSA_OK);
  EXPECT_EQ(ctx.error(), "");
  // The edges of the valid range: d == l, n == n_init + n_local, no forced blocks, w = 1.
  for (nsa_config c : {config(32, 32, 64, 3, 1, 2, 512), config(1, 1, 1, 1, 0, 0, 1),
                       config(32, 16, 64, 16, 16, 0, 512)}) {
    EXPECT_EQ(nsa_config_validate(ctx.get(), &c), NSA_OK) << ctx.error();
  }
}

TEST(ApiMisc, CmpLen) {
  nsa_config c;
  nsa_config_default(&c);  // l = 32, d = 16
  const std::pair<int64_t, int64_t> cases[] = {{0, 0},    {1, 0},     {31, 0},      {32, 1},
                                               {47, 1},   {48, 2},    {63, 2},      {64, 3},
                                               {256, 15}, {1000, 61}, {65536, 4095}};
  for (auto [t, tc] : cases) EXPECT_EQ(nsa_cmp_len(&c, t), tc) << "t = " << t;
  const nsa_config same = config(16, 16, 64, 16, 1, 2, 512);  // non-overlapping blocks
  EXPECT_EQ(nsa_cmp_len(&same, 64), 4);
  EXPECT_EQ(nsa_cmp_len(&same, 79), 4);
  EXPECT_EQ(nsa_cmp_len(nullptr, 100), 0);
  EXPECT_EQ(nsa_cmp_len(&c, -5), 0);
}

TEST(ApiMisc, CmpSeqlens) {
  nsa_config c;
  nsa_config_default(&c);
  Ctx ctx;
  // Lengths 31, 32, 97, 0, 48 have Tc 0, 1, 5, 0, 2.
  const int32_t cu[] = {0, 31, 63, 160, 160, 208};
  int32_t out[6] = {-7, -7, -7, -7, -7, -7};
  ASSERT_EQ(nsa_cmp_seqlens(ctx.get(), &c, cu, 5, out), NSA_OK) << ctx.error();
  const int32_t want[] = {0, 0, 1, 6, 6, 8};
  for (int i = 0; i < 6; ++i) EXPECT_EQ(out[i], want[i]) << i;
  EXPECT_EQ(ctx.error(), "");

  struct Case {
    const char* what;
    const nsa_config* cfg;
    std::vector<int32_t> cu;  // empty: NULL
    int64_t n;
    bool null_out;
    nsa_status code;
    const char* needle;
  };
  nsa_config bad = c;
  bad.cmp_stride = 33;
  const Case cases[] = {
      {"NULL cfg", nullptr, {0, 4}, 1, false, NSA_ERR_NULL_POINTER, "cfg"},
      {"NULL cu_seqlens", &c, {}, 1, false, NSA_ERR_NULL_POINTER, "cu_seqlens"},
      {"NULL cu_cmp", &c, {0, 4}, 1, true, NSA_ERR_NULL_POINTER, "cu_cmp"},
      {"bad cfg", &bad, {0, 4}, 1, false, NSA_ERR_INVALID_CONFIG, "config.cmp_stride"},
      {"num_seqs 0", &c, {0, 4}, 0, false, NSA_ERR_INVALID_SEQLENS, "num_seqs"},
      {"not at 0", &c, {3, 4}, 1, false, NSA_ERR_INVALID_SEQLENS, "cu_seqlens[0]"},
      {"decreasing", &c, {0, 40, 39}, 2, false, NSA_ERR_INVALID_SEQLENS, "decreases"}};
  for (const Case& cs : cases) {
    SCOPED_TRACE(cs.what);
    int32_t dst[4] = {-7, -7, -7, -7};
    EXPECT_EQ(nsa_cmp_seqlens(ctx.get(), cs.cfg, cs.cu.empty() ? nullptr : cs.cu.data(), cs.n,
                              cs.null_out ? nullptr : dst),
              cs.code);
    expect_message(ctx.error(), {cs.needle});
    for (int32_t v : dst) EXPECT_EQ(v, -7);  // nothing written on error
  }
}

TEST(ApiMisc, TensorContiguous) {
  float buf[1];
  const int64_t shape[] = {2, 3, 4, 5};
  const nsa_tensor t = nsa_tensor_contiguous(buf, NSA_DTYPE_BF16, 4, shape);
  EXPECT_EQ(t.data, buf);
  EXPECT_EQ(t.dtype, NSA_DTYPE_BF16);
  EXPECT_EQ(t.ndim, 4);
  const int64_t strides[] = {60, 20, 5, 1};
  for (int i = 0; i < 4; ++i) {
    EXPECT_EQ(t.shape[i], shape[i]);
    EXPECT_EQ(t.stride[i], strides[i]);
  }
  const nsa_tensor r1 = nsa_tensor_contiguous(buf, NSA_DTYPE_F32, 1, shape + 3);
  EXPECT_EQ(r1.ndim, 1);
  EXPECT_EQ(r1.shape[0], 5);
  EXPECT_EQ(r1.stride[0], 1);
  // A zero size keeps the outer strides non-zero (the view is empty either way).
  const int64_t zero[] = {2, 0, 3};
  const nsa_tensor z = nsa_tensor_contiguous(buf, NSA_DTYPE_F32, 3, zero);
  EXPECT_EQ(z.stride[0], 3);
  EXPECT_EQ(z.stride[1], 3);
  EXPECT_EQ(z.stride[2], 1);
  // An impossible rank gives ndim 0, which every op rejects as a shape error.
  EXPECT_EQ(nsa_tensor_contiguous(buf, NSA_DTYPE_F32, 0, shape).ndim, 0);
  EXPECT_EQ(nsa_tensor_contiguous(buf, NSA_DTYPE_F32, 5, shape).ndim, 0);
  EXPECT_EQ(nsa_tensor_contiguous(buf, NSA_DTYPE_F32, 2, nullptr).ndim, 0);
}

TEST(ApiMisc, DtypeNamesAndSizes) {
  EXPECT_STREQ(nsa_dtype_name(NSA_DTYPE_F32), "f32");
  EXPECT_STREQ(nsa_dtype_name(NSA_DTYPE_BF16), "bf16");
  EXPECT_STREQ(nsa_dtype_name(NSA_DTYPE_F16), "f16");
  EXPECT_STREQ(nsa_dtype_name(NSA_DTYPE_I32), "i32");
  EXPECT_STREQ(nsa_dtype_name(static_cast<nsa_dtype>(9)), "unknown");
  EXPECT_EQ(nsa_dtype_size(NSA_DTYPE_F32), 4u);
  EXPECT_EQ(nsa_dtype_size(NSA_DTYPE_BF16), 2u);
  EXPECT_EQ(nsa_dtype_size(NSA_DTYPE_F16), 2u);
  EXPECT_EQ(nsa_dtype_size(NSA_DTYPE_I32), 4u);
  EXPECT_EQ(nsa_dtype_size(static_cast<nsa_dtype>(9)), 0u);
}

TEST(ApiMisc, ContextLifecycleAndThreads) {
  EXPECT_EQ(nsa_context_create(nullptr), NSA_ERR_NULL_POINTER);
  nsa_context_destroy(nullptr);  // a no-op
  Ctx ctx;
  EXPECT_EQ(nsa_context_backend(ctx.get()), NSA_BACKEND_AUTO);
  EXPECT_EQ(nsa_context_num_threads(ctx.get()), 0);
  EXPECT_EQ(ctx.error(), "");
  EXPECT_EQ(nsa_context_set_num_threads(ctx.get(), 3), NSA_OK);
  EXPECT_EQ(nsa_context_num_threads(ctx.get()), 3);
  EXPECT_EQ(nsa_context_set_num_threads(ctx.get(), -1), NSA_ERR_INVALID_ARGUMENT);
  expect_message(ctx.error(), {"num_threads"});
  EXPECT_EQ(nsa_context_num_threads(ctx.get()), 3);  // a failed call changes nothing
  // Bounded above: OpenMP aborts when it cannot start the team asked for (INT32_MAX threads).
  EXPECT_EQ(nsa_context_set_num_threads(ctx.get(), NSA_MAX_THREADS + 1), NSA_ERR_INVALID_ARGUMENT);
  expect_message(ctx.error(), {"num_threads", "1024"});
  EXPECT_EQ(nsa_context_set_num_threads(ctx.get(), INT32_MAX), NSA_ERR_INVALID_ARGUMENT);
  EXPECT_EQ(nsa_context_num_threads(ctx.get()), 3);
  EXPECT_EQ(nsa_context_set_num_threads(ctx.get(), NSA_MAX_THREADS), NSA_OK);
  EXPECT_EQ(nsa_context_num_threads(ctx.get()), NSA_MAX_THREADS);
  EXPECT_EQ(nsa_context_set_num_threads(ctx.get(), 3), NSA_OK);
  EXPECT_EQ(nsa_context_set_num_threads(ctx.get(), 0), NSA_OK);
  EXPECT_EQ(nsa_context_num_threads(ctx.get()), 0);
  EXPECT_EQ(ctx.error(), "");
  // NULL contexts: errors, and neutral answers from the getters.
  EXPECT_EQ(nsa_context_set_num_threads(nullptr, 2), NSA_ERR_NULL_POINTER);
  EXPECT_EQ(nsa_context_set_backend(nullptr, NSA_BACKEND_REF), NSA_ERR_NULL_POINTER);
  EXPECT_EQ(nsa_context_backend(nullptr), NSA_BACKEND_AUTO);
  EXPECT_EQ(nsa_context_num_threads(nullptr), 0);
  EXPECT_STREQ(nsa_last_error(nullptr), "");
}

TEST(ApiMisc, Backends) {
  EXPECT_EQ(nsa_backend_available(NSA_BACKEND_AUTO), 1);
  EXPECT_EQ(nsa_backend_available(NSA_BACKEND_REF), 1);
  EXPECT_EQ(nsa_backend_available(static_cast<nsa_backend>(99)), 0);
  EXPECT_STREQ(nsa_backend_name(NSA_BACKEND_AUTO), "auto");
  EXPECT_STREQ(nsa_backend_name(NSA_BACKEND_REF), "ref");
  EXPECT_STREQ(nsa_backend_name(NSA_BACKEND_CPU), "cpu");
  EXPECT_STREQ(nsa_backend_name(NSA_BACKEND_CUDA), "cuda");
  EXPECT_STREQ(nsa_backend_name(static_cast<nsa_backend>(99)), "unknown");

  Ctx ctx;
  ASSERT_EQ(nsa_context_set_backend(ctx.get(), NSA_BACKEND_REF), NSA_OK);
  for (int bad : {-1, 4, 99}) {
    EXPECT_EQ(nsa_context_set_backend(ctx.get(), static_cast<nsa_backend>(bad)),
              NSA_ERR_INVALID_ARGUMENT);
    expect_message(ctx.error(), {"backend", std::to_string(bad)});
    EXPECT_EQ(nsa_context_backend(ctx.get()), NSA_BACKEND_REF);  // unchanged
  }
  // CUDA is reserved: asking for it where it is missing is UNSUPPORTED, not a silent fallback.
  if (!nsa_backend_available(NSA_BACKEND_CUDA)) {
    EXPECT_EQ(nsa_context_set_backend(ctx.get(), NSA_BACKEND_CUDA), NSA_ERR_UNSUPPORTED);
    expect_message(ctx.error(), {"cuda", "not available"});
    EXPECT_EQ(nsa_context_backend(ctx.get()), NSA_BACKEND_REF);
  }
  EXPECT_EQ(nsa_context_set_backend(ctx.get(), NSA_BACKEND_AUTO), NSA_OK);
  EXPECT_EQ(ctx.error(), "");
}

// Contexts share nothing: an error on one leaves the other's message alone.
TEST(ApiMisc, ContextsAreIndependent) {
  Ctx a, b;
  EXPECT_EQ(nsa_context_set_num_threads(a.get(), -4), NSA_ERR_INVALID_ARGUMENT);
  EXPECT_EQ(b.error(), "");
  EXPECT_EQ(nsa_context_set_backend(b.get(), NSA_BACKEND_REF), NSA_OK);
  EXPECT_EQ(nsa_context_backend(a.get()), NSA_BACKEND_AUTO);
  expect_message(a.error(), {"num_threads"});
}

TEST(ApiMisc, VersionAndBuildInfo) {
  const std::string v = std::to_string(NSA_VERSION_MAJOR) + "." +
                        std::to_string(NSA_VERSION_MINOR) + "." + std::to_string(NSA_VERSION_PATCH);
  EXPECT_EQ(std::string(nsa_version()), v);
  ASSERT_NE(nsa_build_info(), nullptr);
  EXPECT_NE(std::string(nsa_build_info()).find("compiler"), std::string::npos);
}

// ---- The C++ layer: nsa::Error carries the C status and the context's message. ----

TEST(ApiCpp, ErrorCarriesStatusAndMessage) {
  nsa::Context ctx;
  nsa_config cfg = nsa::default_config();
  cfg.cmp_stride = cfg.cmp_block + 1;
  try {
    ctx.validate(cfg);
    ADD_FAILURE() << "an invalid config must throw";
  } catch (const nsa::Error& e) {
    EXPECT_EQ(e.status(), NSA_ERR_INVALID_CONFIG);
    expect_message(e.what(), {"NSA_ERR_INVALID_CONFIG", "config.cmp_stride"});
  }
  FwdFixture f;
  nsa_fwd_params p = f.full();
  p.in.q.data = nullptr;
  try {
    ctx.fwd(p);
    ADD_FAILURE() << "a NULL q must throw";
  } catch (const nsa::Error& e) {
    EXPECT_EQ(e.status(), NSA_ERR_NULL_POINTER);
    expect_message(e.what(), {"q: data is NULL"});
  }
  EXPECT_THROW(ctx.set_num_threads(-1), nsa::Error);
  if (!nsa_backend_available(NSA_BACKEND_CUDA)) {
    try {
      const nsa::Context cuda(NSA_BACKEND_CUDA);
      (void)cuda;
      ADD_FAILURE() << "an unavailable backend must throw";
    } catch (const nsa::Error& e) {
      EXPECT_EQ(e.status(), NSA_ERR_UNSUPPORTED);
    }
  }
  // After all that, a valid call goes through.
  EXPECT_NO_THROW(ctx.fwd(f.full()));
  EXPECT_EQ(std::string(nsa_last_error(ctx.get())), "");
}

TEST(ApiCpp, TensorHelpers) {
  std::vector<float> buf(2 * 3 * 4);
  const nsa_tensor t = nsa::tensor(buf.data(), {2, 3, 4});
  EXPECT_EQ(t.dtype, NSA_DTYPE_F32);
  EXPECT_EQ(t.ndim, 3);
  EXPECT_EQ(t.stride[0], 12);
  EXPECT_EQ(t.stride[1], 4);
  EXPECT_EQ(t.stride[2], 1);
  nsa::bf16 hb[8];
  const nsa_tensor s = nsa::tensor(hb, {2, 2}, {4, 1});
  EXPECT_EQ(s.dtype, NSA_DTYPE_BF16);
  EXPECT_EQ(s.stride[0], 4);
  EXPECT_EQ(s.stride[1], 1);
  nsa::f16 hh[3];
  EXPECT_EQ(nsa::tensor(hh, {3}).dtype, NSA_DTYPE_F16);
  int32_t ib[3];
  EXPECT_EQ(nsa::tensor(ib, {3}).dtype, NSA_DTYPE_I32);
}

// A legal slc_count far above the number of blocks must not make a backend allocate or fill in
// proportion to n per query (found by the fuzzer: REF aborted with bad_alloc, CPU returned
// out-of-memory). The reported indices are still padded with -1 to n.
TEST(ApiHugeSlcCount, ValidCallSucceedsOnEveryBackend) {
  using namespace nsa_test;
  Shape s;
  s.B = 1;
  s.T = 70;
  s.Hq = 2;
  s.Hkv = 1;
  s.Dk = 4;
  s.Dv = 4;
  for (nsa_backend b : {NSA_BACKEND_CPU, NSA_BACKEND_REF}) {
    FwdCase c = make_case(s, config(32, 16, 64, 16, 1, 2, 512), NSA_DTYPE_F32, 1);
    nsa_fwd_params p = c.params();
    p.in.cfg.slc_count = INT32_MAX;                                // valid: >= slc_init + slc_local
    std::memset(&p.slc_indices_out, 0, sizeof p.slc_indices_out);  // [.., n] would not fit
    std::string msg;
    EXPECT_EQ(run_fwd(b, c, &msg, &p), NSA_OK) << nsa_backend_name(b) << ": " << msg;
    // Every block is selected (n exceeds them), so o_slc is causal attention over all keys:
    // row 69 is finite.
    EXPECT_TRUE(std::isfinite(c.o_slc.at({0, 69, 1, 3})));
  }
  // With a caller-supplied n-wide output, the padding is -1 (n = 1000, T = 70: two blocks).
  FwdCase c = make_case(s, config(32, 16, 64, 1000, 1, 2, 512), NSA_DTYPE_F32, 1);
  for (nsa_backend b : {NSA_BACKEND_CPU, NSA_BACKEND_REF}) {
    ASSERT_EQ(run_fwd(b, c), NSA_OK);
    EXPECT_EQ(c.idx_out.at_i32({0, 69, 0, 0}), 0);
    EXPECT_EQ(c.idx_out.at_i32({0, 69, 0, 1}), 1);
    EXPECT_EQ(c.idx_out.at_i32({0, 69, 0, 2}), -1);
    EXPECT_EQ(c.idx_out.at_i32({0, 69, 0, 999}), -1);
  }
}

// Profiling is per context and off by default; when on, every stage of a CPU forward is timed.
TEST(ApiMisc, FwdProfile) {
  using namespace nsa_test;
  nsa_fwd_profile prof{};
  EXPECT_EQ(nsa_context_set_profiling(nullptr, 1), NSA_ERR_NULL_POINTER);
  nsa_context* ctx = nullptr;
  ASSERT_EQ(nsa_context_create(&ctx), NSA_OK);
  EXPECT_EQ(nsa_context_fwd_profile(ctx, nullptr), NSA_ERR_NULL_POINTER);
  EXPECT_EQ(nsa_context_fwd_profile(nullptr, &prof), NSA_ERR_NULL_POINTER);
  nsa_context_set_backend(ctx, NSA_BACKEND_CPU);
  Shape s;
  s.T = 300, s.Hq = 16, s.Hkv = 1, s.Dk = 16, s.Dv = 8;
  FwdCase c = make_case(s, config(32, 16, 64, 4, 1, 2, 64), NSA_DTYPE_F32, 3);
  nsa_fwd_params p = c.params();
  // Off (the default): nothing is recorded.
  ASSERT_EQ(nsa_fwd(ctx, &p), NSA_OK);
  ASSERT_EQ(nsa_context_fwd_profile(ctx, &prof), NSA_OK);
  EXPECT_EQ(prof.wall_s, 0.0);
  // On: every stage of this case does work (T = 300 selects among 5 blocks with n = 4).
  ASSERT_EQ(nsa_context_set_profiling(ctx, 1), NSA_OK);
  ASSERT_EQ(nsa_fwd(ctx, &p), NSA_OK);
  ASSERT_EQ(nsa_context_fwd_profile(ctx, &prof), NSA_OK);
  EXPECT_GT(prof.wall_s, 0.0);
  for (double stage : {prof.pack_s, prof.cmp_s, prof.scores_s, prof.topn_s, prof.slc_s, prof.win_s,
                       prof.combine_s}) {
    EXPECT_GT(stage, 0.0);
  }
  nsa_context_destroy(ctx);
}
