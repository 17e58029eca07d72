// The CUDA backend's own tests (ctest label `cuda`). The parameterised suites (FwdVsRef,
// CompressVsRef, DenseVsRef, ...) run every case on CUDA as soon as a device is present
// (backend_harness.cc); this file adds what is particular to a device backend:
//   - everywhere: the API of nsa_cuda.h and what a build without a device answers;
//   - with a device (skipped with a message without one): same bits on two runs, the context's
//     stream, the workspace, shared-memory limits reported as UNSUPPORTED, and device content
//     checks (invalid cu_seqlens, out-of-range caller indices) that never read or write outside
//     the tensors.
#include <gtest/gtest.h>

#include <cstring>
#include <string>

#include "backend_harness.h"
#include "decode_util.h"
#include "nsa/nsa.hpp"
#include "nsa/nsa_cuda.h"
#include "test_util.h"

#ifdef NSA_HAVE_CUDA
#include <cuda_runtime.h>
#endif

namespace {
using namespace nsa_test;

bool have_device() { return nsa_cuda_device_count() > 0; }

#define SKIP_WITHOUT_DEVICE()                                                              \
  do {                                                                                     \
    if (!have_device()) {                                                                  \
      GTEST_SKIP() << "no CUDA device here (nsa_cuda_device_count() = 0): this case runs " \
                      "on a GPU machine (scripts/gpu-check.sh)";                           \
    }                                                                                      \
  } while (0)

TEST(CudaApi, AvailabilityIsADevicePresent) {
  EXPECT_GE(nsa_cuda_device_count(), 0);
  EXPECT_EQ(nsa_backend_available(NSA_BACKEND_CUDA), have_device() ? 1 : 0);
#ifndef NSA_HAVE_CUDA
  EXPECT_EQ(nsa_cuda_device_count(), 0);  // not built: never a device
#endif
}

// Asking for CUDA where it cannot run is UNSUPPORTED with the reason, never a host fallback.
TEST(CudaApi, UnavailableBackendSaysWhy) {
  if (have_device()) GTEST_SKIP() << "a CUDA device is present: the backend is available";
  Ctx ctx;
  EXPECT_EQ(nsa_context_set_backend(ctx.get(), NSA_BACKEND_CUDA), NSA_ERR_UNSUPPORTED);
#ifdef NSA_HAVE_CUDA
  EXPECT_NE(ctx.error().find("no device was found"), std::string::npos) << ctx.error();
#else
  EXPECT_NE(ctx.error().find("not available in this build"), std::string::npos) << ctx.error();
#endif
  EXPECT_EQ(nsa_context_backend(ctx.get()), NSA_BACKEND_AUTO);
}

TEST(CudaApi, StreamIsAContextSetting) {
  Ctx a, b;
  EXPECT_EQ(nsa_context_cuda_stream(a.get()), nullptr);  // the default stream
  int token = 0;                                         // any address stands in for a stream
  EXPECT_EQ(nsa_context_set_cuda_stream(a.get(), &token), NSA_OK);
  EXPECT_EQ(nsa_context_cuda_stream(a.get()), &token);
  EXPECT_EQ(nsa_context_cuda_stream(b.get()), nullptr);  // contexts share nothing
  EXPECT_EQ(nsa_context_set_cuda_stream(a.get(), nullptr), NSA_OK);
  EXPECT_EQ(nsa_context_cuda_stream(a.get()), nullptr);
  EXPECT_EQ(nsa_context_set_cuda_stream(nullptr, &token), NSA_ERR_NULL_POINTER);
  EXPECT_EQ(nsa_context_cuda_stream(nullptr), nullptr);
  nsa::Context cpp;  // the C++ layer
  cpp.set_cuda_stream(&token);
  EXPECT_EQ(nsa_context_cuda_stream(cpp.get()), &token);
}

TEST(CudaApi, WorkspaceNeedsTheBackend) {
  EXPECT_EQ(nsa_context_reserve_cuda_workspace(nullptr, 16), NSA_ERR_NULL_POINTER);
  EXPECT_EQ(nsa_context_cuda_workspace_size(nullptr), 0u);
  Ctx ctx;
  EXPECT_EQ(nsa_context_cuda_workspace_size(ctx.get()), 0u);
  if (have_device()) {
    ASSERT_EQ(nsa_context_reserve_cuda_workspace(ctx.get(), 1 << 20), NSA_OK) << ctx.error();
    EXPECT_GE(nsa_context_cuda_workspace_size(ctx.get()), size_t{1} << 20);
    ASSERT_EQ(nsa_context_reserve_cuda_workspace(ctx.get(), 16), NSA_OK);  // never shrinks
    EXPECT_GE(nsa_context_cuda_workspace_size(ctx.get()), size_t{1} << 20);
  } else {
    EXPECT_EQ(nsa_context_reserve_cuda_workspace(ctx.get(), 16), NSA_ERR_UNSUPPORTED);
    EXPECT_NE(ctx.error().find("cuda"), std::string::npos) << ctx.error();
    EXPECT_EQ(nsa_context_cuda_workspace_size(ctx.get()), 0u);
  }
}

#ifdef NSA_HAVE_CUDA

BackendUnderTest cuda() { return backend(NSA_BACKEND_CUDA); }

// A case where the top-n binds (T / l' + 1 > n), bf16 inputs, the whole group in one block.
FwdCase selective_case(uint64_t seed, bool padded = false, std::vector<int32_t> cu = {}) {
  const Shape s{1, 1500, 16, 1, 64, 32};
  return make_case(s, config(32, 16, 64, 5, 1, 2, 128), NSA_DTYPE_BF16, seed, padded,
                   std::move(cu));
}

bool same_bytes(const Tensor& a, const Tensor& b) { return a.storage() == b.storage(); }

TEST(CudaFwd, TwoRunsGiveTheSameBits) {
  SKIP_WITHOUT_DEVICE();
  FwdCase one = selective_case(7), two = selective_case(7);
  std::string msg;
  ASSERT_EQ(run_on(cuda(), one.params(), 0, &msg), NSA_OK) << msg;
  ASSERT_EQ(run_on(cuda(), two.params(), 0, &msg), NSA_OK) << msg;
  for (auto [name, a, b] :
       {std::tuple{"o", &one.o, &two.o}, std::tuple{"lse_cmp", &one.lse_cmp, &two.lse_cmp},
        std::tuple{"idx", &one.idx_out, &two.idx_out}}) {
    EXPECT_TRUE(same_bytes(*a, *b)) << name;
  }
}

// The context's stream carries the work: the result, read after that stream alone is
// synchronised, is the default stream's, bit for bit.
TEST(CudaFwd, RunsOnTheContextsStream) {
  SKIP_WITHOUT_DEVICE();
  FwdCase base = selective_case(11), on_stream = selective_case(11);
  std::string msg;
  ASSERT_EQ(run_on(cuda(), base.params(), 0, &msg), NSA_OK) << msg;
  cudaStream_t stream = nullptr;
  ASSERT_EQ(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), cudaSuccess);
  {
    Staging st(cuda());
    const nsa_fwd_params p = stage(st, on_stream.params());
    Ctx ctx(NSA_BACKEND_CUDA);
    ASSERT_EQ(nsa_context_set_cuda_stream(ctx.get(), stream), NSA_OK);
    ASSERT_EQ(nsa_fwd(ctx.get(), &p), NSA_OK) << ctx.error();
    ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
    st.download_outputs();
  }
  cudaStreamDestroy(stream);
  EXPECT_TRUE(same_bytes(base.o, on_stream.o));
  EXPECT_TRUE(same_bytes(base.idx_out, on_stream.idx_out));
}

