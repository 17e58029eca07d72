// Out of memory, one allocation at a time (nsa.h: every call returns a status, the library never
// aborts, and a failed call writes no output). For each public call, on REF and CPU, with 1 and 2
// threads, allocation k of the call (k = 1, 2, ...; for the reference, which allocates per query,
// the first and last ones and a spread between) is made to fail. The call must then return
// NSA_ERR_OUT_OF_MEMORY with a message and leave every output byte and every KV-cache length as
// it was (or, where the library absorbs the failure, succeed with exactly a clean run's results),
// and once k passes the call's last allocation it must succeed.
//
// The hook sees every allocation of this process's C++ code (this file replaces the global
// operator new/delete, every variant) and the C allocations of libnsa.a's objects: the test is
// linked with -Wl,--wrap for malloc, calloc, realloc, aligned_alloc, posix_memalign and Highway's
// hwy::AllocateAlignedBytes (tests/CMakeLists.txt), which redirects the references of the
// objects in this link, the static library's included, to the __wrap_ functions below. It does
// not see what shared libraries allocate with their own malloc calls: OpenBLAS (the mlp
// compression's sgemm), libgomp (its thread pool) and libhwy (inside AllocateAlignedBytes, which
// is hooked as a whole). The hook is armed only around the call under test (GoogleTest
// allocates too). Run by hand, set OMP_WAIT_POLICY=passive as ctest does (tests/CMakeLists.txt).
#include <gtest/gtest.h>
#include <hwy/aligned_allocator.h>

#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <execinfo.h>
#include <functional>
#include <memory>
#include <new>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "nsa/nsa.h"
#include "decode_util.h"  // rows(), test_util.h

// ---- The hook. ----

namespace alloc_hook {

enum Kind { kNew, kMalloc, kCalloc, kRealloc, kAlignedAlloc, kPosixMemalign, kHwy };

std::atomic<bool> armed{false};
std::atomic<int64_t> seen{0};     // allocations since arming
std::atomic<int64_t> fail_at{0};  // the allocation to fail (1-based); 0: none, count only
std::atomic<int> fired{-1};       // the Kind that failed, -1 while none

// Whether this allocation (of `kind`) fails: it is the fail_at-th since arming. With
// NSA_ALLOC_BACKTRACE=k, failing allocation k prints where it was made (stderr), to find the
// code behind a reported failure.
bool should_fail(Kind kind) {
  if (!armed.load()) return false;
  const int64_t k = seen.fetch_add(1) + 1;
  if (k != fail_at.load()) return false;
  fired.store(kind);
  const char* trace = std::getenv("NSA_ALLOC_BACKTRACE");
  if (trace != nullptr && std::atoll(trace) == k) {
    void* frames[32];
    backtrace_symbols_fd(frames, backtrace(frames, 32), 2);
  }
  return true;
}

void arm(int64_t k) {
  seen.store(0);
  fail_at.store(k);
  fired.store(-1);
  armed.store(true);
}

void disarm() { armed.store(false); }

}  // namespace alloc_hook

using alloc_hook::should_fail;

// The real allocators (--wrap=X makes __real_X name X itself).
extern "C" {
void* __real_malloc(size_t n);
void* __real_calloc(size_t n, size_t size);
void* __real_realloc(void* p, size_t n);
void* __real_aligned_alloc(size_t align, size_t n);
int __real_posix_memalign(void** p, size_t align, size_t n);

void* __wrap_malloc(size_t n) {
  return should_fail(alloc_hook::kMalloc) ? nullptr : __real_malloc(n);
}
void* __wrap_calloc(size_t n, size_t size) {
  return should_fail(alloc_hook::kCalloc) ? nullptr : __real_calloc(n, size);
}
void* __wrap_realloc(void* p, size_t n) {
  return should_fail(alloc_hook::kRealloc) ? nullptr : __real_realloc(p, n);
}
void* __wrap_aligned_alloc(size_t align, size_t n) {
  return should_fail(alloc_hook::kAlignedAlloc) ? nullptr : __real_aligned_alloc(align, n);
}
int __wrap_posix_memalign(void** p, size_t align, size_t n) {
  return should_fail(alloc_hook::kPosixMemalign) ? ENOMEM : __real_posix_memalign(p, align, n);
}

// hwy::AllocateAlignedBytes(size_t, AllocPtr, void*), by its mangled name (Highway 1.0):
// hwy::AllocateAligned<T> is a header template, so every call site sits in libnsa.a's objects.
void* __real__ZN3hwy20AllocateAlignedBytesEmPFPvS0_mES0_(size_t n, hwy::AllocPtr alloc,
                                                         void* opaque);
void* __wrap__ZN3hwy20AllocateAlignedBytesEmPFPvS0_mES0_(size_t n, hwy::AllocPtr alloc,
                                                         void* opaque) {
  if (should_fail(alloc_hook::kHwy)) return nullptr;
  return __real__ZN3hwy20AllocateAlignedBytesEmPFPvS0_mES0_(n, alloc, opaque);
}
}  // extern "C"

// The global operator new and delete, every variant: malloc and free underneath (the real ones,
// so that an allocation counts once).
namespace {
void* new_or_null(size_t n, size_t align) {
  if (should_fail(alloc_hook::kNew)) return nullptr;
  if (n == 0) n = 1;
  if (align <= alignof(std::max_align_t)) return __real_malloc(n);
  void* p = nullptr;
  return __real_posix_memalign(&p, align, n) == 0 ? p : nullptr;
}
void* new_or_throw(size_t n, size_t align) {
  void* p = new_or_null(n, align);
  if (p == nullptr) throw std::bad_alloc();
  return p;
}
constexpr size_t kPlain = alignof(std::max_align_t);
size_t al(std::align_val_t a) { return static_cast<size_t>(a); }
}  // namespace

