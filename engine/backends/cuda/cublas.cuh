#pragma once
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cstdint>
namespace mq {
// y[m, n] = Σ_k x[m, k] · w[n, k] + beta · y[m, n] through cuBLAS (fp16 operands, fp32 accumulation and output), w
// fp16 [n, k] and x fp16 [m, k] row-major. Returns false, doing nothing, where cuBLAS is not there: it is loaded
// at the first call (libcublas.so.13 or .12, or the file MERGEQUANT_CUBLAS_LIB names; MERGEQUANT_CUBLAS=0 never
// loads it), so the engine runs without it and the caller takes its own GEMM.
bool cuda_cublas_gemm_f16(const __half * w, int64_t n, int64_t k, const __half * x, int32_t m, float * y, float beta,
                          cudaStream_t st);
// c[m, n] = Σ_k x[m, k] · w[n, k] exact in int32 through cuBLAS's int8 kernels (CUBLAS_COMPUTE_32I), w int8 [n, k]
// and x int8 [m, k] row-major, c int32 row-major with row stride ldc. Returns cuBLAS's status (0: done), or -1
// where cuBLAS is not there (nothing done).
int cuda_cublas_gemm_i8(const int8_t * w, int64_t n, int64_t k, const int8_t * x, int32_t m, int32_t * c, int64_t ldc,
                        cudaStream_t st);
// whether cuBLAS was found (loading it at the first call)
bool cuda_cublas_available();
}
