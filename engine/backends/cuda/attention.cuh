#pragma once
#include <cuda_runtime.h>
#include <cstddef>
#include <cstdint>
namespace mq {
// bytes of device workspace cuda_attention needs for this shape (0: none); it must be zero-filled once when
// allocated (the kernels leave it so) and may be shared by every launch that fits in it
size_t cuda_attention_workspace(int32_t n_tokens, int32_t n_head, int32_t head_dim, int32_t n_ctx);
// causal attention of each token t over cache rows [0, pos[t]]: out [n_tokens, n_head * head_dim] fp32;
// q is read from the qkv rows and rounded to fp16; head_dim a multiple of 8, at most 256; n_ctx: rows of
// the caches (the longest context a launch may see, which sizes the decode split). The caches hold fp16
// (k_scale, v_scale null) or int8 codes of value code · scale[c] (k_scale, v_scale: fp32 [n_head_kv * head_dim]).
void cuda_attention(const float * qkv, int32_t n_tokens, int32_t row_stride, int32_t n_head, int32_t n_head_kv,
                    int32_t head_dim, int32_t n_ctx, const int32_t * pos, const void * k_cache, const void * v_cache,
                    const float * k_scale, const float * v_scale, void * workspace, float * out, cudaStream_t st);
}
