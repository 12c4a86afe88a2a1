// The CPU backend's code-level helpers for the 4-bit schemes (docs/numerics.md): rounding, slot expansion and
// the activations' layout for the int4 GEMM (the GEMM itself: kernels/gemm-int4.cpp, through cpu-simd.h).
#pragma once

#include "cpu-simd.h"

#include <cstdint>

namespace mq {

// round half to even, then clamp (NaN gives 0), for bounds |lo|, |hi| < 2^22: the same as clamping first (the
// bounds are integers and rint is monotonic), and a clamped x rounds exactly by adding and subtracting
// 1.5·2^23 in fp32 (the sum's ulp is 1, so the default rounding mode rounds x half to even), without the
// library call that std::nearbyint is for the baseline instruction set
inline int32_t cpu_round_clamp(float x, int32_t lo, int32_t hi) {
    if (!(x >= (float) lo)) {  // also catches NaN
        return x != x ? 0 : lo;
    }
    if (x > (float) hi) {
        return hi;
    }
    const float magic = 12582912.0f;  // 1.5 · 2^23
    return (int32_t) ((x + magic) - magic);
}

// input slots of a w4a4 linear from step-unit values z[K]: slot s with in_map[s] = (j, part, parts) gets
// floordiv(clamp(rint(z_j), -8·parts, 7·parts) + part, parts); j = -1 gives 0
void cpu_expand_slots(const float * z, const int32_t * in_map, int64_t kp, int8_t * a);

// codes = clamp(rint(x), -8, 7) for k values, zero up to kp
void cpu_round_codes(const float * x, int64_t k, int64_t kp, int8_t * a);

// codes a [m, kp] -> even and odd slots and row sums, the int4 GEMM's operand (CodesPrepared, cpu-simd.h)
void cpu_codes_prepare(const int8_t * a, int64_t m, int64_t kp, CodesPrepared & out);

}  // namespace mq
