#pragma once
#include <cuda_runtime.h>
#include <cstdint>
namespace mq {
// y[m, n] (+)= (float(acc[m, n]) * scale[n]) * row_scale[m], acc = Σ_k a[m, k] · w[n, k] exact in int32
// (docs/numerics.md, "Dynamic int8 activations"), for int8 codes a [m, kp] (zeros past K) and the packed int4
// weights qweight [n, kp/2] of the model file: w = q (scheme w4a8, gscale == nullptr) or w = q · gscale[n, k /
// group] (w4a8g: gscale U8 [n, kp / group], group a multiple of 64). kp a positive multiple of 64, at most
// 131072. GEMV for m <= 16, the tiled GEMM of gemm-mma.cuh (FmtA8W4 / FmtA8W4G of mma.cuh) above.
// bias (or nullptr; GEMV sizes only, m <= 16) is added in the epilogue as the CPU does: y = v + bias[n], accumulate
// y = y + (v + bias[n]).
void cuda_linear_w4a8(const void * qweight, const uint8_t * gscale, int64_t group, const float * scale,
                      const float * row_scale, const float * bias, int64_t n, int64_t kp, const int8_t * a, int32_t m,
                      float * y, bool accumulate, cudaStream_t st);
constexpr int32_t W4A8_GEMV_MAX_M = 16;
}
