#pragma once
#include <cuda_runtime.h>
#include <cstddef>
#include <cstdint>
namespace mq {
// scratch bytes cuda_linear_w4a16g needs for m tokens of an [n, k] weight
size_t cuda_linear_w4a16g_scratch(int32_t m, int64_t n, int64_t k);
// y[m, n] (+)= Σ_k x[m, k] · q[n, k] · scale[n, k / group] (docs/numerics.md, scheme w4a16g); qweight packed int4
// [n, k/2] as in the model file, scale fp16 [n, k/group], k % 64 == 0, group a multiple of 64; x, y fp32
void cuda_linear_w4a16g(const void * qweight, const void * scale, int64_t n, int64_t k, int64_t group, const float * x,
                        int32_t m, float * y, bool accumulate, void * scratch, cudaStream_t st);
}
