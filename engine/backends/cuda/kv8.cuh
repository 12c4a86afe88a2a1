// Loads of 8 consecutive KV-cache elements (attention.cu, attention-quant.cu).
#pragma once

#include "mma.cuh"

#include <cuda_fp16.h>

#include <cstdint>

namespace mq {

// 8 consecutive cache elements in one load (16 bytes of fp16, 8 bytes of int8) and their values as fp32:
// the fp16 values, or the int8 codes (the caller applies the steps)
template <typename T> struct Kv8;
template <> struct Kv8<__half> {
    uint4 raw;
    __device__ __forceinline__ void load(const __half * p) { raw = ld_cached(p); }
    __device__ __forceinline__ void zero() { raw = make_uint4(0, 0, 0, 0); }
    __device__ __forceinline__ void widen(float f[8]) const {
        const __half2 * h = (const __half2 *) &raw;
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const float2 x = __half22float2(h[i]);
            f[2 * i] = x.x, f[2 * i + 1] = x.y;
        }
    }
};
template <> struct Kv8<int8_t> {
    uint2 raw;
    __device__ __forceinline__ void load(const int8_t * p) {
        asm volatile("ld.global.nc.v2.u32 {%0,%1}, [%2];\n" : "=r"(raw.x), "=r"(raw.y) : "l"(p));
    }
    __device__ __forceinline__ void zero() { raw = make_uint2(0, 0); }
    __device__ __forceinline__ void widen(float f[8]) const {
        const int8_t * b = (const int8_t *) &raw;
#pragma unroll
        for (int i = 0; i < 8; i++) f[i] = (float) b[i];
    }
};

}  // namespace mq
