#pragma once
#include <cuda_runtime.h>
#include <cstdint>
namespace mq {
// causal attention of each token t over fp16 cache rows [0, pos[t]]: out [n_tokens, n_head * head_dim] fp32;
// q is read from the qkv rows and rounded to fp16; head_dim <= 256
void cuda_attention(const float * qkv, int32_t n_tokens, int32_t row_stride, int32_t n_head, int32_t n_head_kv,
                    int32_t head_dim, const int32_t * pos, const void * k_cache, const void * v_cache, float * out,
                    cudaStream_t st);
}
