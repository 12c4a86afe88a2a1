#pragma once
#include <cuda_runtime.h>
#include <cstdint>
namespace mq {
// k_cache[pos[t]] = fp16(k of token t), v_cache likewise; caches fp16 [n_ctx, n_head_kv * head_dim]
void cuda_kv_store(const float * qkv, int32_t n_tokens, int32_t row_stride, int32_t q_dim, int32_t kv_dim,
                   const int32_t * pos, void * k_cache, void * v_cache, cudaStream_t st);
}
