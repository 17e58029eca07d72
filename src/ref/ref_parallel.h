// The reference's one parallel loop. Its items are independent queries (or compressed tokens),
// so threads change nothing but speed. The items allocate (the reference is written to be read),
// and an exception (std::bad_alloc) must not leave an OpenMP region, where it would terminate the
// process: it is caught per item, the remaining items are skipped, and it is returned as a status
// after the region. Items that write the caller's outputs write staged copies (ref_staged.h), so
// a failed loop leaves the outputs untouched.
#pragma once

#include <omp.h>

#include <atomic>
#include <exception>
#include <new>

#include "common/status.h"

namespace nsa::ref {

template <typename Body>
Status parallel_for(int64_t n, int32_t num_threads, Body&& body) {
  const int threads = num_threads > 0 ? num_threads : omp_get_max_threads();
  std::atomic<int> failure{0};  // 1: out of memory, 2: another exception
#pragma omp parallel for schedule(dynamic, 4) num_threads(threads)
  for (int64_t i = 0; i < n; ++i) {
    if (failure.load(std::memory_order_relaxed) != 0) continue;
    try {
      body(i);
    } catch (const std::bad_alloc&) {
      failure.store(1);
    } catch (...) {
      failure.store(2);
    }
  }
  if (failure.load() == 1) return error(NSA_ERR_OUT_OF_MEMORY, "reference: out of memory");
  if (failure.load() == 2) return error(NSA_ERR_INTERNAL, "reference: internal error");
  return Status::ok();
}

}  // namespace nsa::ref
