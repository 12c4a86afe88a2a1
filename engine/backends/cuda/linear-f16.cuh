#pragma once
#include <cuda_runtime.h>
#include <cstddef>
#include <cstdint>
namespace mq {
// scratch bytes cuda_linear_f16 needs for m tokens of k inputs (0 for decode sizes)
size_t cuda_linear_f16_scratch(int32_t m, int64_t k);
// y[m, n] (+)= Σ_k float(fp16(x[m, k])) · float(w[n, k]) (docs/numerics.md); w fp16 [n, k] with k % 8 == 0, x and y fp32
void cuda_linear_f16(const void * w, int64_t n, int64_t k, const float * x, int32_t m, float * y, bool accumulate,
                     void * scratch, cudaStream_t st);
}
