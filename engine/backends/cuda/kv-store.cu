// Writes each token's k and v into the caches at its position (docs/numerics.md): fp16 (round to nearest
// even), or int8 codes clamp(rint(x · inv_c), -127, 127) with the per-channel inverse steps inv_c; grid
// (element blocks, tokens).
#include "kv-store.cuh"
#include "cuda-common.cuh"
#include "rope.cuh"

#include <cuda_fp16.h>

namespace mq {

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

// rope_kv_store: grid (blocks of 256 work items, tokens); items [0, pairs) are the (head, i < hd/2) pairs of the q
// and k heads (rope_kernel's), a k head's pair also writes its two rotated values to the cache; items [pairs,
// pairs + kv_dim) write v
template <typename T>
static __global__ void rope_kv_store_kernel(float * __restrict__ qkv, int32_t row_stride, int32_t n_head, int32_t n_head_kv,
                                            int32_t head_dim, const int32_t * __restrict__ pos,
                                            const double * __restrict__ inv_freq, const float * __restrict__ k_inv,
                                            const float * __restrict__ v_inv, T * __restrict__ kc, T * __restrict__ vc) {
    pdl_trigger();
    pdl_wait();  // launched with PDL: the inputs come from the kernel before
    const int32_t half = head_dim / 2, pairs = (n_head + n_head_kv) * half, kv_dim = n_head_kv * head_dim;
    float * row = qkv + (size_t) blockIdx.y * row_stride;
    const size_t base = (size_t) pos[blockIdx.y] * kv_dim;
    for (int32_t idx = blockIdx.x * blockDim.x + threadIdx.x; idx < pairs + kv_dim; idx += gridDim.x * blockDim.x) {
        if (idx >= pairs) {
            const int32_t j = idx - pairs;
            kv_encode(row[(n_head + n_head_kv) * head_dim + j], v_inv, j, vc[base + j]);
            continue;
        }
        const int32_t h = idx / half, i = idx % half;
        float * v = row + (size_t) h * head_dim;
        float a = v[i], b = v[i + half];
        rope_rotate((double) pos[blockIdx.y], inv_freq[i], a, b);
        v[i] = a;
        v[i + half] = b;
        if (h >= n_head) {
            const int32_t c = (h - n_head) * head_dim + i;
            kv_encode(a, k_inv, c, kc[base + c]);
            kv_encode(b, k_inv, c + half, kc[base + c + half]);
        }
    }
}

void cuda_rope_kv_store(float * qkv, int32_t n_tokens, int32_t row_stride, int32_t n_head, int32_t n_head_kv,
                        int32_t head_dim, const int32_t * pos, const double * inv_freq, const float * k_inv,
                        const float * v_inv, void * k_cache, void * v_cache, cudaStream_t st) {
    if (n_tokens <= 0) return;
    const int32_t items = (n_head + n_head_kv) * (head_dim / 2) + n_head_kv * head_dim;
    const dim3 grid((unsigned) ceil_div(items, 256), n_tokens);
    if (k_inv) {
        launch_pdl(rope_kv_store_kernel<int8_t>, grid, dim3(256), 0, st, "rope_kv_store_kernel<int8>", qkv, row_stride,
                   n_head, n_head_kv, head_dim, pos, inv_freq, k_inv, v_inv, (int8_t *) k_cache, (int8_t *) v_cache);
    } else {
        launch_pdl(rope_kv_store_kernel<__half>, grid, dim3(256), 0, st, "rope_kv_store_kernel<fp16>", qkv, row_stride,
                   n_head, n_head_kv, head_dim, pos, inv_freq, k_inv, v_inv, (__half *) k_cache, (__half *) v_cache);
    }
}

}  // namespace mq
