// The seam between the C API and the backends (src/common/backend.h): the table answers
// nsa_backend_available, an absent entry is NSA_ERR_UNSUPPORTED naming the backend and the call,
// and validation reads no tensor contents itself: cu_seqlens and caller indices reach the
// backend's content hooks, only after every descriptor check passed (nsa.h, "Where memory
// lives"), which is what lets a device backend take device pointers.
#include <gtest/gtest.h>

#include <string>

#include "api/call.h"
#include "nsa/nsa_cuda.h"
#include "api/validate.h"
#include "common/backend.h"
#include "decode_util.h"
#include "test_util.h"

namespace {

using nsa::Backend;
using nsa::Status;

TEST(BackendTable, AvailabilityComesFromTheTable) {
  EXPECT_EQ(nsa_backend_available(NSA_BACKEND_AUTO), 1);
  for (nsa_backend b : {NSA_BACKEND_REF, NSA_BACKEND_CPU, NSA_BACKEND_CUDA}) {
    const Backend* be = nsa::api::find_backend(b);
    EXPECT_EQ(nsa_backend_available(b), be != nullptr ? 1 : 0) << nsa_backend_name(b);
    if (be != nullptr) {
      EXPECT_EQ(be->id, b);
      EXPECT_STREQ(be->name, nsa_backend_name(b));
      EXPECT_TRUE(be->packed && be->indices && be->forward && be->compress && be->dense_forward);
      // Every host backend checks contents on the host and has every op of the contract.
      if (b != NSA_BACKEND_CUDA) {
        EXPECT_TRUE(be->backward && be->compress_backward && be->dense_backward);
      }
    }
  }
  // CUDA: built (NSA_CUDA) and a device present, or absent.
  EXPECT_EQ(nsa::api::find_backend(NSA_BACKEND_CUDA) != nullptr, nsa_cuda_device_count() > 0);
  EXPECT_EQ(nsa_backend_available(static_cast<nsa_backend>(42)), 0);
  EXPECT_STREQ(nsa_backend_name(static_cast<nsa_backend>(42)), "unknown");
}

// An absent entry: the message names the call and the backend.
TEST(BackendTable, AbsentEntryIsUnsupportedNamingBackendAndCall) {
  Backend fake;
  fake.name = "fake";
  nsa::FwdProblem pr;
  const Status s = nsa::api::run(fake, &Backend::forward, "nsa_fwd", pr);
  EXPECT_EQ(s.code, NSA_ERR_UNSUPPORTED);
  EXPECT_EQ(s.message, "nsa_fwd: the fake backend does not implement this call");
}

// The reference has no cache: each cache call on a REF context says which call and backend.
TEST(BackendTable, ReferenceHasNoCacheCalls) {
  nsa_test::Context cpu;
  const nsa_test::Shape s{1, 40, 2, 1, 16, 16};
  const nsa_config cfg = nsa_test::config(16, 8, 16, 4, 1, 1, 32);
  nsa_test::CachePtr cache =
      nsa_test::make_cache(cpu.ctx, cfg, 1, s.T, s, NSA_DTYPE_F32, NSA_CMP_MEAN, nullptr);
  ASSERT_TRUE(cache);
  nsa_test::Context ref;
  ASSERT_EQ(nsa_context_set_backend(ref.ctx, NSA_BACKEND_REF), NSA_OK);
  nsa_prefill_params pp;
  nsa_prefill_params_init(&pp);
  EXPECT_EQ(nsa_prefill(ref.ctx, cache.get(), &pp), NSA_ERR_UNSUPPORTED);
  EXPECT_EQ(ref.error(), "nsa_prefill: the ref backend does not implement this call");
  nsa_decode_params dp;
  nsa_decode_params_init(&dp);
  EXPECT_EQ(nsa_decode(ref.ctx, cache.get(), &dp), NSA_ERR_UNSUPPORTED);
  EXPECT_EQ(ref.error(), "nsa_decode: the ref backend does not implement this call");
  nsa_dense_decode_params ddp;
  nsa_dense_decode_params_init(&ddp);
  EXPECT_EQ(nsa_dense_decode(ref.ctx, cache.get(), &ddp), NSA_ERR_UNSUPPORTED);
  EXPECT_EQ(ref.error(), "nsa_dense_decode: the ref backend does not implement this call");
}

// A stand-in device backend: its content hooks read nothing and record that they ran.
struct Recorder {
  static inline int packed_calls = 0, index_calls = 0;
  static Status packed(const nsa::PackedArgs& a, std::vector<nsa::Sequence>*) {
    ++packed_calls;
    EXPECT_EQ(a.cmp[0].name, std::string("k_cmp"));
    EXPECT_EQ(a.cmp[1].name, std::string("v_cmp"));
    return Status::ok();
  }
  static Status indices(const nsa::IndexArgs&) {
    ++index_calls;
    return Status::ok();
  }
};

Backend recording_backend() {
  Backend be;
  be.name = "recorder";
  be.packed = Recorder::packed;
  be.indices = Recorder::indices;
  return be;
}

// Device-style validation: cu_seqlens and slc_indices_in point at memory the host must not read
// (an address no mapping holds); validation still passes, having handed both to the hooks once.
TEST(BackendTable, DescriptorChecksReadNoContents) {
  const nsa_test::Shape s{1, 70, 4, 2, 16, 8};
  const nsa_config cfg = nsa_test::config(16, 8, 16, 4, 1, 1, 32);
  nsa_test::FwdCase c = nsa_test::make_case(s, cfg, NSA_DTYPE_F32, 3, false, {0, 30, 70});
  nsa_test::Tensor idx(NSA_DTYPE_I32, {1, s.T, s.Hkv, cfg.slc_count});
  nsa_fwd_params p = c.params();
  p.slc_indices_in = idx.desc();
  // Unreadable pointers: a read would fault (and ASan would name it).
  p.in.cu_seqlens = reinterpret_cast<const int32_t*>(uintptr_t{16});
  p.slc_indices_in.data = reinterpret_cast<void*>(uintptr_t{64});
  const Backend be = recording_backend();
  Recorder::packed_calls = Recorder::index_calls = 0;
  nsa::FwdProblem pr;
  const Status st = nsa::make_fwd_problem(p, be, &pr);
  EXPECT_TRUE(st.is_ok()) << st.message;
  EXPECT_EQ(Recorder::packed_calls, 1);
  EXPECT_EQ(Recorder::index_calls, 1);
  EXPECT_EQ(pr.Tc, c.k_cmp.desc().shape[1]);  // packed: Tc from k_cmp, compared by the hook

  // A descriptor error is reported before any content hook runs.
  Recorder::packed_calls = Recorder::index_calls = 0;
  p.o.dtype = NSA_DTYPE_I32;
  EXPECT_EQ(nsa::make_fwd_problem(p, be, &pr).code, NSA_ERR_INVALID_DTYPE);
  EXPECT_EQ(Recorder::packed_calls + Recorder::index_calls, 0);
}

// The host hooks: cu_seqlens and the compressed rows it implies, each compressed tensor named.
TEST(BackendTable, HostPackedChecksEachCompressedTensor) {
  const nsa_config cfg = nsa_test::config(16, 8, 16, 4, 1, 1, 32);
  const int32_t cu[3] = {0, 30, 70};  // Tc = (30 - 16) / 8 + 1 + (40 - 16) / 8 + 1 = 2 + 4
  nsa::PackedArgs a;
  a.cfg = &cfg;
  a.cu_seqlens = cu;
  a.num_seqs = 2;
  a.T = 70;
  a.cmp[0] = {"k_cmp", 6};
  a.cmp[1] = {"v_cmp", 5};
  std::vector<nsa::Sequence> seqs;
  Status st = nsa::host_packed(a, &seqs);
  EXPECT_EQ(st.code, NSA_ERR_INVALID_SHAPE);
  EXPECT_NE(st.message.find("v_cmp: 5 compressed rows given, but Tc = 6"), std::string::npos)
      << st.message;
  a.cmp[1].rows = 6;
  st = nsa::host_packed(a, &seqs);
  ASSERT_TRUE(st.is_ok()) << st.message;
  ASSERT_EQ(seqs.size(), 2u);
  EXPECT_EQ(seqs[1].start, 30);
  EXPECT_EQ(seqs[1].cmp_start, 2);
  EXPECT_EQ(seqs[1].cmp_len, 4);
  a.T = 71;
  EXPECT_EQ(nsa::host_packed(a, &seqs).code, NSA_ERR_INVALID_SEQLENS);
}

}  // namespace
