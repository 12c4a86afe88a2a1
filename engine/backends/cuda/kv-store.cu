// Writes each token's k and v into the fp16 caches at its position (round to nearest even); grid
// (element blocks, tokens).
#include "kv-store.cuh"
#include "cuda-common.cuh"

#include <cuda_fp16.h>

namespace mq {

static __global__ void kv_store_kernel(const float * __restrict__ qkv, int32_t row_stride, int32_t q_dim, int32_t kv_dim,
                                       const int32_t * __restrict__ pos, __half * __restrict__ kc,
                                       __half * __restrict__ vc) {
    pdl_trigger();
    pdl_wait();  // launched with PDL: the inputs come from the kernel before
    const float * row = qkv + (size_t) blockIdx.y * row_stride + q_dim;
    const size_t base = (size_t) pos[blockIdx.y] * kv_dim;
    for (int32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < kv_dim; i += gridDim.x * blockDim.x) {
        kc[base + i] = __float2half_rn(row[i]);
        vc[base + i] = __float2half_rn(row[kv_dim + i]);
    }
}

void cuda_kv_store(const float * qkv, int32_t n_tokens, int32_t row_stride, int32_t q_dim, int32_t kv_dim,
                   const int32_t * pos, void * k_cache, void * v_cache, cudaStream_t st) {
    if (n_tokens <= 0) return;
    launch_pdl(kv_store_kernel, dim3((unsigned) ceil_div(kv_dim, 256), n_tokens), dim3(256), 0, st, "kv_store_kernel",
               qkv, row_stride, q_dim, kv_dim, pos, (__half *) k_cache, (__half *) v_cache);
}

}  // namespace mq
