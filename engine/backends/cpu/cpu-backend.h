// The CPU backend: the reference implementation of every op, multithreaded, with SIMD inner loops picked at
// startup (cpu-simd.h). fp32 activations, fp32 accumulation, fp16 or int8 KV cache (docs/numerics.md).
// The backend object holds the thread pool; each op is a function in the file of its name (rmsnorm.cpp, ...),
// each scheme's kernels in linear-<scheme>.cpp, and cpu-backend.cpp lists them in the backend's two tables.
#pragma once

#include "cpu-threadpool.h"

#include "../../src/mq-backend.h"
#include "../../src/mq-file.h"

#include <cmath>
#include <functional>

namespace mq {

class BackendCpu : public Backend {
public:
    explicit BackendCpu(int32_t n_threads);

    std::string name() const override { return "cpu"; }
    void * alloc(size_t bytes) override;
    void free(void * p) override;
    void upload(void * dst, const void * src, size_t bytes) override;
    void download(void * dst, const void * src, size_t bytes) override;
    void synchronize() override {}

    ThreadPool & pool() { return pool_; }
    // rows of a linear split across threads in blocks of 16, so each thread streams its own weights once
    void run_row_blocks(int64_t n, const std::function<void(int64_t, int64_t)> & fn);
    // a job over rows (fn(ith, nth)); a single row is not worth waking the other threads for
    void run_rows(int64_t n_rows, const std::function<void(int32_t, int32_t)> & fn);

private:
    ThreadPool pool_;
};

inline BackendCpu & cpu_of(Backend & be) {
    return static_cast<BackendCpu &>(be);
}

// [begin, end) of chunk ith of nth over n items
void split_range(int64_t n, int32_t ith, int32_t nth, int64_t & begin, int64_t & end);

// The float values that feed a rounding to int4 are computed in float64 and rounded once to fp32, so they equal
// the simulator's bit for bit whatever the summation order (docs/numerics.md).
// r = 1 / sqrt(mean(x²) + eps), the RMSNorm factor of one row (rmsnorm.cpp)
float rms_factor(const float * x, int32_t dim, float eps);

// the ops of the CPU table, each in the file of its name
namespace cpu {
void embed(Backend &, const EmbedTable & table, const int32_t * ids, int32_t n, int32_t dim, float * out);
void rmsnorm(Backend &, const float * x, const float * w, int32_t n_rows, int32_t dim, float eps, float * out);
void rmsnorm_quant(Backend &, const float * x, const Linear & c, int32_t m, int32_t dim, float eps, int8_t * out);
void quantize_codes(Backend &, const float * x, int32_t m, int32_t k, const Linear & c, int8_t * out);
void swiglu_quant(Backend &, const float * gu, const Linear & c, int32_t m, int32_t n_ff, int8_t * out);
void rope(Backend &, float * qkv, int32_t n_tokens, int32_t row_stride, int32_t n_head, int32_t n_head_kv,
          int32_t head_dim, const int32_t * pos, const RopeParams & rp);
void kv_store(Backend &, const float * qkv, int32_t n_tokens, int32_t row_stride, const AttentionShape & s,
              const int32_t * pos, const KvScales & sc, void * k_cache, void * v_cache);
void attention(Backend &, const float * qkv, int32_t n_tokens, int32_t row_stride, const AttentionShape & s,
               const int32_t * pos, const KvScales & sc, const void * k_cache, const void * v_cache, float * out);
void swiglu(Backend &, const float * gu, int32_t m, int32_t n_ff, float * out);
void linear_codes_swiglu_quant(Backend &, const Linear & gate_up, const int8_t * a, int32_t m, const Linear & down,
                               int32_t n_ff, float * gu, int8_t * out);

// x [total] rounded to fp16 and widened back (exact), the input of the f16 and w4a16g linears
// (docs/numerics.md); a buffer of the calling thread, valid until its next call (linear-f16.cpp)
const float * round_to_f16(const float * x, int64_t total);

// the scheme table's entries, each in linear-<scheme>.cpp
extern const LinearKernels linear_f16, linear_w4a16g, linear_w4a4d, linear_w4a4;
// linear-int8.cpp: the dynamic int8-activation schemes
extern const LinearKernels linear_w8a8, linear_w4a8, linear_w4a8g, linear_w8a8s;
}  // namespace cpu

}  // namespace mq
