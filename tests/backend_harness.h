// The backend harness of the numeric suites: which backends run, and how a test moves its host
// tensors into a backend's memory and back.
//
// Every numeric case builds its inputs on the host (Tensor, test_util.h), runs the float64
// reference (the oracle, SPEC.md section 1) on them there, and runs each backend under test on
// copies in that backend's memory (nsa.h, "Where memory lives"): REF and CPU read host memory,
// so their buffer helper is the identity; a device backend (CUDA) would copy. A new backend
// inherits every parameterised case by appearing in all_backends() (backend_harness.cc) with its
// buffer helper; nothing in the suites changes.
#pragma once

#include <gtest/gtest.h>

#include <cstddef>
#include <cstdint>
#include <iostream>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include <hwy/targets.h>

#include "api_util.h"
#include "test_util.h"

namespace nsa_test {

// Memory a backend owns, released by the helper that allocated it (RAII, move-only). Empty for
// the host identity: then nothing is owned.
class BackendMemory {
 public:
  using Free = void (*)(void*);
  BackendMemory() = default;
  BackendMemory(void* ptr, Free free) : ptr_(ptr, free) {}
  void* get() const { return ptr_.get(); }

 private:
  std::unique_ptr<void, Free> ptr_{nullptr, [](void*) {}};
};

// A tensor in a backend's memory: the descriptor to pass to the C API (same dtype, shape and
// strides as the host view it came from) and the memory it points into.
struct BackendTensor {
  nsa_tensor desc{};
  BackendMemory memory;
};

// int32 arrays (cu_seqlens) in a backend's memory.
struct BackendInts {
  const int32_t* data = nullptr;
  BackendMemory memory;
};

// Moves test data between the host and one backend's memory. upload copies the bytes a view
// spans, [data, data + end) (nsa.h, "Tensors"; strided gaps included, so padding a kernel must
// not write comes back with the result); download copies them back over the same host view.
class BufferHelper {
 public:
  virtual ~BufferHelper() = default;
  virtual BackendTensor upload(const nsa_tensor& host_view) const = 0;
  virtual void download(const BackendTensor& t, const nsa_tensor& host_view) const = 0;
  virtual BackendInts upload_ints(const int32_t* host, int64_t n) const = 0;

  BackendTensor upload(const Tensor& t) const { return upload(t.desc()); }
  void download(const BackendTensor& b, Tensor& t) const { download(b, t.desc()); }
};

// REF and CPU: every pointer is host memory, so the backend reads the test's own buffers.
const BufferHelper& host_buffers();
#ifdef NSA_HAVE_CUDA
// CUDA: device copies (cuda_buffers.cc). download waits for the device first, since the ops
// return before their kernels ran (nsa_cuda.h).
const BufferHelper& cuda_buffers();
// The CUDA cache's compressed tokens, as cache_cmp below reads them.
void cuda_cache_cmp(const nsa_kv_cache& cache, int64_t seq, int64_t b, int64_t row0, Tensor& k_cmp,
                    Tensor& v_cmp);
#endif
// The bytes a view spans, [data, data + end) (nsa.h, "Tensors"): 0 when a size is 0.
int64_t view_bytes(const nsa_tensor& t);
// Rows [0, n) of a contiguous [n, H, D] host buffer of dtype dt (f32 or bf16) into rows
// row0 .. row0 + n of batch row b of t ([B, T, H, D]): a device cache's tokens, read back.
void copy_rows_into(const void* bytes, nsa_dtype dt, int64_t n, int64_t H, int64_t D, int64_t b,
                    int64_t row0, Tensor& t);

// The op families a backend implements (its table's entries): a parameterised suite runs on the
// backends that have its op, so a backend with part of the API still runs every case it can.
enum Op : uint32_t {
  kOpFwd = 1u << 0,
  kOpBwd = 1u << 1,
  kOpCompress = 1u << 2,
  kOpCompressBwd = 1u << 3,
  kOpDense = 1u << 4,
  kOpDenseBwd = 1u << 5,
  kOpDecode = 1u << 6,  // the KV cache: create, append, prefill, decode, dense decode
  kOpAll = (1u << 7) - 1,
};

// One backend under test (a GoogleTest value parameter: copyable, printed by name).
struct BackendUnderTest {
  nsa_backend id = NSA_BACKEND_AUTO;
  const char* name = "";  // test-name suffix: "cpu"
  const BufferHelper* buffers = nullptr;
  // Writes the compressed tokens of cache sequence `seq` into rows [row0, row0 + Tc) of batch
  // row `b` of host tensors k_cmp/v_cmp ([B, Tc, Hkv, D]), so that the oracle's forward reads
  // what decode read (SPEC 7). nullptr: the backend has no KV cache; the decode cases skip it.
  void (*cache_cmp)(const nsa_kv_cache& cache, int64_t seq, int64_t b, int64_t row0, Tensor& k_cmp,
                    Tensor& v_cmp) = nullptr;
  uint32_t ops = kOpAll;  // the Op bits it implements
};

// The oracle: the float64 reference, on host memory.
const BackendUnderTest& oracle();
// Every backend this build has and can run here, except the oracle (comparing REF with itself is
// pointless), that implements every op in `ops`.
std::vector<BackendUnderTest> backends_under_test(uint32_t ops);
// The entry for `id` (CPU-only tests name theirs). Fails the test if the build lacks it.
BackendUnderTest backend(nsa_backend id);

void PrintTo(const BackendUnderTest& b, std::ostream* os);
// The name generator of INSTANTIATE_TEST_SUITE_P: "cpu".
std::string backend_test_name(const ::testing::TestParamInfo<BackendUnderTest>& info);

// The name generator of a suite over (backend, case) pairs: "cpu_7".
template <typename Case>
std::string backend_case_name(
    const ::testing::TestParamInfo<std::tuple<BackendUnderTest, Case>>& info) {
  return std::string(std::get<0>(info.param).name) + "_" + std::to_string(info.index);
}

// The tensors of one call moved to a backend: inputs uploaded, outputs uploaded (their prior
// bytes included, for "nothing written" checks) and downloaded by download_outputs(). Absent
// tensors (data NULL) stay absent. The staged copies live as long as the Staging.
class Staging {
 public:
  explicit Staging(const BufferHelper& b) : b_(b) {}
  explicit Staging(const BackendUnderTest& b) : b_(*b.buffers) {}
  nsa_tensor in(const nsa_tensor& host);
  nsa_tensor out(const nsa_tensor& host);
  const int32_t* ints(const int32_t* host, int64_t n);
  void download_outputs();

