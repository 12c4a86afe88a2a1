// Writes each token's k and v into the caches at its position (docs/numerics.md): fp16 (round to nearest
// even), or int8 codes clamp(rint(x · inv_c), -127, 127) with the per-channel inverse steps inv_c; grid
// (element blocks, tokens).
#include "kv-store.cuh"
#include "cuda-common.cuh"
#include "rope.cuh"

#include <cuda_fp16.h>

#include <algorithm>

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

// rope_kv_store: grid (head groups, tokens). Block x of a token rotates the q and k heads x, x + G, x + 2G, ..
// (G = gridDim.x): a thread takes pair i of one head in every group of heads it visits, so the float64 cos and
// sin of (position, i) are computed once per block and pair instead of once per head (at a 2048-token prefill
// of a 7B shape: 8 instead of 64 times); a k head's pair also writes its two rotated values to the cache. Then
// the block writes its share of v.
template <typename T>
static __global__ void rope_kv_store_kernel(float * __restrict__ qkv, int32_t row_stride, int32_t n_head, int32_t n_head_kv,
                                            int32_t head_dim, const int32_t * __restrict__ pos,
                                            const double * __restrict__ inv_freq, const float * __restrict__ k_inv,
                                            const float * __restrict__ v_inv, T * __restrict__ kc, T * __restrict__ vc) {
    pdl_trigger();
    pdl_wait();  // launched with PDL: the inputs come from the kernel before
    const int32_t half = head_dim / 2, nh = n_head + n_head_kv, kv_dim = n_head_kv * head_dim;
    float * row = qkv + (size_t) blockIdx.y * row_stride;
    const size_t base = (size_t) pos[blockIdx.y] * kv_dim;
    const double p = (double) pos[blockIdx.y];
    // threads side by side on pairs i, in lanes of `lanes` heads at a time (half <= 256: every pair at once)
    const int32_t lanes = half <= (int32_t) blockDim.x ? (int32_t) blockDim.x / half : 1;
    for (int32_t t = threadIdx.x; t < lanes * half; t += blockDim.x) {
        const int32_t i = t % half;
        float c, s;
        rope_cos_sin(p, inv_freq[i], c, s);
        for (int32_t h = blockIdx.x + (t / half) * gridDim.x; h < nh; h += lanes * gridDim.x) {
            float * v = row + (size_t) h * head_dim;
            float a = v[i], b = v[i + half];
            rope_apply(c, s, a, b);
            v[i] = a;
            v[i + half] = b;
            if (h >= n_head) {
                const int32_t ch = (h - n_head) * head_dim + i;
                kv_encode(a, k_inv, ch, kc[base + ch]);
                kv_encode(b, k_inv, ch + half, kc[base + ch + half]);
            }
        }
    }
    for (int32_t j = blockIdx.x * blockDim.x + threadIdx.x; j < kv_dim; j += gridDim.x * blockDim.x) {
        kv_encode(row[nh * head_dim + j], v_inv, j, vc[base + j]);
    }
}

void cuda_rope_kv_store(float * qkv, int32_t n_tokens, int32_t row_stride, int32_t n_head, int32_t n_head_kv,
                        int32_t head_dim, const int32_t * pos, const double * inv_freq, const float * k_inv,
                        const float * v_inv, void * k_cache, void * v_cache, cudaStream_t st) {
    if (n_tokens <= 0) return;
    // head groups: 8 at prefill sizes (the cos and sin computed 8 times a token), more at decode (one token: more
    // blocks to spread it over)
    const int32_t groups = std::min<int32_t>(n_head + n_head_kv, n_tokens >= 64 ? 8 : 32);
    const dim3 grid((unsigned) groups, n_tokens);
    if (k_inv) {
        launch_pdl(rope_kv_store_kernel<int8_t>, grid, dim3(256), 0, st, "rope_kv_store_kernel<int8>", qkv, row_stride,
                   n_head, n_head_kv, head_dim, pos, inv_freq, k_inv, v_inv, (int8_t *) k_cache, (int8_t *) v_cache);
    } else {
        launch_pdl(rope_kv_store_kernel<__half>, grid, dim3(256), 0, st, "rope_kv_store_kernel<fp16>", qkv, row_stride,
                   n_head, n_head_kv, head_dim, pos, inv_freq, k_inv, v_inv, (__half *) k_cache, (__half *) v_cache);
    }
}

}  // namespace mq
