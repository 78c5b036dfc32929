// What the CPU kernels (cpu_attention.cc, cpu_matmul.cc) share: models/cpu_kernels.py
// compiles them into one library.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <cstdint>
#include <memory>
#include <thread>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace orca {

namespace ffi = xla::ffi;

// e^x for x <= 0 (attention's scores minus their running max, GELU's tanh), in a form
// the compiler vectorizes:
// 2^n * e^r with n = round(x / ln 2), |r| <= ln 2 / 2, e^r by its degree-6 Taylor polynomial
// (relative error < 2e-7, float32's own rounding). Below -87 the result is 0.
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);
  const float n = std::nearbyint(x * 1.44269504088896341f);
  const float r = (x - n * 0.693145751953125f) - n * 1.42860682030941723e-6f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  int32_t bits;
  std::memcpy(&bits, &p, sizeof bits);
  bits += static_cast<int32_t>(n) << 23;  // times 2^n (n >= -126: no denormals)
  std::memcpy(&p, &bits, sizeof p);
  return p;
}

// The helpers of ParallelFor: threads that stay awake between kernels. XLA's own pool let a
// helper start ~80 us after the kernel asked for it (a sleeping thread woken on this VM), with
// ~85 kernels in a decode step; these spin for kSpin after their last task before they sleep.
class Team {
 public:
  static constexpr auto kSpin = std::chrono::microseconds(60);
  static Team& Get(int64_t workers) {
    static Team* team = new Team(workers);  // never destroyed: threads outlive static teardown
    return *team;
  }
  int64_t size() const { return size_; }
  void Schedule(std::function<void()> f) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      tasks_.push_back(std::move(f));
      pending_.fetch_add(1, std::memory_order_release);
    }
    if (sleeping_.load(std::memory_order_acquire) > 0) cv_.notify_one();
  }

 private:
  explicit Team(int64_t workers) : size_(std::max<int64_t>(workers, 0)) {
    for (int64_t i = 0; i < size_; ++i) std::thread([this] { Loop(); }).detach();
  }
  // The next task, with mu_ held and tasks_ not empty.
  std::function<void()> Pop() {
    std::function<void()> f = std::move(tasks_.front());
    tasks_.pop_front();
    pending_.fetch_sub(1, std::memory_order_relaxed);
    return f;
  }
  bool Take(std::function<void()>& f) {
    std::lock_guard<std::mutex> lock(mu_);
    if (tasks_.empty()) return false;
    f = Pop();
    return true;
  }
  void Loop() {
    for (std::function<void()> f;;) {
      const auto until = std::chrono::steady_clock::now() + kSpin;
      bool got = false;
      while (!(got = pending_.load(std::memory_order_acquire) > 0 && Take(f)) &&
             std::chrono::steady_clock::now() < until) {
#if defined(__x86_64__)
        __builtin_ia32_pause();
#else
        std::this_thread::yield();
#endif
      }
      if (!got) {
        std::unique_lock<std::mutex> lock(mu_);
        sleeping_.fetch_add(1, std::memory_order_release);
        cv_.wait(lock, [this] { return !tasks_.empty(); });
        sleeping_.fetch_sub(1, std::memory_order_relaxed);
        f = Pop();
      }
      f();
    }
  }
  const int64_t size_;  // worker threads (detached: they outlive the library's users)
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> tasks_;
  std::atomic<int64_t> pending_{0}, sleeping_{0};  // pending_: tasks_.size(), read without mu_ while spinning
};

// Runs fn(i) for i in [0, n) on the calling thread and on the Team's threads (as many as
// XLA's intra-op pool has besides: XLA's own ops leave the cores to them). [0, n) is cut into
// one contiguous range per thread; each thread takes the items of the first range nobody has
// claimed, front to back, one at a time from the range's counter, then helps finish the other
// ranges the same way (a helper that wakes late finds its range partly done). Contiguous
// ranges let an item prefetch the next one's data for the same core (the packed matmul: 64-row
// GEMMs 8-12% faster than with 16 chunks handed out in turn, whose first panels came cold).
// The caller returns once every item is done; a helper that starts after that finds nothing
// to do (the state outlives the call).
template <typename F>
void ParallelFor(ffi::ThreadPool& pool, int64_t n, const F& fn) {
  constexpr int64_t kMaxThreads = 64;
  struct alignas(64) Range {
    std::atomic<int64_t> next{0};
    int64_t end = 0;
  };
  struct State {
    std::atomic<int64_t> claimed{0}, done{0};
    Range ranges[kMaxThreads];
  };
  if (n <= 0) return;
  const int64_t threads = std::clamp<int64_t>(pool.num_threads(), 1, std::min(n, kMaxThreads));
  auto st = std::make_shared<State>();
  for (int64_t r = 0; r < threads; ++r) {
    st->ranges[r].next.store(n * r / threads, std::memory_order_relaxed);
    st->ranges[r].end = n * (r + 1) / threads;
  }
  // fn is only called for an item taken before the caller returns: the pointer stays valid.
  auto work = [st, threads, fnp = &fn]() {
    const int64_t first = st->claimed.fetch_add(1) % threads;
    for (int64_t j = 0; j < threads; ++j) {
      Range& r = st->ranges[(first + j) % threads];
      for (int64_t i; (i = r.next.fetch_add(1)) < r.end;) {
        (*fnp)(i);
        st->done.fetch_add(1, std::memory_order_release);
      }
    }
  };
  Team& team = Team::Get(pool.num_threads() - 1);
  for (int64_t h = 1; h < std::min(threads, team.size() + 1); ++h) team.Schedule(work);  // a copy each
  work();
  while (st->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

}  // namespace orca

