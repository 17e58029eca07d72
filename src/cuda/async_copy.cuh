// Copies from global to shared memory that run while the block computes (cp.async, sm_80 and
// newer): a thread issues 16-byte copies, closes them into a group (commit), and later waits
// until at most N of its newest groups are still in flight. The data is visible to the issuing
// thread after its wait, and to the block after a barrier that follows every thread's wait.
// attend.cuh streams key chunks this way, one chunk ahead (paper, Section 3.4: the kernel keeps
// the tensor cores fed while the next block of keys is on its way).
//
// The SIMT emulator (tests/simt_emu.h) gives these calls the same meaning on the CPU, with the
// copies landing either as late as allowed (at the wait: a read before it sees stale data) or
// at once (a copy into a buffer that other threads still read corrupts their reads), so that
// both kinds of missing synchronisation fail the emulator's tests.
#pragma once

#include <cstdint>

namespace nsa::cuda {

// 16 bytes from global memory at src to shared memory at dst, both 16-byte aligned. .cg: cached
// in L2 only, as a streamed key is read once per block.
__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
#if defined(NSA_SIMT_EMU)
  simt_emu::Machine::get().cp_async16(dst, src);
#elif defined(__CUDA_ARCH__)
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  const size_t s = __cvta_generic_to_global(src);
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(d), "l"(s) : "memory");
#endif
}

// Closes the thread's copies issued since the last commit into one group (possibly empty).
__device__ __forceinline__ void cp_async_commit() {
#if defined(NSA_SIMT_EMU)
  simt_emu::Machine::get().cp_async_commit();
#elif defined(__CUDA_ARCH__)
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Waits until at most N of the thread's committed groups are in flight (the newest ones).
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(NSA_SIMT_EMU)
  simt_emu::Machine::get().cp_async_wait(N);
#elif defined(__CUDA_ARCH__)
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

}  // namespace nsa::cuda