// An index past the query's last block is ignored like -1 (a device call cannot report it,
// nsa.h "Where memory lives"): the result equals the one with -1 there.
TEST(CudaFwd, OutOfRangeCallerIndexIsIgnored) {
  SKIP_WITHOUT_DEVICE();
  FwdCase bad = selective_case(3), good = selective_case(3);
  const nsa_config& cfg = bad.cfg;
  Tensor in_bad(NSA_DTYPE_I32, {1, bad.shape.T, 1, cfg.slc_count});
  Tensor in_good(NSA_DTYPE_I32, {1, bad.shape.T, 1, cfg.slc_count});
  for (int64_t t = 0; t < bad.shape.T; ++t) {
    for (int64_t i = 0; i < cfg.slc_count; ++i) {
      const int64_t j = i == 0 ? 0 : i == 1 ? t / cfg.slc_block : -1;
      in_good.set({0, t, 0, i}, static_cast<double>(j));
      in_bad.set({0, t, 0, i}, static_cast<double>(i == 2 ? t / cfg.slc_block + 3 : j));
    }
  }
  nsa_fwd_params pb = bad.params(), pg = good.params();
  pb.slc_indices_in = in_bad.desc();
  pg.slc_indices_in = in_good.desc();
  std::string msg;
  ASSERT_EQ(run_on(cuda(), pb, 0, &msg), NSA_OK) << msg;
  ASSERT_EQ(run_on(cuda(), pg, 0, &msg), NSA_OK) << msg;
  EXPECT_TRUE(same_bytes(bad.o, good.o));
  EXPECT_TRUE(same_bytes(bad.idx_out, good.idx_out));
}

// cu_seqlens that decrease, or do not end at T, are not reported (the host never reads them):
// the call succeeds, and nothing outside the outputs' elements is written (the padding of the
// strided outputs keeps its NaN fill).
TEST(CudaFwd, InvalidSeqlensStayInBounds) {
  SKIP_WITHOUT_DEVICE();
  for (std::vector<int32_t> cu :
       {std::vector<int32_t>{0, 900, 400, 1500}, std::vector<int32_t>{0, 700, 2000},
        std::vector<int32_t>{5, 1500}}) {
    FwdCase c = make_case({1, 1500, 16, 1, 64, 32}, config(32, 16, 64, 5, 1, 2, 128),
                          NSA_DTYPE_BF16, 5, /*padded=*/true, {0, 700, 1500});
    nsa_fwd_params p = c.params();
    p.in.cu_seqlens = cu.data();
    p.in.num_seqs = static_cast<int64_t>(cu.size()) - 1;
    std::string msg;
    ASSERT_EQ(run_on(cuda(), p, 0, &msg), NSA_OK) << msg;
    const int64_t elems = static_cast<int64_t>(c.o.storage().size() / 4);
    int64_t nan = 0;
    for (int64_t i = 0; i < elems; ++i) nan += std::isnan(c.o.get_raw(i)) ? 1 : 0;
    EXPECT_GE(nan, elems - c.o.numel()) << "padding of o written";
  }
}

