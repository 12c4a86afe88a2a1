#pragma once
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cstdint>
namespace mq {
// a cache value: fp16 (round to nearest even), or the int8 code of channel c: one fp32 multiply by inv[c], then
// round half to even (NaN gives 0, as on the CPU backend) and clamp
__device__ __forceinline__ void kv_encode(float x, const float *, int32_t, __half & out) {
    out = __float2half_rn(x);
}
__device__ __forceinline__ void kv_encode(float x, const float * inv, int32_t c, int8_t & out) {
    out = (int8_t) min(127, max(-127, __float2int_rn(__fmul_rn(x, inv[c]))));
}

// k_cache[pos[t]] = k of token t, v_cache likewise; caches [n_ctx, n_head_kv * head_dim] of fp16 (k_inv and
// v_inv null) or of int8 codes clamp(rint(x · inv[c]), -127, 127) (k_inv, v_inv: fp32 [kv_dim], 1 / step)
void cuda_kv_store(const float * qkv, int32_t n_tokens, int32_t row_stride, int32_t q_dim, int32_t kv_dim,
                   const int32_t * pos, const float * k_inv, const float * v_inv, void * k_cache, void * v_cache,
                   cudaStream_t st);

// rope then kv_store in one launch (the decode step's two small kernels as one): q and k rotated in place as
// cuda_rope does, the rotated k and the v of each token written to the caches as cuda_kv_store does; the same
// values and bytes as the two launches
void cuda_rope_kv_store(float * qkv, int32_t n_tokens, int32_t row_stride, int32_t n_head, int32_t n_head_kv,
                        int32_t head_dim, const int32_t * pos, const double * inv_freq, const float * k_inv,
                        const float * v_inv, void * k_cache, void * v_cache, cudaStream_t st);
}
