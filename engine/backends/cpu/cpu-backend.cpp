// The CPU backend's object (memory, the thread pool) and its two tables: the ops, and the kernels of every
// scheme it runs. Adding an op or a scheme adds a line here and a file of its name (docs/architecture.md).
#include "cpu-backend.h"

#include "cpu-simd.h"

#include "../../src/mq-error.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>

namespace mq {

void split_range(int64_t n, int32_t ith, int32_t nth, int64_t & begin, int64_t & end) {
    int64_t per = (n + nth - 1) / nth;
    begin = std::min<int64_t>(n, per * ith);
    end = std::min<int64_t>(n, begin + per);
}

static const BackendOps & cpu_ops() {
    static const BackendOps ops = {
        cpu::embed,          // embed.cpp
        cpu::rmsnorm,        // rmsnorm.cpp
        cpu::rmsnorm_quant,  // quantize.cpp
        cpu::quantize_codes, // quantize.cpp
        cpu::rope,           // rope.cpp
        cpu::kv_store,       // kv-store.cpp
        cpu::attention,      // attention.cpp
        nullptr,             // attention_quant: attention() is exact (docs/numerics.md), its codes are rounded after
        cpu::swiglu,         // swiglu.cpp
        cpu::swiglu_quant,   // quantize.cpp
        cpu::linear_codes_swiglu_quant,  // linear-w4a4.cpp
        nullptr,             // sample: the host sampler (mq-sampling.cpp)
        nullptr,             // rope_kv_store: rope(), then kv_store()
    };
    return ops;
}

static const std::vector<LinearKernels> & cpu_schemes() {
    static const std::vector<LinearKernels> table = {
        cpu::linear_f16,     // linear-f16.cpp
        cpu::linear_w4a16g,  // linear-w4a16g.cpp
        cpu::linear_w4a4d,   // linear-w4a4.cpp
        cpu::linear_w4a4,    // linear-w4a4.cpp
        cpu::linear_w8a8,    // linear-int8.cpp
        cpu::linear_w4a8,    // linear-int8.cpp
        cpu::linear_w4a8g,   // linear-int8.cpp
        cpu::linear_w8a8s,   // linear-int8.cpp
    };
    return table;
}

BackendCpu::BackendCpu(int32_t n_threads) : Backend(cpu_ops(), cpu_schemes()), pool_(n_threads) {}

void * BackendCpu::alloc(size_t bytes) {
    void * p = nullptr;
    if (posix_memalign(&p, 64, std::max<size_t>(bytes, 64)) != 0) {
        throw Error("out of memory allocating " + std::to_string(bytes) + " bytes");
    }
    return p;
}

void BackendCpu::free(void * p) {
    std::free(p);
}

void BackendCpu::upload(void * dst, const void * src, size_t bytes) {
    memcpy(dst, src, bytes);
}

void BackendCpu::download(void * dst, const void * src, size_t bytes) {
    memcpy(dst, src, bytes);
}

void BackendCpu::run_row_blocks(int64_t n, const std::function<void(int64_t, int64_t)> & fn) {
    const int64_t block = 16, n_blocks = (n + block - 1) / block;
    pool_.run([&](int32_t ith, int32_t nth) {
        int64_t b, e;
        split_range(n_blocks, ith, nth, b, e);
        if (b < e) {
            fn(b * block, std::min(n, e * block));
        }
    });
}

void BackendCpu::run_rows(int64_t n_rows, const std::function<void(int32_t, int32_t)> & fn) {
    if (n_rows < 2) {
        fn(0, 1);
    } else {
        pool_.run(fn);
    }
}

std::unique_ptr<Backend> backend_cpu_create(int32_t n_threads) {
    cpu_kernels();  // picks the instruction set now, so a bad MERGEQUANT_CPU fails here, naming itself
    return std::unique_ptr<Backend>(new BackendCpu(n_threads));
}

}  // namespace mq
