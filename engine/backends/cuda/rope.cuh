#pragma once
#include <cuda_runtime.h>
#include <cstdint>
namespace mq {
// rotate the q and k heads of each qkv row in place (rotate_half layout); inv_freq [head_dim/2] float64
// on the device; pos [n_tokens] on the device
void cuda_rope(float * qkv, int32_t n_tokens, int32_t row_stride, int32_t n_head, int32_t n_head_kv, int32_t head_dim,
               const int32_t * pos, const double * inv_freq, cudaStream_t st);
}