// A group whose queries and accumulators exceed a block's shared memory is UNSUPPORTED, named.
TEST(CudaFwd, SharedMemoryLimitIsReported) {
  SKIP_WITHOUT_DEVICE();
  FwdCase c =
      make_case({1, 40, 512, 1, 256, 256}, config(16, 8, 16, 4, 1, 1, 32), NSA_DTYPE_BF16, 1);
  std::string msg;
  EXPECT_EQ(run_on(cuda(), c.params(), 0, &msg), NSA_ERR_UNSUPPORTED);
  EXPECT_NE(msg.find("shared memory"), std::string::npos) << msg;
}

// A decode step is enqueued without waiting for the host (nsa_cuda.h), so it can be captured into
// a CUDA graph: a step without an append, captured on the context's stream and replayed, writes
// the bits a direct call writes. (A captured step keeps the lengths it was captured at: the
// lengths are launch parameters.) At T = 1500 the step splits its keys (cuda/split.cuh): its
// scratch, grown by the direct call, is reused inside the capture.
void expect_graph_equals_direct(int64_t T) {
  const Shape s{1, T, 16, 2, 64, 32};
  const nsa_config cfg = config(32, 16, 64, 4, 1, 2, 128);
  FwdCase c = make_case(s, cfg, NSA_DTYPE_BF16, 9), direct = make_case(s, cfg, NSA_DTYPE_BF16, 9),
          graph = make_case(s, cfg, NSA_DTYPE_BF16, 9);
  cudaStream_t stream = nullptr;
  ASSERT_EQ(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), cudaSuccess);
  {
    Ctx ctx(NSA_BACKEND_CUDA);
    ASSERT_EQ(nsa_context_set_cuda_stream(ctx.get(), stream), NSA_OK);
    CachePtr cache = make_cache(ctx.get(), cfg, 1, s.T, s, NSA_DTYPE_BF16, NSA_CMP_MEAN, nullptr,
                                nullptr, cuda_buffers());
    ASSERT_TRUE(cache);
    Staging st(cuda()), sd(cuda()), sg(cuda());
    const DecodeTensors x = DecodeTensors::staged(st, c, c);
    const nsa_prefill_params pp = prefill_rows(x, s.T - 1);
    ASSERT_EQ(nsa_prefill(ctx.get(), cache.get(), &pp), NSA_OK) << ctx.error();
    const nsa_decode_params last = decode_row(x, s.T - 1, /*append=*/true);
    ASSERT_EQ(nsa_decode(ctx.get(), cache.get(), &last), NSA_OK) << ctx.error();
    // Two more steps at the full length, without an append: one direct, one through a graph.
    const DecodeTensors xd = DecodeTensors::staged(sd, c, direct);
    const DecodeTensors xg = DecodeTensors::staged(sg, c, graph);
    const nsa_decode_params pd = decode_row(xd, s.T - 1, false),
                            pg = decode_row(xg, s.T - 1, false);
    ASSERT_EQ(nsa_decode(ctx.get(), cache.get(), &pd), NSA_OK) << ctx.error();
    cudaGraph_t g = nullptr;
    ASSERT_EQ(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal), cudaSuccess);
    const nsa_status captured = nsa_decode(ctx.get(), cache.get(), &pg);
    ASSERT_EQ(cudaStreamEndCapture(stream, &g), cudaSuccess);
    ASSERT_EQ(captured, NSA_OK) << ctx.error();
    cudaGraphExec_t exec = nullptr;
    ASSERT_EQ(cudaGraphInstantiate(&exec, g, 0), cudaSuccess);
    ASSERT_EQ(cudaGraphLaunch(exec, stream), cudaSuccess);
    ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
    cudaGraphExecDestroy(exec);
    cudaGraphDestroy(g);
    sd.download_outputs();
    sg.download_outputs();
  }
  cudaStreamDestroy(stream);
  const int64_t t = s.T - 1;
  for (int64_t h = 0; h < s.Hq; ++h) {
    for (int64_t x = 0; x < s.Dv; ++x) {
      ASSERT_EQ(direct.o.at({0, t, h, x}), graph.o.at({0, t, h, x})) << h << "," << x;
    }
  }
}

TEST(CudaDecode, StepCapturesIntoAGraph) {
  SKIP_WITHOUT_DEVICE();
  expect_graph_equals_direct(300);
  expect_graph_equals_direct(1500);
}

#endif  // NSA_HAVE_CUDA

}  // namespace
