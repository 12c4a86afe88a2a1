#pragma once
#include <cuda_runtime.h>
#include <cstdint>
namespace mq {
// Producers of the static W4A4 input codes (docs/numerics.md, "Input slots"): int8 codes [m, kp], one per
// byte. in_map [kp, 3] = (source channel j or -1, part, parts) on the device.
// z_j = (x_j · r) · in_scale[j], r = 1 / sqrt(Σ x² / dim + eps), expanded into slots
void cuda_rmsnorm_quant(const float * x, const float * in_scale, const int32_t * in_map, int32_t m, int32_t dim,
                        int64_t kp, float eps, int8_t * out, cudaStream_t st);
// codes = clamp(rint(x), -8, 7) for the k channels of each row, 0 up to kp
void cuda_quantize_codes(const float * x, int32_t m, int32_t k, int64_t kp, int8_t * out, cudaStream_t st);
// z_j = silu(g_j) · u_j of rows [gate | up] (n_ff each), expanded into slots
void cuda_swiglu_quant(const float * gu, const int32_t * in_map, int32_t m, int32_t n_ff, int64_t kp, int8_t * out,
                       cudaStream_t st);
// w4a4d per-token dynamic quantization: step[t] = amax_t / 7, codes clamp(rint(x · (7 / amax_t)), -8, 7) for the
// k channels (0 up to kp; all 0 when amax_t = 0), written packed [m, kp/2] like cuda_pack_codes
void cuda_quantize_dynamic(const float * x, int32_t m, int32_t k, int64_t kp, uint8_t * packed, float * step,
                           cudaStream_t st);
// int8 codes [m, kp] -> packed int4 [m, kp/2], even k in the low nibble (the GEMM's operand layout)
void cuda_pack_codes(const int8_t * codes, int32_t m, int64_t kp, uint8_t * packed, cudaStream_t st);
// acc[t, n] = Σ_k a[t, k] · q[n, k], exact int32; a packed like q
void cuda_int_gemm(const void * qweight, int64_t n, int64_t kp, const uint8_t * a_packed, int32_t m, int32_t * acc,
                   cudaStream_t st);
// low-rank branch in float64: l[t, i] = Σ_s lora_a[i, s] · a[t, s]; out[t, n] = fp32(Σ_i lora_b[n, i] · l[t, i])
// its first half alone: l[t, i] = Σ_s lora_a[i, s] · a[t, s] (the GEMM adds the second in its epilogue, GemmLora)
void cuda_lora_down(const void * lora_a, int64_t rank, int64_t kp, const int8_t * codes, int32_t m, double * l,
                    cudaStream_t st);
void cuda_lora(const void * lora_a, const void * lora_b, int64_t rank, int64_t n, int64_t kp, const int8_t * codes,
               int32_t m, double * l_scratch, float * out, cudaStream_t st);
}
