// A small fork-join pool for the CPU backend. Workers spin briefly after a job (decode issues hundreds
// of short jobs per token) and then sleep on a condition variable, so a busy machine (another process
// on the same cores) degrades to blocking waits instead of burning the CPU in spin barriers.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace mq {

class ThreadPool {
public:
    explicit ThreadPool(int32_t n_threads);
    ~ThreadPool();
    ThreadPool(const ThreadPool &) = delete;
    ThreadPool & operator=(const ThreadPool &) = delete;

    int32_t size() const { return n_threads_; }
    // runs fn(ith, nth) on every thread (the caller is thread 0) and returns when all are done
    void run(const std::function<void(int32_t, int32_t)> & fn);

private:
    void worker(int32_t ith);

    int32_t n_threads_;
    std::vector<std::thread> threads_;
    const std::function<void(int32_t, int32_t)> * job_ = nullptr;
    std::atomic<uint64_t> generation_{0};
    std::atomic<int32_t> pending_{0};
    std::atomic<bool> stop_{false};
    std::mutex mutex_;
    std::condition_variable wake_;
    std::condition_variable done_;
};

}  // namespace mq
