#include "cpu-threadpool.h"

#include <chrono>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace mq {

// how long an idle thread spins before it blocks (microseconds): long enough to cover the gap between two ops
// of one decode step, short enough not to steal a shared core for long
static constexpr int64_t SPIN_US = 200;
// chunks per thread: small chunks keep the work a descheduled thread holds up small
static constexpr int32_t CHUNKS_PER_THREAD = 4;

static int64_t now_us() {
    return std::chrono::duration_cast<std::chrono::microseconds>(
               std::chrono::steady_clock::now().time_since_epoch())
        .count();
}

// One wait before blocking: step() pauses once and says whether the wait may go on; the clock is read every
// 16 steps only (a clock read costs as much as the pause it times).
class SpinWait {
public:
    SpinWait() : t0_(now_us()) {}
    bool step() {
#if defined(__x86_64__)
        _mm_pause();
#endif
        return ++n_ % 16 != 0 || now_us() - t0_ <= SPIN_US;
    }

private:
    int64_t t0_;
    int32_t n_ = 0;
};

ThreadPool::ThreadPool(int32_t n_threads)
    : n_threads_(n_threads < 1 ? 1 : n_threads), n_chunks_(n_threads_ * CHUNKS_PER_THREAD) {
    for (int32_t i = 1; i < n_threads_; i++) {
        threads_.emplace_back([this] { worker(); });
    }
}

ThreadPool::~ThreadPool() {
    {
        std::lock_guard<std::mutex> lock(mutex_);
        stop_.store(true);
    }
    wake_.notify_all();
    for (auto & t : threads_) {
        t.join();
    }
}

void ThreadPool::work_on(uint64_t gen) {
    for (;;) {
        uint64_t w = work_.load(std::memory_order_acquire);
        if ((w >> 32) != gen || (int32_t) (w & 0xFFFFFFFFu) >= n_chunks_) {
            return;  // another job by now, or nothing left to claim
        }
        if (!work_.compare_exchange_weak(w, w + 1, std::memory_order_acq_rel)) {
            continue;
        }
        // a claimed chunk of job `gen` is not done yet, so the caller has not moved on: job_ is still ours
        (*job_)((int32_t) (w & 0xFFFFFFFFu), n_chunks_);
        if (done_.fetch_add(1, std::memory_order_acq_rel) + 1 == n_chunks_) {
            std::lock_guard<std::mutex> lock(mutex_);
            finished_.notify_one();
        }
    }
}

void ThreadPool::run(const std::function<void(int32_t, int32_t)> & fn) {
    if (n_threads_ == 1) {
        fn(0, 1);
        return;
    }
    const uint64_t gen = (work_.load() >> 32) + 1;
    {
        std::lock_guard<std::mutex> lock(mutex_);
        job_ = &fn;
        done_.store(0);
        work_.store(gen << 32, std::memory_order_release);
    }
    wake_.notify_all();
    work_on(gen);
    SpinWait wait;
    while (done_.load(std::memory_order_acquire) != n_chunks_) {
        if (!wait.step()) {
            std::unique_lock<std::mutex> lock(mutex_);
            finished_.wait(lock, [this] { return done_.load() == n_chunks_; });
            break;
        }
    }
}

void ThreadPool::worker() {
    uint64_t seen = 0;
    for (;;) {
        SpinWait wait;
        while ((work_.load(std::memory_order_acquire) >> 32) == seen && !stop_.load()) {
            if (!wait.step()) {
                std::unique_lock<std::mutex> lock(mutex_);
                wake_.wait(lock, [this, seen] { return (work_.load() >> 32) != seen || stop_.load(); });
                break;
            }
        }
        if (stop_.load()) {
            return;
        }
        seen = work_.load(std::memory_order_acquire) >> 32;
        work_on(seen);
    }
}

}  // namespace mq
