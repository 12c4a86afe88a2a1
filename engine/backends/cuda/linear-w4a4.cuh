#pragma once
#include <cuda_runtime.h>
#include <cstdint>
namespace mq {
// y[m, n] (+)= (float(acc[m, n]) * scale[n] (+ add[m, n] when add != nullptr)) (* row_scale[m] when row_scale !=
// nullptr: the per-token step of w4a4d), acc = Σ_k a[m, k] · q[n, k] exact in int32 (docs/numerics.md, schemes
// w4a4 and w4a4d). a: packed int4 codes [m, kp/2], qweight: packed int4 [n, kp/2], both as in the model file
// (two per byte, even k in the low nibble); kp % 64 == 0; scale, y fp32. codes8: a holds int8 codes [m, kp]
// instead (one per byte), taken for m <= W4A4_GEMV_MAX_M only.
// mma: the tensor-core path (mma.cuh): I8 unpacks the int4 codes to int8 (sm_90, which has no INT4 tensor
// cores), S4 runs the native int4 MMA (sm_80/86/89; on sm_90 it is emulated and slow, kept for tests).
constexpr int32_t W4A4_GEMV_MAX_M = 16;
enum class W4A4Mma { I8, S4 };
// down_proj's input codes, written by the gate/up GEMV's epilogue (cuda_linear_w4a4_swiglu): channel j of the
// SwiGLU output fills the slots slots[start[j]] .. slots[start[j+1] - 1], each (slot, part, parts, 0) of the
// consumer's in_map; parts 0 marks a padding slot (code 0). out: int8 codes [m, kp].
struct SwigluOut {
    const int32_t * start = nullptr;
    const int4 * slots = nullptr;
    int8_t * out = nullptr;
    int64_t kp = 0;
    int32_t n_ff = 0;
};
// The low-rank branch inside the decode GEMV (docs/numerics.md): lora[m, n] = f64(Σ_i b[n, i] · l[m, i]) with
// l[m, i] = Σ_s a[i, s] · codes[m, s] in float64, exact (fp16 times int4 codes: any order of the sum gives the
// same double). `rank` extra blocks at the front of the GEMV's grid compute l into `l` (one row each) and add
// one to sync[0] each; every GEMV block waits for its launch's `rank` rows before its epilogue. The counters
// only grow (no reset, no end-of-launch bookkeeping, no two blocks on one counter but sync[0]): sync[1 + s],
// s < ceil(n / 8), counts the launches of the linear; GEMV block b of a grid of G adds one to the slots b, b + G,
// b + 2G, .. (so every slot once a launch, whatever G) and reads the launch number e off slot b; launches of one
// linear never overlap (one stream), so e's rows are written when sync[0] ≥ (e + 1)·rank. rank 0: no branch.
struct LoraGemv {
    const void * a = nullptr;     // F16 [rank, kp], the file's lora_a
    const void * b = nullptr;     // F16 [n, rank], the file's lora_b
    double * l = nullptr;         // [W4A4_GEMV_MAX_M, rank] workspace
    unsigned long long * sync = nullptr;  // [1 + ceil(n / 8)]: rows written, launches (all zero at first)
    int32_t rank = 0;
};
// The low-rank branch in the prefill GEMM's epilogue (gemm-mma.cuh): lora[m, n] = f64(Σ_i b[n, i] · l[m, i]),
// i = 0, 1, .., added to float(acc) · scale as the GEMV does; l [m, rank] made before by cuda_lora_down
// (quantize.cuh). rank 0: none.
struct GemmLora {
    const void * b = nullptr;    // F16 [n, rank], the file's lora_b
    const double * l = nullptr;  // [m, rank]
    int32_t rank = 0;
};
// S4 below sm_90, I8 from sm_90; the environment variable MERGEQUANT_W4A4_MMA = s4 | i8 overrides
W4A4Mma cuda_w4a4_mma_default();
// lo: the low-rank branch fused into the GEMV (codes8 only, m <= W4A4_GEMV_MAX_M); gl: its up-projection in the
// GEMM's epilogue (m > W4A4_GEMV_MAX_M, l made before by cuda_lora_down; gemm-mma.cuh); add must then be null
void cuda_linear_w4a4(const void * qweight, const float * scale, const float * add, const float * row_scale, int64_t n,
                      int64_t kp, const void * a, bool codes8, int32_t m, float * y, bool accumulate, W4A4Mma mma,
                      cudaStream_t st, const LoraGemv & lo = LoraGemv(), const GemmLora & gl = GemmLora());
// y[m, n] (+)= (float(acc[m, n]) * scale[n]) * row_scale[m], acc = Σ_k a[m, k] · w[n, k] exact in int32, for int8
// codes a [m, k] and int8 weights w [n, k] (scheme w8a8, linear-int8.cu): this file's GEMV (m <= 16) and tiled
// GEMM with the FmtI8 fragments; k a positive multiple of 16 (16-byte rows), at most 131072
void cuda_linear_i8(const void * qweight, const float * scale, const float * row_scale, int64_t n, int64_t k,
                    const int8_t * a, int32_t m, float * y, bool accumulate, cudaStream_t st);
// the static W4A4 gate/up linear [2·n_ff rows: gate, then up] at decode sizes (m <= W4A4_GEMV_MAX_M, int8 codes
// in), fused with SwiGLU and the requantization to down_proj's codes: so.out = slots of swiglu(g, u) where
// g, u = float(acc) · scale (+ add); n_ff a multiple of 8
void cuda_linear_w4a4_swiglu(const void * qweight, const float * scale, const float * add, int64_t kp, const int8_t * codes,
                             int32_t m, const SwigluOut & so, W4A4Mma mma, cudaStream_t st, const LoraGemv & lo = LoraGemv());
}
