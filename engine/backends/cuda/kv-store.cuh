#pragma once
#include <cuda_runtime.h>
#include <cstdint>
namespace mq {
// k_cache[pos[t]] = k of token t, v_cache likewise; caches [n_ctx, n_head_kv * head_dim] of fp16 (k_inv and
// v_inv null) or of int8 codes clamp(rint(x · inv[c]), -127, 127) (k_inv, v_inv: fp32 [kv_dim], 1 / step)
void cuda_kv_store(const float * qkv, int32_t n_tokens, int32_t row_stride, int32_t q_dim, int32_t kv_dim,
                   const int32_t * pos, const float * k_inv, const float * v_inv, void * k_cache, void * v_cache,
                   cudaStream_t st);
}
