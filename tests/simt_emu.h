// A SIMT emulator for the CUDA backend's device code on the CPU (test_cuda_emu.cc): the kernels'
// per-block code (src/cuda/query.cuh and what it includes) compiled as host C++, each block run
// as 128 cooperative fibers on one OS thread (each started on its own stack by makecontext, then
// switched with _setjmp / _longjmp, which skip swapcontext's signal-mask system calls).
// __syncthreads and __syncwarp are barriers, __shfl_xor_sync exchanges through per-warp slots
// between two warp barriers,
// __shared__ variables are statics (one block runs at a time), dynamic shared memory is a buffer
// refilled with NaN before every block (a read of a slot no thread wrote shows up as NaN).
//
// What it checks: the kernels' arithmetic and indexing against the reference on a machine
// without a GPU, and that every barrier is reached by every thread (a barrier some threads skip
// never completes: reported as a deadlock), and that asynchronous copies (cp.async) are waited
// for before their data is read and never land in a buffer still being read (Machine::
// cp_async16 lands them at either extreme). What it cannot check: data races between threads
// (fibers switch only at barriers), memory-model and timing questions, the real expf/logf
// (host libm here), and anything about performance. A GPU run (scripts/gpu-check.sh) is still
// the test of record.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>
#include <setjmp.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <deque>
#include <functional>
#include <string>
#include <limits>
#include <stdexcept>
#include <vector>

// The device code's tensor-core calls (mma.cuh) come here.
#define NSA_SIMT_EMU 1

#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __launch_bounds__
#undef __shared__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

inline float __int_as_float(unsigned x) {
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}
using std::isnan;
using std::max;
using std::min;

namespace simt_emu {

struct Dim {
  unsigned x = 0, y = 0, z = 0;
};

constexpr int kBlockThreads = 128, kWarpSize = 32, kWarps = kBlockThreads / kWarpSize;

// A barrier among n fibers: the last arrival opens it; the others yield until it opened.
struct Barrier {
  int n = 0, count = 0;
  uint64_t gen = 0;
};

class Machine {
 public:
  static Machine& get() {
    static Machine m;
    return m;
  }

  // Runs body() for every block of grid as kBlockThreads fibers; dynamic shared memory of
  // smem_bytes is handed to body through smem().
  void launch(Dim grid, size_t smem_bytes, const std::function<void()>& body) {
    smem_.assign((smem_bytes + 3) / 4, std::numeric_limits<float>::quiet_NaN());
    for (unsigned z = 0; z < std::max(grid.z, 1u); ++z) {
      for (unsigned y = 0; y < std::max(grid.y, 1u); ++y) {
        for (unsigned x = 0; x < std::max(grid.x, 1u); ++x) {
          block_ = {x, y, z};
          std::fill(smem_.begin(), smem_.end(), std::numeric_limits<float>::quiet_NaN());
          run_block(body);
        }
      }
    }
  }

  Dim tid() const { return {unsigned(cur_), 0, 0}; }
  Dim bid() const { return block_; }
  float* smem() { return smem_.data(); }

  void sync_block() { wait(block_bar_); }
  void sync_warp() { wait(warp_bar_[cur_ / kWarpSize]); }

  template <typename T>
  T shfl_xor(T v, int mask) {
    static_assert(sizeof(T) == 4, "32-bit shuffles only");
    const int warp = cur_ / kWarpSize, lane = cur_ % kWarpSize;
    std::memcpy(&slots_[warp][lane], &v, 4);
    sync_warp();
    T r;
    std::memcpy(&r, &slots_[warp][lane ^ mask], 4);
    sync_warp();
    return r;
  }

