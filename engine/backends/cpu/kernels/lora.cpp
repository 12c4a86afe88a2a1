// The low-rank branch's two products. The first, l[t, i] = Σ_s A[i, s]·a[t, s] over a token's int4 codes, is exact
// in float64 (fp16 times int4), so any order gives the same l.
// The second, compiled once per instruction set (kernels.h): for rows r of a w4a4
// linear, out[r] = Σ_i l[i]·Bᵀ[i, r] in float64 (docs/numerics.md), summed in the order i = 0, 1, ... A block
// of rows keeps its sums in registers across the rank instead of reading and writing them once per i.
#include "kernels.h"

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

namespace mq::MQ_CPU_ISA {

void lora_rows(const double * l, int64_t rank, const float * bt, int64_t n, int64_t r0, int64_t r1, double * out) {
    int64_t r = r0;
#if defined(__AVX512F__)
    for (; r + 16 <= r1; r += 16) {
        __m512d a0 = _mm512_setzero_pd(), a1 = _mm512_setzero_pd();
        for (int64_t i = 0; i < rank; i++) {
            const __m512d li = _mm512_set1_pd(l[i]);
            const float * b = bt + i * n + r;
            a0 = _mm512_fmadd_pd(li, _mm512_cvtps_pd(_mm256_loadu_ps(b)), a0);
            a1 = _mm512_fmadd_pd(li, _mm512_cvtps_pd(_mm256_loadu_ps(b + 8)), a1);
        }
        _mm512_storeu_pd(out + (r - r0), a0);
        _mm512_storeu_pd(out + (r - r0) + 8, a1);
    }
#elif defined(__AVX2__) && defined(__FMA__)
    for (; r + 8 <= r1; r += 8) {
        __m256d a0 = _mm256_setzero_pd(), a1 = _mm256_setzero_pd();
        for (int64_t i = 0; i < rank; i++) {
            const __m256d li = _mm256_set1_pd(l[i]);
            const float * b = bt + i * n + r;
            a0 = _mm256_fmadd_pd(li, _mm256_cvtps_pd(_mm_loadu_ps(b)), a0);
            a1 = _mm256_fmadd_pd(li, _mm256_cvtps_pd(_mm_loadu_ps(b + 4)), a1);
        }
        _mm256_storeu_pd(out + (r - r0), a0);
        _mm256_storeu_pd(out + (r - r0) + 4, a1);
    }
#endif
    for (; r < r1; r++) {
        double acc = 0.0;
        for (int64_t i = 0; i < rank; i++) {
            acc += l[i] * (double) bt[i * n + r];
        }
        out[r - r0] = acc;
    }
}

#if defined(__AVX512F__)
// l for U tokens (their codes widened to float64 in cd [U][kp]) and the ≤ 16 ranks [rb, rb + width) (RV vectors of
// 8, masks m[]): Σ over s of Aᵀ[s, i] · a[t, s], one fma per token and vector at each s, the row of Aᵀ shared
template <int U, int RV>
static void first_block(const float * at, const double * cd, int64_t kp, int64_t rank, int64_t rb, const __mmask8 * m,
                        double * l) {
    __m512d acc[U][RV];
#pragma GCC unroll 8
    for (int u = 0; u < U; u++) {
#pragma GCC unroll 2
        for (int r = 0; r < RV; r++) {
            acc[u][r] = _mm512_setzero_pd();
        }
    }
    for (int64_t s = 0; s < kp; s++) {
        __m512d w[RV];
#pragma GCC unroll 2
        for (int r = 0; r < RV; r++) {
            w[r] = _mm512_cvtps_pd(_mm256_maskz_loadu_ps(m[r], at + s * rank + rb + 8 * r));
        }
#pragma GCC unroll 8
        for (int u = 0; u < U; u++) {
            const __m512d c = _mm512_set1_pd(cd[u * kp + s]);
#pragma GCC unroll 2
            for (int r = 0; r < RV; r++) {
                acc[u][r] = _mm512_fmadd_pd(c, w[r], acc[u][r]);
            }
        }
    }
    for (int u = 0; u < U; u++) {
        for (int r = 0; r < RV; r++) {
            _mm512_mask_storeu_pd(l + u * rank + rb + 8 * r, m[r], acc[u][r]);
        }
    }
}

typedef void (*FirstBlock)(const float *, const double *, int64_t, int64_t, int64_t, const __mmask8 *, double *);
template <int RV>
static FirstBlock first_block_for(int64_t u) {
    switch (u) {
    case 1: return first_block<1, RV>;
    case 2: return first_block<2, RV>;
    case 3: return first_block<3, RV>;
    case 4: return first_block<4, RV>;
    case 5: return first_block<5, RV>;
    case 6: return first_block<6, RV>;
    case 7: return first_block<7, RV>;
    default: return first_block<8, RV>;
    }
}
#endif

void lora_first(const float * at, const int8_t * codes, int64_t kp, int64_t rank, int64_t t0, int64_t t1, double * l) {
#if defined(__AVX512F__)
    // blocks of 8 tokens, their codes widened once; ranks 16 at a time
    double * cd = new double[8 * kp];  // plain new[]: no std template instantiated here (kernels.h)
    for (int64_t tb = t0; tb < t1; tb += 8) {
        const int64_t nt = t1 - tb < 8 ? t1 - tb : 8;
        for (int64_t u = 0; u < nt; u++) {
            for (int64_t s = 0; s < kp; s++) {
                cd[u * kp + s] = (double) codes[(tb + u) * kp + s];
            }
        }
        for (int64_t rb = 0; rb < rank; rb += 16) {
            const int64_t width = rank - rb < 16 ? rank - rb : 16;
            const __mmask8 m[2] = {(__mmask8) (width >= 8 ? 0xFF : (1u << width) - 1),
                                   (__mmask8) (width >= 16 ? 0xFF : width > 8 ? (1u << (width - 8)) - 1 : 0)};
            (width > 8 ? first_block_for<2>(nt) : first_block_for<1>(nt))(at, cd, kp, rank, rb, m, l + tb * rank);
        }
    }
    delete[] cd;
#else
    for (int64_t t = t0; t < t1; t++) {
        const int8_t * a = codes + t * kp;
        for (int64_t i = 0; i < rank; i++) {
            double s = 0.0;
            for (int64_t k = 0; k < kp; k++) {
                s += (double) at[k * rank + i] * (double) a[k];
            }
            l[t * rank + i] = s;
        }
    }
#endif
}

}  // namespace mq::MQ_CPU_ISA
