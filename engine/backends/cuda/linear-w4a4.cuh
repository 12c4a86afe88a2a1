#pragma once
#include <cuda_runtime.h>
#include <cstdint>
namespace mq {
// y[m, n] (+)= float(acc[m, n]) * scale[n] (+ add[m, n] when add != nullptr), acc = Σ_k a[m, k] · q[n, k] exact in int32 (docs/numerics.md,
// scheme w4a4). a: packed int4 codes [m, kp/2], qweight: packed int4 [n, kp/2], both as in the model file
// (two per byte, even k in the low nibble); kp % 64 == 0; scale, y fp32.
void cuda_linear_w4a4(const void * qweight, const float * scale, const float * add, int64_t n, int64_t kp, const void * a,
                      int32_t m, float * y, bool accumulate, cudaStream_t st);
}
