// The low-rank branch's second product, compiled once per instruction set (kernels.h): for rows r of a w4a4
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

}  // namespace mq::MQ_CPU_ISA
