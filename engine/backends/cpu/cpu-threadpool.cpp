#include "cpu-threadpool.h"

#include <chrono>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace mq {

// how long a thread spins for the next event before it blocks (microseconds): long enough to cover
// the gap between two ops of one decode step, short enough not to steal a shared core for long
static constexpr int64_t SPIN_US = 200;

static inline void cpu_relax() {
#if defined(__x86_64__)
    _mm_pause();
#endif
}

static int64_t now_us() {
    return std::chrono::duration_cast<std::chrono::microseconds>(
               std::chrono::steady_clock::now().time_since_epoch())
        .count();
}

ThreadPool::ThreadPool(int32_t n_threads) : n_threads_(n_threads < 1 ? 1 : n_threads) {
    for (int32_t i = 1; i < n_threads_; i++) {
        threads_.emplace_back([this, i] { worker(i); });
    }
}

ThreadPool::~ThreadPool() {
    {
        std::lock_guard<std::mutex> lock(mutex_);
        stop_.store(true);
        generation_.fetch_add(1);
    }
    wake_.notify_all();
    for (auto & t : threads_) {
        t.join();
    }
}

void ThreadPool::run(const std::function<void(int32_t, int32_t)> & fn) {
    if (n_threads_ == 1) {
        fn(0, 1);
        return;
    }
    {
        std::lock_guard<std::mutex> lock(mutex_);
        job_ = &fn;
        pending_.store(n_threads_ - 1);
        generation_.fetch_add(1, std::memory_order_release);
    }
    wake_.notify_all();
    fn(0, n_threads_);
    int64_t t0 = now_us();
    while (pending_.load(std::memory_order_acquire) != 0) {
        if (now_us() - t0 > SPIN_US) {
            std::unique_lock<std::mutex> lock(mutex_);
            done_.wait(lock, [this] { return pending_.load() == 0; });
            break;
        }
        cpu_relax();
    }
}

void ThreadPool::worker(int32_t ith) {
    uint64_t seen = 0;
    for (;;) {
        int64_t t0 = now_us();
        while (generation_.load(std::memory_order_acquire) == seen) {
            if (now_us() - t0 > SPIN_US) {
                std::unique_lock<std::mutex> lock(mutex_);
                wake_.wait(lock, [this, seen] { return generation_.load() != seen; });
                break;
            }
            cpu_relax();
        }
        const std::function<void(int32_t, int32_t)> * job;
        {
            std::lock_guard<std::mutex> lock(mutex_);
            seen = generation_.load();
            if (stop_.load()) {
                return;
            }
            job = job_;
        }
        (*job)(ith, n_threads_);
        if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
            std::lock_guard<std::mutex> lock(mutex_);
            done_.notify_one();
        }
    }
}

}  // namespace mq
