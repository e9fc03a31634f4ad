// parallel_for: on the OpenMP runtime torch has loaded, when Python hands it over
// (use_openmp_runtime), else on a small persistent thread pool of effops's own.
//
// Why torch's OpenMP threads: after a torch op they spin for a while waiting for the next
// parallel region; threads of another pool then compete with them for the cores (on a 2-core
// machine a converted EfficientNet-B0 scaled 1.0x from 1 to 2 threads on the pool, against
// eager's 2x). Running effops's loops as OpenMP parallel regions of the same runtime reuses
// those very threads. The entry points (GOMP_parallel, omp_get_thread_num; GNU libgomp, and
// LLVM/Intel runtimes export the GNU names too) are looked up in the already loaded library
// with dlopen(RTLD_NOLOAD): effops does not link an OpenMP runtime itself.
//
// Why not start threads per call: right after a torch op, torch's OpenMP workers keep spinning
// for a while; a freshly started thread may not run for milliseconds, and a caller that joins
// it waits all that time. Here the caller works through the tasks itself and only waits for
// tasks a worker actually picked up; workers that wake late find nothing left and sleep again.
// The thread count always comes from Python (torch.get_num_threads()), so effops never runs
// more threads than torch is configured to use. After fork() the child starts a fresh pool
// (see pool() for why that is safe whatever the parent's threads were doing).
#pragma once
#include <dlfcn.h>
#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
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

// How long an idle worker (and a caller waiting for its last tasks) polls before sleeping:
// EFFOPS_SPIN_US, default 50 microseconds; 0 sleeps at once.
inline int spin_micros() {
  const char* v = std::getenv("EFFOPS_SPIN_US");
  if (v == nullptr || *v == 0) return 50;
  return std::max(0, std::atoi(v));
}

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
      generation_.fetch_add(1, std::memory_order_release);
    }
    wake_.notify_all();
    job->work(0);
    // The tasks still running were taken by workers that are running them: poll (yielding)
    // rather than sleep, a wake-up would cost more than a short task.
    const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(spin_us_);
    while (job->done.load() < job->n && std::chrono::steady_clock::now() < until) std::this_thread::yield();
    std::unique_lock<std::mutex> lock(job->mu);
    job->finished.wait(lock, [&] { return job->done.load() >= job->n; });
  }

 private:
  // After a job a worker polls for the next one for a short while before it sleeps: waking a
  // sleeping thread costs tens of microseconds here, as long as a whole small kernel, and
  // kernels often come back to back (a BiFPN, a network's blocks). It yields while it polls,
  // so a runnable thread (torch's own workers) gets the core first.
  void loop() {
    uint64_t seen = 0;
    for (;;) {
      const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(spin_us_);
      while (generation_.load(std::memory_order_acquire) == seen && std::chrono::steady_clock::now() < until)
        std::this_thread::yield();
      std::shared_ptr<Job> job;
      {
        std::unique_lock<std::mutex> lock(mu_);
        wake_.wait(lock, [&] { return generation_.load(std::memory_order_relaxed) != seen; });
        seen = generation_.load(std::memory_order_relaxed);
        job = job_;
      }
      if (!job) continue;
      const int id = job->joined.fetch_add(1) + 1;
      if (id < job->workers) job->work(id);
    }
  }

  const int spin_us_ = spin_micros();
  std::mutex mu_;
  std::condition_variable wake_;
  std::shared_ptr<Job> job_;
  std::atomic<uint64_t> generation_{0};
  size_t threads_ = 0;
};

// The OpenMP runtime in use (null: the pool). Set from Python once; reset in a forked child.
using GompParallel = void (*)(void (*)(void*), void*, unsigned, unsigned);
using OmpThreadNum = int (*)();
struct OpenMP {
  std::atomic<GompParallel> parallel{nullptr};
  OmpThreadNum thread_num = nullptr;
  std::string path;
};
inline OpenMP& openmp() {
  static OpenMP* o = [] {
    pthread_atfork(nullptr, nullptr, [] { openmp().parallel.store(nullptr); });
    return new OpenMP();
  }();
  return *o;
}
inline void omp_entry(void* job) {
  auto* j = static_cast<Job*>(job);
  j->work(openmp().thread_num());
}

// The pool is never destroyed: its detached workers may outlive main().
//
// Fork safety: in a forked child only the forking thread exists. The pool's workers are gone,
// so the child forgets the pool and starts a new one on first use (the old object, whose
// mutexes a vanished worker may hold, is never touched again). The one lock the child does
// use, pool_mutex, is taken by the prepare handler and released on both sides, so a fork
// while another thread is inside pool() cannot leave it locked in the child.
inline Pool*& pool_ptr() {
  static Pool* p = nullptr;
  return p;
}
inline std::mutex& pool_mutex() {
  static std::mutex* mu = new std::mutex();  // never destroyed (atfork handlers use it)
  return *mu;
}
inline Pool& pool() {
  static const bool registered = [] {
    pthread_atfork([] { pool_mutex().lock(); }, [] { pool_mutex().unlock(); },
                   [] {
                     pool_ptr() = nullptr;
                     pool_mutex().unlock();
                   });
    return true;
  }();
  (void)registered;
  std::lock_guard<std::mutex> lock(pool_mutex());
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
  if (detail::GompParallel par = detail::openmp().parallel.load())
    par(&detail::omp_entry, job.get(), static_cast<unsigned>(workers), 0);  // returns when all are done
  else
    detail::pool().run(job);
  if (job->error) std::rethrow_exception(job->error);
}

// Runs parallel_for on the OpenMP runtime loaded from `path` (the library torch uses), or on the
// pool again for an empty path. Returns "" on success, else why not (the pool is kept).
inline std::string use_openmp_runtime(const std::string& path) {
  detail::OpenMP& o = detail::openmp();
  if (path.empty()) {
    o.parallel.store(nullptr);
    o.path.clear();
    return "";
  }
  void* lib = dlopen(path.c_str(), RTLD_LAZY | RTLD_NOLOAD);
  if (lib == nullptr) return path + " is not loaded in this process";
  auto par = reinterpret_cast<detail::GompParallel>(dlsym(lib, "GOMP_parallel"));
  auto num = reinterpret_cast<detail::OmpThreadNum>(dlsym(lib, "omp_get_thread_num"));
  if (par == nullptr || num == nullptr) return path + " has no GOMP_parallel / omp_get_thread_num";
  o.thread_num = num;
  o.path = path;
  o.parallel.store(par);
  return "";
}

inline std::string parallel_runtime() {
  const detail::OpenMP& o = detail::openmp();
  return o.parallel.load() != nullptr ? "openmp:" + o.path : "pool";
}

}  // namespace effops
