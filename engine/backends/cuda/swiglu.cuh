#pragma once
#include <cuda_runtime.h>
#include <cstdint>
namespace mq {
// out[m, j] = silu(gu[m, j]) * gu[m, n_ff + j]
void cuda_swiglu(const float * gu, int32_t m, int32_t n_ff, float * out, cudaStream_t st);
}
