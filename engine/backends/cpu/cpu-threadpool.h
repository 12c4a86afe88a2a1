// A small fork-join pool for the CPU backend, built to degrade gracefully on a busy machine.
//
// A job is cut into more chunks than there are threads, and every thread (the caller included) claims
// chunks from one atomic counter. A thread that the OS has descheduled (another process on the same
// core) therefore holds up nothing it has not claimed: the running threads take the rest. Idle workers
// spin briefly (decode issues hundreds of short jobs per token) and then sleep on a condition variable,
// so they do not burn a shared core in spin barriers.
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
    // calls fn(chunk, n_chunks) for every chunk in [0, n_chunks) across the threads (the caller takes part)
    // and returns when all are done; n_chunks is a few per thread
    void run(const std::function<void(int32_t, int32_t)> & fn);

private:
    void worker();
    // claims and runs chunks of job `gen` until none is left
    void work_on(uint64_t gen);

    const int32_t n_threads_;
    const int32_t n_chunks_;
    std::vector<std::thread> threads_;
    const std::function<void(int32_t, int32_t)> * job_ = nullptr;
    // high 32 bits: the job's generation; low 32 bits: the next chunk to claim
    std::atomic<uint64_t> work_{0};
    std::atomic<int32_t> done_{0};
    std::atomic<bool> stop_{false};
    std::mutex mutex_;
    std::condition_variable wake_;
    std::condition_variable finished_;
};

}  // namespace mq
