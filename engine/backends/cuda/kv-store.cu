// Writes each token's k and v into the caches at its position (docs/numerics.md): fp16 (round to nearest
// even), or int8 codes clamp(rint(x · inv_c), -127, 127) with the per-channel inverse steps inv_c; grid
// (element blocks, tokens).
#include "kv-store.cuh"
#include "cuda-common.cuh"

#include <cuda_fp16.h>

namespace mq {

__device__ __forceinline__ void kv_encode(float x, const float *, int32_t, __half & out) {
    out = __float2half_rn(x);
}

// one fp32 multiply, then round half to even (NaN gives 0, as on the CPU backend) and clamp
__device__ __forceinline__ void kv_encode(float x, const float * inv, int32_t c, int8_t & out) {
    out = (int8_t) min(127, max(-127, __float2int_rn(__fmul_rn(x, inv[c]))));
}

template <typename T>
static __global__ void kv_store_kernel(const float * __restrict__ qkv, int32_t row_stride, int32_t q_dim, int32_t kv_dim,
                                       const int32_t * __restrict__ pos, const float * __restrict__ k_inv,
                                       const float * __restrict__ v_inv, T * __restrict__ kc, T * __restrict__ vc) {
    pdl_trigger();
    pdl_wait();  // launched with PDL: the inputs come from the kernel before
    const float * row = qkv + (size_t) blockIdx.y * row_stride + q_dim;
    const size_t base = (size_t) pos[blockIdx.y] * kv_dim;
    for (int32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < kv_dim; i += gridDim.x * blockDim.x) {
        kv_encode(row[i], k_inv, i, kc[base + i]);
        kv_encode(row[kv_dim + i], v_inv, i, vc[base + i]);
    }
}

void cuda_kv_store(const float * qkv, int32_t n_tokens, int32_t row_stride, int32_t q_dim, int32_t kv_dim,
                   const int32_t * pos, const float * k_inv, const float * v_inv, void * k_cache, void * v_cache,
                   cudaStream_t st) {
    if (n_tokens <= 0) return;
    const dim3 grid((unsigned) ceil_div(kv_dim, 256), n_tokens);
    if (k_inv) {
        launch_pdl(kv_store_kernel<int8_t>, grid, dim3(256), 0, st, "kv_store_kernel<int8>", qkv, row_stride, q_dim,
                   kv_dim, pos, k_inv, v_inv, (int8_t *) k_cache, (int8_t *) v_cache);
    } else {
        launch_pdl(kv_store_kernel<__half>, grid, dim3(256), 0, st, "kv_store_kernel<fp16>", qkv, row_stride, q_dim,
                   kv_dim, pos, k_inv, v_inv, (__half *) k_cache, (__half *) v_cache);
    }
}

}  // namespace mq
