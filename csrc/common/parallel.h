// parallel_for on a small persistent thread pool.
//
// Why not start threads per call: right after a torch op, torch's OpenMP workers keep spinning
// for a while; a freshly started thread may not run for milliseconds, and a caller that joins
// it waits all that time. Here the caller works through the tasks itself and only waits for
// tasks a worker actually picked up; workers that wake late find nothing left and sleep again.
// The thread count always comes from Python (torch.get_num_threads()), so effops never runs
// more threads than torch is configured to use. After fork() the child starts a fresh pool.
#pragma once
#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace effops {

inline int max_workers(int64_t n, int threads) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(n, std::max(threads, 1))));
}

namespace detail {

struct Job {
  std::function<void(int64_t, int)> fn;
  int64_t n = 0;
  int workers = 1;  // the caller is worker 0
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::atomic<int> joined{0};
  std::mutex mu;
  std::condition_variable finished;
  std::exception_ptr error;

  // Runs tasks until none are left; returns when this worker has no task in hand.
  void work(int worker) {
    for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) {
      try {
        fn(i, worker);
      } catch (...) {
        std::lock_guard<std::mutex> lock(mu);
        if (!error) error = std::current_exception();
      }
      if (done.fetch_add(1) + 1 == n) {
        std::lock_guard<std::mutex> lock(mu);
        finished.notify_all();
      }
    }
  }
};

class Pool {
 public:
  void run(const std::shared_ptr<Job>& job) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      while (static_cast<int>(threads_) < job->workers - 1) {
        std::thread(&Pool::loop, this).detach();  // detached: the pool lives for the process
        ++threads_;
      }
      job_ = job;
      ++generation_;
    }
    wake_.notify_all();
    job->work(0);
    std::unique_lock<std::mutex> lock(job->mu);
    job->finished.wait(lock, [&] { return job->done.load() >= job->n; });
  }

 private:
  void loop() {
    uint64_t seen = 0;
    for (;;) {
      std::shared_ptr<Job> job;
      {
        std::unique_lock<std::mutex> lock(mu_);
        wake_.wait(lock, [&] { return generation_ != seen; });
        seen = generation_;
        job = job_;
      }
      if (!job) continue;
      const int id = job->joined.fetch_add(1) + 1;
      if (id < job->workers) job->work(id);
    }
  }

  std::mutex mu_;
  std::condition_variable wake_;
  std::shared_ptr<Job> job_;
  uint64_t generation_ = 0;
  size_t threads_ = 0;
};

// The pool is never destroyed: its detached workers may outlive main().
inline Pool*& pool_ptr() {
  static Pool* p = [] {
    // In a forked child the workers do not exist: forget the pool, start a new one lazily.
    pthread_atfork(nullptr, nullptr, [] { pool_ptr() = nullptr; });
    return static_cast<Pool*>(nullptr);
  }();
  return p;
}
inline Pool& pool() {
  static std::mutex mu;
  std::lock_guard<std::mutex> lock(mu);
  Pool*& p = pool_ptr();
  if (!p) p = new Pool();
  return *p;
}
}  // namespace detail

// fn(task, worker) for task in [0, n) on up to `threads` threads (the caller included);
// worker in [0, max_workers(n, threads)) identifies per-thread scratch. The first exception
// thrown by a task is re-thrown here after all tasks have run.
template <class F>
void parallel_for(int64_t n, int threads, F&& fn) {
  const int workers = max_workers(n, threads);
  if (workers <= 1) {
    for (int64_t i = 0; i < n; ++i) fn(i, 0);
    return;
  }
  auto job = std::make_shared<detail::Job>();
  job->fn = [&fn](int64_t i, int w) { fn(i, w); };
  job->n = n;
  job->workers = workers;
  detail::pool().run(job);
  if (job->error) std::rethrow_exception(job->error);
}

}  // namespace effops