  // cp.async (src/cuda/async_copy.cuh): the source is read at issue (the kernels' global inputs
  // do not change during a launch); the 16 bytes land at the issuing thread's wait for their
  // group (kLate, the default: as late as the hardware may land them, so a read before the wait
  // and its barrier sees stale data) or at once (kEarly: as soon as it may, so a copy into a
  // buffer that other threads still read corrupts their reads). A misaligned copy, or one never
  // waited for by the end of the block, fails the launch.
  enum class AsyncCopies { kLate, kEarly };
  void set_async_copies(AsyncCopies m) { async_ = m; }
  void cp_async16(void* dst, const void* src) {
    if (reinterpret_cast<uintptr_t>(dst) % 16 != 0 || reinterpret_cast<uintptr_t>(src) % 16 != 0) {
      if (fault_.empty()) fault_ = "simt_emu: cp.async of 16 bytes needs 16-byte aligned addresses";
      return;
    }
    Copy c{dst, {}};
    std::memcpy(c.bytes, src, 16);
    if (async_ == AsyncCopies::kEarly) {
      std::memcpy(dst, c.bytes, 16);
      return;
    }
    copies_[size_t(cur_)].open.push_back(c);
  }
  void cp_async_commit() {
    Pending& p = copies_[size_t(cur_)];
    p.groups.push_back(std::move(p.open));
    p.open.clear();
  }
  void cp_async_wait(int n) {
    Pending& p = copies_[size_t(cur_)];
    while (int(p.groups.size()) > n) {
      for (const Copy& c : p.groups.front()) std::memcpy(c.dst, c.bytes, 16);
      p.groups.pop_front();
    }
  }

  // One warp's mma.sync m16n8k16 (src/cuda/mma.cuh): every lane posts its A and B registers,
  // then each computes its own four accumulators from the whole warp's, with the PTX ISA's
  // fragment layout written out independently of mma.cuh's loads. Products are exact and summed
  // in double, then added to c in f32 (the hardware's order of additions is not specified; the
  // tests' tolerances cover either).
  void mma(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], bool f16) {
    const int warp = cur_ / kWarpSize, lane = cur_ % kWarpSize;
    uint32_t* mine = mma_[warp][lane];
    for (int i = 0; i < 4; ++i) mine[i] = a[i];
    mine[4] = b[0], mine[5] = b[1];
    sync_warp();
    const auto half_of = [&](uint32_t w, int k) -> double {
      const uint16_t bits = uint16_t(k % 2 ? w >> 16 : w & 0xffffu);
      return f16 ? double(__half2float(__ushort_as_half(bits)))
                 : double(__bfloat162float(__ushort_as_bfloat16(bits)));
    };
    // A(row, k) is in lane 4 (row % 8) + (k % 8) / 2, register (row >= 8) + 2 (k >= 8);
    // B(k, n) in lane 4 n + (k % 8) / 2, register b[k >= 8]; the low half holds the even k.
    const auto A = [&](int row, int k) {
      return half_of(mma_[warp][4 * (row % 8) + (k % 8) / 2][(row >= 8) + 2 * (k >= 8)], k);
    };
    const auto B = [&](int k, int n) {
      return half_of(mma_[warp][4 * n + (k % 8) / 2][4 + (k >= 8)], k);
    };
    for (int i = 0; i < 4; ++i) {
      const int row = lane / 4 + 8 * (i / 2), n = 2 * (lane % 4) + i % 2;
      double acc = 0.0;
      for (int k = 0; k < 16; ++k) acc += A(row, k) * B(k, n);
      c[i] = c[i] + float(acc);
    }
    sync_warp();
  }

 private:
  // A fiber's life: the body, then back to the scheduler for good (it never returns, so no
  // stale context is ever resumed).
  static void entry(int i) {
    Machine& m = get();
    m.body_();
    m.done_[size_t(i)] = true;
    ++m.progress_;
    _longjmp(m.sched_jb_, 1);
  }

