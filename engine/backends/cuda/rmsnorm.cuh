#pragma once
#include <cuda_runtime.h>
#include <cstdint>
namespace mq {
// out = x / sqrt(mean(x²) + eps) * w, row by row
void cuda_rmsnorm(const float * x, const float * w, int32_t n_rows, int32_t dim, float eps, float * out, cudaStream_t st);
}