 private:
  const BufferHelper& b_;
  std::vector<std::unique_ptr<BackendTensor>> ins_;
  std::vector<std::pair<std::unique_ptr<BackendTensor>, nsa_tensor>> outs_;
  std::vector<BackendInts> ints_;
};

// Each op's params with every tensor and cu_seqlens staged (the host params are left as they
// are). seq_ids and the params structs stay host memory (nsa.h).
nsa_fwd_params stage(Staging& s, const nsa_fwd_params& p);
nsa_bwd_params stage(Staging& s, const nsa_bwd_params& p);
nsa_compress_params stage(Staging& s, const nsa_compress_params& p);
nsa_compress_bwd_params stage(Staging& s, const nsa_compress_bwd_params& p);
nsa_dense_fwd_params stage(Staging& s, const nsa_dense_fwd_params& p);
nsa_dense_bwd_params stage(Staging& s, const nsa_dense_bwd_params& p);
nsa_kv_cache_params stage(Staging& s, const nsa_kv_cache_params& p);
nsa_prefill_params stage(Staging& s, const nsa_prefill_params& p);

// The op a params type belongs to.
inline nsa_status call(nsa_context* c, const nsa_fwd_params* p) { return nsa_fwd(c, p); }
inline nsa_status call(nsa_context* c, const nsa_bwd_params* p) { return nsa_bwd(c, p); }
inline nsa_status call(nsa_context* c, const nsa_compress_params* p) { return nsa_compress(c, p); }
inline nsa_status call(nsa_context* c, const nsa_compress_bwd_params* p) {
  return nsa_compress_bwd(c, p);
}
inline nsa_status call(nsa_context* c, const nsa_dense_fwd_params* p) {
  return nsa_dense_fwd(c, p);
}
inline nsa_status call(nsa_context* c, const nsa_dense_bwd_params* p) {
  return nsa_dense_bwd(c, p);
}

// Runs host params `p` on backend `b` with `threads` threads (0: the default): stages them,
// calls the op, downloads the outputs into the host tensors `p` describes. The status, and the
// context's message through `msg`.
template <typename Params>
nsa_status run_on(const BackendUnderTest& b, const Params& p, int threads = 0,
                  std::string* msg = nullptr, nsa_bf16_math math = NSA_BF16_MATH_AUTO) {
  Staging st(b);
  const Params staged = stage(st, p);
  Ctx ctx(b.id);
  EXPECT_EQ(nsa_context_set_num_threads(ctx.get(), threads), NSA_OK);
  EXPECT_EQ(nsa_context_set_bf16_math(ctx.get(), math), NSA_OK);
  const nsa_status s = call(ctx.get(), &staged);
  st.download_outputs();
  if (msg) *msg = ctx.error();
  return s;
}

// Runs body() once per Highway target that this machine supports and the build generated, with
// the CPU kernels' dynamic dispatch pinned to it (targets are a CPU notion: CPU-only tests), and
// states in the log and the test's XML which targets ran and which were built but cannot run
// here. Fails if none ran.
template <typename Body>
void for_each_hwy_target(Body&& body) {
  const int64_t supported = hwy::SupportedTargets();
  std::string ran, not_here;
  for (int64_t target : hwy::SupportedAndGeneratedTargets()) {
    SCOPED_TRACE(std::string("target ") + hwy::TargetName(target));
    hwy::SetSupportedTargetsForTest(target);
    body();
    hwy::SetSupportedTargetsForTest(0);  // back to every supported target
    ran += std::string(ran.empty() ? "" : " ") + hwy::TargetName(target);
  }
  for (int64_t bits = HWY_TARGETS & ~supported; bits != 0; bits &= bits - 1) {
    const int64_t target = bits & -bits;
    not_here += std::string(not_here.empty() ? "" : " ") + hwy::TargetName(target);
  }
  std::cout << "[ targets  ] ran: " << ran
            << "; built but unsupported here: " << (not_here.empty() ? "none" : not_here)
            << std::endl;
  ::testing::Test::RecordProperty("hwy_targets_ran", ran);
  ::testing::Test::RecordProperty("hwy_targets_unsupported", not_here);
  EXPECT_FALSE(ran.empty()) << "no Highway target ran";
}

}  // namespace nsa_test
