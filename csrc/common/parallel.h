// A minimal fork-safe parallel_for: threads are started per call (no persistent pool that a
// fork() could leave dead), tasks are handed out dynamically, the caller's thread works too,
// and the first exception thrown by any task is re-thrown in the caller.
// The thread count always comes from Python (torch.get_num_threads()), so effops never runs
// more threads than torch is configured to use.
#pragma once
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace effops {

// fn(task, worker) for task in [0, n); worker in [0, workers) identifies per-thread scratch.
// Returns the number of workers used (so callers can size scratch as max_workers(...)).
inline int max_workers(int64_t n, int threads) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(n, std::max(threads, 1))));
}

template <class F>
void parallel_for(int64_t n, int threads, F&& fn) {
  const int workers = max_workers(n, threads);
  if (workers <= 1) {
    for (int64_t i = 0; i < n; ++i) fn(i, 0);
    return;
  }
  std::atomic<int64_t> next{0};
  std::exception_ptr error;
  std::mutex error_mu;
  auto work = [&](int worker) {
    try {
      for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) fn(i, worker);
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mu);
      if (!error) error = std::current_exception();
      next.store(n);  // stop handing out tasks
    }
  };
  std::vector<std::thread> pool;
  pool.reserve(workers - 1);
  for (int w = 1; w < workers; ++w) pool.emplace_back(work, w);
  work(0);
  for (auto& t : pool) t.join();
  if (error) std::rethrow_exception(error);
}

}  // namespace effops
