// Shared helpers of the kernel lab: error checks, a deterministic RNG, a thread-parallel loop for the CPU
// references, timing through CUDA graphs, and the streaming-bandwidth ceiling measured in the same run.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <thread>
#include <vector>

#define CUDA_CHECK(call)                                                                                   \
    do {                                                                                                   \
        cudaError_t err_ = (call);                                                                         \
        if (err_ != cudaSuccess) {                                                                         \
            fprintf(stderr, "%s:%d: %s failed: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(err_)); \
            exit(1);                                                                                       \
        }                                                                                                  \
    } while (0)

// xorshift64*: the same stream on every machine
struct Rng {
    uint64_t s;
    explicit Rng(uint64_t seed) : s(seed * 0x9E3779B97F4A7C15ull + 1) {}
    uint32_t next() {
        s ^= s >> 12, s ^= s << 25, s ^= s >> 27;
        return (uint32_t) ((s * 0x2545F4914F6CDD1Dull) >> 32);
    }
    float uniform() { return (next() >> 8) * (1.0f / 16777216.0f); }  // [0, 1)
};

// fn(begin, end) over [0, n) split across the host's cores
inline void parallel_for(int64_t n, const std::function<void(int64_t, int64_t)> & fn) {
    int nth = std::max(1u, std::thread::hardware_concurrency());
    std::vector<std::thread> th;
    int64_t per = (n + nth - 1) / nth;
    for (int i = 0; i < nth; i++) {
        int64_t b = std::min(n, per * i), e = std::min(n, b + per);
        if (b < e) th.emplace_back(fn, b, e);
    }
    for (auto & t : th) t.join();
}

// Median time of one call in µs: `reps` calls (call i gets i, to rotate among input copies, and the stream
// to launch on) are captured
// in a CUDA graph so launch gaps shrink to what the engine's captured decode step will see; the graph
// is replayed `iters` times after a warm-up.
inline float time_us(const std::function<void(int, cudaStream_t)> & call, int reps = 20, int iters = 15) {
    cudaStream_t st;
    CUDA_CHECK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
    cudaGraph_t g;
    cudaGraphExec_t ge;
    CUDA_CHECK(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal));
    for (int i = 0; i < reps; i++) call(i, st);
    CUDA_CHECK(cudaStreamEndCapture(st, &g));
    CUDA_CHECK(cudaGraphInstantiate(&ge, g, 0));
    cudaEvent_t e0, e1;
    CUDA_CHECK(cudaEventCreate(&e0));
    CUDA_CHECK(cudaEventCreate(&e1));
    CUDA_CHECK(cudaGraphLaunch(ge, st));
    std::vector<float> t;
    for (int it = 0; it < iters; it++) {
        CUDA_CHECK(cudaEventRecord(e0, st));
        CUDA_CHECK(cudaGraphLaunch(ge, st));
        CUDA_CHECK(cudaEventRecord(e1, st));
        CUDA_CHECK(cudaEventSynchronize(e1));
        float ms;
        CUDA_CHECK(cudaEventElapsedTime(&ms, e0, e1));
        t.push_back(ms * 1000.0f / reps);
    }
    CUDA_CHECK(cudaGetLastError());
    CUDA_CHECK(cudaGraphExecDestroy(ge));
    CUDA_CHECK(cudaGraphDestroy(g));
    CUDA_CHECK(cudaEventDestroy(e0));
    CUDA_CHECK(cudaEventDestroy(e1));
    CUDA_CHECK(cudaStreamDestroy(st));
    std::sort(t.begin(), t.end());
    return t[t.size() / 2];
}

// Copies of one input so that consecutive timed calls read different memory: at least `min_total` bytes
// in all (more than the 50 MB L2), so no call finds its operands in cache.
inline int rotation_count(size_t bytes_per_call, size_t min_total = 256u << 20) {
    return (int) std::max<size_t>(2, (min_total + bytes_per_call - 1) / bytes_per_call);
}

__global__ void lab_read_kernel(const uint4 * __restrict__ p, size_t n, unsigned * out) {
    unsigned acc = 0;
    for (size_t i = blockIdx.x * (size_t) blockDim.x + threadIdx.x; i < n; i += (size_t) gridDim.x * blockDim.x) {
        uint4 v = __ldcs(p + i);
        acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
    if (acc == 0x12345678u) *out = acc;  // keeps the loads alive
}

// Streaming read ceiling (GB/s) over a 1 GiB buffer, and device-to-device copy (read + write bytes).
inline void measure_bandwidth(float & read_gbs, float & copy_gbs) {
    const size_t bytes = 1ull << 30;
    uint4 * a;
    uint4 * b;
    unsigned * sink;
    CUDA_CHECK(cudaMalloc(&a, bytes));
    CUDA_CHECK(cudaMalloc(&b, bytes));
    CUDA_CHECK(cudaMalloc(&sink, 4));
    CUDA_CHECK(cudaMemset(a, 1, bytes));
    int sms;
    CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    float us = time_us([&](int, cudaStream_t st) {
        lab_read_kernel<<<sms * 8, 512, 0, st>>>(a, bytes / 16, sink);
    }, 5, 9);
    read_gbs = bytes / us * 1e-3f;
    us = time_us([&](int, cudaStream_t st) {
        CUDA_CHECK(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice, st));
    }, 5, 9);
    copy_gbs = 2.0f * bytes / us * 1e-3f;
    CUDA_CHECK(cudaFree(a));
    CUDA_CHECK(cudaFree(b));
    CUDA_CHECK(cudaFree(sink));
}

inline void print_device() {
    cudaDeviceProp p;
    CUDA_CHECK(cudaGetDeviceProperties(&p, 0));
    printf("device: %s, sm_%d%d, %d SMs, L2 %d MB\n", p.name, p.major, p.minor, p.multiProcessorCount,
           p.l2CacheSize >> 20);
}
