// The prefill GEMM of the integer schemes (w4a4, w4a8, w4a8g, w8a8, w8a8s) on cuBLAS's int8 tensor-core kernels:
//   y[m][n] (+)= epilogue(float(Σ_k a[m][k] · w[n][k]) · scale[n] ...), a int8 codes [m][k], w int8 [n][k]
// The products are exact in int32 whichever kernel sums them, so this path gives the integers of the tiled
// GEMM of gemm-mma.cuh, and its epilogue (i8_epilogue_kernel) applies the same fp32 operations in the same order:
// the outputs are bit-identical to that GEMM's and to the CPU backend's (docs/numerics.md).
// Weights that are stored as packed int4 (w4a4, w4a8; w4a8g with its group scales) are widened to int8 in a work
// buffer first, a block of output columns at a time: w = q, or w = q · gscale[n, k / group] for w4a8g, which lies
// in [-128, 112] (docs/numerics.md), so one int8 GEMM over whole K gives w4a8g's integer too.
// cuBLAS is loaded at run time (cublas.cuh); where it is absent, or m is below MERGEQUANT_CUBLAS_I8_MIN_M (default
// 64), cuda_gemm_i8_cublas returns false and the caller runs its tiled GEMM.
#pragma once

#include "linear-w4a4.cuh"  // GemmLora

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace mq {

enum class I8Weights {
    I8,   // int8 [n][k] (w8a8, w8a8s)
    I4,   // packed int4 [n][k/2], even k in the low nibble (w4a4, w4a8)
    I4G,  // packed int4 times its U8 group scale gscale [n][k / group] (w4a8g)
};

// the operations after the integer sum, in this order (each optional):
//   v = float(acc) · scale[n]; v += fp32(Σ_i b[n, i] · l[m, i] in float64, i = 0, 1, ..) (lo.rank > 0) or
//   v += add[m, n]; v = v · row_scale[m]; v = v + bias[n]; y = accumulate ? y + v : v
struct I8Epilogue {
    const float * scale = nullptr;
    const float * add = nullptr;
    const float * row_scale = nullptr;
    const float * bias = nullptr;
    GemmLora lo;
    bool accumulate = false;
};

// the largest low-rank rank the epilogue stages in shared memory (larger ranks: compute the branch into `add`)
constexpr int32_t CUBLAS_I8_MAX_RANK = 64;
// the work buffer cuda_gemm_i8_cublas needs (widened weights and the int32 sums of one block of columns)
size_t cuda_cublas_i8_work_bytes(int32_t m, int64_t n, int64_t k, I8Weights fmt);
// whether cuBLAS will run the int8 GEMM at this m (the library loaded, m at or above the threshold)
bool cuda_cublas_i8_enabled(int32_t m);
// runs the GEMM and its epilogue into y [m][n]; false (nothing done) where cuda_cublas_i8_enabled(m) is false or
// cuBLAS declines the shape. k a positive multiple of 16 (of 64 for I4 and I4G); work at least
// cuda_cublas_i8_work_bytes(m, n, k, fmt) bytes, 256-byte aligned.
bool cuda_gemm_i8_cublas(const void * w, I8Weights fmt, const uint8_t * gscale, int64_t group, int64_t n, int64_t k,
                         const int8_t * a, int32_t m, const I8Epilogue & ep, float * y, void * work, size_t work_bytes,
                         cudaStream_t st);

}  // namespace mq
