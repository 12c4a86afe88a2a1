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

void lora_first(const float * af, const int8_t * codes, int64_t kp, int64_t rank, int64_t t0, int64_t t1, double * l) {
    for (int64_t t = t0; t < t1; t++) {
        const int8_t * a = codes + t * kp;
        int64_t i = 0;
#if defined(__AVX512F__)
        // 16 ranks at a time: each 8 codes widened once, then one fma per rank
        for (; i + 16 <= rank; i += 16) {
            __m512d s[16];
            for (int j = 0; j < 16; j++) {
                s[j] = _mm512_setzero_pd();
            }
            for (int64_t k = 0; k < kp; k += 8) {
                const __m512d c = _mm512_cvtepi32_pd(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *) (a + k))));
                for (int j = 0; j < 16; j++) {
                    s[j] = _mm512_fmadd_pd(_mm512_cvtps_pd(_mm256_loadu_ps(af + (i + j) * kp + k)), c, s[j]);
                }
            }
            for (int j = 0; j < 16; j++) {
                l[t * rank + i + j] = _mm512_reduce_add_pd(s[j]);
            }
        }
#endif
        for (; i < rank; i++) {
            double s = 0.0;
            for (int64_t k = 0; k < kp; k++) {
                s += (double) af[i * kp + k] * (double) a[k];
            }
            l[t * rank + i] = s;
        }
    }
}

}  // namespace mq::MQ_CPU_ISA
