#pragma once
#include <cuda_runtime.h>
#include <cstdint>
namespace mq {
// rotate the q and k heads of each qkv row in place (rotate_half layout); inv_freq [head_dim/2] float64
// on the device; pos [n_tokens] on the device
void cuda_rope(float * qkv, int32_t n_tokens, int32_t row_stride, int32_t n_head, int32_t n_head_kv, int32_t head_dim,
               const int32_t * pos, const double * inv_freq, cudaStream_t st);

// pair i of a head at position p: angle = p · inv_freq_i in float64, cos and sin rounded to fp32, each product
// rounded on its own (no fma contraction), as on the CPU and in the simulator; a = x[i], b = x[i + hd/2].
// rope_cos_sin and rope_apply are its two halves, for kernels that rotate many heads with one pair's cos and sin.
__device__ __forceinline__ void rope_cos_sin(double p, double inv_freq, float & c, float & s) {
    const double ang = p * inv_freq;
    c = (float) cos(ang), s = (float) sin(ang);
}
__device__ __forceinline__ void rope_apply(float c, float s, float & a, float & b) {
    const float a0 = a, b0 = b;
    a = __fsub_rn(__fmul_rn(a0, c), __fmul_rn(b0, s));
    b = __fadd_rn(__fmul_rn(b0, c), __fmul_rn(a0, s));
}
__device__ __forceinline__ void rope_rotate(double p, double inv_freq, float & a, float & b) {
    float c, s;
    rope_cos_sin(p, inv_freq, c, s);
    rope_apply(c, s, a, b);
}
}
