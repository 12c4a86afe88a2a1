// SIMD inner loops of the CPU backend.
#pragma once

#include <cstdint>

namespace mq {

struct RopeParams;

void cpu_f16_to_f32(const uint16_t * x, float * y, int64_t n);
// round to nearest even
void cpu_f32_to_f16(const float * x, uint16_t * y, int64_t n);
// int8 KV cache rows: y = float(x) * s (one fp32 multiply per value)
void cpu_i8_to_f32_scaled(const int8_t * x, const float * s, float * y, int64_t n);
// y = clamp(rint(x * inv), -127, 127) (fp32 multiply, round half to even; NaN gives 0)
void cpu_f32_to_i8_scaled(const float * x, const float * inv, int8_t * y, int64_t n);
float cpu_dot_f32(const float * a, const float * b, int64_t n);
// Σ a[i]·b[i] accumulated in float64 (each product of two fp32 values is exact there)
double cpu_dot_f64(const float * a, const float * b, int64_t n);
// y += a * x in float64
void cpu_axpy_f64(double a, const float * x, double * y, int64_t n);
// y[m, n] (+)= sum_k x[m, k] * w[n, k] for rows n in [n_begin, n_end); w fp16 [N, K] row-major
void cpu_gemm_f16(const uint16_t * w, const float * x, float * y, int64_t m, int64_t n, int64_t k, int64_t n_begin,
                  int64_t n_end, bool accumulate);
double rope_inv_freq(int32_t i, int32_t head_dim, const RopeParams & rp);

}  // namespace mq
