#pragma once
#include <cuda_runtime.h>
#include <cstddef>
#include <cstdint>
namespace mq {
// The attention output of a static W4A4 block rounded to o_proj's int4 codes, a[t, c] = clamp(rint(o[t, c]), -8, 7)
// for c < n_head·head_dim, 0 up to kp, with o the CPU backend's value (docs/numerics.md: float64 sums, one fp32
// rounding). `out` holds the fp32 attention of cuda_attention, within a few fp32 ulps of that value: a head with
// a channel whose o lies within CUDA_ATTN_EXACT_BAND·max(1, |o|) of a rounding boundary (x.5) is listed, and a
// block per listed head recomputes its attention in float64 from q and the caches as the CPU does (an int8 cache:
// k_scale/v_scale non-null, rows read as float(code) · s_c; else fp16). The
// codes then equal the CPU's wherever the fp32 error is below the band (about 400 fp32 ulps of o).
// The CUDA backend takes this path with MERGEQUANT_CUDA_EXACT_CODES=1; by default it keeps the fp32 attention's
// codes (faster: a recomputed head costs a float64 attention; equal to the CPU's within the tolerances).
constexpr float CUDA_ATTN_EXACT_BAND = 5e-5f;
// device workspace in bytes for m tokens of n_head heads (marks and a list of the heads to recompute); it
// must be zero-filled once when allocated (the kernels leave it so) and may be shared by every launch that fits
// (workspace_bytes: its whole size, which fixes its layout)
size_t cuda_attention_quant_workspace(int32_t m, int32_t n_head);
void cuda_attention_quant(const float * out, const float * qkv, int32_t m, int32_t row_stride, int32_t n_head,
                          int32_t n_head_kv, int32_t head_dim, const int32_t * pos, const void * k_cache,
                          const void * v_cache, const float * k_scale, const float * v_scale, int64_t kp, void * workspace,
                          size_t workspace_bytes, int8_t * codes, cudaStream_t st);
}
