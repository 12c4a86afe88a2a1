// RoPE (Hugging Face rotate_half layout): angle = pos · inv_freq_i in float64, cos and sin rounded to fp32,
// x'[i] = x[i]·c − x[i + hd/2]·s, x'[i + hd/2] = x[i + hd/2]·c + x[i]·s (docs/numerics.md).
#include "rope.cuh"
#include "cuda-common.cuh"

namespace mq {

// grid (pair blocks, tokens); a thread per (head, i < hd/2): a decode step spreads over many SMs
// (the float64 cos/sin are the costly part)
static __global__ void rope_kernel(float * __restrict__ qkv, int32_t row_stride, int32_t n_heads, int32_t head_dim,
                                   const int32_t * __restrict__ pos, const double * __restrict__ inv_freq) {
    pdl_trigger();
    pdl_wait();  // launched with PDL: the inputs come from the kernel before
    const int32_t half = head_dim / 2;
    float * row = qkv + (size_t) blockIdx.y * row_stride;
    const double p = (double) pos[blockIdx.y];
    for (int32_t idx = blockIdx.x * blockDim.x + threadIdx.x; idx < n_heads * half; idx += gridDim.x * blockDim.x) {
        const int32_t h = idx / half, i = idx % half;
        float * v = row + (size_t) h * head_dim;
        float a = v[i], b = v[i + half];
        rope_rotate(p, inv_freq[i], a, b);
        v[i] = a;
        v[i + half] = b;
    }
}

void cuda_rope(float * qkv, int32_t n_tokens, int32_t row_stride, int32_t n_head, int32_t n_head_kv, int32_t head_dim,
               const int32_t * pos, const double * inv_freq, cudaStream_t st) {
    if (n_tokens <= 0) return;
    const int32_t pairs = (n_head + n_head_kv) * (head_dim / 2);
    launch_pdl(rope_kernel, dim3((unsigned) ceil_div(pairs, 256), n_tokens), dim3(256), 0, st, "rope_kernel", qkv,
               row_stride, n_head + n_head_kv, head_dim, pos, inv_freq);
}

}  // namespace mq