void* operator new(size_t n) { return new_or_throw(n, kPlain); }
void* operator new[](size_t n) { return new_or_throw(n, kPlain); }
void* operator new(size_t n, std::align_val_t a) { return new_or_throw(n, al(a)); }
void* operator new[](size_t n, std::align_val_t a) { return new_or_throw(n, al(a)); }
void* operator new(size_t n, const std::nothrow_t&) noexcept { return new_or_null(n, kPlain); }
void* operator new[](size_t n, const std::nothrow_t&) noexcept { return new_or_null(n, kPlain); }
void* operator new(size_t n, std::align_val_t a, const std::nothrow_t&) noexcept {
  return new_or_null(n, al(a));
}
void* operator new[](size_t n, std::align_val_t a, const std::nothrow_t&) noexcept {
  return new_or_null(n, al(a));
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, size_t) noexcept { std::free(p); }
void operator delete[](void* p, size_t) noexcept { std::free(p); }
void operator delete(void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete(void* p, size_t, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, size_t, std::align_val_t) noexcept { std::free(p); }
void operator delete(void* p, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete[](void* p, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete(void* p, std::align_val_t, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete[](void* p, std::align_val_t, const std::nothrow_t&) noexcept {
  std::free(p);
}

namespace {

using nsa_test::FwdCase;
using nsa_test::Shape;
using nsa_test::Tensor;

// ---- The calls under test. ----

// Every byte a call may write, labelled: output tensors (padding included), cache lengths.
using Snapshot = std::vector<std::pair<std::string, std::vector<unsigned char>>>;
using Named = std::vector<std::pair<std::string, const Tensor*>>;

struct Call {
  std::function<void()> reset;  // the start state: outputs poisoned, caches rebuilt
  std::function<nsa_status(nsa_context*)> run;
  std::function<Snapshot()> snapshot;
  bool ref_unsupported = false;  // the reference has no KV cache: NSA_ERR_UNSUPPORTED there
  bool keeps_scratch = false;    // the cache keeps decode's scratch: later calls allocate less
  std::set<int> must_fail;       // allocator kinds the CPU path reaches (so their hooks must fire)
  std::string known_issue;       // a cache length a failed call is known to change, and why
};

// Small shapes, so that failing each allocation in turn stays fast: T = 128, G = 2, Dk != Dv;
// Tc = 15 compressed tokens, 8 selection blocks of which n = 4 are chosen, a window of 32.
Shape small_shape() {
  Shape s;
  s.B = 1, s.T = 128, s.Hq = 4, s.Hkv = 2, s.Dk = 16, s.Dv = 8;
  return s;
}
nsa_config small_cfg() { return nsa_test::config(16, 8, 16, 4, 1, 1, 32); }
constexpr int64_t kDh = 8;  // the mlp compressor's hidden width
// Packed sequences of lengths 50, 1 and 77 (T = 128).
const std::vector<int32_t> kSeqlens = {0, 50, 51, 128};

// Packs the call's sequences as kSeqlens says.
template <typename Params>
void pack(Params& p) {
  p.cu_seqlens = kSeqlens.data();
  p.num_seqs = static_cast<int64_t>(kSeqlens.size()) - 1;
}

void poison(const Tensor& t) {
  std::memset(const_cast<unsigned char*>(t.storage().data()), 0xA5, t.storage().size());
}

// reset and snapshot for a call that writes the tensors outs(*d) names.
template <typename D, typename Outs>
void writes(Call& c, const std::shared_ptr<D>& d, Outs outs) {
  c.reset = [d, outs] {
    for (const auto& o : outs(*d)) poison(*o.second);
  };
  c.snapshot = [d, outs] {
    Snapshot s;
    for (const auto& [name, t] : outs(*d)) s.emplace_back(name, t->storage());
    return s;
  };
}

Tensor random_tensor(nsa_dtype dt, std::vector<int64_t> shape, std::mt19937_64& rng,
                     double lo = -1.0, double hi = 1.0) {
  Tensor t(dt, std::move(shape));
  t.fill_uniform(rng, lo, hi);
  return t;
}

Tensor shaped_as(const Tensor& t) {
  const nsa_tensor& d = t.desc();
  return Tensor(d.dtype, std::vector<int64_t>(d.shape, d.shape + d.ndim));
}

// The mlp compressor's parameters for head dim D: pos, w1, b1, w2, b2.
struct Mlp {
  Tensor t[5];
  Mlp(int64_t Hkv, int64_t l, int64_t D, nsa_dtype dt, std::mt19937_64& rng) {
    t[0] = random_tensor(dt, {Hkv, l, D}, rng, -0.5, 0.5);
    t[1] = random_tensor(dt, {Hkv, kDh, l * D}, rng, -0.1, 0.1);
    t[2] = random_tensor(dt, {Hkv, kDh}, rng, -0.1, 0.1);
    t[3] = random_tensor(dt, {Hkv, D, kDh}, rng, -0.5, 0.5);
    t[4] = random_tensor(dt, {Hkv, D}, rng, -0.1, 0.1);
  }
  void set(nsa_tensor* const (&fields)[5]) const {
    for (int i = 0; i < 5; ++i) *fields[i] = t[i].desc();
  }
};

std::unique_ptr<nsa_context, void (*)(nsa_context*)> context(nsa_backend b, int threads) {
  nsa_context* ctx = nullptr;
  EXPECT_EQ(nsa_context_create(&ctx), NSA_OK);
  EXPECT_EQ(nsa_context_set_backend(ctx, b), NSA_OK);
  EXPECT_EQ(nsa_context_set_num_threads(ctx, threads), NSA_OK);
  return {ctx, nsa_context_destroy};
}

// ---- Compression and its backward (packed sequences). ----

struct CompressData {
  Tensor x, dout, out, dx, dparam[5];
  std::unique_ptr<Mlp> mlp;
};

Call compress_call(nsa_cmp_kind kind, bool backward) {
  const Shape s = small_shape();
  const nsa_config cfg = small_cfg();
  const int64_t Tc = nsa_test::cmp_rows(cfg, s.T, kSeqlens);
  std::mt19937_64 rng(11);
  auto d = std::make_shared<CompressData>();
  d->x = random_tensor(NSA_DTYPE_F32, {1, s.T, s.Hkv, s.Dk}, rng);
  d->dout = random_tensor(NSA_DTYPE_F32, {1, Tc, s.Hkv, s.Dk}, rng);
  d->out = Tensor(NSA_DTYPE_F32, {1, Tc, s.Hkv, s.Dk});
  d->dx = shaped_as(d->x);
  const bool mlp = kind == NSA_CMP_MLP;
  if (mlp) {
    d->mlp = std::make_unique<Mlp>(s.Hkv, cfg.cmp_block, s.Dk, NSA_DTYPE_F32, rng);
    for (int i = 0; i < 5; ++i) d->dparam[i] = shaped_as(d->mlp->t[i]);
  }
  // The inputs, named alike in both calls' params.
  auto inputs = [d, kind, cfg](auto& p) {
    p.cfg = cfg, p.kind = kind, p.x = d->x.desc();
    pack(p);
    if (d->mlp) d->mlp->set({&p.pos, &p.w1, &p.b1, &p.w2, &p.b2});
  };
  Call c;
  if (!backward) {
    writes(c, d, [](CompressData& d) { return Named{{"out", &d.out}}; });
    c.run = [d, inputs](nsa_context* ctx) {
      nsa_compress_params p;
      nsa_compress_params_init(&p);
      inputs(p);
      p.out = d->out.desc();
      return nsa_compress(ctx, &p);
    };
    return c;
  }
  writes(c, d, [mlp](CompressData& d) {
    Named n = {{"dx", &d.dx}};
    if (mlp) {
      for (int i = 0; i < 5; ++i) n.emplace_back("dparam" + std::to_string(i), &d.dparam[i]);
    }
    return n;
  });
  c.run = [d, inputs](nsa_context* ctx) {
    nsa_compress_bwd_params p;
    nsa_compress_bwd_params_init(&p);
    inputs(p);
    if (d->mlp) {
      p.dpos = d->dparam[0].desc(), p.dw1 = d->dparam[1].desc(), p.db1 = d->dparam[2].desc();
      p.dw2 = d->dparam[3].desc(), p.db2 = d->dparam[4].desc();
    }
    p.dout = d->dout.desc();
    p.dx = d->dx.desc();
    return nsa_compress_bwd(ctx, &p);
  };
  return c;
}

// ---- The forward and the backward. ----

enum class Fwd { kFull, kVarlenBf16, kGivenSelection };

struct FwdData {
  FwdCase c;
  Tensor k_win, v_win, idx_in;  // the win branch's own K/V (kFull); a selection (kGivenSelection)
  Tensor d_o, dq, dk, dv, dk_win, dv_win, dk_cmp, dv_cmp, dg[3];  // the backward's
};

bool has(const Tensor& t) { return t.desc().data != nullptr; }

Named fwd_outputs(FwdData& d) {
  FwdCase& c = d.c;
  return {{"o", &c.o},           {"o_cmp", &c.o_cmp},     {"o_slc", &c.o_slc},
          {"o_win", &c.o_win},   {"lse_cmp", &c.lse_cmp}, {"lse_slc", &c.lse_slc},
          {"lse_win", &c.lse_win}, {"slc_indices_out", &c.idx_out}};
}

std::shared_ptr<FwdData> fwd_data(Fwd kind) {
  const Shape s = small_shape();
  const nsa_config cfg = small_cfg();
  const bool varlen = kind == Fwd::kVarlenBf16;
  auto d = std::make_shared<FwdData>();
  d->c = nsa_test::make_case(s, cfg, varlen ? NSA_DTYPE_BF16 : NSA_DTYPE_F32, 5, false,
                             varlen ? kSeqlens : std::vector<int32_t>{});
  std::mt19937_64 rng(17);
  if (kind == Fwd::kFull) {
    d->k_win = random_tensor(NSA_DTYPE_F32, {s.B, s.T, s.Hkv, s.Dk}, rng);
    d->v_win = random_tensor(NSA_DTYPE_F32, {s.B, s.T, s.Hkv, s.Dv}, rng);
  }
  if (kind == Fwd::kGivenSelection) {
    // Blocks in [0, t / l'] with repeats and -1 entries, as a caller may give them.
    d->idx_in = Tensor(NSA_DTYPE_I32, {s.B, s.T, s.Hkv, cfg.slc_count});
    d->idx_in.for_each([&](int64_t b, int64_t t, int64_t h, int64_t k) {
      const int64_t j = k == 3 ? -1 : (3 * t + h + 5 * k) % (t / cfg.slc_block + 1);
      d->idx_in.set_raw(d->idx_in.logical_offset(b, t, h, k), static_cast<double>(j));
    });
  }
  return d;
}

nsa_fwd_params fwd_params(FwdData& d) {
  nsa_fwd_params p = d.c.params();
  if (has(d.k_win)) p.k_win = d.k_win.desc(), p.v_win = d.v_win.desc();
  if (has(d.idx_in)) p.slc_indices_in = d.idx_in.desc();
  return p;
}

Call fwd_call(Fwd kind) {
  auto d = fwd_data(kind);
  Call c;
  writes(c, d, fwd_outputs);
  c.run = [d](nsa_context* ctx) {
    const nsa_fwd_params p = fwd_params(*d);
    return nsa_fwd(ctx, &p);
  };
  c.must_fail = {alloc_hook::kHwy, alloc_hook::kNew};
  return c;
}

Call bwd_call(Fwd kind, bool saved) {
  auto d = fwd_data(kind);
  {  // The forward's selection and saved state, once, with no allocation failing.
    auto ctx = context(NSA_BACKEND_CPU, 0);
    const nsa_fwd_params p = fwd_params(*d);
    EXPECT_EQ(nsa_fwd(ctx.get(), &p), NSA_OK) << nsa_last_error(ctx.get());
  }
  const Shape s = small_shape();
  const int64_t Tc = d->c.k_cmp.desc().shape[1];
  std::mt19937_64 rng(23);
  d->d_o = random_tensor(NSA_DTYPE_F32, {s.B, s.T, s.Hq, s.Dv}, rng);
  d->dq = Tensor(NSA_DTYPE_F32, {s.B, s.T, s.Hq, s.Dk});
  d->dk = Tensor(NSA_DTYPE_F32, {s.B, s.T, s.Hkv, s.Dk});
  d->dv = Tensor(NSA_DTYPE_F32, {s.B, s.T, s.Hkv, s.Dv});
  if (has(d->k_win)) d->dk_win = shaped_as(d->dk), d->dv_win = shaped_as(d->dv);
  d->dk_cmp = Tensor(NSA_DTYPE_F32, {s.B, Tc, s.Hkv, s.Dk});
  d->dv_cmp = Tensor(NSA_DTYPE_F32, {s.B, Tc, s.Hkv, s.Dv});
  for (Tensor& g : d->dg) g = Tensor(NSA_DTYPE_F32, {s.B, s.T, s.Hq});
  Call c;
  writes(c, d, [](FwdData& d) {
    Named n = {{"dq", &d.dq},         {"dk", &d.dk},         {"dv", &d.dv},
               {"dk_cmp", &d.dk_cmp}, {"dv_cmp", &d.dv_cmp}, {"dg_cmp", &d.dg[0]},
               {"dg_slc", &d.dg[1]},  {"dg_win", &d.dg[2]}};
    if (has(d.dk_win)) n.insert(n.end(), {{"dk_win", &d.dk_win}, {"dv_win", &d.dv_win}});
    return n;
  });
  c.run = [d, saved](nsa_context* ctx) {
    const FwdCase& f = d->c;
    const nsa_fwd_params fp = fwd_params(*d);
    nsa_bwd_params p;
    nsa_bwd_params_init(&p);
    p.cfg = fp.cfg;
    p.q = fp.q, p.k = fp.k, p.v = fp.v, p.k_win = fp.k_win, p.v_win = fp.v_win;
    p.k_cmp = fp.k_cmp, p.v_cmp = fp.v_cmp;
    p.g_cmp = fp.g_cmp, p.g_slc = fp.g_slc, p.g_win = fp.g_win;
    p.cu_seqlens = fp.cu_seqlens, p.num_seqs = fp.num_seqs;
    p.slc_indices = f.idx_out.desc();
    if (saved) {
      p.lse_cmp = fp.lse_cmp, p.lse_slc = fp.lse_slc, p.lse_win = fp.lse_win;
      p.o_cmp = fp.o_cmp, p.o_slc = fp.o_slc, p.o_win = fp.o_win;
    }
    p.d_o = d->d_o.desc();
    p.dq = d->dq.desc(), p.dk = d->dk.desc(), p.dv = d->dv.desc();
    if (has(d->dk_win)) p.dk_win = d->dk_win.desc(), p.dv_win = d->dv_win.desc();
    p.dk_cmp = d->dk_cmp.desc(), p.dv_cmp = d->dv_cmp.desc();
    p.dg_cmp = d->dg[0].desc(), p.dg_slc = d->dg[1].desc(), p.dg_win = d->dg[2].desc();
    return nsa_bwd(ctx, &p);
  };
  c.must_fail = {alloc_hook::kHwy, alloc_hook::kNew};
  return c;
}

// ---- Dense attention, forward and backward (packed sequences). ----

struct DenseData {
  Tensor q, k, v, o, lse, d_o, dq, dk, dv;
};

nsa_dense_fwd_params dense_params(DenseData& d, int32_t window) {
  nsa_dense_fwd_params p;
  nsa_dense_fwd_params_init(&p);
  p.q = d.q.desc(), p.k = d.k.desc(), p.v = d.v.desc();
  pack(p);
  p.window = window;
  p.o = d.o.desc(), p.lse = d.lse.desc();
  return p;
}

Call dense_call(bool backward) {
  const Shape s = small_shape();
  std::mt19937_64 rng(29);
  auto d = std::make_shared<DenseData>();
  d->q = random_tensor(NSA_DTYPE_F32, {1, s.T, s.Hq, s.Dk}, rng);
  d->k = random_tensor(NSA_DTYPE_F32, {1, s.T, s.Hkv, s.Dk}, rng);
  d->v = random_tensor(NSA_DTYPE_F32, {1, s.T, s.Hkv, s.Dv}, rng);
  d->o = Tensor(NSA_DTYPE_F32, {1, s.T, s.Hq, s.Dv});
  d->lse = Tensor(NSA_DTYPE_F32, {1, s.T, s.Hq});
  const int32_t window = backward ? 40 : 0;
  Call c;
  if (!backward) {
    writes(c, d, [](DenseData& d) { return Named{{"o", &d.o}, {"lse", &d.lse}}; });
    c.run = [d, window](nsa_context* ctx) {
      const nsa_dense_fwd_params p = dense_params(*d, window);
      return nsa_dense_fwd(ctx, &p);
    };
    c.must_fail = {alloc_hook::kHwy, alloc_hook::kNew};
    return c;
  }
  {  // The forward's o and lse, once, with no allocation failing.
    auto ctx = context(NSA_BACKEND_CPU, 0);
    const nsa_dense_fwd_params p = dense_params(*d, window);
    EXPECT_EQ(nsa_dense_fwd(ctx.get(), &p), NSA_OK) << nsa_last_error(ctx.get());
  }
  d->d_o = random_tensor(NSA_DTYPE_F32, {1, s.T, s.Hq, s.Dv}, rng);
  d->dq = shaped_as(d->q), d->dk = shaped_as(d->k), d->dv = shaped_as(d->v);
  writes(c, d, [](DenseData& d) { return Named{{"dq", &d.dq}, {"dk", &d.dk}, {"dv", &d.dv}}; });
  c.run = [d, window](nsa_context* ctx) {
    nsa_dense_bwd_params p;
    nsa_dense_bwd_params_init(&p);
    p.q = d->q.desc(), p.k = d->k.desc(), p.v = d->v.desc();
    p.o = d->o.desc(), p.lse = d->lse.desc(), p.d_o = d->d_o.desc();
    pack(p);
    p.window = window;
    p.dq = d->dq.desc(), p.dk = d->dk.desc(), p.dv = d->dv.desc();
    return nsa_dense_bwd(ctx, &p);
  };
  c.must_fail = {alloc_hook::kHwy};
  return c;
}

Call cmp_seqlens_call() {
  auto d = std::make_shared<Tensor>(NSA_DTYPE_I32, std::vector<int64_t>{4});
  Call c;
  writes(c, d, [](Tensor& t) { return Named{{"cu_cmp", &t}}; });
  c.run = [d](nsa_context* ctx) {
    const nsa_config cfg = small_cfg();
    int32_t* out = static_cast<int32_t*>(d->desc().data);
    return nsa_cmp_seqlens(ctx, &cfg, kSeqlens.data(), 3, out);
  };
  return c;
}

// ---- The KV cache: create, append, prefill, decode. ----

enum class CacheOp { kCreate, kAppend, kPrefill, kDecode, kDecodeNoAppend, kDenseDecode };

// nsa_kv_cache_create's output before a call: a failed call must leave it as it was.
nsa_kv_cache* unset() { return reinterpret_cast<nsa_kv_cache*>(uintptr_t{0x5a5a5a5a}); }

struct CacheData {
  nsa_cmp_kind kind = NSA_CMP_MEAN;
  FwdCase src, out;  // the tokens (q, k, v, gates); the outputs, written row by row
  std::unique_ptr<Mlp> mk, mv;
  nsa_kv_cache* cache = nullptr;
  nsa_kv_cache* created = unset();

  ~CacheData() {
    nsa_kv_cache_destroy(cache);
    if (created != unset()) nsa_kv_cache_destroy(created);
  }
  nsa_kv_cache_params params() const {
    nsa_kv_cache_params p;
    nsa_kv_cache_params_init(&p);
    const Shape s = small_shape();
    p.cfg = small_cfg();
    p.num_seqs = 2;
    p.capacity = 256;
    p.num_kv_heads = s.Hkv, p.head_dim_k = s.Dk, p.head_dim_v = s.Dv;
    p.dtype = src.dtype;
    p.cmp_kind = kind;
    if (mk) mk->set({&p.k_pos, &p.k_w1, &p.k_b1, &p.k_w2, &p.k_b2});
    if (mv) mv->set({&p.v_pos, &p.v_w1, &p.v_b1, &p.v_w2, &p.v_b2});
    return p;
  }
  // A fresh cache whose sequence s holds the first lens[s] tokens of src (no failing hook).
  void rebuild(const std::vector<int64_t>& lens) {
    auto ctx = context(NSA_BACKEND_CPU, 0);
    nsa_kv_cache_destroy(cache);
    cache = nullptr;
    const nsa_kv_cache_params p = params();
    ASSERT_EQ(nsa_kv_cache_create(ctx.get(), &p, &cache), NSA_OK) << nsa_last_error(ctx.get());
    for (size_t s = 0; s < lens.size(); ++s) {
      const nsa_tensor k = nsa_test::rows(src.k, 0, lens[s]), v = nsa_test::rows(src.v, 0, lens[s]);
      ASSERT_EQ(nsa_kv_cache_append(ctx.get(), cache, int64_t(s), &k, &v), NSA_OK)
          << nsa_last_error(ctx.get());
    }
  }
  Named outputs() const {
    return {{"o", &out.o},             {"lse_cmp", &out.lse_cmp}, {"lse_slc", &out.lse_slc},
            {"lse_win", &out.lse_win}, {"slc_indices_out", &out.idx_out}};
  }
  Snapshot snapshot() const {
    Snapshot s;
    for (const auto& [name, t] : outputs()) s.emplace_back(name, t->storage());
    auto bytes = [](const void* p, size_t n) {
      const auto* b = static_cast<const unsigned char*>(p);
      return std::vector<unsigned char>(b, b + n);
    };
    for (int64_t q = 0; q < 2 && cache; ++q) {
      const int64_t len = nsa_kv_cache_len(cache, q);
      s.emplace_back("nsa_kv_cache_len(" + std::to_string(q) + ")", bytes(&len, sizeof len));
    }
    // Whether nsa_kv_cache_create wrote its output (each cache is at a new address).
    const bool wrote = created != unset();
    s.emplace_back("nsa_kv_cache_create's out", bytes(&wrote, sizeof wrote));
    return s;
  }
};

nsa_status run_cache_op(CacheOp op, CacheData& d, nsa_context* ctx) {
  const FwdCase& x = d.src;
  auto rows = [](const Tensor& t, int64_t t0, int64_t n) { return nsa_test::rows(t, t0, n); };
  // Queries and gates of src rows [t0, t0 + n); every output into rows [0, n) of out.
  auto set_rows = [&](auto& p, int64_t t0, int64_t n) {
    p.q = rows(x.q, t0, n);
    p.g_cmp = rows(x.g_cmp, t0, n), p.g_slc = rows(x.g_slc, t0, n), p.g_win = rows(x.g_win, t0, n);
    p.o = rows(d.out.o, 0, n);
    p.lse_cmp = rows(d.out.lse_cmp, 0, n), p.lse_slc = rows(d.out.lse_slc, 0, n);
    p.lse_win = rows(d.out.lse_win, 0, n);
    p.slc_indices_out = rows(d.out.idx_out, 0, n);
  };
  switch (op) {
    case CacheOp::kCreate: {
      const nsa_kv_cache_params p = d.params();
      return nsa_kv_cache_create(ctx, &p, &d.created);
    }
    case CacheOp::kAppend: {  // 30 tokens to a sequence of 40: two compressed tokens complete
      const nsa_tensor k = rows(x.k, 40, 30), v = rows(x.v, 40, 30);
      return nsa_kv_cache_append(ctx, d.cache, 0, &k, &v);
    }
    case CacheOp::kPrefill: {
      nsa_prefill_params p;
      nsa_prefill_params_init(&p);
      p.seq = 0;
      set_rows(p, 0, 100);
      p.k = rows(x.k, 0, 100), p.v = rows(x.v, 0, 100);
      return nsa_prefill(ctx, d.cache, &p);
    }
    case CacheOp::kDecode:
    case CacheOp::kDecodeNoAppend: {  // both sequences, each at its own length
      nsa_decode_params p;
      nsa_decode_params_init(&p);
      set_rows(p, 60, 2);
      if (op == CacheOp::kDecode) p.k = rows(x.k, 60, 2), p.v = rows(x.v, 60, 2);
      return nsa_decode(ctx, d.cache, &p);
    }
    case CacheOp::kDenseDecode: {
      nsa_dense_decode_params p;
      nsa_dense_decode_params_init(&p);
      p.q = rows(x.q, 60, 2), p.k = rows(x.k, 60, 2), p.v = rows(x.v, 60, 2);
      p.o = rows(d.out.o, 0, 2);
      p.lse = rows(d.out.lse_cmp, 0, 2);
      return nsa_dense_decode(ctx, d.cache, &p);
    }
  }
  return NSA_ERR_INTERNAL;
}

Call cache_call(CacheOp op, nsa_cmp_kind kind, nsa_dtype dt) {
  const Shape s = small_shape();
  const nsa_config cfg = small_cfg();
  auto d = std::make_shared<CacheData>();
  d->kind = kind;
  d->src = nsa_test::make_case(s, cfg, dt, 31);
  d->out = nsa_test::make_case(s, cfg, NSA_DTYPE_F32, 37);
  if (kind == NSA_CMP_MLP) {
    std::mt19937_64 rng(41);
    d->mk = std::make_unique<Mlp>(s.Hkv, cfg.cmp_block, s.Dk, dt, rng);
    d->mv = std::make_unique<Mlp>(s.Hkv, cfg.cmp_block, s.Dv, dt, rng);
  }
  const std::vector<int64_t> lens = op == CacheOp::kAppend    ? std::vector<int64_t>{40, 7}
                                    : op == CacheOp::kPrefill ? std::vector<int64_t>{0, 7}
                                                              : std::vector<int64_t>{60, 97};
  Call c;
  // Appending is the cache's own work, on any backend; the rest runs the CPU kernels.
  c.ref_unsupported = op != CacheOp::kAppend;
  c.keeps_scratch = op == CacheOp::kDecode || op == CacheOp::kDecodeNoAppend ||
                    op == CacheOp::kDenseDecode;
  c.reset = [d, op, lens] {
    if (d->created != unset()) nsa_kv_cache_destroy(d->created);
    d->created = unset();
    if (op != CacheOp::kCreate) d->rebuild(lens);
    for (const auto& o : d->outputs()) poison(*o.second);
  };
  c.run = [d, op](nsa_context* ctx) { return run_cache_op(op, *d, ctx); };
  c.snapshot = [d] { return d->snapshot(); };
  c.must_fail = {alloc_hook::kNew};
  if (op == CacheOp::kCreate) c.must_fail.insert(alloc_hook::kCalloc);
  if (op == CacheOp::kPrefill) {
    c.known_issue = "known: nsa_prefill (src/api/api_decode.cc) appends the prompt, then "
                    "allocates the row buffer that copies the compressed tokens out; when that "
                    "allocation fails, the sequence keeps the prompt's length instead of 0";
  }
  return c;
}

// ---- The driver. ----

struct Builder {
  const char* name;
  std::function<Call()> make;
};

const std::vector<Builder>& builders() {
  static const std::vector<Builder> all = [] {
    std::vector<Builder> b = {
      {"compress_mean", [] { return compress_call(NSA_CMP_MEAN, false); }},
      {"compress_mlp", [] { return compress_call(NSA_CMP_MLP, false); }},
      {"fwd_all_outputs_win_kv", [] { return fwd_call(Fwd::kFull); }},
      {"fwd_cu_seqlens_bf16", [] { return fwd_call(Fwd::kVarlenBf16); }},
      {"fwd_slc_indices_in", [] { return fwd_call(Fwd::kGivenSelection); }},
      {"bwd_saved_state", [] { return bwd_call(Fwd::kFull, true); }},
      {"bwd_recompute_cu_seqlens_bf16", [] { return bwd_call(Fwd::kVarlenBf16, false); }},
      {"compress_bwd_mean", [] { return compress_call(NSA_CMP_MEAN, true); }},
      {"compress_bwd_mlp", [] { return compress_call(NSA_CMP_MLP, true); }},
      {"dense_fwd", [] { return dense_call(false); }},
      {"dense_bwd", [] { return dense_call(true); }},
      {"cmp_seqlens", [] { return cmp_seqlens_call(); }},
    };
    using K = CacheOp;
    const nsa_cmp_kind mean = NSA_CMP_MEAN, mlp = NSA_CMP_MLP;
    const nsa_dtype f32 = NSA_DTYPE_F32, bf16 = NSA_DTYPE_BF16;
    struct {
      const char* name;
      CacheOp op;
      nsa_cmp_kind kind;
      nsa_dtype dt;
    } const caches[] = {
        {"kv_cache_create_mean", K::kCreate, mean, f32},
        {"kv_cache_create_mlp_bf16", K::kCreate, mlp, bf16},
        {"kv_cache_append_mean", K::kAppend, mean, f32},
        {"kv_cache_append_mlp_bf16", K::kAppend, mlp, bf16},
        {"prefill_mean", K::kPrefill, mean, f32},
        {"prefill_mlp_bf16", K::kPrefill, mlp, bf16},
        {"decode_append_mean", K::kDecode, mean, f32},
        {"decode_append_mlp_bf16", K::kDecode, mlp, bf16},
        {"decode_mean", K::kDecodeNoAppend, mean, f32},
        {"dense_decode_append", K::kDenseDecode, mean, f32},
    };
    for (const auto& c : caches) {
      b.push_back({c.name, [c] { return cache_call(c.op, c.kind, c.dt); }});
    }
    return b;
  }();
  return all;
}

const char* kind_name(int kind) {
  static const char* const names[] = {"operator new", "malloc", "calloc", "realloc",
                                      "aligned_alloc", "posix_memalign",
                                      "hwy::AllocateAlignedBytes"};
  return kind >= 0 && kind < 7 ? names[kind] : "none";
}

struct Outcome {
  nsa_status status;
  int fired;     // the kind of the allocation that failed; -1: none did
  int64_t seen;  // allocations the call made
  std::string error;
};

// Runs the call with allocation k failing (k = 0: none, only counted).
Outcome run_failing(const Call& c, nsa_context* ctx, int64_t k) {
  alloc_hook::arm(k);
  const nsa_status st = c.run(ctx);
  alloc_hook::disarm();
  return {st, alloc_hook::fired.load(), alloc_hook::seen.load(), nsa_last_error(ctx)};
}

// The allocations to fail for a call that makes n: every one while there are a few hundred; the
// reference allocates per query (thousands), so then the first and last kEdge and kSpread spread
// between them. Last, n + 1: nothing fails, and the call must succeed.
std::vector<int64_t> schedule(int64_t n) {
  constexpr int64_t kAll = 400, kEdge = 60, kSpread = 60;
  std::vector<int64_t> ks;
  if (n <= kAll) {
    for (int64_t k = 1; k <= n; ++k) ks.push_back(k);
  } else {
    for (int64_t k = 1; k <= kEdge; ++k) ks.push_back(k);
    for (int64_t i = 1; i <= kSpread; ++i) {
      ks.push_back(kEdge + (n - 2 * kEdge) * i / (kSpread + 1));
    }
    for (int64_t k = n - kEdge + 1; k <= n; ++k) ks.push_back(k);
  }
  ks.push_back(n + 1);
  return ks;
}

std::string first_change(const Snapshot& before, const Snapshot& after) {
  for (size_t i = 0; i < before.size() && i < after.size(); ++i) {
    if (before[i] != after[i]) return before[i].first;
  }
  return before.size() == after.size() ? "" : "the snapshot's size";
}

// What the failures of one call came to.
struct Tally {
  std::set<int> kinds;  // the allocator kinds that failed
  int64_t failed = 0, absorbed = 0;
  std::string known;    // where the call's known issue showed
};

// Checks a call whose allocation failed (outcome o): NSA_ERR_OUT_OF_MEMORY, a message, nothing
// written (as `before`); or a failure the library absorbed, with results exactly as a clean
// run's. Records fatal failures in the running test, the call's known issue in tally->known.
void check_failed_call(const Call& call, const Outcome& o, const std::string& where,
                       nsa_status want, const Snapshot& before, const Snapshot& clean,
                       Tally* tally) {
  tally->kinds.insert(o.fired);
  if (o.status == want) {
    // Absorbed: libstdc++'s ostringstream swallows a failed buffer growth, so a message that
    // validation builds in advance comes out short. The results must still be exact.
    ++tally->absorbed;
    ASSERT_EQ(first_change(clean, call.snapshot()), "") << where << ": absorbed, but wrong";
    call.reset();
    return;
  }
  ++tally->failed;
  ASSERT_EQ(o.status, NSA_ERR_OUT_OF_MEMORY)
      << where << ": " << nsa_status_name(o.status) << ": " << o.error;
  ASSERT_FALSE(o.error.empty()) << where << ": no message";
  const std::string changed = first_change(before, call.snapshot());
  if (!call.known_issue.empty() && changed.rfind("nsa_kv_cache_len", 0) == 0) {
    tally->known += (tally->known.empty() ? "" : "; ") + where + " changed " + changed;
    call.reset();  // the rest of the call's allocations are still checked
    return;
  }
  ASSERT_EQ(changed, "") << where << ": the failed call changed " << changed;
}

using Param = std::tuple<int, nsa_backend, int>;  // builder, backend, threads

class AllocFailure : public testing::TestWithParam<Param> {};

TEST_P(AllocFailure, EveryFailedAllocationIsCleanOutOfMemory) {
  const auto [index, backend, threads] = GetParam();
  const Call call = builders()[index].make();
  auto ctx = context(backend, threads);
  const bool unsupported = call.ref_unsupported && backend == NSA_BACKEND_REF;
  const nsa_status want = unsupported ? NSA_ERR_UNSUPPORTED : NSA_OK;
  // The call's allocations, counted on a second clean run (the first may also build what the
  // process builds once), and what a clean run writes.
  int64_t n = 0;
  for (int rep = 0; rep < 2; ++rep) {
    call.reset();
    const Outcome o = run_failing(call, ctx.get(), 0);
    ASSERT_EQ(o.status, want) << nsa_status_name(o.status) << ": " << o.error;
    n = o.seen;
  }
  const Snapshot clean = call.snapshot();
  call.reset();
  const Snapshot before = call.snapshot();
  Tally tally;
  for (int64_t k : schedule(n)) {
    const Outcome o = run_failing(call, ctx.get(), k);
    const std::string where = "allocation " + std::to_string(k) + " of " + std::to_string(n) +
                              " (" + kind_name(o.fired) + ")";
    if (o.fired >= 0) {
      check_failed_call(call, o, where, want, before, clean, &tally);
      if (HasFatalFailure()) return;
      continue;
    }
    // Past the last allocation: the call succeeds. A cache keeps decode's scratch from an
    // earlier failed call that got past allocating it, so there the end may come sooner.
    if (!call.keeps_scratch) {
      EXPECT_EQ(k, n + 1) << where << " never came";
    }
    EXPECT_EQ(o.status, want) << nsa_status_name(o.status) << ": " << o.error;
    EXPECT_EQ(first_change(clean, call.snapshot()), "") << "the call after the failures";
    break;
  }
  if (!unsupported && backend == NSA_BACKEND_CPU) {
    for (int kind : call.must_fail) {
      EXPECT_TRUE(tally.kinds.count(kind)) << "no " << kind_name(kind) << " failed: no hook?";
    }
  }
  std::printf("[   alloc  ] %lld allocations; %lld failed one at a time, %lld of them absorbed\n",
              static_cast<long long>(n), static_cast<long long>(tally.failed + tally.absorbed),
              static_cast<long long>(tally.absorbed));
  if (!tally.known.empty()) GTEST_SKIP() << call.known_issue << ": " << tally.known;
}

std::string param_name(const testing::TestParamInfo<Param>& info) {
  const auto [index, backend, threads] = info.param;
  return std::string(builders()[index].name) + "_" + nsa_backend_name(backend) + "_" +
         std::to_string(threads) + "t";
}

INSTANTIATE_TEST_SUITE_P(Calls, AllocFailure,
                         testing::Combine(testing::Range(0, int(builders().size())),
                                          testing::Values(NSA_BACKEND_REF, NSA_BACKEND_CPU),
                                          testing::Values(1, 2)),
                         param_name);

// The hook itself: every allocator it covers fails when told to, through the same references
// libnsa.a's objects make (called through volatile pointers, so the compiler keeps the calls).
TEST(AllocHook, EachHookedAllocatorFails) {
  void* (*volatile p_malloc)(size_t) = &malloc;
  void* (*volatile p_calloc)(size_t, size_t) = &calloc;
  void* (*volatile p_realloc)(void*, size_t) = &realloc;
  void* (*volatile p_aligned)(size_t, size_t) = &aligned_alloc;
  int (*volatile p_memalign)(void**, size_t, size_t) = &posix_memalign;
  void* (*volatile p_new)(size_t) = &::operator new;
  const std::pair<int, std::function<bool()>> probes[] = {
      {alloc_hook::kMalloc, [&] { return p_malloc(16) == nullptr; }},
      {alloc_hook::kCalloc, [&] { return p_calloc(4, 4) == nullptr; }},
      {alloc_hook::kRealloc, [&] { return p_realloc(nullptr, 16) == nullptr; }},
      {alloc_hook::kAlignedAlloc, [&] { return p_aligned(64, 64) == nullptr; }},
      {alloc_hook::kPosixMemalign, [&] { void* q = nullptr; return p_memalign(&q, 64, 64) != 0; }},
      {alloc_hook::kHwy, [] { return !hwy::AllocateAligned<float>(16); }},
      {alloc_hook::kNew, [&] {
         try {
           ::operator delete(p_new(16));
           return false;
         } catch (const std::bad_alloc&) {
           return true;
         }
       }},
  };
  for (const auto& [kind, fails] : probes) {
    alloc_hook::arm(1);
    const bool failed = fails();
    alloc_hook::disarm();
    EXPECT_TRUE(failed) << kind_name(kind);
    EXPECT_EQ(alloc_hook::fired.load(), kind) << kind_name(kind);
  }
}

}  // namespace
