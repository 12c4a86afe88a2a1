// SIMD inner loops of the CPU backend. They are compiled once per instruction set (kernels/, see kernels.h) and one
// set is picked once, at the first use, by the features of the CPU the process runs on: avx512 (AVX-512 F, BW, DQ,
// VL and VNNI), avx2 (AVX2, FMA, F16C) or scalar (portable C++). MERGEQUANT_CPU=avx512|avx2|scalar forces a set
// (tests run every path this way); asking for one the CPU lacks is an error. The integer results are the same on
// every path; fp32 sums differ in their order (docs/numerics.md).
#pragma once

#include <cstdint>

namespace mq {

// Activations prepared for the int4 GEMM: even and odd slots apart (they meet the low and high nibbles of the
// packed weights) and the row sum (the kernel works on w + 8, see kernels/gemm-int4.cpp).
struct CodesPrepared {
    int8_t * even;  // [m, kp/2]
    int8_t * odd;   // [m, kp/2]
    int32_t * sum;  // [m]
};

// int8 activation codes prepared for the int4-weight GEMM of w4a8/w4a8g: even and odd slots apart (as for the int4
// GEMM) and the sum of the codes of every group along K (the kernels work on q + 8, kernels/gemm-int8.cpp)
struct Int8Prepared {
    const int8_t * even;   // [m, kp/2]
    const int8_t * odd;    // [m, kp/2]
    const int32_t * gsum;  // [m, kp/group]
};

// The blocked form of the W4A4 GEMM for a block of tokens (kernels/gemm-int4.cpp, AVX-512 VNNI only): the file's
// packed weights [n, kp/2] and the codes a [m, kp] as they are, with the epilogue fused. The output columns go in
// units: a unit is 32 columns (rows 32q .. 32q + 32 of the weights), or with n_ff > 0 (SwiGLU) the 16 gate rows
// 16q .. 16q + 16 with the 16 up rows n_ff + 16q .. of the same channels. Each value takes the contract's fp32 steps
// in order (docs/numerics.md): v = float(acc) * scale[c], v += fp32(lora[t, c]), v *= step[t], then y = y + v (or
// y = v); with n_ff, z = f64(g / (1 + exp(-g)) * u) of the gate and up values into y [m, n_ff].
struct W4a4Tiles {
    const uint8_t * qw;     // [n, kp/2], two codes a byte, even k in the low nibble
    int64_t n, kp, m;
    const int8_t * a;       // [m, kp] codes in [-8, 7]
    const int32_t * a_sum;  // [m] Σ_k a[t, k]
    int32_t * acc;          // non-null: only the exact int32 acc [m, n] (no epilogue)
    const float * scale;    // [n]
    const double * l;       // [m, rank]: the low-rank branch's first product (or null: no branch)
    const float * bt;       // [rank, n]: Bᵀ of the branch
    int64_t rank;
    const float * step;     // [m] per-token step (w4a4d) or null
    float * y;              // [m, n], or [m, n_ff] with SwiGLU
    bool accumulate;
    int64_t n_ff;           // > 0: units of gate/up channels, SwiGLU into y
};

// The rows of one kv head in a layer's K and V caches: row j of K is at k + j·stride elements (fp16, or
// int8 codes read back as float(code) · k_step[d]).
struct KvRows {
    const void * k;
    const void * v;
    const float * k_step;  // int8 cache: the steps of this head's hd channels; null for fp16
    const float * v_step;
    int64_t stride;        // elements between rows (n_head_kv · hd)
    bool i8;
};

struct CpuKernels {
    const char * isa;  // "avx512", "avx2" or "scalar"
    void (*f16_to_f32)(const uint16_t * x, float * y, int64_t n);
    void (*f32_to_f16)(const float * x, uint16_t * y, int64_t n);
    void (*i8_to_f32_scaled)(const int8_t * x, const float * s, float * y, int64_t n);
    void (*f32_to_i8_scaled)(const float * x, const float * inv, int8_t * y, int64_t n);
    float (*dot_f32)(const float * a, const float * b, int64_t n);
    double (*dot_f64)(const float * a, const float * b, int64_t n);
    void (*axpy_f64)(double a, const float * x, double * y, int64_t n);
    void (*gemm_f16)(const uint16_t * w, const float * x, float * y, int64_t m, int64_t n, int64_t k, int64_t n_begin,
                     int64_t n_end, bool accumulate);
    void (*gemm_w4a4)(const uint8_t * qw, const CodesPrepared & a, int64_t m, int64_t kp, int64_t n, int64_t r0,
                      int64_t r1, int32_t * acc);
    void (*gemm_w4a16g)(const uint8_t * qw, const uint16_t * scale, const float * x, float * y, int64_t m, int64_t n,
                        int64_t k, int64_t group, int64_t r0, int64_t r1, bool accumulate);
    void (*attention_heads)(const float * q, int32_t g, int32_t hd, const KvRows & kv, int32_t n_kv, float * out);
    void (*lora_rows)(const double * l, int64_t rank, const float * bt, int64_t n, int64_t r0, int64_t r1,
                      double * out);
    // the dynamic int8-activation schemes (kernels/gemm-int8.cpp)
    float (*quant_row_i8)(const float * x, int64_t k, int64_t kp, int32_t qmax, int8_t * a);
    void (*gemm_w8a8)(const int8_t * w, const int32_t * wsum, const int8_t * a, int64_t ka, int64_t m, int64_t k,
                      int64_t n, int64_t r0, int64_t r1, int32_t * acc);
    void (*gemm_w4a8)(const uint8_t * qw, const uint8_t * gscale, int64_t group, const int32_t * wsum,
                      const Int8Prepared & a, int64_t m, int64_t kp, int64_t n, int64_t r0, int64_t r1, int32_t * acc);
    // attention of nq query tokens of one kv head (a prefill): token u's g query heads at q + u·q_stride (as
    // attention_heads takes them) over rows [0, n_kv[u]) of kv, out at out + u·out_stride; false where the head size
    // has no such kernel. Null where the set has none (attention_heads per token then).
    bool (*attention_tokens)(const float * q, int64_t q_stride, int32_t nq, const int32_t * n_kv, int32_t g, int32_t hd,
                             const KvRows & kv, float * out, int64_t out_stride);
    // a w4a4 linear's input slots from step-unit values (quantize.h, cpu_expand_slots)
    void (*expand_slots)(const float * z, const int32_t * in_map, int64_t kp, int8_t * a);
    // units [u0, u1) of the blocked W4A4 GEMM (W4a4Tiles); null where the set has none (the row kernels then)
    void (*gemm_w4a4_tiles)(const W4a4Tiles & g, int64_t u0, int64_t u1);
    // the low-rank branch's first product l[t, i] = Σ_s A[i, s]·a[t, s] in float64 (exact) for tokens [t0, t1), from
    // Aᵀ as fp32 [kp, rank]; l [m, rank]
    void (*lora_first)(const float * at, const int8_t * codes, int64_t kp, int64_t rank, int64_t t0, int64_t t1,
                       double * l);
    // SwiGLU of one row: out[j] = f64(g[j] / (1 + exp(-g[j])) * u[j]) (kernels/swiglu.cpp)
    void (*swiglu_row)(const float * g, const float * u, float * out, int64_t n);
};

// the set this process runs (chosen at the first call; throws mq::Error for a bad MERGEQUANT_CPU)
const CpuKernels & cpu_kernels();

// the wrappers the backend's ops call (not seen by the kernels' own translation units, kernels/kernels.h)
#ifndef MQ_CPU_ISA

inline void cpu_f16_to_f32(const uint16_t * x, float * y, int64_t n) {
    cpu_kernels().f16_to_f32(x, y, n);
}
// round to nearest even
inline void cpu_f32_to_f16(const float * x, uint16_t * y, int64_t n) {
    cpu_kernels().f32_to_f16(x, y, n);
}
// int8 KV cache rows: y = float(x) * s (one fp32 multiply per value)
inline void cpu_i8_to_f32_scaled(const int8_t * x, const float * s, float * y, int64_t n) {
    cpu_kernels().i8_to_f32_scaled(x, s, y, n);
}
// y = clamp(rint(x * inv), -127, 127) (fp32 multiply, round half to even; NaN gives 0)
inline void cpu_f32_to_i8_scaled(const float * x, const float * inv, int8_t * y, int64_t n) {
    cpu_kernels().f32_to_i8_scaled(x, inv, y, n);
}
inline float cpu_dot_f32(const float * a, const float * b, int64_t n) {
    return cpu_kernels().dot_f32(a, b, n);
}
// Σ a[i]·b[i] accumulated in float64 (each product of two fp32 values is exact there)
inline double cpu_dot_f64(const float * a, const float * b, int64_t n) {
    return cpu_kernels().dot_f64(a, b, n);
}
// y += a * x in float64
inline void cpu_axpy_f64(double a, const float * x, double * y, int64_t n) {
    cpu_kernels().axpy_f64(a, x, y, n);
}
// y[m, n] (+)= sum_k x[m, k] * w[n, k] for rows n in [n_begin, n_end); w fp16 [N, K] row-major
inline void cpu_gemm_f16(const uint16_t * w, const float * x, float * y, int64_t m, int64_t n, int64_t k,
                         int64_t n_begin, int64_t n_end, bool accumulate) {
    cpu_kernels().gemm_f16(w, x, y, m, n, k, n_begin, n_end, accumulate);
}
// acc[t, r] = Σ_k a[t, k] · q[r, k] (exact int32) for rows [r0, r1); qw packed [N, kp/2]; acc [m, n]
inline void cpu_gemm_w4a4(const uint8_t * qw, const CodesPrepared & a, int64_t m, int64_t kp, int64_t n, int64_t r0,
                          int64_t r1, int32_t * acc) {
    cpu_kernels().gemm_w4a4(qw, a, m, kp, n, r0, r1, acc);
}
// y[t, r] = Σ_k x[t, k] · q[r, k] · s[r, k / group] for rows [r0, r1) (weight-only 4-bit, fp16 group scales)
inline void cpu_gemm_w4a16g(const uint8_t * qw, const uint16_t * scale, const float * x, float * y, int64_t m,
                            int64_t n, int64_t k, int64_t group, int64_t r0, int64_t r1, bool accumulate) {
    cpu_kernels().gemm_w4a16g(qw, scale, x, y, m, n, k, group, r0, r1, accumulate);
}

// Attention of one query token over rows [0, n_kv) of one kv head, for the g query heads q [g, hd] that read it
// (fp32, already fp32(fp16(q)) · c): s_j = Σ_d q[d]·k_j[d], p_j = exp(s_j − max_j s_j),
// out[d] = fp32((Σ_j p_j·v_j[d]) / Σ_j p_j), s, p and the sums in float64 (docs/numerics.md). out [g, hd].
inline void cpu_attention_heads(const float * q, int32_t g, int32_t hd, const KvRows & kv, int32_t n_kv,
                                float * out) {
    cpu_kernels().attention_heads(q, g, hd, kv, n_kv, out);
}

// the low-rank branch for rows [r0, r1): out[r - r0] = Σ_i l[i]·bt[i·n + r] in float64, i = 0, 1, ... (bt: Bᵀ
// as fp32 [rank, n])
inline void cpu_lora_rows(const double * l, int64_t rank, const float * bt, int64_t n, int64_t r0, int64_t r1,
                          double * out) {
    cpu_kernels().lora_rows(l, rank, bt, n, r0, r1, out);
}

// one token's dynamic int8 codes: amax = max_i |x[i]|, a[i] = clamp(rint(x[i] * (qmax / amax)), -qmax, qmax)
// (fp32 division and multiply, round half to even) for i < k, 0 up to kp; returns amax (0: every code 0)
inline float cpu_quant_row_i8(const float * x, int64_t k, int64_t kp, int32_t qmax, int8_t * a) {
    return cpu_kernels().quant_row_i8(x, k, kp, qmax, a);
}
// w8a8: acc[t, r] = Σ_{i<k} a[t·ka + i] · w[r, i] (exact int32) for rows [r0, r1); w int8 [n, k]; a int8 [m, ka] with
// ka a multiple of 64 and zeros beyond k; wsum[r] = Σ_i w[r, i] (the AVX-512 path's offset)
inline void cpu_gemm_w8a8(const int8_t * w, const int32_t * wsum, const int8_t * a, int64_t ka, int64_t m, int64_t k,
                          int64_t n, int64_t r0, int64_t r1, int32_t * acc) {
    cpu_kernels().gemm_w8a8(w, wsum, a, ka, m, k, n, r0, r1, acc);
}
// w4a8 (gscale null: one group of kp) and w4a8g: acc[t, r] = Σ_k a[t, k] · q[r, k] · g[r, k / group] (exact int32)
// for rows [r0, r1); qw packed [n, kp/2]; group a multiple of 64 dividing kp; wsum[r] = Σ_k q[r, k] · g[r, k / group]
// (the AVX-512 path's offset)
inline void cpu_gemm_w4a8(const uint8_t * qw, const uint8_t * gscale, int64_t group, const int32_t * wsum,
                          const Int8Prepared & a, int64_t m, int64_t kp, int64_t n, int64_t r0, int64_t r1,
                          int32_t * acc) {
    cpu_kernels().gemm_w4a8(qw, gscale, group, wsum, a, m, kp, n, r0, r1, acc);
}

#endif

}  // namespace mq
