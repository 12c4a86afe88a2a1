// Integer kernels of the CPU backend for the 4-bit schemes (docs/numerics.md): slot expansion, code
// rounding, and the int4 x int4 -> int32 GEMM over the file's packed layout.
#pragma once

#include <cstdint>

namespace mq {

// round half to even, then clamp
int32_t cpu_round_clamp(float x, int32_t lo, int32_t hi);

// input slots of a w4a4 linear from step-unit values z[K]: slot s with in_map[s] = (j, part, parts) gets
// floordiv(clamp(rint(z_j), -8·parts, 7·parts) + part, parts); j = -1 gives 0
void cpu_expand_slots(const float * z, const int32_t * in_map, int64_t kp, int8_t * a);

// codes = clamp(rint(x), -8, 7) for k values, zero up to kp
void cpu_round_codes(const float * x, int64_t k, int64_t kp, int8_t * a);

// Activations prepared for the GEMM: even and odd slots apart (they meet the low and high nibbles of the
// packed weights) and the row sum (the kernel works on w + 8, see cpu-quant.cpp).
struct CodesPrepared {
    int8_t * even;  // [m, kp/2]
    int8_t * odd;   // [m, kp/2]
    int32_t * sum;  // [m]
};
void cpu_codes_prepare(const int8_t * a, int64_t m, int64_t kp, CodesPrepared & out);

// acc[t, r] = Σ_k a[t, k] · q[r, k] (exact int32) for rows [r0, r1); qw packed [N, kp/2]; acc [m, n]
void cpu_gemm_w4a4(const uint8_t * qw, const CodesPrepared & a, int64_t m, int64_t kp, int64_t n, int64_t r0,
                   int64_t r1, int32_t * acc);

// y[t, r] = Σ_k x[t, k] · q[r, k] · s[r, k / group] for rows [r0, r1) (weight-only 4-bit, fp16 group scales)
void cpu_gemm_w4a16g(const uint8_t * qw, const uint16_t * scale, const float * x, float * y, int64_t m, int64_t n,
                     int64_t k, int64_t group, int64_t r0, int64_t r1, bool accumulate);

}  // namespace mq
