#pragma once
#include <cuda_runtime.h>
#include <cstdint>
namespace mq {
// y[m, n] (+)= (float(acc[m, n]) * scale[n]) * row_scale[m], acc = Σ_k a[m, k] · w[n, k] exact in int32
// (docs/numerics.md, "Dynamic int8 activations"), for int8 codes a [m, kp] (zeros past K) and the packed int4
// weights qweight [n, kp/2] of the model file: w = q (scheme w4a8, gscale == nullptr) or w = q · gscale[n, k /
// group] (w4a8g: gscale U8 [n, kp / group], group a multiple of 64). kp a positive multiple of 64, at most
// 131072. GEMV for m <= 16, the tiled GEMM of gemm-mma.cuh (FmtA8W4 / FmtA8W4G of mma.cuh) above.
void cuda_linear_w4a8(const void * qweight, const uint8_t * gscale, int64_t group, const float * scale,
                      const float * row_scale, int64_t n, int64_t kp, const int8_t * a, int32_t m, float * y,
                      bool accumulate, cudaStream_t st);
// The same from the fp32 input x [m, k] at decode sizes, in one launch: the GEMV's first m blocks quantize each row
// (per token, docs/numerics.md: the codes and step quantize_i8_kernel of linear-int8.cu would give) into the
// workspace q while the others prefetch their weights and then wait for them (grid_wait, cuda-common.cuh); bias (or
// nullptr) is added in its epilogue, y = v + bias[n] (accumulate: y + (v + bias[n])). Taken where
// cuda_linear_w4a8_takes_floats(m): 1 <= m <= W4A8_QUANT_MAX_M.
constexpr int32_t W4A8_QUANT_MAX_M = 4;
struct W4A8Quant {
    int8_t * codes = nullptr;  // [m, kp]
    float * step = nullptr;    // [m]
    unsigned * sync = nullptr;  // [2], zero between launches (the kernel leaves it so)
};
bool cuda_linear_w4a8_takes_floats(int32_t m);
void cuda_linear_w4a8_floats(const void * qweight, const uint8_t * gscale, int64_t group, const float * scale,
                             const float * bias, int64_t n, int64_t k, int64_t kp, int32_t qmax, const float * x,
                             int32_t m, const W4A8Quant & q, float * y, bool accumulate, cudaStream_t st);
}
