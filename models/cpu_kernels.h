// What the CPU kernels (cpu_attention.cc, cpu_matmul.cc) share: models/cpu_kernels.py
// compiles them into one library.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace orca {

namespace ffi = xla::ffi;

// Runs fn(i) for i in [0, n) on the calling thread and on the other threads of XLA's intra-op
// pool (the one its own ops use, so nothing else competes for the cores): every thread takes
// chunks from a shared counter; the caller returns once every chunk is done. A helper that
// starts after the last chunk was taken finds nothing to do (the state outlives the call).
template <typename F>
void ParallelFor(ffi::ThreadPool& pool, int64_t n, int64_t chunk, const F& fn) {
  struct State {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto st = std::make_shared<State>();
  const int64_t chunks = (n + chunk - 1) / chunk;
  // fn is only called for a chunk taken before the caller returns: the pointer stays valid.
  auto work = [st, chunks, chunk, n, fnp = &fn]() {
    for (int64_t c; (c = st->next.fetch_add(1)) < chunks;) {
      for (int64_t i = c * chunk, e = std::min(n, i + chunk); i < e; ++i) (*fnp)(i);
      st->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), chunks) - 1;
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule(decltype(work)(work));  // a copy each
  work();
  while (st->done.load(std::memory_order_acquire) < chunks) std::this_thread::yield();
}

}  // namespace orca
