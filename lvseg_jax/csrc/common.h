// Shared by the FFI kernels in this folder: error propagation and a task-parallel loop on
// XLA's intra-op thread pool.

#ifndef LVSEG_JAX_CSRC_COMMON_H_
#define LVSEG_JAX_CSRC_COMMON_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

// Returns the xla::ffi::Error of `expr` from the enclosing handler if it is a failure.
#define RETURN_IF_ERROR(expr)                              \
  if (::xla::ffi::Error error = (expr); error.failure()) { \
    return error;                                          \
  }

namespace lvseg {

// Runs fn(0) ... fn(num_tasks - 1) on the calling thread and up to num_threads - 1 pool
// threads. The caller takes tasks too and only waits for tasks already started, so it never
// waits on a pool that is busy elsewhere.
struct ParallelState {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  int64_t num_tasks = 0;
  const std::function<void(int64_t)>* fn = nullptr;
};

inline void RunTasks(ParallelState& state) {
  for (int64_t i = state.next.fetch_add(1); i < state.num_tasks; i = state.next.fetch_add(1)) {
    (*state.fn)(i);
    state.done.fetch_add(1, std::memory_order_release);
  }
}

inline void ParallelFor(xla::ffi::ThreadPool& pool, int64_t num_tasks,
                        const std::function<void(int64_t)>& fn) {
  auto state = std::make_shared<ParallelState>();
  state->num_tasks = num_tasks;
  state->fn = &fn;
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), num_tasks) - 1;
  for (int64_t h = 0; h < helpers; ++h) {
    pool.Schedule([state]() { RunTasks(*state); });
  }
  RunTasks(*state);
  while (state->done.load(std::memory_order_acquire) < num_tasks) std::this_thread::yield();
}

}  // namespace lvseg

#endif  // LVSEG_JAX_CSRC_COMMON_H_