  void run_block(const std::function<void()>& body) {
    body_ = body;
    block_bar_ = {kBlockThreads, 0, 0};
    for (Barrier& b : warp_bar_) b = {kWarpSize, 0, 0};
    stacks_.resize(kBlockThreads);
    ctx_.resize(kBlockThreads);
    jb_.resize(kBlockThreads);
    done_.assign(kBlockThreads, false);
    copies_.assign(kBlockThreads, Pending{});
    fault_.clear();
    started_.assign(kBlockThreads, false);
    for (int i = 0; i < kBlockThreads; ++i) {
      stacks_[size_t(i)].resize(256 * 1024);
      getcontext(&ctx_[size_t(i)]);
      ctx_[size_t(i)].uc_stack.ss_sp = stacks_[size_t(i)].data();
      ctx_[size_t(i)].uc_stack.ss_size = stacks_[size_t(i)].size();
      ctx_[size_t(i)].uc_link = &sched_;
      makecontext(&ctx_[size_t(i)], reinterpret_cast<void (*)()>(&Machine::entry), 1, i);
    }
    // Round robin until every fiber returned; a full round with no barrier opened and no fiber
    // finished while some still wait is a deadlock (a barrier that some threads never reach).
    for (int live = kBlockThreads; live > 0;) {
      const uint64_t before = progress_;
      live = 0;
      for (int i = 0; i < kBlockThreads; ++i) {
        if (done_[size_t(i)]) continue;
        resume(i);
        live += done_[size_t(i)] ? 0 : 1;
      }
      if (live > 0 && progress_ == before && ++idle_rounds_ > 2) {
        throw std::runtime_error("simt_emu: deadlock: a barrier is not reached by every thread");
      }
      if (progress_ != before) idle_rounds_ = 0;
    }
    for (const Pending& p : copies_) {
      if (fault_.empty() && (!p.open.empty() || !p.groups.empty())) {
        fault_ = "simt_emu: a thread ended with cp.async copies it never waited for";
      }
    }
    if (!fault_.empty()) throw std::runtime_error(fault_);
  }

  // Runs fiber i until it waits or ends. Its own frame holds the _setjmp, so no local of the
  // scheduler's loop lives across a _longjmp.
  __attribute__((noinline)) void resume(int i) {
    cur_ = i;
    if (_setjmp(sched_jb_) == 0) {
      if (started_[size_t(i)]) _longjmp(jb_[size_t(i)].buf, 1);
      started_[size_t(i)] = true;
      swapcontext(&sched_, &ctx_[size_t(i)]);  // first entry; it comes back by _longjmp
    }
  }

  void wait(Barrier& b) {
    const uint64_t g = b.gen;
    if (++b.count == b.n) {
      b.count = 0;
      ++b.gen;
      ++progress_;
      return;
    }
    while (b.gen == g) {
      if (_setjmp(jb_[size_t(cur_)].buf) == 0) _longjmp(sched_jb_, 1);
    }
  }

  struct Copy {
    void* dst;
    unsigned char bytes[16];
  };
  struct Pending {
    std::vector<Copy> open;                // issued since the last commit
    std::deque<std::vector<Copy>> groups;  // committed, oldest first
  };
  std::vector<Pending> copies_;
  AsyncCopies async_ = AsyncCopies::kLate;
  std::string fault_;  // a fiber's error, thrown by run_block once the block ended
  std::function<void()> body_;
  std::vector<float> smem_;
  std::vector<std::vector<char>> stacks_;
  std::vector<ucontext_t> ctx_;
  struct JumpBuf {
    jmp_buf buf;
  };
  std::vector<JumpBuf> jb_;
  std::vector<bool> done_, started_;
  ucontext_t sched_{};
  jmp_buf sched_jb_;
  Barrier block_bar_, warp_bar_[kWarps];
  uint32_t slots_[kWarps][kWarpSize] = {};
  uint32_t mma_[kWarps][kWarpSize][6] = {};
  Dim block_;
  int cur_ = 0, idle_rounds_ = 0;
  uint64_t progress_ = 0;
};

}  // namespace simt_emu

#define threadIdx (::simt_emu::Machine::get().tid())
#define blockIdx (::simt_emu::Machine::get().bid())
inline void __syncthreads() { simt_emu::Machine::get().sync_block(); }
inline void __syncwarp(unsigned = 0xffffffffu) { simt_emu::Machine::get().sync_warp(); }
template <typename T>
T __shfl_xor_sync(unsigned, T v, int mask) {
  return simt_emu::Machine::get().shfl_xor(v, mask);
}
inline int atomicAdd(int* p, int v) {  // fibers switch only at barriers: a plain add is atomic
  const int old = *p;
  *p += v;
  return old;
}
